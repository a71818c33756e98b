"""MBPO (Janner et al. 2019): SAC trained mostly on short model rollouts branched from real states.

The agent's parts (algorithms/agent.py): the model phase (the ensemble fit, when due), MBPO's
rollouts (algorithms/parts/model_rollouts.py ``BranchedRollouts``: right after each fit,
``rollout_batch_size`` start states from the real buffer, whatever the fit interval, branched
with the current policy for the schedule's length into the model replay, which keeps the
rollouts of the last ``retain_epochs`` epochs; each batch ``real_ratio`` real, the rest model),
and SAC's one-step improvement: only the data differs from SAC.

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
from typing import Any, Optional, Sequence

from jsonargparse.typing import PositiveFloat, PositiveInt

from mpdp_lightning.algorithms.model_based import ModelBasedAgent
from mpdp_lightning.algorithms.parts.model_rollouts import BranchedRollouts
from mpdp_lightning.envs.tasks import get_task
from mpdp_lightning.planners.branched_rollouts import RolloutSchedule


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


class MBPO(ModelBasedAgent):
    """Model-Based Policy Optimization (see ModelBasedAgent and Agent for the other arguments).

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
        epochs = settings.epoch_length if epoch_length is None else int(epoch_length)
        retain = float(settings.retain_epochs if retain_epochs is None else retain_epochs)
        starts = int(settings.rollout_batch_size if rollout_batch_size is None else rollout_batch_size)
        # built first: a real_ratio outside [0, 1] fails here, before any net is built
        rollouts = BranchedRollouts(RolloutSchedule(*(int(x) for x in schedule), epoch_length=epochs), starts,
                                    int(train_every), retain, real_ratio)
        super().__init__(task, *args, target_entropy=entropy, model_train_every=train_every, **kwargs)
        # the hyperparameters as resolved: the arguments' None would hide the task's values
        self.hparams.update(
            rollout_batch_size=starts, rollout_schedule=[int(x) for x in schedule], epoch_length=epochs,
            retain_epochs=retain, target_entropy=float(entropy), model_train_every=int(train_every),
        )
        self.rollouts = rollouts

    @classmethod
    def default_warmup_steps_for(cls, task: str) -> int:
        """MBPO's initial exploration for the task (5000; inverted_pendulum 500)."""
        settings = MBPO_TASKS.get(task)
        return MBPOTaskSettings.warmup_steps if settings is None else settings.warmup_steps

    def default_updates_per_env_step(self) -> int:
        """MBPO's updates per env step for the task (20; halfcheetah 40, inverted_pendulum 10)."""
        settings = MBPO_TASKS.get(self.task)
        return MBPOTaskSettings.updates_per_env_step if settings is None else settings.updates_per_env_step
