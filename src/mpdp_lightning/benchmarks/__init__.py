"""Benchmarks that are run and reported, not timed tests (see README, Benchmarks)."""
