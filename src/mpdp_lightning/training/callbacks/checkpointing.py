"""EnvStepCheckpoint: a resumable checkpoint on the env-step clock, written atomically.

The checkpoint holds everything a run needs to go on as if it had not stopped: nets and
optimizers (Lightning), the env-step and update counters (the module), the replay buffer (the
datamodule), the callbacks' state, the MLflow run id and the RNG states. It is written to a
temporary file beside it, flushed to disk and renamed over ``last.ckpt``, so a crash during the
write leaves the previous checkpoint intact, and a kill leaves no temporary anywhere else (stale
ones beside the checkpoint are removed at the next start). Ctrl-C and SIGTERM stop at the next
update boundary and save first; a NaN or inf stops without saving, keeping the last good checkpoint.
"""

from __future__ import annotations

import os
import random
import signal
import sys
from pathlib import Path
from typing import Any, Optional

import lightning.pytorch as pl
import numpy as np
import torch
from jsonargparse.typing import PositiveInt
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.callbacks import Checkpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException
from tqdm import tqdm

from mpdp_lightning.training.clock import passed_multiple
from mpdp_lightning.errors import RunInterrupted
from mpdp_lightning.training.seed_runs import seed_position

LAST = "last.ckpt"


def temporary_prefix(path: Path) -> Path:
    """``<dir>/.<name>.tmp-``: the file being written is this plus the writer's pid."""
    return path.with_name(f".{path.name}.tmp-")


class LocalAtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer, but the temporary file lives beside the target.

    Lightning's default stages the bytes through an fsspec transaction whose temporary file is in
    $TMPDIR: a kill during a write leaves it there for good (21 MB after three kills). Here it is
    ``.<name>.tmp-<pid>`` in the checkpoint's folder, fsynced and renamed over the target.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Optional[Any] = None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(f"{temporary_prefix(path)}{os.getpid()}")
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)  # atomic on POSIX: readers see the old file or the new one
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def rng_states() -> dict[str, Any]:
    """torch, numpy and python RNG states in a form that loads with ``weights_only=True``."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    states = {
        "torch": torch.get_rng_state(),
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    n = states["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    random.setstate(tuple(x if not isinstance(x, list) else tuple(x) for x in states["python"]))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def default_checkpoint_dir(trainer: pl.Trainer) -> Path:
    """``<default_root_dir>/checkpoints/<MLflow run id, or logger version>``."""
    logger = trainer.logger
    run = getattr(logger, "run_id", None) or (str(logger.version) if logger is not None else "run")
    return Path(trainer.default_root_dir) / "checkpoints" / run


class EnvStepCheckpoint(Checkpoint):
    """Save ``last.ckpt`` at multiples of ``checkpoint_every`` env steps, at the end, and on
    Ctrl-C/SIGTERM.

    Args:
        checkpoint_every: env steps between checkpoints.
        dirpath: folder of ``last.ckpt``; None means ``<default_root_dir>/checkpoints/<run id>``.
    """

    def __init__(self, checkpoint_every: PositiveInt = 10_000, dirpath: Optional[str] = None) -> None:
        if checkpoint_every <= 0:
            raise ValueError(f"checkpoint_every must be positive, got {checkpoint_every}")
        self.checkpoint_every = checkpoint_every
        self.dirpath: Optional[Path] = Path(dirpath) if dirpath else None
        self.last_saved_step = 0
        self._stop_requested = False
        self._previous_sigint = None

    @property
    def path(self) -> Optional[Path]:
        return None if self.dirpath is None else self.dirpath / LAST

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.dirpath is None:
            self.dirpath = default_checkpoint_dir(trainer)
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:  # keep a user's own plugin
            trainer.strategy.checkpoint_io = LocalAtomicCheckpointIO()
        # what a process killed mid-write left behind (the last whole checkpoint is untouched)
        for stale in self.dirpath.glob(f"{temporary_prefix(self.path).name}*") if self.dirpath.is_dir() else ():
            stale.unlink(missing_ok=True)
        # from here on (the warm-up included), Ctrl-C stops at the next update boundary and saves
        self._stop_requested = False
        self._previous_sigint = signal.signal(signal.SIGINT, self._on_sigint)

    # ---- when to save ------------------------------------------------------------------------

    def _on_sigint(self, signum: int, frame: Any) -> None:
        if self._stop_requested:  # a second Ctrl-C aborts at once, without saving
            self._restore_sigint()
            raise RunInterrupted(signal.SIGINT, saved=False)
        self._stop_requested = True
        # tqdm.write prints above a progress bar instead of through it
        tqdm.write("Ctrl-C: stopping after this update and saving a checkpoint (Ctrl-C again: stop at once, without saving)",
                   file=sys.stderr)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._stop_requested:
            self.save(trainer, pl_module)
            self._restore_sigint()
            raise RunInterrupted(signal.SIGINT, saved=True)  # the CLI marks the run KILLED and exits 130
        if passed_multiple(self.last_saved_step, pl_module.env_steps, self.checkpoint_every):
            self.save(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.save(trainer, pl_module)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        # Lightning raises SIGTERMException at an update boundary, so the state is consistent.
        # Any other exception may have struck mid-update (or is a NaN): keep the last good file.
        if isinstance(exception, SIGTERMException):
            self.save(trainer, pl_module)
        self._restore_sigint()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._restore_sigint()

    def _restore_sigint(self) -> None:
        if self._previous_sigint is not None:
            signal.signal(signal.SIGINT, self._previous_sigint)
            self._previous_sigint = None

    # ---- how to save ---------------------------------------------------------------------------
    def save(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Path:
        pl_module.raise_if_not_finite(scan_parameters=True)  # a broken state never overwrites the last good one
        trainer.save_checkpoint(self.path, weights_only=False)  # through LocalAtomicCheckpointIO
        self.last_saved_step = pl_module.env_steps
        return self.path

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        checkpoint["rng_states"] = rng_states()
        checkpoint["mlflow_run_id"] = getattr(trainer.logger, "run_id", None)
        if getattr(pl_module, "seed_axis", None) is not None:  # a group: each seed's run, in the group's order
            runs = {seed_position(logger): getattr(logger, "run_id", None) for logger in trainer.loggers}
            checkpoint["mlflow_run_ids"] = [runs.get(position) for position in range(len(pl_module.seed_axis))]

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        if "rng_states" in checkpoint:
            set_rng_states(checkpoint["rng_states"])

    def state_dict(self) -> dict[str, Any]:
        return {"last_saved_step": self.last_saved_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.last_saved_step = int(state_dict["last_saved_step"])
