"""Progress on the env-step clock: env steps done of the budget, the latest evaluation return,
env steps per second and the time left (Lightning's batch count means nothing here).

In a terminal it is a tqdm bar redrawn in place; when output is not a terminal (a batch job's
log, a pipe) it prints a plain line every ``log_every_env_steps`` instead, so logs show progress
without a screenful of carriage returns.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from typing import Any, Optional

import lightning.pytorch as pl
from jsonargparse.typing import PositiveInt
from lightning.pytorch.callbacks.progress import ProgressBar
from tqdm import tqdm

from mpdp_lightning.training.callbacks.env_interaction import EnvInteraction
from mpdp_lightning.training.callbacks.evaluation import Evaluation


def find_callback(trainer: pl.Trainer, kind: type) -> Any:
    return next((cb for cb in trainer.callbacks if isinstance(cb, kind)), None)


def format_return(value: Any) -> str:
    """An eval return for a line: ``123.4``; a group's one per seed, ``123.4/98.7/150.2``; ``-`` none yet."""
    if value is None:
        return "-"
    if isinstance(value, (list, tuple)):
        return "/".join("-" if v is None or v == float("-inf") else f"{v:.1f}" for v in value)
    return f"{value:.1f}"


def format_duration(seconds: float) -> str:
    """3725 -> '1h02m', 125 -> '2m05s', 7.2 -> '7s'."""
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def _width() -> dict[str, Any]:
    """Follow the terminal's size; one that reports none (0 x 0, e.g. a bare pseudo-terminal)
    makes tqdm draw nothing at all, so it gets COLUMNS and LINES, or 100 x 24."""
    try:
        size = os.get_terminal_size(sys.stdout.fileno())
    except (OSError, ValueError):
        size = os.terminal_size((0, 0))
    if size.columns > 0 and size.lines > 0:
        return {"dynamic_ncols": True}
    fallback = shutil.get_terminal_size((100, 24))
    return {"ncols": fallback.columns, "nrows": fallback.lines}


class EnvStepProgressBar(ProgressBar):
    """Args:
    refresh_every_env_steps: env steps between two redraws of the bar in a terminal.
    log_every_env_steps: env steps between two plain progress lines when output is not a terminal.
    enabled: show progress (``--trainer.enable_progress_bar false`` switches it off too).
    """

    def __init__(
        self, refresh_every_env_steps: PositiveInt = 100, log_every_env_steps: PositiveInt = 1000, enabled: bool = True
    ) -> None:
        super().__init__()
        self.refresh_every_env_steps = refresh_every_env_steps
        self.log_every_env_steps = log_every_env_steps
        self._enabled = enabled
        self.bar: Optional[tqdm] = None
        self._start = (0, 0.0)  # env steps and time when this attempt's updates began
        self._last_shown = 0

    # ---- Lightning's ProgressBar interface ------------------------------------------------------
    @property
    def is_enabled(self) -> bool:
        return self._enabled

    @property
    def is_disabled(self) -> bool:
        return not self._enabled

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    # ---- hooks ----------------------------------------------------------------------------------
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # after the warm-up (random actions, in EnvInteraction.on_fit_start): the rate is the updates'
        self._start = (pl_module.env_steps, time.perf_counter())
        self._last_shown = pl_module.env_steps
        if self.is_disabled or not sys.stdout.isatty():
            return
        self.bar = tqdm(
            total=self._total(trainer), initial=pl_module.env_steps, desc="env steps", unit=" env steps",
            file=sys.stdout, smoothing=0.05, leave=True, **_width(),
        )
        self._show(trainer, pl_module.env_steps)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        steps = pl_module.env_steps
        every = self.refresh_every_env_steps if self.bar is not None else self.log_every_env_steps
        if self.is_enabled and steps // every > self._last_shown // every:
            self._show(trainer, steps)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.bar is not None:
            self._show(trainer, pl_module.env_steps)
        self._close()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._close()  # what follows (the summary, an error line) starts on a line of its own

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._close()

    # ---- drawing ----------------------------------------------------------------------------------
    def _total(self, trainer: pl.Trainer) -> Optional[int]:
        interaction = find_callback(trainer, EnvInteraction)
        return interaction.total_env_steps if interaction is not None else None

    def _latest_return(self, trainer: pl.Trainer) -> str:
        evaluation = find_callback(trainer, Evaluation)
        latest = evaluation.latest_return if evaluation is not None else None
        return format_return(latest)

    def _show(self, trainer: pl.Trainer, steps: int) -> None:
        self._last_shown = steps
        if self.bar is not None:
            self.bar.set_postfix_str(f"eval return {self._latest_return(trainer)}", refresh=False)
            self.bar.update(steps - self.bar.n)  # redraws
            return
        total = self._total(trainer)
        start_steps, start_time = self._start
        rate = (steps - start_steps) / max(time.perf_counter() - start_time, 1e-9)
        eta = format_duration((total - steps) / rate) if total and rate > 0 else "?"
        share = f" ({100 * steps / total:.0f}%)" if total else ""
        print(
            f"env steps {steps}/{total}{share} · eval return {self._latest_return(trainer)} · "
            f"{rate:.1f} env steps/s · ETA {eta}",
            flush=True,
        )

    def _close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
