"""EnvInteraction: the callback that acts in the real environment and fills the replay buffer.

Before the first update it collects ``warmup_steps`` transitions with uniform random actions
(updates need data), or with the untrained policy's samples (``warmup_policy: policy``, as
mbpo_pytorch and COPlanner's MuJoCo code do). After that, every ``updates_per_env_step`` updates it takes one env step
with pi_0 (a sample, not the mode), and it stops training at ``total_env_steps``. It keeps
``terminated`` (a true terminal: no bootstrap) apart from ``truncated`` (the time limit: the
next state still has value), and logs training episodes and the train metrics against env steps.
"""

from __future__ import annotations

import time
from typing import Any, Literal, Optional

import lightning.pytorch as pl
import numpy as np
import torch
from jsonargparse.typing import NonNegativeInt, PositiveInt
from lightning.pytorch.callbacks import Callback
from tensordict import TensorDict

from mpdp_lightning.training.metrics import log_metrics
from mpdp_lightning.training.seed_runs import run_seeds
from mpdp_lightning.envs.stepping import step_envs
from mpdp_lightning.envs.tasks import make_env


def resolved_warmup(warmup_steps: Optional[int], algorithm: type, task: str, total_env_steps: int) -> int:
    """The run's warm-up: ``warmup_steps``, or when None the algorithm's own for the task
    (``default_warmup_steps_for``); a ValueError naming the option when it does not end before
    ``total_env_steps`` (the CLI asks before any work, the callback when the run is set up)."""
    warmup = algorithm.default_warmup_steps_for(task) if warmup_steps is None else int(warmup_steps)
    _check_warmup(warmup, total_env_steps, given=warmup_steps is not None)
    return warmup


def _check_warmup(warmup: int, total_env_steps: int, given: bool) -> None:
    if warmup >= total_env_steps:
        default = "" if given else ", the default of the algorithm"
        raise ValueError(f"env_interaction.warmup_steps ({warmup}{default}) must be below "
                         f"env_interaction.total_env_steps ({total_env_steps})")


class EnvInteraction(Callback):
    """Acts in the environment, fills the buffer, counts env steps, logs training episodes.

    Args:
        total_env_steps: env steps of the whole run (warm-up included); training stops there.
        warmup_steps: env steps before the first update; None: the algorithm's own
            (``default_warmup_steps_for``: the task's 5000, inverted_pendulum 1000; MBPO its
            task's initial exploration, 5000, inverted_pendulum 500).
        warmup_policy: how the warm-up acts: ``random`` (uniform actions, as SAC and jannerm/mbpo)
            or ``policy`` (samples of the untrained pi_0, as mbpo_pytorch and COPlanner).
        updates_per_env_step: policy/critic updates between two env steps; None: the algorithm's
            own (``default_updates_per_env_step``: 1; MBPO its task's, 20 or halfcheetah's 40).
        log_every_env_steps: how often the train metrics (means since the last log) are logged.
        seed: seed of the training environment; None uses the run's ``seed_everything``.
    """

    def __init__(
        self,
        total_env_steps: PositiveInt = 100_000,
        warmup_steps: Optional[PositiveInt] = None,
        updates_per_env_step: Optional[PositiveInt] = None,
        log_every_env_steps: PositiveInt = 1_000,
        seed: Optional[NonNegativeInt] = None,
        warmup_policy: Literal["random", "policy"] = "random",
    ) -> None:
        for name, value in dict(
            total_env_steps=total_env_steps,
            warmup_steps=1 if warmup_steps is None else warmup_steps,
            updates_per_env_step=1 if updates_per_env_step is None else updates_per_env_step,
            log_every_env_steps=log_every_env_steps,
        ).items():
            if value <= 0:
                raise ValueError(f"{name} must be positive, got {value}")
        if warmup_steps is not None:  # the algorithm's default is checked once it is known (resolve_defaults)
            _check_warmup(warmup_steps, total_env_steps, given=True)
        if warmup_policy not in ("random", "policy"):
            raise ValueError(f"warmup_policy must be random or policy, got {warmup_policy!r}")
        self.total_env_steps = int(total_env_steps)
        self.warmup_steps = warmup_steps
        self.warmup_policy = warmup_policy
        self.updates_per_env_step = updates_per_env_step
        self.log_every_env_steps = log_every_env_steps
        self.seed = seed
        # one environment, or in a group of seeds one per seed (the group's order)
        self.envs: list = []
        self._obs: list[np.ndarray] = []
        self._episode_returns = np.zeros(0)
        self._episode_lengths = np.zeros(0, dtype=int)
        self.episodes: list[int] = [0]
        self._finished: list[list[tuple[float, int]]] = []  # per environment: (return, length) since the last log
        self._window_start = (0, time.perf_counter())

    @property
    def env(self) -> Any:
        """The training environment of a run of one seed."""
        return self.envs[0] if self.envs else None

    # ---- lifecycle ------------------------------------------------------------------------
    def resolve_defaults(self, pl_module: pl.LightningModule) -> None:
        """The warm-up and the updates per env step left to the algorithm: its own for the task
        (the CLI calls this before logging the config, so the run's params hold the values used)."""
        self.warmup_steps = resolved_warmup(self.warmup_steps, type(pl_module), pl_module.task, self.total_env_steps)
        pl_module.warmup_steps = self.warmup_steps  # the run's: MBPO's rollout schedule counts from its end
        if self.updates_per_env_step is None:
            self.updates_per_env_step = pl_module.default_updates_per_env_step()

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.resolve_defaults(pl_module)
        seeds = run_seeds(pl_module)
        if not self.envs:
            self.envs = [make_env(pl_module.task) for _ in seeds]
            self._finished = [[] for _ in seeds]
        if len(self.episodes) != len(seeds):  # a fresh group (a checkpoint's counts are loaded after setup)
            self.episodes = [0] * len(seeds)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        for env in self.envs:
            env.close()
        self.envs = []

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # on_fit_start: after a checkpoint is restored, before Lightning fetches the first batch.
        if pl_module.env_steps >= self.total_env_steps:
            raise ValueError(
                f"the run is already at {pl_module.env_steps} env steps, not below total_env_steps "
                f"({self.total_env_steps}); raise --env_interaction.total_env_steps to train further"
            )
        # A fresh episode, seeded by the run's seed (in a group each environment by its seed's)
        # and the env step, so a resumed run is reproducible too (the episode in progress at the
        # checkpoint is not restored).
        seeds = [self.seed] if self.seed is not None else run_seeds(pl_module)
        self._obs = []
        for env, seed in zip(self.envs, seeds):
            obs, _ = env.reset(seed=seed + pl_module.env_steps)
            env.action_space.seed(seed + pl_module.env_steps)
            self._obs.append(obs)
        self._episode_returns = np.zeros(len(self.envs))
        self._episode_lengths = np.zeros(len(self.envs), dtype=int)
        self._window_start = (pl_module.env_steps, time.perf_counter())
        while pl_module.env_steps < self.warmup_steps:
            self.env_step(trainer, pl_module, random=self.warmup_policy == "random")

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        if pl_module.updates % self.updates_per_env_step == 0:
            self.env_step(trainer, pl_module, random=False)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if pl_module.updates % self.updates_per_env_step != 0:
            return  # mid-way between two env steps
        if pl_module.env_steps >= self.total_env_steps:
            trainer.should_stop = True

    # ---- one env step -----------------------------------------------------------------------
    def env_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, random: bool) -> None:
        grouped = getattr(pl_module, "seed_axis", None) is not None
        if random:
            actions = [env.action_space.sample()[None] for env in self.envs]
        else:  # one call for every seed: [seeds, 1, obs_dim] in a group, [1, obs_dim] alone
            where = f"at env step {pl_module.env_steps + 1}"
            obs = np.stack(self._obs)[:, None] if grouped else self._obs[0][None]
            chosen = pl_module.act_on_host(obs, where=where, explore=True)
            actions = list(chosen) if grouped else [chosen]
        steps = [step_envs([env], [obs], lambda _, a=action: a)[0]
                 for env, obs, action in zip(self.envs, self._obs, actions)]
        transition = TensorDict(
            obs=torch.as_tensor(np.stack([s.obs for s in steps]), dtype=torch.float32),
            action=torch.as_tensor(np.stack([s.action for s in steps]), dtype=torch.float32),
            reward=torch.tensor([s.reward for s in steps]),
            next_obs=torch.as_tensor(np.stack([s.next_obs for s in steps]), dtype=torch.float32),
            terminated=torch.tensor([s.terminated for s in steps]),
            batch_size=[len(steps)],
        )
        trainer.datamodule.add(transition if grouped else transition[0])  # a group: one item per seed
        pl_module.env_steps += 1
        for i, (env, step) in enumerate(zip(self.envs, steps)):
            self._episode_returns[i] += step.reward
            self._episode_lengths[i] += 1
            next_obs = step.next_obs
            if step.done:
                self._finished[i].append((float(self._episode_returns[i]), int(self._episode_lengths[i])))
                self.episodes[i] += 1
                self._episode_returns[i], self._episode_lengths[i] = 0.0, 0
                next_obs, _ = env.reset()
            self._obs[i] = next_obs
        if pl_module.env_steps % self.log_every_env_steps == 0:
            self.log_window(trainer, pl_module)

    def log_window(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Log the train metrics since the last log point (and check the losses are finite); in a
        group, each seed's episodes and metrics to its own run."""
        pl_module.raise_if_not_finite()
        metrics = pl_module.window_metrics()
        steps0, t0 = self._window_start
        now = time.perf_counter()
        if pl_module.env_steps > steps0:
            metrics["time/env_steps_per_second"] = (pl_module.env_steps - steps0) / max(now - t0, 1e-9)
        self._window_start = (pl_module.env_steps, now)
        returns = [float(np.mean([r for r, _ in f])) if f else None for f in self._finished]
        lengths = [float(np.mean([n for _, n in f])) if f else None for f in self._finished]
        grouped = getattr(pl_module, "seed_axis", None) is not None
        if any(r is not None for r in returns):
            metrics["train/episode_return"] = returns if grouped else returns[0]
            metrics["train/episode_length"] = lengths if grouped else lengths[0]
        for finished in self._finished:
            finished.clear()
        metrics["train/episodes"] = [float(e) for e in self.episodes] if grouped else float(self.episodes[0])
        metrics["train/updates"] = float(pl_module.updates)
        log_metrics(trainer, metrics, step=pl_module.env_steps)

    # ---- checkpoint ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        # a run of one seed keeps the number it always kept; a group one per seed
        return {"episodes": self.episodes[0] if len(self.episodes) == 1 else list(self.episodes)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        episodes = state_dict["episodes"]
        self.episodes = [int(e) for e in episodes] if isinstance(episodes, (list, tuple)) else [int(episodes)]
