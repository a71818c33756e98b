"""Small settings and probe callbacks for the end-to-end tests (importable as ``helpers.*``)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback

ROOT = Path(__file__).resolve().parents[1]

# A world model small and quick enough for end-to-end tests of the model-based algorithms
TINY_MODEL = ("--model.ensemble_size", "3", "--model.num_elites", "2", "--model.model_hidden", "32",
              "--model.model_layers", "2", "--model.model_train_every", "100", "--model.model_max_epochs", "2",
              "--env_interaction.updates_per_env_step", "2")


def tracking_uri() -> str:
    """The MLflow store of the current folder, as an absolute URI: MLflow caches a store per URI
    within a process, so a relative one would keep pointing at the first test's folder."""
    return f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def fit_args(task: str, total: int, *extra: str, algo: str = "sac") -> list[str]:
    """``mpdp fit`` arguments composing the real config files, shrunk to seconds of work."""
    return [
        "fit",
        "--config", str(ROOT / "conf/base.yaml"),
        "--config", str(ROOT / f"conf/algo/{algo}.yaml"),
        "--config", str(ROOT / f"conf/task/{task}.yaml"),
        "--env_interaction.total_env_steps", str(total),
        "--env_interaction.warmup_steps", "100",
        "--env_interaction.log_every_env_steps", "50",
        "--evaluation.eval_every", "100",
        "--evaluation.eval_episodes", "1",
        "--checkpoint.checkpoint_every", "100",
        "--data.batch_size", "32",
        "--model.hidden", "32",
        "--trainer.enable_progress_bar", "false",
        "--video.enabled", "false",  # tests/test_video.py switches it on
        "--trainer.logger.init_args.tracking_uri", tracking_uri(),
        *extra,
    ]


class SignalAt(Callback):
    """Sends ``signum`` to this process once the run reaches ``env_step`` env steps (only in a run
    that started below it, so the command that resumes the run does not interrupt it again)."""

    def __init__(self, env_step: int, signum: int = int(signal.SIGTERM)) -> None:
        self.env_step, self.signum, self.armed = env_step, signum, False

    def on_train_start(self, trainer, pl_module) -> None:
        self.armed = pl_module.env_steps < self.env_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.armed and pl_module.env_steps >= self.env_step:
            self.armed = False
            os.kill(os.getpid(), self.signum)


class PoisonAt(Callback):
    """Turns the weights of ``module`` (critic, actor, ...) into NaN after the update at ``env_step``:
    a stand-in for a diverging net (the actor's NaN shows in the next action)."""

    def __init__(self, env_step: int, module: str = "critic") -> None:
        self.env_step, self.module = env_step, module

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if pl_module.env_steps == self.env_step:
            with torch.no_grad():
                for p in getattr(pl_module, self.module).parameters():
                    p.fill_(float("nan"))


class RecordStartState(Callback):
    """Records what a (resumed) run starts from, at on_train_start, into a file for the test."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        optimizer_steps = [
            int(next(iter(opt.state.values()))["step"]) if opt.state else 0 for opt in trainer.optimizers
        ]
        torch.save(
            {
                "env_steps": pl_module.env_steps,
                "updates": pl_module.updates,
                "buffer": trainer.datamodule.contents().to("cpu"),
                "optimizer_steps": optimizer_steps,
                "actor": {k: v.clone() for k, v in pl_module.actor.state_dict().items()},
            },
            self.path,
        )


class PoisonTemperatureAt(Callback):
    """Gives log(alpha) a NaN gradient in the temperature update at ``env_step``: a diverging
    temperature, the first phase to produce a non-finite value."""

    def __init__(self, env_step: int) -> None:
        self.env_step, self.handle = env_step, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if pl_module.env_steps == self.env_step and self.handle is None:
            self.handle = pl_module.temperature.log_alpha.register_hook(lambda grad: grad * float("nan"))


class ActionSpy(Callback):
    """Writes to ``path`` how many actions the training env was given and how many were not finite."""

    def __init__(self, path: str) -> None:
        self.path, self.given, self.non_finite = path, 0, 0

    def on_train_start(self, trainer, pl_module) -> None:
        interaction = next(cb for cb in trainer.callbacks if type(cb).__name__ == "EnvInteraction")
        step = interaction.env.step

        def spied(action):
            self.given += 1
            self.non_finite += int(not np.isfinite(action).all())
            Path(self.path).write_text(f"{self.given} {self.non_finite}")
            return step(action)

        interaction.env.step = spied


class _KillOnPickle:
    def __reduce__(self):
        os.kill(os.getpid(), signal.SIGKILL)  # while torch.save is writing the checkpoint
        return (int, (0,))


class KillDuringCheckpointWrite(Callback):
    """SIGKILLs this process in the middle of writing the checkpoint at ``env_step``."""

    def __init__(self, env_step: int) -> None:
        self.env_step = env_step

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        if pl_module.env_steps == self.env_step:
            checkpoint["zz_kill"] = _KillOnPickle()


class RecordCapturable(Callback):
    """Writes to ``path`` the optimizers' ``capturable`` flags as the first update sees them."""

    def __init__(self, path: str) -> None:
        self.path, self.done = path, False

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if not self.done:
            self.done = True
            torch.save([g["capturable"] for opt in trainer.optimizers for g in opt.param_groups], self.path)


class SlowBoundaryAfterSigterm(Callback):
    """Once SIGTERM has arrived, the update boundary takes ``seconds`` (as a model fit or a
    branching of model rollouts can): the save comes well after the signal."""

    def __init__(self, seconds: float = 3.0) -> None:
        self.seconds, self.slept = seconds, False

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.received_sigterm and not self.slept:
            self.slept = True
            time.sleep(self.seconds)


class PoisonSeedAt(Callback):
    """Turns one seed's critic weights (group position ``position``) into NaN after the update at
    ``env_step``: a stand-in for one seed of a group diverging."""

    def __init__(self, env_step: int, position: int) -> None:
        self.env_step, self.position = env_step, position

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if pl_module.env_steps == self.env_step:
            with torch.no_grad():
                for p in pl_module.critic.parameters():
                    p[self.position].fill_(float("nan"))
