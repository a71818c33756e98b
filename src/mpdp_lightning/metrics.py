"""Metrics kept on the device between logging points, and logged against env steps.

Reading a tensor on the host synchronises the device, so the update loop only adds detached
values into on-device sums; they are read (one transfer for all of them) every
``log_every_env_steps``. Every metric goes to every logger with ``step=env_steps``: under manual
optimization Lightning's ``global_step`` counts optimizer steps and is not the clock.
"""

from __future__ import annotations

import math
from typing import Mapping

import lightning.pytorch as pl
import torch

from mpdp_lightning.errors import NonFiniteLossError


class MetricAccumulator:
    """Running means of scalar tensors, summed on their device."""

    def __init__(self) -> None:
        self._sums: dict[str, torch.Tensor] = {}
        self._counts: dict[str, int] = {}

    def add(self, values: Mapping[str, torch.Tensor]) -> None:
        for name, value in values.items():
            value = value.detach().float().mean()
            if name in self._sums:
                self._sums[name] += value
                self._counts[name] += 1
            else:
                self._sums[name] = value.clone()
                self._counts[name] = 1

    def pop_means(self) -> dict[str, float]:
        """The means since the last call (one host transfer), and a fresh start."""
        if not self._sums:
            return {}
        names = list(self._sums)
        sums = torch.stack([self._sums[n] for n in names]).tolist()
        means = {n: s / self._counts[n] for n, s in zip(names, sums)}
        self._sums.clear()
        self._counts.clear()
        return means

    def raise_if_not_finite(self, phases: Mapping[str, str], env_steps: int) -> None:
        """Check the pending sums of the loss metrics in ``phases`` (metric name -> phase)."""
        names = [n for n in phases if n in self._sums]
        if not names:
            return
        values = torch.stack([self._sums[n] for n in names]).tolist()
        for name, value in zip(names, values):
            if not math.isfinite(value):
                raise NonFiniteLossError(
                    f"the {phases[name]} loss ({name}) became {value} before env step {env_steps}; "
                    "the run stopped and its last good checkpoint is kept"
                )


def log_metrics(trainer: pl.Trainer, metrics: Mapping[str, float], step: int) -> None:
    """Send ``metrics`` to every logger of ``trainer`` at ``step`` (the env-step clock)."""
    if not metrics or trainer.sanity_checking:
        return
    for logger in trainer.loggers:
        logger.log_metrics(dict(metrics), step=step)
