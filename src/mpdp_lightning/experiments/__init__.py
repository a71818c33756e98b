"""Tracking and comparison: what a run records in MLflow, sweeps on Ray Tune, the comparison over
seeds, its figures and the seed table."""
