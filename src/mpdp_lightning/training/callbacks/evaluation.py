"""Evaluation: deterministic pi_0 episodes on separately seeded environments."""

from __future__ import annotations

from typing import Any, Optional, Union

import lightning.pytorch as pl
import numpy as np
import torch
from jsonargparse.typing import NonNegativeInt, PositiveInt

from mpdp_lightning.training.callbacks.schedule import EnvStepRoutine
from mpdp_lightning.training.metrics import log_metrics
from mpdp_lightning.training.seed_runs import run_seeds, seed_action, seed_values
from mpdp_lightning.envs.stepping import EnvStep, run_episodes
from mpdp_lightning.envs.tasks import make_env

# Evaluation seeds are offset from training seeds so the two environments never share episodes.
EVAL_SEED_OFFSET = 1_000_003


class Evaluation(EnvStepRoutine):
    """At every multiple of ``eval_every`` env steps (and at the end of training) run ``eval_episodes`` episodes
    with pi_0's mode and log ``eval/return`` (mean), ``eval/return_std`` and ``eval/length``; and,
    for an agent with critics, what they predicted against what the episodes then gave:
    ``eval/q_start``, the mean over episodes of min_j Q_j(s_0, a_0) at each episode's first state
    and action, beside ``eval/discounted_return``, the mean of sum_t gamma^t r_t over the episode
    (Q is the soft value of the stochastic policy, the episodes are the mode's: a gap that grows
    over training, not its size, says that the critics overestimate).

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
            track = StartAndDiscount(len(envs), float(pl_module.hparams.get("gamma", 0.99)))
            returns, lengths = run_episodes(envs, [base_seed + i for i in range(len(envs))], policy, on_step=track)
            per_seed.append({
                "eval/return": float(returns.mean()),
                "eval/return_std": float(returns.std()),
                "eval/length": float(lengths.mean()),
                **track.metrics(pl_module, position if grouped else None),
            })
        names = list(dict.fromkeys(name for m in per_seed for name in m))  # a stopped seed logs None
        metrics: dict[str, Any] = per_seed[0] if not grouped else {name: [m.get(name) for m in per_seed] for name in names}
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


class StartAndDiscount:
    """An ``on_step`` of ``run_episodes``: each episode's first state and action, and its
    discounted return."""

    def __init__(self, episodes: int, gamma: float) -> None:
        self.gamma = gamma
        self.first: list[Optional[tuple[np.ndarray, np.ndarray]]] = [None] * episodes
        self.discounted = np.zeros(episodes)
        self.steps = np.zeros(episodes, dtype=int)

    def __call__(self, step: EnvStep) -> bool:
        if self.first[step.env] is None:
            self.first[step.env] = (step.obs, step.action)
        self.discounted[step.env] += self.gamma ** self.steps[step.env] * step.reward
        self.steps[step.env] += 1
        return True

    @torch.no_grad()
    def metrics(self, module: Any, position: Optional[int]) -> dict[str, float]:
        """``eval/discounted_return`` and, where ``module`` has critics, ``eval/q_start`` (in a
        group, seed ``position``'s critics)."""
        metrics = {"eval/discounted_return": float(self.discounted.mean())}
        if getattr(module, "critic", None) is None:
            return metrics
        obs = torch.as_tensor(np.stack([o for o, _ in self.first]), dtype=torch.float32, device=module.device)
        action = torch.as_tensor(np.stack([a for _, a in self.first]), dtype=torch.float32, device=module.device)
        if position is not None:  # every seed's critics on this seed's pairs; this seed's kept
            seeds = len(module.seed_axis)
            obs, action = obs.expand(seeds, *obs.shape), action.expand(seeds, *action.shape)
        q = module.per_seed(None, lambda agent, obs, action: agent.critic(obs, action).min(dim=0).values, obs, action)
        metrics["eval/q_start"] = float((q[position] if position is not None else q).mean())
        return metrics
