"""Evaluation: deterministic pi_0 episodes on separately seeded environments."""

from __future__ import annotations

from typing import Any, Optional, Union

import lightning.pytorch as pl
import numpy as np
from jsonargparse.typing import NonNegativeInt, PositiveInt

from mpdp_lightning.training.callbacks.schedule import EnvStepRoutine
from mpdp_lightning.training.metrics import log_metrics
from mpdp_lightning.training.seed_runs import run_seeds, seed_action, seed_values
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
        # the last and the best eval/return: a float, or in a group a list with one per seed
        self.latest_return: Optional[Union[float, list[float]]] = None
        self.best_return: Optional[Union[float, list[float]]] = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not self.envs:  # eval_episodes environments per seed (a group has one set per seed)
            self.envs = [[make_env(pl_module.task) for _ in range(self.eval_episodes)] for _ in run_seeds(pl_module)]

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        for envs in self.envs:
            for env in envs:
                env.close()
        self.envs = []

    @property
    def interval(self) -> int:
        return self.eval_every

    def run(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        return self.evaluate(trainer, pl_module)

    def evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        """Run the episodes in lockstep, one batched policy call per step for all that are running;
        in a group each seed's on its own environments, seeded from its seed as a run of that seed
        alone seeds them, and logged to its own run (a value per seed)."""
        where = f"in the evaluation at env step {pl_module.env_steps}"
        grouped = getattr(pl_module, "seed_axis", None) is not None
        per_seed = []
        stopped = getattr(pl_module, "stopped_seeds", set())
        for position, (seed, envs) in enumerate(zip(run_seeds(pl_module), self.envs)):
            if position in stopped:  # a seed stopped by a NaN: nothing to evaluate
                per_seed.append({"eval/return": None, "eval/return_std": None, "eval/length": None})
                continue
            base_seed = (self.seed if self.seed is not None else seed + EVAL_SEED_OFFSET) + pl_module.env_steps
            policy = (lambda obs: pl_module.act_on_host(obs, deterministic=True, where=where)) if not grouped else \
                (lambda obs, position=position: seed_action(pl_module, position, obs, where))
            returns, lengths = run_episodes(envs, [base_seed + i for i in range(len(envs))], policy)
            per_seed.append({
                "eval/return": float(returns.mean()),
                "eval/return_std": float(returns.std()),
                "eval/length": float(lengths.mean()),
            })
        metrics: dict[str, Any] = per_seed[0] if not grouped else {
            name: [m[name] for m in per_seed] for name in per_seed[0]}
        self.last_step = pl_module.env_steps
        latest = [m["eval/return"] for m in per_seed]
        best = seed_values(self.best_return, len(latest)) if self.best_return is not None else [-np.inf] * len(latest)
        best = [b if r is None else max(r, b) for r, b in zip(latest, best)]
        self.latest_return = latest if grouped else latest[0]
        self.best_return = best if grouped else best[0]
        log_metrics(trainer, metrics, step=pl_module.env_steps)
        return metrics

    def state_dict(self) -> dict[str, Any]:
        return {"last_eval_step": self.last_step, "latest_return": self.latest_return, "best_return": self.best_return}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.last_step = int(state_dict["last_eval_step"])
        self.latest_return = state_dict["latest_return"]
        self.best_return = state_dict.get("best_return", self.latest_return)
