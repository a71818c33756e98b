"""EnvStepRoutine: a callback whose work happens on the env-step clock (evaluation, videos)."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback

from mpdp_lightning.training.clock import passed_multiple


class EnvStepRoutine(Callback):
    """Runs ``run`` at every multiple of ``interval`` env steps (0: never in between), including
    when the warm-up ends on one, and once at the end of training unless the last run was at that
    env step. ``last_step`` (the env step of the last run, set by ``run``) belongs in the
    subclass's checkpoint state, so a resumed run neither repeats nor skips one."""

    last_step: int = 0

    @property
    def interval(self) -> int:
        raise NotImplementedError

    def run(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Any:
        raise NotImplementedError

    def _due(self, env_steps: int) -> bool:
        return self.interval > 0 and passed_multiple(self.last_step, env_steps, self.interval)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._due(pl_module.env_steps):  # the warm-up ended on a multiple: the untrained policy
            self.run(trainer, pl_module)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._due(pl_module.env_steps):
            self.run(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if pl_module.env_steps != self.last_step:
            self.run(trainer, pl_module)
