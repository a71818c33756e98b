"""EnvInteraction: the callback that acts in the real environment and fills the replay buffer.

Before the first update it collects ``warmup_steps`` transitions with uniform random actions
(updates need data), or with the untrained policy's samples (``warmup_policy: policy``, as
mbpo_pytorch and COPlanner's MuJoCo code do). After that, every ``updates_per_env_step`` updates it takes one env step
with pi_0 (a sample, not the mode), and it stops training at ``total_env_steps``. It keeps
``terminated`` (a true terminal: no bootstrap) apart from ``truncated`` (the time limit: the
next state still has value), and logs training episodes and the train metrics against env steps.
"""

from __future__ import annotations

import os
import time
from typing import Any, Literal, Optional

import lightning.pytorch as pl
import numpy as np
import torch
from jsonargparse.typing import NonNegativeInt, PositiveInt
from lightning.pytorch.callbacks import Callback
from tensordict import TensorDict

from mpdp_lightning.training.metrics import log_metrics
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


def global_seed() -> int:
    """The seed that LightningCLI's ``seed_everything`` chose (0 when none was set)."""
    return int(os.environ.get("PL_GLOBAL_SEED", 0))


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
        self.env = None
        self._obs: Optional[np.ndarray] = None
        self._episode_return = 0.0
        self._episode_length = 0
        self.episodes = 0
        self._finished_returns: list[float] = []
        self._finished_lengths: list[int] = []
        self._window_start = (0, time.perf_counter())

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
        if self.env is None:
            self.env = make_env(pl_module.task)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.env is not None:
            self.env.close()
            self.env = None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # on_fit_start: after a checkpoint is restored, before Lightning fetches the first batch.
        if pl_module.env_steps >= self.total_env_steps:
            raise ValueError(
                f"the run is already at {pl_module.env_steps} env steps, not below total_env_steps "
                f"({self.total_env_steps}); raise --env_interaction.total_env_steps to train further"
            )
        # A fresh episode, seeded by the run's seed and the env step, so a resumed run is
        # reproducible too (the episode in progress at the checkpoint is not restored).
        seed = (self.seed if self.seed is not None else global_seed()) + pl_module.env_steps
        self._obs, _ = self.env.reset(seed=seed)
        self.env.action_space.seed(seed)
        self._episode_return, self._episode_length = 0.0, 0
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
        if random:
            policy = lambda obs: self.env.action_space.sample()[None]  # noqa: E731
        else:
            where = f"at env step {pl_module.env_steps + 1}"
            policy = lambda obs: pl_module.act_on_host(obs, where=where, explore=True)  # noqa: E731
        [step] = step_envs([self.env], [self._obs], policy)
        trainer.datamodule.add(
            TensorDict(
                obs=torch.as_tensor(step.obs, dtype=torch.float32),
                action=torch.as_tensor(step.action, dtype=torch.float32),
                reward=torch.tensor(step.reward),
                next_obs=torch.as_tensor(step.next_obs, dtype=torch.float32),
                terminated=torch.tensor(step.terminated),
            )
        )
        pl_module.env_steps += 1
        self._episode_return += step.reward
        self._episode_length += 1
        next_obs = step.next_obs
        if step.done:
            self._finished_returns.append(self._episode_return)
            self._finished_lengths.append(self._episode_length)
            self.episodes += 1
            self._episode_return, self._episode_length = 0.0, 0
            next_obs, _ = self.env.reset()
        self._obs = next_obs
        if pl_module.env_steps % self.log_every_env_steps == 0:
            self.log_window(trainer, pl_module)

    def log_window(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Log the train metrics since the last log point (and check the losses are finite)."""
        pl_module.raise_if_not_finite()
        metrics = pl_module.window_metrics()
        steps0, t0 = self._window_start
        now = time.perf_counter()
        if pl_module.env_steps > steps0:
            metrics["time/env_steps_per_second"] = (pl_module.env_steps - steps0) / max(now - t0, 1e-9)
        self._window_start = (pl_module.env_steps, now)
        if self._finished_returns:
            metrics["train/episode_return"] = float(np.mean(self._finished_returns))
            metrics["train/episode_length"] = float(np.mean(self._finished_lengths))
            self._finished_returns.clear()
            self._finished_lengths.clear()
        metrics["train/episodes"] = float(self.episodes)
        metrics["train/updates"] = float(pl_module.updates)
        log_metrics(trainer, metrics, step=pl_module.env_steps)

    # ---- checkpoint ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"episodes": self.episodes}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.episodes = int(state_dict["episodes"])
