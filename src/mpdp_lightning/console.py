"""What a run says when it starts and when it ends: the one line that names it, and the summary
that tells how far it got, where its results are and how to resume it."""

from __future__ import annotations

import os
import shlex
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import lightning.pytorch as pl
from lightning.pytorch.loggers import MLFlowLogger

from mpdp_lightning.training.callbacks.checkpointing import EnvStepCheckpoint
from mpdp_lightning.training.callbacks.env_interaction import EnvInteraction
from mpdp_lightning.training.callbacks.evaluation import Evaluation
from mpdp_lightning.training.callbacks.progress import find_callback, format_duration, format_return
from mpdp_lightning.training.seed_runs import parse_seeds
from mpdp_lightning.training.tracking import algo_name

# The store `make ui` serves (the Makefile's ui target)
PROJECT_STORE = "sqlite:///mlflow.db"


@dataclass(frozen=True)
class Outcome:
    """How ``fit`` ended: ``signum`` None for a finished run; ``saved`` whether a checkpoint was
    written on the way out."""

    signum: Optional[int] = None
    saved: bool = True

    @property
    def interrupted(self) -> bool:
        return self.signum is not None

    @property
    def exit_code(self) -> int:
        return 0 if self.signum is None else 128 + self.signum  # as shells report a signal

    def describe(self) -> str:
        if self.signum is None:
            return "finished"
        return "interrupted by " + ("Ctrl-C (SIGINT)" if self.signum == signal.SIGINT else signal.Signals(self.signum).name)


def shown_path(path: str | os.PathLike) -> str:
    """``path`` relative to the working folder when it lies inside it (shorter, still exact)."""
    absolute = Path(path).absolute()
    try:
        return str(absolute.relative_to(Path.cwd()))
    except ValueError:
        return str(absolute)


def resume_command(argv: Sequence[str], checkpoint: str | os.PathLike) -> str:
    """The command line that continues this run: the same arguments with ``--ckpt_path``."""
    args, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--ckpt_path":
            skip = True
        elif not arg.startswith("--ckpt_path="):
            args.append(arg)
    return shlex.join([shown_path(sys.executable), "-m", "mpdp_lightning", *args, "--ckpt_path", shown_path(checkpoint)])


def mlflow_loggers(trainer: pl.Trainer) -> list[MLFlowLogger]:
    return [logger for logger in trainer.loggers if isinstance(logger, MLFlowLogger)]


def where_it_logs(logger: MLFlowLogger) -> str:
    uri = logger._tracking_uri
    in_project = Path("Makefile").is_file()  # `make ui` serves ./mlflow.db of the project folder
    if in_project and uri in (PROJECT_STORE, f"sqlite:///{Path.cwd() / 'mlflow.db'}"):
        how = "`make ui`, then http://127.0.0.1:5000"
    elif uri.startswith(("http://", "https://")):
        how = f"{uri.rstrip('/')}/#/experiments/{logger.experiment_id}/runs/{logger.run_id}"
    else:
        how = f"`mlflow ui --backend-store-uri {uri}`"
    return f"MLflow run {logger.run_id} (experiment '{logger._experiment_name}', {uri}); open it with {how}"


def start_line(trainer: pl.Trainer, config: dict, checkpoint: Optional[Path], resumed_from: Optional[int],
               plan: Optional[Any] = None) -> str:
    """One line naming the run, how its update runs (the execution plan), where it logs and where
    it checkpoints."""
    algo = algo_name(config)
    preset = f", {config['preset']} preset" if config.get("preset") else ""
    resumed = f", resumed at env step {resumed_from}" if resumed_from is not None else ""
    loggers = mlflow_loggers(trainer)
    logs = f"MLflow run {loggers[0].run_id} in {loggers[0]._tracking_uri}" if loggers else "no MLflow logger"
    if len(loggers) > 1:
        logs = f"MLflow runs {', '.join(lg.run_id for lg in loggers)} in {loggers[0]._tracking_uri}"
    seeds = parse_seeds(config.get("seeds"))
    seed = f"seed {config.get('seed_everything')}" if seeds is None else f"seeds {','.join(map(str, seeds))} (one group)"
    where = shown_path(checkpoint) if checkpoint is not None else "none"
    device = trainer.strategy.root_device.type
    if plan is not None:
        device = f"{device} ({plan.describe()})"
    return (
        f"{algo} on {config.get('task')}{preset}, {seed}, {device}{resumed} · "
        f"logs: {logs} · checkpoints: {where}"
    )


class RunClock:
    """Wall time and env steps of this attempt (a resumed run counts from where it resumed)."""

    def __init__(self, start_env_steps: int) -> None:
        self.start_env_steps = start_env_steps
        self.started = time.perf_counter()

    def seconds(self) -> float:
        return time.perf_counter() - self.started


def summary(trainer: pl.Trainer, module: pl.LightningModule, outcome: Outcome, clock: RunClock, argv: Sequence[str]) -> str:
    """The lines printed when a run ends or is interrupted."""
    interaction = find_callback(trainer, EnvInteraction)
    evaluation = find_callback(trainer, Evaluation)
    checkpointing = find_callback(trainer, EnvStepCheckpoint)
    steps = module.env_steps
    total = interaction.total_env_steps if interaction is not None else "?"
    seconds = clock.seconds()
    rate = (steps - clock.start_env_steps) / max(seconds, 1e-9)

    fmt = format_return

    lines = [
        f"run {outcome.describe()} at {steps} of {total} env steps · eval return last {fmt(getattr(evaluation, 'latest_return', None))}, "
        f"best {fmt(getattr(evaluation, 'best_return', None))} · {format_duration(seconds)} wall, {rate:.1f} env steps/s"
    ]
    lines += [where_it_logs(logger) + (", marked KILLED" if outcome.interrupted else "") for logger in mlflow_loggers(trainer)]
    path = checkpointing.path if checkpointing is not None else None
    if path is not None and path.is_file():
        if outcome.interrupted and outcome.saved:
            lines.append(f"saved: {shown_path(path)} at env step {checkpointing.last_saved_step}")
        elif outcome.interrupted:
            lines.append(f"not saved (stopped at once); the last checkpoint is {shown_path(path)} at env step {checkpointing.last_saved_step}")
        else:
            lines.append(f"checkpoint: {shown_path(path)}")
        if outcome.interrupted:
            lines.append(f"resume: {resume_command(argv, path)}")
        else:
            lines.append("train further: resume it with --ckpt_path and a larger --env_interaction.total_env_steps")
    elif outcome.interrupted:
        lines.append("no checkpoint was written before the interruption: nothing to resume")
    return "\n".join(lines)
