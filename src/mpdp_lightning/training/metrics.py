"""Metrics kept on the device between logging points, and logged against env steps.

Reading a tensor on the host synchronises the device, so the update loop only adds detached
values into on-device sums; they are read (one transfer for all of them) every
``log_every_env_steps``. Every metric goes to every logger with ``step=env_steps``: the agent
steps its optimizers itself, so Lightning's ``global_step`` stays 0 and is not the clock.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Any, Iterator, Mapping

import lightning.pytorch as pl
import torch

from mpdp_lightning.training.seed_runs import STOPPED, for_logger, seed_position


class MetricAccumulator:
    """Running means of scalar tensors, summed on their device: one stack and one add per call.
    A group of seeds' metrics are [seeds] tensors (all of one call the same shape): their means
    come out per seed, as lists."""

    def __init__(self) -> None:
        self._sums: dict[tuple[str, ...], torch.Tensor] = {}
        self._counts: dict[tuple[str, ...], int] = {}

    def accumulate(self, values: Mapping[str, torch.Tensor]) -> None:
        names = tuple(values)
        stacked = torch.stack([v.detach().float() for v in values.values()])
        if names in self._sums:
            self._sums[names] += stacked
            self._counts[names] += 1
        else:
            self._sums[names] = stacked
            self._counts[names] = 1

    def _flat_sums(self) -> dict[str, tuple[torch.Tensor, int]]:
        return {
            name: (sums[i], self._counts[names])
            for names, sums in self._sums.items()
            for i, name in enumerate(names)
        }

    def pop_means(self) -> dict[str, Any]:
        """The means since the last call (one host transfer), and a fresh start: a float per
        name, or in a group a list with one per seed."""
        if not self._sums:
            return {}
        flat = self._flat_sums()
        values = torch.stack([total for total, _ in flat.values()]).tolist()
        means = {name: (value / count if isinstance(value, float) else [v / count for v in value])
                 for (name, (_, count)), value in zip(flat.items(), values)}
        self._sums.clear()
        self._counts.clear()
        return means


def log_metrics(trainer: pl.Trainer, metrics: Mapping[str, float], step: int) -> None:
    """Send ``metrics`` to every logger of ``trainer`` at ``step`` (the env-step clock). In a group
    of seeds, a per-seed list gives each seed's run its own entry (training/seed_runs.py)."""
    if not metrics or trainer.sanity_checking:
        return
    for logger in trainer.loggers:
        picked = for_logger(metrics, logger)
        if picked:
            logger.log_metrics(picked, step=step)


class PhaseTimer:
    """Seconds per phase, averaged per update between log points (``time/<phase>_seconds``).

    On the CPU, wall-clock time. On CUDA, the GPU's time: a pair of CUDA events recorded on the
    current stream around each phase, read at the next log point (``pop_means``, a host sync
    there, never in the update), so that a phase shows what its kernels cost on the device and a
    replayed CUDA graph what the replay costs, not the microseconds its launch takes on the host.
    Recording an event costs the host a few microseconds; the events are reused.
    """

    def __init__(self) -> None:
        self._seconds: dict[str, float] = {}
        self._updates = 0
        self._paused = False
        self._cuda = False
        self._pending: list[tuple[str, torch.cuda.Event, torch.cuda.Event]] = []  # recorded, not yet read
        self._free: list[torch.cuda.Event] = []

    def use_cuda_events(self, enabled: bool) -> None:
        """Time phases with CUDA events (the GPU's time) rather than the host's clock."""
        self._cuda = enabled

    def _event(self) -> "torch.cuda.Event":
        return self._free.pop() if self._free else torch.cuda.Event(enable_timing=True)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        if self._paused:
            yield
            return
        if self._cuda:
            start, end = self._event(), self._event()
            start.record()
            try:
                yield
            finally:
                end.record()
                self._pending.append((name, start, end))
            return
        began = time.perf_counter()
        try:
            yield
        finally:
            self._seconds[name] = self._seconds.get(name, 0.0) + time.perf_counter() - began

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Phases inside are not timed (a CUDA graph's update is timed whole: its phases run once,
        at capture)."""
        self._paused = True
        try:
            yield
        finally:
            self._paused = False

    def count_update(self) -> None:
        self._updates += 1

    def pop_means(self) -> dict[str, float]:
        if self._pending:
            self._pending[-1][2].synchronize()  # the last phase's end: all recorded work is done
            for name, start, end in self._pending:
                self._seconds[name] = self._seconds.get(name, 0.0) + start.elapsed_time(end) / 1e3
                self._free += (start, end)
            self._pending.clear()
        means = {f"time/{name}_seconds": total / max(self._updates, 1) for name, total in self._seconds.items()}
        self._seconds.clear()
        self._updates = 0
        return means


def log_json_artifact(trainer: pl.Trainer, data: Any, name: str, per_seed: bool = False) -> None:
    """Write ``data`` as the JSON artifact ``name`` of every MLflow run of ``trainer`` (overwriting);
    ``per_seed``: ``data`` is a group's list, each seed's run gets its own entry."""
    from lightning.pytorch.loggers import MLFlowLogger

    for logger in trainer.loggers:
        if isinstance(logger, MLFlowLogger) and not getattr(logger, STOPPED, False):
            logger.experiment.log_dict(logger.run_id, data[seed_position(logger)] if per_seed else data, name)
