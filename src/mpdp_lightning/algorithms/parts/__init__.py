"""The parts an agent is assembled from: its policy improvement, its model phase and where its
batches come from (algorithms/agent.py says which algorithm uses which)."""
