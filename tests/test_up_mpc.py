"""COPlanner's UP-MPC: it takes the first action of the best-scoring candidate, the score weighs
the ensemble's disagreement against reward, and everything is batched over states x candidates."""

import pytest
import torch

from mpdp_lightning.models.world_model import GaussianEnsemble
from mpdp_lightning.planners.up_mpc import UPMPC, ensemble_disagreement


class ConstructedEnsemble:
    """An ensemble whose members agree on the reward and disagree on the next observation in
    proportion to |action|: member k predicts a change of (k - mean of k) * action * spread.
    Reward r(s, a) = reward_of_action * a; terminal where ``terminal_below`` > a."""

    obs_dim = 2

    def __init__(self, members=4, spread=1.0, reward_of_action=0.0, terminal_below=None):
        self.offsets = (torch.arange(members, dtype=torch.float32) - (members - 1) / 2) * spread
        self.elites = torch.arange(members)
        self.num_elites = members
        self.reward_of_action = reward_of_action
        self.terminal_below = terminal_below

    def member_samples(self, obs, action):
        change = self.offsets.view(-1, 1, 1) * action[:, :1].unsqueeze(0).expand(-1, -1, self.obs_dim)
        reward = (self.reward_of_action * action[:, 0]).expand(len(self.offsets), -1).unsqueeze(-1)
        return torch.cat([change, reward], dim=-1)

    def is_terminal(self, obs, action, next_obs):
        if self.terminal_below is None:
            return torch.zeros(obs.shape[0], dtype=torch.bool)
        return action[:, 0] < self.terminal_below


def first_step_policy(first_actions):
    """Candidates' first actions from a table [N, B]; zero actions afterwards (no more reward or
    disagreement), so the score is the first step's."""

    def policy(obs, step):
        if step == 0:
            return first_actions.reshape(-1, 1).clone()  # candidate-major rows, as the planner lays them out
        return torch.zeros(obs.shape[0], 1)

    return policy


FIRST = torch.tensor([[0.1, -0.9, 0.5],
                      [-0.8, 0.05, -0.2],
                      [0.3, 0.4, 0.9]])  # 3 candidates (rows) for 3 start states (columns)


def test_conservative_scoring_picks_the_candidate_the_ensemble_agrees_on_most():
    plan = UPMPC(candidates=3, horizon=2, rate=-2.0).plan(ConstructedEnsemble(), first_step_policy(FIRST), torch.zeros(3, 2))
    expected = FIRST.abs().argmin(dim=0)  # smallest |a|: least disagreement
    assert torch.equal(plan.action[:, 0], FIRST[expected, torch.arange(3)])
    assert (plan.chosen_uncertainty <= plan.candidate_uncertainty).all()


def test_optimistic_scoring_picks_the_candidate_the_ensemble_disagrees_on_most():
    plan = UPMPC(candidates=3, horizon=2, rate=1.0).plan(ConstructedEnsemble(), first_step_policy(FIRST), torch.zeros(3, 2))
    expected = FIRST.abs().argmax(dim=0)
    assert torch.equal(plan.action[:, 0], FIRST[expected, torch.arange(3)])
    assert (plan.chosen_uncertainty >= plan.candidate_uncertainty).all()


def test_the_score_trades_reward_against_uncertainty_at_the_given_rate():
    # reward 3a, disagreement u1 |a|: the score is 3a + rate u1 |a|; a mild penalty keeps the
    # highest reward, a heavy one gives some of it up for certainty
    model = ConstructedEnsemble(reward_of_action=3.0)
    u1 = ensemble_disagreement(model.member_samples(torch.zeros(1, 2), torch.ones(1, 1))).item()
    for weight in (0.5, 2.0):
        rate = -weight * 3.0 / u1
        plan = UPMPC(candidates=3, horizon=1, rate=rate).plan(model, first_step_policy(FIRST), torch.zeros(3, 2))
        best = (3.0 * FIRST + rate * u1 * FIRST.abs()).argmax(dim=0)
        assert torch.equal(plan.action[:, 0], FIRST[best, torch.arange(3)])
        if weight == 0.5:
            assert torch.equal(plan.action[:, 0], FIRST.max(dim=0).values)
        else:
            assert not torch.equal(plan.action[:, 0], FIRST.max(dim=0).values)


def test_a_candidate_stops_scoring_at_a_predicted_terminal():
    # reward 1 per step whatever the action, terminal for negative actions: a falling candidate
    # collects one step's reward where the others collect all of the horizon's
    class ConstantReward(ConstructedEnsemble):
        def member_samples(self, obs, action):
            samples = super().member_samples(obs, action)
            samples[..., -1] = 1.0
            return samples

    model = ConstantReward(spread=0.0, terminal_below=0.0)
    policy = lambda obs, step: (FIRST.reshape(-1, 1).clone() if step == 0 else torch.full((obs.shape[0], 1), 0.5))
    plan = UPMPC(candidates=3, horizon=3, discount=1.0, rate=0.0).plan(model, policy, torch.zeros(3, 2))
    assert (plan.action >= 0).all()
    assert torch.allclose(plan.chosen_return, torch.full((3,), 3.0))


def test_chunks_of_start_states_give_the_same_plan():
    # one elite and no aleatoric noise to speak of: the scores are deterministic, so planning
    # 10 states at once or 2 at a time must choose the same candidates
    torch.manual_seed(0)
    model = GaussianEnsemble(3, 2, ensemble_size=4, num_elites=1, hidden=16, layers=2)
    with torch.no_grad():
        model.max_logvar.fill_(-40.0)
        model.min_logvar.fill_(-50.0)

    def policy(obs, step):  # candidate n of a state proposes tanh(obs + n): distinct, deterministic
        candidate = torch.arange(obs.shape[0]) // (obs.shape[0] // 5)
        return torch.tanh(obs[:, :2] + candidate.unsqueeze(1))

    obs = torch.randn(10, 3)
    whole = UPMPC(candidates=5, horizon=3, rate=-1.0).plan(model, policy, obs)
    chunked = UPMPC(candidates=5, horizon=3, rate=-1.0, max_rows=10).plan(model, policy, obs)
    assert chunked.action.shape == (10, 2)
    assert torch.allclose(whole.action, chunked.action)
    assert torch.allclose(whole.chosen_uncertainty, chunked.chosen_uncertainty, rtol=1e-4)


def test_the_disagreement_is_in_raw_units():
    # the same normalised predictions with targets 10 times larger: 10 times the disagreement
    torch.manual_seed(0)
    model = GaussianEnsemble(3, 2, ensemble_size=4, num_elites=2, hidden=16, layers=2)
    obs, action = torch.randn(64, 3), torch.randn(64, 2)
    torch.manual_seed(1)
    small = ensemble_disagreement(model.member_samples(obs, action))
    model.target_norm.std.mul_(10.0)
    torch.manual_seed(1)
    large = ensemble_disagreement(model.member_samples(obs, action))
    assert torch.allclose(large, 10.0 * small, rtol=1e-4)


@pytest.mark.parametrize("bad", [dict(candidates=0), dict(horizon=0), dict(discount=1.5), dict(max_rows=2, candidates=3)])
def test_bad_settings_are_refused(bad):
    with pytest.raises(ValueError):
        UPMPC(**bad)
