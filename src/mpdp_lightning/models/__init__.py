"""The networks: the batched MLP block, the actor heads, twin critics and temperature, and the
probabilistic ensemble world model with its One-vs-Rest error."""
