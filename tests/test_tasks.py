"""The task registry: the termination functions agree with the real environments."""

import numpy as np
import pytest
import torch

from mpdp_lightning.envs.tasks import TASKS, UnknownTaskError, get_task, make_env, task_spaces

# (steps of random actions, whether the task has a health rule that must fire within them)
BUDGETS = {
    "inverted_pendulum": (1000, True),
    "hopper": (2000, True),
    "walker2d": (2000, True),
    "halfcheetah": (1200, False),
    "ant": (5000, True),
    "humanoid": (1500, True),
}


def test_every_task_has_a_budget_here():
    assert set(BUDGETS) == set(TASKS)


@pytest.mark.parametrize("name", list(TASKS))
def test_termination_function_agrees_with_the_environment(name):
    steps, must_terminate = BUDGETS[name]
    env = make_env(name, seed=123)
    obs, _ = env.reset(seed=123)
    rows, terminated_flags = [], []
    for _ in range(steps):
        action = env.action_space.sample()
        next_obs, _, terminated, truncated, _ = env.step(action)
        rows.append((obs, action, next_obs))
        terminated_flags.append(terminated)
        obs = env.reset()[0] if terminated or truncated else next_obs
    env.close()
    # float64, as the environment computes it, so that no value near a bound rounds across it
    o, a, n = (torch.as_tensor(np.stack(col), dtype=torch.float64) for col in zip(*rows))
    predicted = get_task(name).termination_fn(o, a, n)
    expected = torch.as_tensor(terminated_flags)
    assert predicted.shape == expected.shape
    assert torch.equal(predicted, expected), f"{int((predicted != expected).sum())} of {steps} transitions disagree"
    if must_terminate:
        assert expected.sum() >= 2, "too few real terminations to test the rule"
    else:
        assert not expected.any()


def test_termination_function_is_batched_over_leading_dims():
    fn = get_task("hopper").termination_fn
    next_obs = torch.zeros(3, 5, 11)
    next_obs[..., 0] = 1.25  # healthy height, zero angle
    next_obs[1, 2, 1] = 0.5  # torso tilted past 0.2 rad
    done = fn(next_obs, torch.zeros(3, 5, 3), next_obs)
    assert done.shape == (3, 5)
    assert done.sum() == 1 and done[1, 2]


def test_unknown_task_is_one_line_listing_known_tasks():
    with pytest.raises(UnknownTaskError) as info:
        get_task("walker")
    message = str(info.value)
    assert "\n" not in message and "'walker'" in message
    assert all(name in message for name in TASKS)


def test_ant_and_humanoid_drop_the_unlearnable_observation_terms():
    # Ant-v5 is 105-dimensional with contact forces, Humanoid-v5 348 with cinert/cvel/qfrc/cfrc.
    assert task_spaces("ant").obs_dim == 27
    assert task_spaces("humanoid").obs_dim == 45
    assert task_spaces("humanoid").action_high[0] == pytest.approx(0.4)
