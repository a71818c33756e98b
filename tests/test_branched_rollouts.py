"""MBPO's branched rollouts and rollout-length schedule."""

import pytest
import torch

from mpdp_lightning.planners.branched_rollouts import RolloutSchedule, branched_rollouts
from mpdp_lightning.models.world_model import GaussianEnsemble

OBS, ACT = 3, 2


@pytest.mark.parametrize("env_steps,length", [(0, 1), (20_999, 1), (21_000, 1), (60_000, 5), (149_999, 14),
                                              (150_000, 15), (250_000, 15)])
def test_hoppers_schedule_grows_from_1_to_15_over_epochs_20_to_150(env_steps, length):
    assert RolloutSchedule(20, 150, 1, 15).length(env_steps) == length


def test_a_fixed_schedule_stays_at_its_length():
    assert {RolloutSchedule(20, 150, 1, 1).length(n) for n in range(0, 300_000, 7_000)} == {1}


@pytest.mark.parametrize("bad", [dict(min_length=0), dict(min_length=3, max_length=2), dict(min_epoch=100, max_epoch=20),
                                 dict(epoch_length=0)])
def test_bad_schedules_are_refused(bad):
    with pytest.raises(ValueError):
        RolloutSchedule(**bad)


def _model(done_above=None):
    torch.manual_seed(0)
    done = None if done_above is None else (lambda obs, action, next_obs: next_obs[..., 0] > done_above)
    return GaussianEnsemble(OBS, ACT, 4, 2, hidden=16, layers=2, termination_fn=done)


def test_rollouts_act_with_the_policy_and_chain_their_states():
    model = _model()
    seen = []

    def act(obs):
        seen.append(obs)
        return torch.tanh(obs[:, :ACT])

    start = torch.randn(5, OBS)
    data = branched_rollouts(model, act, start, length=3)
    assert data.batch_size == torch.Size([15])  # no terminals: every row runs all 3 steps
    torch.testing.assert_close(data["action"], torch.tanh(data["obs"][:, :ACT]))
    torch.testing.assert_close(data["obs"][:5], start)
    torch.testing.assert_close(data["obs"][5:], data["next_obs"][:10])  # step t+1 starts where step t ended
    assert len(seen) == 3 and not data["terminated"].any()


def test_rows_stop_at_a_predicted_terminal():
    model = _model(done_above=0.0)  # about half the sampled next states end
    data = branched_rollouts(model, lambda obs: torch.zeros(obs.shape[0], ACT), torch.randn(64, OBS), length=4)
    ended = data["next_obs"][data["terminated"]]
    assert (ended[:, 0] > 0).all() and data["terminated"].any()
    # no transition starts from a terminal state: every later obs was a non-terminal next_obs
    later_starts = data["obs"][64:]
    continuing = data["next_obs"][~data["terminated"]]
    assert later_starts.shape[0] <= continuing.shape[0]
    for row in later_starts:
        assert (continuing == row).all(dim=-1).any()
    assert (data["u"] >= 0).all()
