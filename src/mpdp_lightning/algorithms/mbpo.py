"""MBPO (Janner et al. 2019): SAC trained mostly on short model rollouts branched from real states.

Per update: the model phase when due (ModelBasedSAC), followed by a fresh set of branched
rollouts (``rollout_batch_size`` start states per fit drawn from the real buffer, whatever the
fit interval, the current policy acting, the rollout length from the task's schedule) into the
model replay, which keeps the rollouts of the last ``retain_epochs`` epochs; then SAC's update on
a batch of ``real_ratio`` real and the rest model transitions. Only the policy improvement's data
differs from SAC: the losses, nets and temperature are SAC's.

Where each setting comes from (checked against jannerm/mbpo, the original, and its PyTorch ports
mbpo_pytorch and mbrl-lib): the per-task values are jannerm/mbpo's examples/config/<task>/0.py
(``MBPO_TASKS``); the rollout length's epoch counts from the end of the initial exploration, as
in all three (epoch 0 is the first epoch of training); one learning rate, 3e-4, for Q, policy and
temperature, the temperature learned from 1.0 (conf/algo/mbpo.yaml); the world model's raw
targets, truncated-normal init, uncapped fits stopped after more than 5 epochs without a 1 %
improvement (models/world_model.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence, Union

import torch
from jsonargparse.typing import PositiveFloat, PositiveInt
from tensordict import TensorDictBase

from mpdp_lightning.planners.branched_rollouts import RolloutSchedule, branched_rollouts
from mpdp_lightning.planners.up_mpc import Plan
from mpdp_lightning.training.data import PendingBatch, drawn, uniform_sample
from mpdp_lightning.training.metrics import log_metrics
from mpdp_lightning.algorithms.model_based import ModelBasedSAC
from mpdp_lightning.training.model_replay import ModelReplay, split_batch
from mpdp_lightning.envs.tasks import get_task
from mpdp_lightning.training.callbacks.env_interaction import EnvInteraction


@dataclass(frozen=True)
class MBPOTaskSettings:
    """What MBPO's original configs (jannerm/mbpo, examples/config/<env>/0.py) set per task."""

    rollout_schedule: tuple[int, int, int, int]  # [min_epoch, max_epoch, min_length, max_length]
    target_entropy: float
    model_train_every: int = 250  # model_train_freq
    retain_epochs: float = 1  # model_retain_epochs
    updates_per_env_step: int = 20  # n_train_repeat
    epoch_length: int = 1000  # env steps per epoch (the rollout schedule's unit)
    warmup_steps: int = 5000  # n_initial_exploration_steps (uniform random actions)
    rollout_batch_size: int = 100_000  # start states branched per model fit


MBPO_TASKS = {
    "hopper": MBPOTaskSettings((20, 150, 1, 15), -1.0),
    "walker2d": MBPOTaskSettings((20, 150, 1, 1), -3.0),
    "halfcheetah": MBPOTaskSettings((20, 150, 1, 1), -3.0, updates_per_env_step=40),
    "ant": MBPOTaskSettings((20, 100, 1, 25), -4.0),
    "humanoid": MBPOTaskSettings((20, 300, 1, 25), -2.0, model_train_every=1000, retain_epochs=5),
    "inverted_pendulum": MBPOTaskSettings((1, 15, 1, 1), -0.05, updates_per_env_step=10, epoch_length=250,
                                          warmup_steps=500),
}


class MBPO(ModelBasedSAC):
    """Model-Based Policy Optimization (see ModelBasedSAC and SAC for the other arguments).

    Args:
        rollout_batch_size: branched rollouts started right after each model fit (MBPO's 100k,
            whatever the fit interval); None: the task's (``MBPO_TASKS``).
        rollout_schedule: [min_epoch, max_epoch, min_length, max_length] of the rollout length,
            in epochs of ``epoch_length`` env steps counted from the end of the warm-up; None: the
            task's from MBPO's configs (``MBPO_TASKS``).
        epoch_length: env steps per epoch; None: the task's (1000, inverted_pendulum 250).
        real_ratio: share of real transitions in each SAC batch (MBPO's 0.05; the rest are model).
        retain_epochs: the model replay keeps the rollouts of this many epochs of fits; None: the
            task's (1, humanoid 5). A fraction keeps fewer fits than an epoch holds (COPlanner's
            0.25: the latest of 4 fits per epoch).

    ``target_entropy``, ``model_train_every``, the updates per env step and the warm-up default to
    the task's from MBPO's configs too.
    """

    def __init__(
        self,
        task: str,
        *args: Any,
        rollout_batch_size: Optional[PositiveInt] = None,
        rollout_schedule: Optional[Sequence[int]] = None,
        epoch_length: Optional[PositiveInt] = None,
        real_ratio: float = 0.05,
        retain_epochs: Optional[PositiveFloat] = None,
        target_entropy: Optional[float] = None,
        model_train_every: Optional[PositiveInt] = None,
        **kwargs: Any,
    ) -> None:
        get_task(task)  # an unknown name fails here with the known tasks
        settings = MBPO_TASKS.get(task)
        if settings is None:
            if rollout_schedule is None or target_entropy is None:
                raise ValueError(f"MBPO has no settings for task {task!r}: give --model.rollout_schedule and "
                                 f"--model.target_entropy (known: {', '.join(MBPO_TASKS)})")
            settings = MBPOTaskSettings(tuple(rollout_schedule), target_entropy)
        schedule = settings.rollout_schedule if rollout_schedule is None else tuple(rollout_schedule)
        if len(schedule) != 4:
            raise ValueError(f"rollout_schedule is [min_epoch, max_epoch, min_length, max_length], got {list(schedule)}")
        entropy = settings.target_entropy if target_entropy is None else target_entropy
        train_every = settings.model_train_every if model_train_every is None else model_train_every
        split_batch(1, real_ratio)  # a ratio outside [0, 1] fails here, before any net is built
        super().__init__(task, *args, target_entropy=entropy, model_train_every=train_every, **kwargs)
        epochs = settings.epoch_length if epoch_length is None else int(epoch_length)
        self.schedule = RolloutSchedule(*(int(x) for x in schedule), epoch_length=epochs)
        self.retain_epochs = float(settings.retain_epochs if retain_epochs is None else retain_epochs)
        starts = settings.rollout_batch_size if rollout_batch_size is None else rollout_batch_size
        # the hyperparameters as resolved: the arguments' None would hide the task's values
        self.hparams.update(
            rollout_batch_size=int(starts), rollout_schedule=[int(x) for x in schedule], epoch_length=epochs,
            retain_epochs=self.retain_epochs, target_entropy=float(entropy), model_train_every=int(train_every),
        )
        self.model_replay: Optional[ModelReplay] = None
        # env steps before epoch 0 of the schedule: the run's warm-up, taken when it starts (and
        # kept in its checkpoints, so that a resumed run keeps its schedule)
        self.schedule_start: Optional[int] = None

    @classmethod
    def default_warmup_steps_for(cls, task: str) -> int:
        """MBPO's initial exploration for the task (5000; inverted_pendulum 500)."""
        settings = MBPO_TASKS.get(task)
        return MBPOTaskSettings.warmup_steps if settings is None else settings.warmup_steps

    def default_updates_per_env_step(self) -> int:
        """MBPO's updates per env step for the task (20; halfcheetah 40, inverted_pendulum 10)."""
        settings = MBPO_TASKS.get(self.task)
        return MBPOTaskSettings.updates_per_env_step if settings is None else settings.updates_per_env_step

    def on_fit_start(self) -> None:
        super().on_fit_start()
        # The schedule's epoch 0 starts after the initial exploration, as in MBPO's code
        if self.schedule_start is None:
            interaction = next((cb for cb in self.trainer.callbacks if isinstance(cb, EnvInteraction)), None)
            self.schedule_start = int(interaction.warmup_steps) if interaction is not None else 0

    def rollout_length(self) -> int:
        """The schedule's length now: its epoch counts env steps after the warm-up."""
        return self.schedule.length(max(self.env_steps - (self.schedule_start or 0), 0))

    # ---- rollouts ------------------------------------------------------------------------------
    def train_world_model(self) -> dict[str, float]:
        metrics = super().train_world_model()
        metrics.update(self.refresh_rollouts())
        return metrics

    def model_replay_capacity(self, length: int) -> int:
        """MBPO's model pool: rollout_batch_size x length x fits per epoch x retained epochs (at
        least the latest fit's rollouts)."""
        starts = self.hparams.rollout_batch_size
        fits_per_epoch = self.schedule.epoch_length / self.hparams.model_train_every
        return max(int(starts * length * fits_per_epoch * self.retain_epochs), starts * length)

    def refresh_rollouts(self) -> dict[str, float]:
        """Branch a new set of rollouts from real states with the current policy into the model
        replay (resized for the current rollout length); log mbpo/* against env steps."""
        hp = self.hparams
        length = self.rollout_length()
        starts = hp.rollout_batch_size
        capacity = self.model_replay_capacity(length)
        if self.model_replay is None:
            self.model_replay = ModelReplay(capacity, self.device)
        self.model_replay.resize(capacity)
        real = uniform_sample(self.trainer.datamodule.buffer, starts)
        plans: list[Plan] = []
        rollouts = branched_rollouts(self.world_model, self.rollout_action(plans), real["obs"], length)
        self.model_replay.add(rollouts)
        metrics = {
            "mbpo/rollout_length": float(length),
            "mbpo/rollout_transitions": float(rollouts.numel()),
            "mbpo/model_buffer_size": float(len(self.model_replay)),
            "mbpo/rollout_u_mean": rollouts["u"].mean().item(),
            "mbpo/rollout_terminated": rollouts["terminated"].float().mean().item(),
        }
        if plans:  # COPlanner: how uncertain the chosen actions were, against all candidates
            metrics["coplanner/rollout_u_chosen"] = torch.cat([p.chosen_uncertainty for p in plans]).mean().item()
            metrics["coplanner/rollout_u_candidates"] = torch.cat([p.candidate_uncertainty for p in plans]).mean().item()
        log_metrics(self.trainer, metrics, step=self.env_steps)
        return metrics

    def rollout_action(self, plans: list[Plan]) -> Callable[[torch.Tensor], torch.Tensor]:
        """The rollouts' actor: pi_0's sample, or with a rollout planner (COPlanner) UP-MPC's
        conservative choice at every step, each step's plan appended to ``plans``."""
        planner = self.rollout_planner
        if planner is None:
            return self.actor.act

        def act(obs: torch.Tensor) -> torch.Tensor:
            plans.append(planner.plan(self.world_model, self.planning_action, obs))
            return plans[-1].action

        return act

    # ---- the batch (the model replay is not checkpointed: it is branched again after a resume) ---
    def draw_batch(self, batch: Union[PendingBatch, TensorDictBase]) -> TensorDictBase:
        """``real_ratio`` real transitions and the rest from the model replay (all real until the
        first rollouts exist)."""
        if not isinstance(batch, PendingBatch) or self.model_replay is None or len(self.model_replay) == 0:
            return drawn(batch)
        n_real, n_model = split_batch(batch.batch_size, self.hparams.real_ratio)
        parts = [uniform_sample(batch.buffer, n_real)] if n_real else []
        if n_model:
            parts.append(self.model_replay.sample(n_model))
        return torch.cat(parts)

    def training_step(self, batch: Union[PendingBatch, TensorDictBase], batch_idx: int) -> None:
        # after a resume the model is restored but not its rollouts: branch them again first
        if self.model_replay is None and self.model_trained_at is not None and not self.model_is_due():
            self.refresh_rollouts()
        super().training_step(batch, batch_idx)

    # ---- checkpoint ----------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["counters"]["schedule_start"] = self.schedule_start

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        # a checkpoint from before the schedule counted from the warm-up counted from env step 0
        self.schedule_start = int(checkpoint["counters"].get("schedule_start") or 0)
