"""MBPO's branched rollouts (Janner et al. 2019, Algorithm 2) on the project's world model.

After each model fit, short rollouts start from real states of the replay buffer, act with the
current policy and step the ensemble (one random elite per row and step, sampled, as
``GaussianEnsemble.step`` does); a row stops at a predicted terminal (the task's termination
function on the sampled next state) and contributes that transition, terminal flag set, as its
last. The transitions go to a model replay buffer that SAC samples from.

The rollout length follows MBPO's schedule: ``min_length`` up to epoch ``min_epoch``, then
linear in the epoch to ``max_length`` at ``max_epoch`` and held, floored to an integer; an
epoch is ``epoch_length`` env steps (MBPO's 1000).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from tensordict import TensorDict

from mpdp_lightning.models.world_model import GaussianEnsemble


@dataclass(frozen=True)
class RolloutSchedule:
    """MBPO's ``rollout_schedule`` [min_epoch, max_epoch, min_length, max_length]."""

    min_epoch: int = 20
    max_epoch: int = 100
    min_length: int = 1
    max_length: int = 1
    epoch_length: int = 1000

    def __post_init__(self) -> None:
        if not 1 <= self.min_length <= self.max_length:
            raise ValueError(f"need 1 <= min_length <= max_length, got {self.min_length}, {self.max_length}")
        if not 0 <= self.min_epoch < self.max_epoch:
            raise ValueError(f"need 0 <= min_epoch < max_epoch, got {self.min_epoch}, {self.max_epoch}")
        if self.epoch_length < 1:
            raise ValueError(f"epoch_length must be at least 1, got {self.epoch_length}")

    def length(self, env_steps: int) -> int:
        """The rollout length at ``env_steps`` (epoch = env_steps // epoch_length)."""
        epoch = env_steps // self.epoch_length
        if epoch <= self.min_epoch:
            return self.min_length
        progress = min((epoch - self.min_epoch) / (self.max_epoch - self.min_epoch), 1.0)
        return int(self.min_length + progress * (self.max_length - self.min_length))


@torch.no_grad()
def branched_rollouts(
    model: GaussianEnsemble,
    act: Callable[[torch.Tensor], torch.Tensor],
    start_obs: torch.Tensor,
    length: int,
) -> TensorDict:
    """Up to ``length`` model steps from each of ``start_obs`` [N, obs_dim] with actions
    ``act(obs)``; a row that reaches a predicted terminal stops after that transition. Returns
    every transition (obs, action, reward, next_obs, terminated, u) as one TensorDict, in step
    order; u is the One-vs-Rest model error of each (obs, action)."""
    steps = []
    obs = start_obs
    for _ in range(length):
        if obs.shape[0] == 0:
            break
        action = act(obs)
        step = model.step(obs, action)
        steps.append(TensorDict(
            {"obs": obs, "action": action, "reward": step.reward, "next_obs": step.next_obs,
             "terminated": step.done, "u": step.u},
            batch_size=[obs.shape[0]],
        ))
        obs = step.next_obs[~step.done]  # rows that ended stop here
    if not steps:
        raise ValueError(f"length must be at least 1, got {length}")
    return torch.cat(steps)
