"""The algorithms, each the one agent (agent.py) assembled from its parts (parts/): SAC
(model-free), ModelBasedSAC (SAC that fits the world model without using it), MBPO and MPDP.
How the update runs on a device is the execution plan (execution.py)."""
