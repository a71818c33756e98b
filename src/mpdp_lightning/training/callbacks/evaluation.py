"""Evaluation: deterministic pi_0 episodes on separately seeded environments."""

from __future__ import annotations

from typing import Any, Optional

import lightning.pytorch as pl
import numpy as np
from jsonargparse.typing import NonNegativeInt, PositiveInt

from mpdp_lightning.training.callbacks.env_interaction import global_seed
from mpdp_lightning.training.callbacks.schedule import EnvStepRoutine
from mpdp_lightning.training.metrics import log_metrics
from mpdp_lightning.envs.stepping import run_episodes
from mpdp_lightning.envs.tasks import make_env

# Evaluation seeds are offset from training seeds so the two environments never share episodes.
EVAL_SEED_OFFSET = 1_000_003


class Evaluation(EnvStepRoutine):
    """At every multiple of ``eval_every`` env steps (and at the end of training) run ``eval_episodes`` episodes
    with pi_0's mode and log ``eval/return`` (mean), ``eval/return_std`` and ``eval/length``.

    Args:
        eval_every: env steps between evaluations.
        eval_episodes: episodes per evaluation.
        seed: seed of the evaluation environment; None derives it from the run's seed.
    """

    def __init__(
        self, eval_every: PositiveInt = 5_000, eval_episodes: PositiveInt = 5, seed: Optional[NonNegativeInt] = None
    ) -> None:
        if eval_every <= 0 or eval_episodes <= 0:
            raise ValueError(f"eval_every and eval_episodes must be positive, got {eval_every} and {eval_episodes}")
        self.eval_every, self.eval_episodes, self.seed = eval_every, eval_episodes, seed
        self.envs: list = []
        self.last_step = 0
        self.latest_return: Optional[float] = None
        self.best_return: Optional[float] = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not self.envs:
            self.envs = [make_env(pl_module.task) for _ in range(self.eval_episodes)]

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        for env in self.envs:
            env.close()
        self.envs = []

    @property
    def interval(self) -> int:
        return self.eval_every

    def run(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float]:
        return self.evaluate(trainer, pl_module)

    def evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float]:
        """Run the episodes in lockstep, one batched policy call per step for all that are running."""
        base_seed = (self.seed if self.seed is not None else global_seed() + EVAL_SEED_OFFSET) + pl_module.env_steps
        where = f"in the evaluation at env step {pl_module.env_steps}"
        returns, lengths = run_episodes(
            self.envs, [base_seed + i for i in range(len(self.envs))],
            lambda obs: pl_module.act_on_host(obs, deterministic=True, where=where),
        )
        metrics = {
            "eval/return": float(returns.mean()),
            "eval/return_std": float(returns.std()),
            "eval/length": float(lengths.mean()),
        }
        self.last_step = pl_module.env_steps
        self.latest_return = metrics["eval/return"]
        self.best_return = max(self.latest_return, self.best_return if self.best_return is not None else -np.inf)
        log_metrics(trainer, metrics, step=pl_module.env_steps)
        return metrics

    def state_dict(self) -> dict[str, Any]:
        return {"last_eval_step": self.last_step, "latest_return": self.latest_return, "best_return": self.best_return}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.last_step = int(state_dict["last_eval_step"])
        self.latest_return = state_dict["latest_return"]
        self.best_return = state_dict.get("best_return", self.latest_return)
