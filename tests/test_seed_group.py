"""N seeds in one module (algorithms/seed_group.py): each seed in the group trains exactly as it
would alone, and nothing of one seed reaches another."""

import copy
import types

import numpy as np
import pytest
import torch
from tensordict import TensorDict

from mpdp_lightning.algorithms.mbpo import MBPO
from mpdp_lightning.algorithms.mpdp import MPDP
from mpdp_lightning.algorithms.sac import SAC
from mpdp_lightning.algorithms.parts.model_rollouts import BranchedRollouts
from mpdp_lightning.algorithms.seed_group import SeedStreams, stack_agents
from mpdp_lightning.errors import NonFiniteLossError
from mpdp_lightning.planners.branched_rollouts import branched_rollouts
from mpdp_lightning.planners.coplanner import COPlanner
from mpdp_lightning.training.seed_runs import seed_action

SEEDS = (0, 1, 2)
# Rows per seed: a multiple of 32, so that each seed's share of every stacked tensor is a whole
# number of the CPU's vector chunks (2 x 16 floats on AVX-512), as a preset's batch of 256 is; at
# other row counts vectorised exp/tanh round some elements in the last bit (docs/seed-groups.md).
B, UPDATES = 32, 4


@pytest.fixture
def threads():
    """Sets the CPU's intra-op threads for one test and restores them after. Exactness holds with one
    thread: with two, a seed alone's batch-of-one matmul is one two-thread GEMM and a group's is one
    single-thread GEMM per seed, and for some shapes (11 rows: hopper's observation in the first
    layer's weight gradient) the two round a few elements differently in the last bit."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


def _same(group_value, alone_value, exact):
    """Equal (``exact``: to the bit) or within float rounding; NaN where both are NaN (a statistic
    over no pairs)."""
    if exact:
        return group_value.shape == alone_value.shape and torch.allclose(group_value, alone_value, rtol=0, atol=0, equal_nan=True)
    return torch.allclose(group_value, alone_value, rtol=1e-5, atol=1e-6, equal_nan=True)


def _built(seed, **kwargs):
    """SAC built under ``seed``, as a run of that seed alone builds it, and the global generator's
    state after (where the run's stream goes on)."""
    torch.manual_seed(seed)
    agent = SAC("hopper", hidden=32, layers=2, auto_alpha=True, alpha=1.0, critic_lr=1e-3, **kwargs)
    return agent, torch.get_rng_state()


def _with_optimizers(agent):
    optimizers = agent.configure_optimizers()
    agent.optimizers = lambda use_pl_optimizer=True: optimizers
    return agent


def _batches(seed, obs_dim=11, act_dim=3):
    g = torch.Generator().manual_seed(100 + seed)
    return [TensorDict({
        "obs": torch.randn(B, obs_dim, generator=g),
        "action": torch.rand(B, act_dim, generator=g) * 2 - 1,
        "reward": torch.randn(B, generator=g),
        "next_obs": torch.randn(B, obs_dim, generator=g),
        "terminated": torch.rand(B, generator=g) < 0.2,
    }, batch_size=[B]) for _ in range(UPDATES)]


def _alone(seed):
    agent, state = _built(seed)
    agent = _with_optimizers(agent)
    torch.set_rng_state(state)
    metrics = [agent.update(batch) for batch in _batches(seed)]
    return agent, metrics


def _group():
    built = [_built(seed) for seed in SEEDS]
    group = _with_optimizers(stack_agents([a for a, _ in built], SEEDS, [s for _, s in built]))
    batches = [_batches(seed) for seed in SEEDS]
    metrics = [group.update(torch.stack([b[k] for b in batches])) for k in range(UPDATES)]
    return group, metrics


def _check_sac_group(exact):
    group, group_metrics = _group()
    for position, seed in enumerate(SEEDS):
        alone, alone_metrics = _alone(seed)
        for k in range(UPDATES):
            for name in ("train/critic_loss", "train/actor_loss", "train/alpha_loss", "train/alpha", "train/q_mean"):
                assert _same(group_metrics[k][name][position], alone_metrics[k][name], exact), (seed, k, name)
        for name, p in alone.named_parameters():
            assert _same(group.get_parameter(name)[position], p, exact), (seed, name)
        for name, b in alone.named_buffers():
            if b.is_floating_point():
                assert _same(group.get_buffer(name)[position], b, exact), (seed, name)


def test_each_seed_in_a_group_trains_bit_identically_to_that_seed_alone(threads):
    threads(1)
    _check_sac_group(exact=True)


@pytest.mark.parametrize("algo", ["sac", "mpdp"])
def test_with_two_threads_each_seed_in_a_group_agrees_with_that_seed_alone_to_float_rounding(threads, algo):
    threads(2)
    (_check_sac_group if algo == "sac" else _check_mpdp_group)(exact=False)


def test_a_groups_random_streams_are_each_seeds_own_and_leave_the_global_one_alone():
    states = []
    for seed in SEEDS:
        torch.manual_seed(seed)
        torch.randn(3)  # what building the agent drew
        states.append(torch.get_rng_state())
    streams = SeedStreams(SEEDS, states)
    torch.manual_seed(1234)
    outer = torch.get_rng_state()
    first = streams.draw(lambda g: torch.randn(5, generator=g))
    second = streams.draw(lambda g: (torch.randn(2, generator=g), torch.randint(9, (4,), generator=g)))
    assert torch.equal(torch.get_rng_state(), outer)
    for position, seed in enumerate(SEEDS):
        torch.manual_seed(seed)
        torch.randn(3)
        assert torch.equal(first[position], torch.randn(5))
        assert torch.equal(second[0][position], torch.randn(2))
        assert torch.equal(second[1][position], torch.randint(9, (4,)))


def test_a_non_finite_seed_is_recorded_for_that_seed_only():
    group, _ = _group()
    with torch.no_grad():
        group.actor.net.linears[0].weight[1].fill_(float("nan"))  # seed 1's actor breaks
    batches = [_batches(seed)[0] for seed in SEEDS]
    group.update(torch.stack(batches))
    assert group.guard.first(seed=0) is None and group.guard.first(seed=2) is None
    broken = group.guard.first(seed=1)
    assert broken is not None and broken.phase == "critic"  # its targets, from pi_0, went NaN first
    for position in (0, 2):  # the others' weights stay finite
        assert all(torch.isfinite(p[position]).all() for p in group.parameters())


def test_seeds_must_differ():
    built = [_built(seed) for seed in (0, 0)]
    with pytest.raises(ValueError, match="seeds must differ"):
        stack_agents([a for a, _ in built], (0, 0), [s for _, s in built])


def _planning_mbpo(seed):
    """MBPO with COPlanner's planners, its model counted as fitted (planning needs no fit to run)."""
    torch.manual_seed(seed)
    agent = MBPO("hopper", hidden=32, model_hidden=32, model_layers=2, ensemble_size=3, num_elites=2)
    agent.use_coplanner(COPlanner(enabled=True, candidates=3, horizon=2))
    agent.model_phase.trained_at = 0
    return agent, torch.get_rng_state()


def test_a_group_plans_and_branches_each_seed_as_that_seed_alone():
    """COPlanner's exploration and MBPO's branched rollouts (``SeedAxis.each``): each seed plans with
    its own model and heads and draws from its own stream, as alone; its rollouts stop at its own
    terminals, so each seed's count is its own."""
    obs = torch.randn(2, 4, 11)
    built = [_planning_mbpo(seed) for seed in (0, 1)]
    group = stack_agents([a for a, _ in built], (0, 1), [s for _, s in built])
    planned = group.explore(obs)
    rollouts = group.seed_axis.each(group, lambda agent, start: branched_rollouts(
        agent.world_model, BranchedRollouts.rollout_action(agent, []), start, 3), obs)
    sampled_after = group.act(obs)
    assert planned.shape == (2, 4, 3)
    for position, seed in enumerate((0, 1)):
        agent, state = _planning_mbpo(seed)
        torch.set_rng_state(state)
        assert torch.equal(planned[position], agent.explore(obs[position]))
        alone = branched_rollouts(agent.world_model, BranchedRollouts.rollout_action(agent, []), obs[position], 3)
        assert alone.shape == rollouts[position].shape
        for key in ("obs", "action", "reward", "next_obs", "terminated", "u"):
            assert torch.equal(rollouts[position][key], alone[key]), (seed, key)
        assert torch.equal(sampled_after[position], agent.act(obs[position]))  # the stream went on as alone
    assert not torch.equal(planned[0], planned[1])


def _mpdp_built(seed):
    torch.manual_seed(seed)
    agent = MPDP("hopper", hidden=32, model_hidden=32, model_layers=2, horizon=4, head_grad_clip=0.5,
                 threshold="anchored", compact_rows=False)
    return agent, torch.get_rng_state()


def _check_mpdp_group(exact):
    seeds, alone = (0, 1), []
    for seed in seeds:
        agent, state = _mpdp_built(seed)
        agent = _with_optimizers(agent)
        torch.set_rng_state(state)
        metrics = [agent.update(batch) for batch in _batches(seed)]
        alone.append((agent, metrics))
    built = [_mpdp_built(seed) for seed in seeds]
    group = _with_optimizers(stack_agents([a for a, _ in built], seeds, [s for _, s in built]))
    assert group.plan.compact_rows is False
    batches = [_batches(seed) for seed in seeds]
    group_metrics = [group.update(torch.stack([b[k] for b in batches])) for k in range(UPDATES)]
    for position, (agent, metrics) in enumerate(alone):
        for k in range(UPDATES):
            for name, value in metrics[k].items():
                assert _same(group_metrics[k][name][position], value, exact), (position, k, name)
        for name, p in agent.named_parameters():
            assert _same(group.get_parameter(name)[position], p, exact), (position, name)
        assert _same(group.h_step.held_threshold[position], agent.h_step.held_threshold, exact)
        assert torch.equal(group.h_step.horizon_counts[position], agent.h_step.horizon_counts)
    assert group_metrics[-1]["train/head_grad_norm"].shape == (2,)


def test_mpdp_seeds_in_a_group_train_bit_identically_to_each_seed_alone(threads):
    """The H-step improvement through each seed's own world model (its own elites and normaliser),
    thresholds, horizon counts and clipped head gradients, vmapped: the same bits as alone, with
    rows masked in both (a group masks them; alone, ``compact_rows`` false)."""
    threads(1)
    _check_mpdp_group(exact=True)


def test_a_group_acts_as_each_seed_alone_from_its_own_stream():
    obs = torch.randn(len(SEEDS), 5, 11)
    built = [_built(seed) for seed in SEEDS]
    group = stack_agents([a for a, _ in built], SEEDS, [s for _, s in built])
    sampled, modes = group.act(obs), group.act(obs, deterministic=True)
    sampled_again = group.act(obs)
    assert sampled.shape == (len(SEEDS), 5, 3)
    for position, seed in enumerate(SEEDS):
        agent, state = _built(seed)
        torch.set_rng_state(state)
        assert torch.equal(sampled[position], agent.act(obs[position]))
        assert torch.equal(modes[position], agent.act(obs[position], deterministic=True))
        assert torch.equal(sampled_again[position], agent.act(obs[position]))  # the stream went on


def test_an_evaluations_non_finite_action_stops_that_seed_and_the_last_one_stops_the_run(capsys):
    """``seed_action`` (evaluation episodes, one seed at a time): a seed whose pi_0 gives a NaN
    action is stopped and its environment gets zeros; the others act as before; when the last
    seed stops, the run stops as a run of one seed does."""
    built = [_built(seed) for seed in SEEDS]
    group = stack_agents([a for a, _ in built], SEEDS, [s for _, s in built])
    group._trainer = types.SimpleNamespace(callbacks=[], loggers=[])  # no checkpoint to keep, no runs to mark
    obs = np.random.default_rng(0).standard_normal((1, 11)).astype(np.float32)
    before = seed_action(group, 0, obs)
    with torch.no_grad():
        group.actor.net.linears[0].weight[1].fill_(float("nan"))
    assert np.array_equal(seed_action(group, 1, obs, "in an evaluation at env step 200"), np.zeros((1, 3)))
    assert group.stopped_seeds == {1}
    assert "seed 1 stopped: pi_0's action in an evaluation at env step 200: its action was non-finite" in capsys.readouterr().err
    assert np.array_equal(seed_action(group, 0, obs), before)  # the others act as before
    with torch.no_grad():
        for position in (0, 2):
            group.actor.net.linears[0].weight[position].fill_(float("nan"))
    seed_action(group, 0, obs)
    with pytest.raises(NonFiniteLossError, match="seed 2: .*the last seed of the group; the run stopped"):
        seed_action(group, 2, obs)
