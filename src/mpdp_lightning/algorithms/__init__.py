"""The algorithms, each a LightningModule on the same parts: SAC (model-free), ModelBasedSAC (SAC
plus the world model as a phase), MBPO (SAC on branched model rollouts) and MPDP (H actor heads
trained through the world model)."""
