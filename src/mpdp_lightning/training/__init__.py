"""The training loop around the algorithms: the replay data (real and model), the env-step clock,
the callbacks that act, evaluate, checkpoint and show progress, metrics and the NaN/inf guard."""
