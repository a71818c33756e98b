"""MBPO's batches: real transitions mixed with the model's branched rollouts (``BranchedRollouts``;
SAC and MPDP sample theirs from the real replay alone, ``training/data.drawn``).

Two calls: ``branch`` right after each model fit (fresh rollouts), and ``mixed_batch`` in every
update, for its batch, which is sampled only then: after this update's env step is stored and the
model is fitted on it (data.PendingBatch)."""

from __future__ import annotations

from typing import Any, Callable, Optional, Union

import torch
from tensordict import TensorDictBase

from mpdp_lightning.algorithms.parts.agent_view import AgentView
from mpdp_lightning.planners.branched_rollouts import RolloutSchedule, branched_rollouts
from mpdp_lightning.planners.up_mpc import Plan
from mpdp_lightning.training.data import PendingBatch, drawn, uniform_sample
from mpdp_lightning.training.metrics import log_metrics
from mpdp_lightning.training.model_replay import ModelReplay, split_batch

Batch = Union[PendingBatch, TensorDictBase]


class BranchedRollouts:
    """MBPO's data: after each model fit, ``rollout_batch_size`` real start states are branched
    ``length`` model steps with the current policy (or COPlanner's conservative planner) into the
    model replay, which keeps the rollouts of the last ``retain_epochs`` epochs of fits; each batch
    is ``real_ratio`` real and the rest model transitions. The model replay is not checkpointed: a
    resumed run branches it again before its first update (Agent.training_step).

    Args:
        schedule: the rollout length by epoch of ``schedule.epoch_length`` env steps, counted
            from ``schedule_start`` (the end of the warm-up, set when the run starts).
        rollout_batch_size: start states branched per fit.
        model_train_every: env steps between fits (with the epoch length, the fits per epoch).
        retain_epochs: epochs of fits the model replay keeps.
        real_ratio: share of real transitions in each batch.
    """

    def __init__(self, schedule: RolloutSchedule, rollout_batch_size: int, model_train_every: int,
                 retain_epochs: float, real_ratio: float) -> None:
        self.schedule = schedule
        self.rollout_batch_size = rollout_batch_size
        self.model_train_every = model_train_every
        self.retain_epochs = retain_epochs
        self.real_ratio = real_ratio
        self._split = (0, *split_batch(0, real_ratio))  # (batch size, real rows, model rows); checks the ratio
        self.model_replay: Optional[ModelReplay] = None
        self.schedule_start: Optional[int] = None

    def rollout_length(self, env_steps: int) -> int:
        """The schedule's length now: its epoch counts env steps after the warm-up."""
        return self.schedule.length(max(env_steps - (self.schedule_start or 0), 0))

    def capacity(self, length: int) -> int:
        """MBPO's model pool: rollout_batch_size x length x fits per epoch x retained epochs (at
        least the latest fit's rollouts)."""
        fits_per_epoch = self.schedule.epoch_length / self.model_train_every
        return max(int(self.rollout_batch_size * length * fits_per_epoch * self.retain_epochs),
                   self.rollout_batch_size * length)

    def branch(self, agent: AgentView) -> dict[str, float]:
        """Branch a new set of rollouts from real states into the model replay (resized for the
        current rollout length); log mbpo/* against env steps."""
        length = self.rollout_length(agent.env_steps)
        capacity = self.capacity(length)
        if self.model_replay is None:
            self.model_replay = ModelReplay(capacity, agent.device)
        self.model_replay.resize(capacity)
        real = uniform_sample(agent.trainer.datamodule.buffer, self.rollout_batch_size)
        plans: list[Plan] = []
        rollouts = branched_rollouts(agent.world_model, self.rollout_action(agent, plans), real["obs"], length)
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
        log_metrics(agent.trainer, metrics, step=agent.env_steps)
        return metrics

    @staticmethod
    def rollout_action(agent: AgentView, plans: list[Plan]) -> Callable[[torch.Tensor], torch.Tensor]:
        """The rollouts' actor: pi_0's sample, or with a rollout planner (COPlanner) UP-MPC's
        conservative choice at every step, each step's plan appended to ``plans``."""
        planner = agent.rollout_planner
        if planner is None:
            return agent.actor.act

        def act(obs: torch.Tensor) -> torch.Tensor:
            plans.append(planner.plan(agent.world_model, agent.planning_action, obs))
            return plans[-1].action

        return act

    def mixed_batch(self, agent: AgentView, batch: Batch) -> TensorDictBase:
        """``real_ratio`` real transitions and the rest from the model replay (all real until the
        first rollouts exist)."""
        if not isinstance(batch, PendingBatch) or self.model_replay is None or len(self.model_replay) == 0:
            return drawn(batch)
        if self._split[0] != batch.batch_size:  # once per batch size, not per update
            self._split = (batch.batch_size, *split_batch(batch.batch_size, self.real_ratio))
        _, n_real, n_model = self._split
        parts = [uniform_sample(batch.buffer, n_real)] if n_real else []
        if n_model:
            parts.append(self.model_replay.sample_batch(n_model))
        return torch.cat(parts)

    def counters(self) -> dict[str, Any]:
        return {"schedule_start": self.schedule_start}

    def load_counters(self, counters: dict[str, Any]) -> None:
        # a checkpoint from before the schedule counted from the warm-up counted from env step 0
        self.schedule_start = int(counters.get("schedule_start") or 0)
