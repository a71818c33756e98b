"""A progress bar on the env-step clock: env steps done of the budget, the latest evaluation
return and env steps per second (the batch count of Lightning's bar means nothing here)."""

from __future__ import annotations

import time
from typing import Any

import lightning.pytorch as pl
from jsonargparse.typing import PositiveInt
from lightning.pytorch.callbacks import TQDMProgressBar

from mpdp_lightning.callbacks.env_interaction import EnvInteraction
from mpdp_lightning.callbacks.evaluation import Evaluation


def find_callback(trainer: pl.Trainer, kind: type) -> Any:
    return next((cb for cb in trainer.callbacks if isinstance(cb, kind)), None)


class EnvStepProgressBar(TQDMProgressBar):
    """Args:
    refresh_every_env_steps: env steps between two redraws of the bar.
    enabled: show the bar (``--trainer.enable_progress_bar false`` switches it off too).
    """

    def __init__(self, refresh_every_env_steps: PositiveInt = 100, enabled: bool = True) -> None:
        super().__init__(refresh_rate=1, leave=True)
        if not enabled:
            self.disable()
        self.refresh_every_env_steps = refresh_every_env_steps
        self._last = (0, time.perf_counter())
        self._rate = 0.0

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *_: Any) -> None:
        interaction = find_callback(trainer, EnvInteraction)
        bar = self.train_progress_bar
        bar.reset(total=interaction.total_env_steps if interaction else None)
        bar.set_description("env steps")
        bar.unit = "step"
        bar.n = bar.initial = pl_module.env_steps
        self._last = (pl_module.env_steps, time.perf_counter())

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        steps = pl_module.env_steps
        last_steps, last_time = self._last
        if self.is_disabled or steps - last_steps < self.refresh_every_env_steps:
            return
        now = time.perf_counter()
        self._rate = (steps - last_steps) / max(now - last_time, 1e-9)
        self._last = (steps, now)
        self._redraw(trainer, steps)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.is_disabled:
            self._redraw(trainer, pl_module.env_steps)

    def _redraw(self, trainer: pl.Trainer, steps: int) -> None:
        evaluation = find_callback(trainer, Evaluation)
        latest = evaluation.latest_return if evaluation is not None else None
        bar = self.train_progress_bar
        bar.n = steps
        bar.set_postfix(
            {"eval_return": "-" if latest is None else f"{latest:.1f}", "env_steps/s": f"{self._rate:.0f}"},
            refresh=False,
        )
        bar.refresh()
