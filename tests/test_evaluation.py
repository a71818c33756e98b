"""The evaluation's critic check: what the critics predicted at each episode's start against the
discounted return the episode then gave (eval/q_start, eval/discounted_return)."""

import numpy as np
import torch

from mpdp_lightning.algorithms.sac import SAC
from mpdp_lightning.algorithms.seed_group import stack_agents
from mpdp_lightning.envs.stepping import run_episodes
from mpdp_lightning.envs.tasks import make_env
from mpdp_lightning.training.callbacks.evaluation import StartAndDiscount


def _episodes(agent, gamma, seed=3, policy=None):
    envs = [make_env("inverted_pendulum") for _ in range(2)]
    rewards = [[] for _ in envs]
    track = StartAndDiscount(len(envs), gamma)

    def on_step(step):
        rewards[step.env].append(step.reward)
        return track(step)

    policy = policy or (lambda obs: agent.act_on_host(obs, deterministic=True))
    returns, _ = run_episodes(envs, [seed, seed + 1], policy, on_step=on_step)
    return envs, track, rewards, returns


def test_the_discounted_return_and_the_critics_start_value_are_those_of_each_episode():
    torch.manual_seed(0)
    agent = SAC("inverted_pendulum", hidden=16)
    envs, track, rewards, returns = _episodes(agent, gamma=0.9)
    expected = np.mean([sum(0.9**t * r for t, r in enumerate(episode)) for episode in rewards])
    assert np.isclose(track.metrics(agent, None)["eval/discounted_return"], expected)
    assert not np.isclose(expected, returns.mean())  # discounted, not the return
    starts = [env.reset(seed=seed)[0] for env, seed in zip(envs, [3, 4])]  # each episode's first state, again
    obs = torch.as_tensor(np.stack(starts), dtype=torch.float32)
    with torch.no_grad():
        q = agent.critic(obs, agent.act(obs, deterministic=True)).min(dim=0).values.mean()
    assert np.isclose(track.metrics(agent, None)["eval/q_start"], q.item(), rtol=1e-5)


def test_a_seed_of_a_group_gets_its_own_critics_start_value():
    built = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        built.append((SAC("inverted_pendulum", hidden=16), torch.get_rng_state()))
    alone = [agent for agent, _ in built]
    expected = [_episodes(agent, 0.99)[1].metrics(agent, None)["eval/q_start"] for agent in alone]
    group = stack_agents([agent for agent, _ in built], (0, 1), [state for _, state in built])
    for position in (0, 1):
        policy = lambda obs, agent=alone[position]: agent.act_on_host(obs, deterministic=True)  # noqa: E731
        _, track, _, _ = _episodes(None, 0.99, policy=policy)
        assert np.isclose(track.metrics(group, position)["eval/q_start"], expected[position], rtol=1e-5)
    assert not np.isclose(expected[0], expected[1])
