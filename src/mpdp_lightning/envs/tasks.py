"""Task registry: the six MuJoCo tasks of the paper on gymnasium's -v5 environments.

Each task names its environment, the constructor options that shape the observation and a
batched torch termination function
``done(obs, action, next_obs) -> bool tensor`` that model rollouts use to end imagined episodes.
The termination functions restate each environment's own health rule on the observation (the
-v5 envs test the state *after* the step, so only ``next_obs`` matters) and are checked against
the real environments in tests/test_tasks.py.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Callable

import gymnasium as gym
import torch

from mpdp_lightning.errors import UnknownTaskError

TerminationFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _all_finite(x: torch.Tensor) -> torch.Tensor:
    return torch.isfinite(x).all(dim=-1)


def inverted_pendulum_done(obs: torch.Tensor, action: torch.Tensor, next_obs: torch.Tensor) -> torch.Tensor:
    # InvertedPendulum-v5: the pole angle (obs[1]) leaves [-0.2, 0.2], or any entry is not finite.
    return ~_all_finite(next_obs) | (next_obs[..., 1].abs() > 0.2)


def hopper_done(obs: torch.Tensor, action: torch.Tensor, next_obs: torch.Tensor) -> torch.Tensor:
    # Hopper-v5: healthy while every entry of obs[1:] is in (-100, 100), the torso height obs[0]
    # is above 0.7 and the torso angle obs[1] is in (-0.2, 0.2). NaN fails every comparison.
    z, angle, state = next_obs[..., 0], next_obs[..., 1], next_obs[..., 1:]
    healthy = ((state > -100.0) & (state < 100.0)).all(dim=-1) & (z > 0.7) & (angle > -0.2) & (angle < 0.2)
    return ~healthy


def walker2d_done(obs: torch.Tensor, action: torch.Tensor, next_obs: torch.Tensor) -> torch.Tensor:
    # Walker2d-v5: healthy while the height obs[0] is in (0.8, 2.0) and the angle obs[1] in (-1, 1).
    z, angle = next_obs[..., 0], next_obs[..., 1]
    healthy = (z > 0.8) & (z < 2.0) & (angle > -1.0) & (angle < 1.0)
    return ~healthy


def never_done(obs: torch.Tensor, action: torch.Tensor, next_obs: torch.Tensor) -> torch.Tensor:
    # HalfCheetah-v5 has no health rule: episodes only end by the time limit (truncation).
    return torch.zeros(next_obs.shape[:-1], dtype=torch.bool, device=next_obs.device)


def ant_done(obs: torch.Tensor, action: torch.Tensor, next_obs: torch.Tensor) -> torch.Tensor:
    # Ant-v5: healthy while the state is finite and the torso height obs[0] is in [0.2, 1.0] (closed).
    z = next_obs[..., 0]
    healthy = _all_finite(next_obs) & (z >= 0.2) & (z <= 1.0)
    return ~healthy


def humanoid_done(obs: torch.Tensor, action: torch.Tensor, next_obs: torch.Tensor) -> torch.Tensor:
    # Humanoid-v5: healthy while the torso height obs[0] is in (1.0, 2.0).
    z = next_obs[..., 0]
    return ~((z > 1.0) & (z < 2.0))


@dataclass(frozen=True)
class Task:
    """One entry of the registry."""

    name: str
    env_id: str
    termination_fn: TerminationFn
    env_kwargs: dict = field(default_factory=dict)
    note: str = ""
    model_hidden: int = 200  # width of the world model's hidden layers (MBPO: 400 for humanoid)
    warmup_steps: int = 5000  # random env steps before the first update (SAC's and MPDP's default)


# The env-step budgets (the paper's Fig. 1) live in conf/task/<task>.yaml.
# Contact forces (and for humanoid the inertia, centre-of-mass velocity and actuator-force terms)
# are dropped from the observation, as MBPO and the paper did: they are discontinuous functions of
# the contacts that a dynamics model cannot learn, and the -v5 constructors can leave them out.
_HUMANOID_DROPPED = dict(
    include_cinert_in_observation=False,
    include_cvel_in_observation=False,
    include_qfrc_actuator_in_observation=False,
    include_cfrc_ext_in_observation=False,
)

TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        # a short task (15k env steps): 5k random steps would be a third of its budget
        Task("inverted_pendulum", "InvertedPendulum-v5", inverted_pendulum_done, warmup_steps=1000),
        Task("hopper", "Hopper-v5", hopper_done),
        Task("walker2d", "Walker2d-v5", walker2d_done),
        Task("halfcheetah", "HalfCheetah-v5", never_done),
        Task(
            "ant",
            "Ant-v5",
            ant_done,
            env_kwargs=dict(include_cfrc_ext_in_observation=False),
            note="contact forces dropped from the observation",
        ),
        Task(
            "humanoid",
            "Humanoid-v5",
            humanoid_done,
            env_kwargs=_HUMANOID_DROPPED,
            model_hidden=400,
            note="cinert, cvel, qfrc_actuator and contact forces dropped from the observation",
        ),
    )
}


def get_task(name: str) -> Task:
    """The registry entry for ``name``; a one-line error listing the known tasks otherwise."""
    try:
        return TASKS[name]
    except KeyError:
        raise UnknownTaskError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}") from None


def make_env(
    name: str,
    seed: int | None = None,
    render_mode: str | None = None,
    width: int | None = None,
    height: int | None = None,
) -> gym.Env:
    """The task's gymnasium environment (with its 1000-step time limit), reset with ``seed``.

    ``render_mode`` (e.g. ``"rgb_array"``), ``width`` and ``height`` go to the MuJoCo environment
    when given; without them the environment does not render.
    """
    task = get_task(name)
    render_kwargs = dict(render_mode=render_mode, width=width, height=height)
    env = gym.make(task.env_id, **task.env_kwargs, **{k: v for k, v in render_kwargs.items() if v is not None})
    if seed is not None:
        env.reset(seed=seed)
        env.action_space.seed(seed)
    return env


@dataclass(frozen=True)
class TaskSpaces:
    obs_dim: int
    act_dim: int
    action_low: tuple[float, ...]
    action_high: tuple[float, ...]


@functools.lru_cache(maxsize=None)
def task_spaces(name: str) -> TaskSpaces:
    """Observation and action sizes and bounds, read from the real environment once."""
    env = make_env(name)
    try:
        obs_space, act_space = env.observation_space, env.action_space
        return TaskSpaces(
            obs_dim=int(obs_space.shape[0]),
            act_dim=int(act_space.shape[0]),
            action_low=tuple(float(x) for x in act_space.low),
            action_high=tuple(float(x) for x in act_space.high),
        )
    finally:
        env.close()
