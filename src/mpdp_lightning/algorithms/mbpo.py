"""MBPO (Janner et al. 2019): SAC trained mostly on short model rollouts branched from real states.

Per update: the model phase when due (ModelBasedSAC), followed by a fresh set of branched
rollouts (``rollouts_per_env_step`` x ``model_train_every`` start states drawn from the real
buffer, the current policy acting, the rollout length from the task's schedule) into the model
replay, which keeps the rollouts of the last ``retain_epochs`` epochs; then SAC's update on a batch of
``real_ratio`` real and the rest model transitions. Only the policy improvement's data differs
from SAC: the losses, nets and temperature are SAC's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence, Union

import torch
from jsonargparse.typing import PositiveInt
from tensordict import TensorDictBase

from mpdp_lightning.planners.branched_rollouts import RolloutSchedule, branched_rollouts
from mpdp_lightning.planners.up_mpc import Plan
from mpdp_lightning.training.data import PendingBatch, drawn, uniform_sample
from mpdp_lightning.training.metrics import log_metrics
from mpdp_lightning.algorithms.model_based import ModelBasedSAC
from mpdp_lightning.training.model_replay import ModelReplay, split_batch
from mpdp_lightning.envs.tasks import get_task


@dataclass(frozen=True)
class MBPOTaskSettings:
    """What MBPO's original configs (jannerm/mbpo, examples/config/<env>/0.py) set per task."""

    rollout_schedule: tuple[int, int, int, int]  # [min_epoch, max_epoch, min_length, max_length]
    target_entropy: float
    model_train_every: int = 250
    retain_epochs: int = 1
    updates_per_env_step: int = 20  # num_train_repeat


MBPO_TASKS = {
    "hopper": MBPOTaskSettings((20, 100, 1, 15), -1.0),
    "walker2d": MBPOTaskSettings((20, 150, 1, 1), -3.0),
    "halfcheetah": MBPOTaskSettings((20, 150, 1, 1), -3.0, updates_per_env_step=40),
    "ant": MBPOTaskSettings((20, 100, 1, 25), -4.0),
    "humanoid": MBPOTaskSettings((20, 300, 1, 25), -2.0, model_train_every=1000, retain_epochs=5),
    # Not in MBPO's configs. One-step rollouts, as MBPO's walker2d and halfcheetah: its runs here
    # reach the maximum return within about 10 epochs (10k env steps), before any of MBPO's
    # schedules would start to lengthen (epoch 20). Target entropy -1 = -(action dimensions),
    # SAC's rule, which MBPO's own values sit close to on the tasks with few action dimensions.
    "inverted_pendulum": MBPOTaskSettings((20, 100, 1, 1), -1.0),
}

EPOCH_LENGTH = 1000  # env steps per MBPO epoch


class MBPO(ModelBasedSAC):
    """Model-Based Policy Optimization (see ModelBasedSAC and SAC for the other arguments).

    Args:
        rollouts_per_env_step: branched rollouts started per env step (MBPO's 400: 100k start
            states every 250 env steps); they are all started right after each model fit.
        rollout_schedule: [min_epoch, max_epoch, min_length, max_length] of the rollout length
            (epochs of 1000 env steps); None: the task's from MBPO's configs (``MBPO_TASKS``).
        real_ratio: share of real transitions in each SAC batch (MBPO's 0.05; the rest are model).
        retain_epochs: the model replay keeps the rollouts of this many epochs of fits; None: the
            task's (1, humanoid 5).

    ``target_entropy`` and ``model_train_every`` default to the task's from MBPO's configs too.
    """

    def __init__(
        self,
        task: str,
        *args: Any,
        rollouts_per_env_step: PositiveInt = 400,
        rollout_schedule: Optional[Sequence[int]] = None,
        real_ratio: float = 0.05,
        retain_epochs: Optional[PositiveInt] = None,
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
        self.schedule = RolloutSchedule(*schedule, epoch_length=EPOCH_LENGTH)
        self.retain_epochs = settings.retain_epochs if retain_epochs is None else retain_epochs
        # the hyperparameters as resolved (the arguments' None would hide the task's values), as
        # plain numbers: the CLI's PositiveInt would not load from a weights-only checkpoint
        self.hparams.update(
            rollouts_per_env_step=int(rollouts_per_env_step), rollout_schedule=[int(x) for x in schedule],
            retain_epochs=int(self.retain_epochs), target_entropy=float(entropy), model_train_every=int(train_every),
        )
        self.model_replay: Optional[ModelReplay] = None

    def default_updates_per_env_step(self) -> int:
        """MBPO's updates per env step for the task (20; halfcheetah 40)."""
        settings = MBPO_TASKS.get(self.task)
        return MBPOTaskSettings.updates_per_env_step if settings is None else settings.updates_per_env_step

    # ---- rollouts ------------------------------------------------------------------------------
    def train_world_model(self) -> dict[str, float]:
        metrics = super().train_world_model()
        metrics.update(self.refresh_rollouts())
        return metrics

    def refresh_rollouts(self) -> dict[str, float]:
        """Branch a new set of rollouts from real states with the current policy into the model
        replay (resized for the current rollout length); log mbpo/* against env steps."""
        hp = self.hparams
        length = self.schedule.length(self.env_steps)
        starts = hp.rollouts_per_env_step * hp.model_train_every
        fits_per_epoch = max(EPOCH_LENGTH // hp.model_train_every, 1)
        capacity = starts * length * fits_per_epoch * self.retain_epochs
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
