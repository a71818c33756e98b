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
        self.replays: list[ModelReplay] = []  # one seed's model replay, or a group's one per seed
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

    @property
    def model_replay(self) -> Optional[ModelReplay]:
        """A run of one seed's model replay (None before its first rollouts)."""
        return self.replays[0] if self.replays else None

    @model_replay.setter
    def model_replay(self, replay: Optional[ModelReplay]) -> None:
        self.replays = [] if replay is None else [replay]

    def branch(self, agent: AgentView) -> dict[str, Any]:
        """Branch a new set of rollouts from real states into the model replay (resized for the
        current rollout length); log mbpo/* against env steps. A group of seeds branches each
        seed's from its own real transitions into its own model replay, with its own model, policy
        and random stream, one seed after another as it runs alone (``SeedAxis.each``): their
        rollouts stop at different terminals, so the replays differ in size."""
        length = self.rollout_length(agent.env_steps)
        capacity = self.capacity(length)
        seeds = 1 if agent.seed_axis is None else len(agent.seed_axis)
        if not self.replays:
            self.replays = [ModelReplay(capacity, agent.device) for _ in range(seeds)]
        for replay in self.replays:
            replay.resize(capacity)
        buffer = agent.trainer.datamodule.buffer
        if agent.seed_axis is None:
            metrics = self._branch_one(agent, buffer, self.replays[0], length, None)
        else:
            per_seed = agent.seed_axis.each(
                agent, lambda seed_agent, position: self._branch_one(seed_agent, buffer, self.replays[position], length,
                                                                      position),
                torch.arange(seeds), skip=sorted(agent.stopped_seeds))
            names = {name for seed_metrics in per_seed if seed_metrics for name in seed_metrics}
            metrics = {name: [m.get(name) if m else None for m in per_seed] for name in sorted(names)}
        log_metrics(agent.trainer, metrics, step=agent.env_steps)
        return metrics

    def _branch_one(self, agent: AgentView, buffer: Any, replay: ModelReplay, length: int,
                    position: Optional[int]) -> dict[str, float]:
        """One seed's rollouts into ``replay`` (``position``: its column of a group's storage)."""
        real = uniform_sample(buffer, self.rollout_batch_size,
                              seed_position=None if position is None else int(position))
        plans: list[Plan] = []
        rollouts = branched_rollouts(agent.world_model, self.rollout_action(agent, plans), real["obs"], length)
        replay.add(rollouts)
        metrics = {
            "mbpo/rollout_length": float(length),
            "mbpo/rollout_transitions": float(rollouts.numel()),
            "mbpo/model_buffer_size": float(len(replay)),
            # how many fits' rollouts the replay holds (their age: up to this many fit intervals)
            "mbpo/model_replay_fits": len(replay) / max(rollouts.numel(), 1),
            "mbpo/rollout_u_mean": rollouts["u"].mean().item(),
            "mbpo/rollout_terminated": rollouts["terminated"].float().mean().item(),
        }
        if plans:  # COPlanner: how uncertain the chosen actions were, against all candidates
            metrics["coplanner/rollout_u_chosen"] = torch.cat([p.chosen_uncertainty for p in plans]).mean().item()
            metrics["coplanner/rollout_u_candidates"] = torch.cat([p.candidate_uncertainty for p in plans]).mean().item()
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
        first rollouts exist). A group: [seeds, batch_size], each seed's real rows from its own
        column and its model rows from its own model replay, drawn with its own generator in the
        order a run alone draws them (real, then model)."""
        if not isinstance(batch, PendingBatch) or all(len(r) == 0 for r in self.replays):
            return drawn(batch, agent.draw)
        if self._split[0] != batch.batch_size:  # once per batch size, not per update
            self._split = (batch.batch_size, *split_batch(batch.batch_size, self.real_ratio))
        _, n_real, n_model = self._split
        if agent.seed_axis is None:
            parts = [uniform_sample(batch.buffer, n_real)] if n_real else []
            if n_model:
                parts.append(self.model_replay.sample_batch(n_model))
            return torch.cat(parts)
        generators = agent.seed_axis.streams.generators
        parts = [PendingBatch(batch.buffer, n_real).draw(agent.draw)] if n_real else []
        if n_model:
            # a seed stopped (by a NaN) before the first rollouts has none: real rows fill its batch
            parts.append(torch.stack([
                replay.sample_batch(n_model, generator) if len(replay) else
                uniform_sample(batch.buffer, n_model, generator, seed_position=position)
                for position, (replay, generator) in enumerate(zip(self.replays, generators))
            ]))
        return torch.cat(parts, dim=1)

    def counters(self) -> dict[str, Any]:
        return {"schedule_start": self.schedule_start}

    def load_counters(self, counters: dict[str, Any]) -> None:
        # a checkpoint from before the schedule counted from the warm-up counted from env step 0
        self.schedule_start = int(counters.get("schedule_start") or 0)
