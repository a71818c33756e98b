"""One way to step environments with a policy, shared by the training interaction, the evaluation
and the video (training/callbacks/): the running environments' observations go to the policy in
one batch, each environment steps with its action, and what happened comes back per environment.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import numpy as np

# observations [n, obs_dim] -> actions [n, act_dim]
Policy = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class EnvStep:
    """One environment's step: ``env`` its index; ``next_obs`` the observation after the action."""

    env: int
    obs: np.ndarray
    action: np.ndarray
    reward: float
    next_obs: np.ndarray
    terminated: bool  # a true terminal: no bootstrap from next_obs
    truncated: bool  # the time limit: next_obs still has value

    @property
    def done(self) -> bool:
        return self.terminated or self.truncated


def step_envs(envs: Sequence[Any], obs: Sequence[np.ndarray], policy: Policy,
              which: Optional[Sequence[int]] = None) -> list[EnvStep]:
    """Step the environments ``which`` (all by default) once, lockstep: one ``policy`` call on
    their observations ``obs[i]``, then one ``env.step`` each. The caller keeps the observations
    (``EnvStep.next_obs``) and resets the environments whose episode ended."""
    which = range(len(envs)) if which is None else which
    actions = policy(np.stack([obs[i] for i in which]))
    steps = []
    for i, action in zip(which, actions):
        next_obs, reward, terminated, truncated, _ = envs[i].step(action)
        steps.append(EnvStep(i, obs[i], action, float(reward), next_obs, bool(terminated), bool(truncated)))
    return steps


def run_episodes(envs: Sequence[Any], seeds: Sequence[int], policy: Policy,
                 on_step: Optional[Callable[[EnvStep], bool]] = None,
                 after_reset: Optional[Callable[[], None]] = None) -> tuple[np.ndarray, np.ndarray]:
    """One episode on each environment, reset with ``seeds``, in lockstep until every one ends
    (or ``on_step`` returns False for it); returns their returns and lengths. ``after_reset`` is
    called once the environments are reset (a video's first frame)."""
    obs = [env.reset(seed=seed)[0] for env, seed in zip(envs, seeds)]
    if after_reset is not None:
        after_reset()
    returns, lengths = np.zeros(len(envs)), np.zeros(len(envs), dtype=int)
    running = list(range(len(envs)))
    while running:
        still_running = []
        for step in step_envs(envs, obs, policy, running):
            obs[step.env] = step.next_obs
            returns[step.env] += step.reward
            lengths[step.env] += 1
            go_on = on_step(step) if on_step is not None else True
            if not step.done and go_on:
                still_running.append(step.env)
        running = still_running
    return returns, lengths
