"""The probabilistic ensemble and its One-vs-Rest model error."""

import numpy as np
import pytest
import torch
from torch.distributions import Normal, kl_divergence

from mpdp_lightning.algorithms.model_based import ModelBasedSAC
from mpdp_lightning.models.policy import frozen
from mpdp_lightning.envs.tasks import get_task, make_env
from mpdp_lightning.models.world_model import GaussianEnsemble, fit_ensemble, holdout_errors, ovr_uncertainty

OBS, ACT = 4, 1


def _ensemble(k=4, elites=2, hidden=32, layers=2, termination_fn=None):
    return GaussianEnsemble(OBS, ACT, k, elites, hidden, layers, termination_fn=termination_fn)


def _random_transitions(task, n, seed=0):
    env = make_env(task, seed=seed)
    obs, _ = env.reset(seed=seed)
    rows = []
    for _ in range(n):
        action = env.action_space.sample()
        next_obs, reward, terminated, truncated, _ = env.step(action)
        rows.append(np.concatenate([obs, action, next_obs - obs, [reward]]))
        obs = env.reset()[0] if terminated or truncated else next_obs
    env.close()
    data = torch.as_tensor(np.stack(rows), dtype=torch.float32)
    in_dim = env.observation_space.shape[0] + env.action_space.shape[0]
    return data[:, :in_dim], data[:, in_dim:]


def _adam_step(model, lr=3e-3):
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)

    def step(loss):
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    return step


def test_batched_ensemble_equals_members_one_by_one():
    model = _ensemble()
    model.input_norm.fit(torch.randn(50, OBS + ACT) * 3 + 1)
    obs, action = torch.randn(9, OBS), torch.randn(9, ACT)
    mean, logvar = model(obs, action)
    x = model.input_norm.normalize(torch.cat([obs, action], -1))
    for m in range(model.ensemble_size):
        member_mean, member_raw = model.net.forward_member(x, m).chunk(2, dim=-1)
        torch.testing.assert_close(mean[m], member_mean)
        assert (logvar[m] <= model.max_logvar + 1e-6).all() and (logvar[m] >= model.min_logvar - 1e-6).all()


def test_ovr_uncertainty_matches_the_definition():
    mean, logvar = torch.randn(5, 3, 2), torch.randn(5, 3, 2) * 0.3
    var = logvar.exp()
    expected = torch.zeros(3)
    for i in range(5):
        rest = [j for j in range(5) if j != i]
        rest_mean = mean[rest].mean(0)
        rest_var = (var[rest] + mean[rest] ** 2).mean(0) - rest_mean**2
        expected += kl_divergence(Normal(mean[i], var[i].sqrt()), Normal(rest_mean, rest_var.sqrt())).sum(-1)
    torch.testing.assert_close(ovr_uncertainty(mean, logvar), expected, rtol=1e-4, atol=1e-5)


def test_u_is_zero_for_identical_members_and_positive_otherwise():
    model = _ensemble()
    obs, action = torch.randn(6, OBS), torch.randn(6, ACT)
    assert (ovr_uncertainty(*model(obs, action)) > 0).all()
    with torch.no_grad():
        for p in model.net.parameters():
            p.copy_(p[:1].expand_as(p))
    torch.testing.assert_close(ovr_uncertainty(*model(obs, action)), torch.zeros(6), atol=1e-5, rtol=0)


def test_fits_real_transitions_and_u_grows_far_from_the_data():
    inputs, targets = _random_transitions("hopper", 3000)
    model = GaussianEnsemble(11, 3, ensemble_size=5, num_elites=3, hidden=64, layers=3)
    report = fit_ensemble(model, inputs, targets, _adam_step(model), max_epochs=60, generator=torch.Generator().manual_seed(0))
    # targets are standardised, so their variance is 1 in the units of the holdout MSE
    assert report.holdout_mse < 0.25, report
    assert 1 <= report.epochs <= 60 and len(report.elites) == 3
    obs, action = inputs.split([11, 3], dim=-1)
    with torch.no_grad():
        inside = ovr_uncertainty(*model(obs[:500], action[:500])).mean()
        outside = ovr_uncertainty(*model(obs[:500] * 10 + 5, action[:500] * 10)).mean()
    assert outside > 10 * inside


def test_elites_are_the_best_members_on_holdout():
    inputs, targets = torch.randn(400, OBS + ACT), torch.randn(400, OBS + 1)
    targets[:, :OBS] += inputs[:, :OBS]
    model = _ensemble(k=5, elites=2)
    torch.manual_seed(1)
    fit_ensemble(model, inputs, targets, _adam_step(model), max_epochs=3, holdout_ratio=0.25)
    # the holdout rows are the first quarter of the fit's own permutation; re-derive them
    torch.manual_seed(1)
    hold = torch.randperm(400)[:100]
    mse, _ = holdout_errors(model, inputs[hold], targets[hold])
    assert set(model.elites.tolist()) == set(torch.argsort(mse)[:2].tolist())


def test_policy_backward_reaches_obs_and_actions_but_no_model_weight():
    done_fn = get_task("inverted_pendulum").termination_fn
    model = _ensemble(termination_fn=done_fn)
    obs = torch.randn(8, OBS, requires_grad=True)
    action = torch.randn(8, ACT, requires_grad=True)
    with frozen(model):
        step = model.step(obs, action)
        (step.next_obs.sum() + step.reward.sum() - step.u.sum()).backward()
    assert obs.grad is not None and obs.grad.abs().sum() > 0
    assert action.grad is not None and action.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters())
    assert all(p.requires_grad for p in model.parameters()), "frozen() must give the weights back"
    assert step.done.dtype == torch.bool
    torch.testing.assert_close(step.done, done_fn(obs, action, step.next_obs))


def test_sampling_uses_only_elites():
    model = _ensemble(k=4, elites=1)
    model.elites.fill_(2)
    obs, action = torch.randn(64, OBS), torch.randn(64, ACT)
    with torch.no_grad():
        mean, logvar = model(obs, action)
        model.max_logvar.fill_(-30.0)  # near-zero variance: the sample is the member's mean
        model.min_logvar.fill_(-40.0)
        step = model.step(obs, action)
    expected = obs + model.target_norm.denormalize(mean[2])[:, :OBS]
    torch.testing.assert_close(step.next_obs, expected, atol=1e-4, rtol=1e-4)


def test_model_phase_state_round_trips_through_the_checkpoint():
    module = ModelBasedSAC("hopper", hidden=16, ensemble_size=3, num_elites=2, model_hidden=16, model_layers=2)
    wm = module.world_model
    with torch.no_grad():
        wm.input_norm.fit(torch.randn(20, 14) * 2 + 3)
        wm.target_norm.fit(torch.randn(20, 12) * 5)
        wm.elites.copy_(torch.tensor([2, 0]))
    module.model_phase.trained_at, module.model_phase.fits, module.env_steps = 750, 3, 760
    checkpoint = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    checkpoint = torch.load(_roundtrip(checkpoint), weights_only=True)

    restored = ModelBasedSAC("hopper", hidden=16, ensemble_size=3, num_elites=2, model_hidden=16, model_layers=2)
    restored.load_state_dict(checkpoint["state_dict"])
    restored.on_load_checkpoint(checkpoint)
    for (name, a), (_, b) in zip(module.state_dict().items(), restored.state_dict().items()):
        assert torch.equal(a, b), name
    assert restored.world_model.elites.tolist() == [2, 0]
    assert (restored.model_phase.trained_at, restored.model_phase.fits, restored.env_steps) == (750, 3, 760)


def _roundtrip(obj):
    import io

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return buffer


def test_humanoid_gets_the_wider_model():
    assert ModelBasedSAC("humanoid", hidden=8, model_layers=1).world_model.net.linears[0].out_features == 400
    assert ModelBasedSAC("hopper", hidden=8, model_layers=1).world_model.net.linears[0].out_features == 200


@pytest.mark.parametrize("bad", [dict(num_elites=8), dict(holdout_ratio=1.0)])
def test_bad_model_settings_fail_at_construction(bad):
    with pytest.raises(ValueError):
        ModelBasedSAC("hopper", **bad)


# ---- diversity, precision and which outputs u covers ------------------------------------------
@pytest.fixture(scope="module")
def trained_pendulum_model():
    """An ensemble fitted on inverted_pendulum's near-deterministic dynamics: its variances
    collapse, the case where u is most fragile. Returns the model and its (obs, action) rows."""
    inputs, targets = _random_transitions("inverted_pendulum", 2000)
    torch.manual_seed(0)
    model = GaussianEnsemble(4, 1, ensemble_size=5, num_elites=3, hidden=64, layers=2)
    fit_ensemble(model, inputs, targets, _adam_step(model), max_epochs=30, patience=30)
    return model, inputs.split([4, 1], dim=-1)


def test_each_member_keeps_one_bootstrap_per_fit_and_members_differ(monkeypatch):
    import mpdp_lightning.models.world_model as wm

    n, k = 300, 4
    inputs = torch.randn(n, OBS + ACT)
    inputs[:, 0] = torch.arange(n, dtype=torch.float32)  # row ids, read back from each minibatch
    targets = torch.randn(n, OBS + 1)
    seen = []  # per minibatch: the row ids of each member [K, b]
    real_loss = wm.nll_loss
    monkeypatch.setattr(wm, "nll_loss", lambda model, x, y: (seen.append(x[..., 0].long()), real_loss(model, x, y))[1])
    model = _ensemble(k=k, elites=2)
    fit_ensemble(model, inputs, targets, _adam_step(model), batch_size=40, max_epochs=4, patience=10,
                 holdout_ratio=0.2, generator=torch.Generator().manual_seed(0))
    per_epoch = len(seen) // 4
    epochs = [torch.cat(seen[e * per_epoch:(e + 1) * per_epoch], dim=1) for e in range(4)]
    for member in range(k):
        first = epochs[0][member].sort().values
        for later in epochs[1:]:
            assert torch.equal(later[member].sort().values, first), "a member's bootstrap changed within the fit"
        assert not torch.equal(epochs[1][member], epochs[0][member]), "the order should change every epoch"
        distinct = first.unique().numel() / first.numel()
        assert 0.55 < distinct < 0.72, distinct  # a bootstrap holds about 1 - 1/e = 63 % distinct rows
    sets = [set(epochs[0][m].tolist()) for m in range(k)]
    assert all(sets[i] != sets[j] for i in range(k) for j in range(i + 1, k))


def test_u_and_outputs_under_bf16_autocast_match_fp32(trained_pendulum_model):
    model, (obs, action) = trained_pendulum_model
    with torch.no_grad():
        u32 = model.uncertainty(*model(obs, action))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mean, logvar = model(obs, action)
            u16 = model.uncertainty(mean, logvar)
    assert mean.dtype == torch.float32 and u16.dtype == torch.float32
    assert u32.median() > 0
    torch.testing.assert_close(u16, u32, rtol=0.01, atol=0.0)


def test_u_is_unchanged_by_a_large_common_offset_of_the_member_means(trained_pendulum_model):
    model, (obs, action) = trained_pendulum_model
    with torch.no_grad():
        mean, logvar = model(obs, action)
    assert logvar.exp().median() < 0.1, "the fixture should have small variances (the one-pass form fails there)"
    u = ovr_uncertainty(mean, logvar)
    torch.testing.assert_close(ovr_uncertainty(mean + 100.0, logvar), u, rtol=0.01, atol=0.0)


def test_the_u_outputs_switch_decides_whether_the_reward_output_enters_u():
    both = GaussianEnsemble(OBS, ACT, 4, 2, 16, 2, u_covers_reward=True)
    obs_only = GaussianEnsemble(OBS, ACT, 4, 2, 16, 2, u_covers_reward=False)
    mean, logvar = torch.zeros(4, 6, OBS + 1), torch.full((4, 6, OBS + 1), -2.0)
    mean[:, :, OBS] = torch.arange(4.0).view(4, 1)  # the members disagree on the reward only
    assert (both.uncertainty(mean, logvar) > 1.0).all()
    torch.testing.assert_close(obs_only.uncertainty(mean, logvar), torch.zeros(6), atol=1e-6, rtol=0)
    mean[:, :, 0] = torch.arange(4.0).view(4, 1)  # now on an observation output too
    assert (obs_only.uncertainty(mean, logvar) > 1.0).all()
    torch.testing.assert_close(obs_only.uncertainty(mean, logvar), ovr_uncertainty(mean[..., :OBS], logvar[..., :OBS]))


def _no_step(loss):
    """A step that changes nothing: the holdout error never improves after the first epoch."""


@pytest.mark.parametrize("patience", [5, 2])
def test_a_fit_stops_after_more_than_patience_epochs_without_improvement(patience):
    # MBPO: `_epochs_since_update > 5`: epoch 1 improves on infinity, then 5 + 1 epochs without
    # improvement before the stop (7 epochs for patience 5)
    model = _ensemble()
    inputs, targets = torch.randn(60, OBS + ACT), torch.randn(60, OBS + 1)
    report = fit_ensemble(model, inputs, targets, _no_step, patience=patience)
    assert report.epochs == 1 + patience + 1


def test_the_model_starts_from_mbpos_truncated_normal_with_zero_biases():
    model = GaussianEnsemble(OBS, ACT, 7, 5, hidden=200, layers=4)
    for linear in model.net.linears:
        std = 1.0 / (2.0 * linear.in_features ** 0.5)
        assert linear.weight.abs().max() <= 2 * std + 1e-7  # truncated at two stds
        # a normal truncated at +-2 std has std 0.88 of the untruncated one
        assert abs(linear.weight.std().item() / std - 0.88) < 0.05
        assert torch.count_nonzero(linear.bias) == 0


def test_targets_are_raw_by_default_and_rank_members_on_raw_unit_holdout_mse():
    model = _ensemble()
    inputs = torch.randn(100, OBS + ACT)
    targets = torch.cat([torch.randn(100, OBS) * 0.01, torch.randn(100, 1) * 100.0], dim=-1)  # tiny deltas, large reward
    fit_ensemble(model, inputs, targets, _adam_step(model), max_epochs=2)
    torch.testing.assert_close(model.target_norm.mean, torch.zeros(OBS + 1))
    torch.testing.assert_close(model.target_norm.std, torch.ones(OBS + 1))
    mse, _ = holdout_errors(model, inputs, targets)
    mean, _ = model(*inputs.split([OBS, ACT], dim=-1))
    torch.testing.assert_close(mse, (mean - targets).pow(2).mean(dim=(1, 2)))  # raw units: the reward dominates
    normalised = GaussianEnsemble(OBS, ACT, 4, 2, 32, 2, normalize_targets=True)
    fit_ensemble(normalised, inputs, targets, _adam_step(normalised), max_epochs=2)
    assert normalised.target_norm.std[-1] > 50 and normalised.target_norm.std[0] < 0.1


def test_a_compiled_fit_trains_as_the_eager_one():
    """``fit_ensemble(compiled=True)``: the same minibatches (one generator), the same weights,
    holdout errors and elites as eager, up to rounding; the epoch's last, smaller minibatch too."""
    inputs, targets = _random_transitions("inverted_pendulum", 700)  # 560 training rows: 2 of 256 and one of 48
    fitted = []
    for compiled in (False, True):
        torch.manual_seed(0)
        model = GaussianEnsemble(4, 1, 3, 2, hidden=32, layers=2)
        report = fit_ensemble(model, inputs, targets, _adam_step(model), max_epochs=4,
                              generator=torch.Generator().manual_seed(1), compiled=compiled)
        fitted.append((report, model.state_dict()))
    (eager, eager_weights), (compiled, compiled_weights) = fitted
    assert compiled.epochs == eager.epochs == 4 and compiled.elites == eager.elites
    assert compiled.holdout_mse == pytest.approx(eager.holdout_mse, rel=1e-4)
    for name, value in eager_weights.items():
        torch.testing.assert_close(compiled_weights[name], value, rtol=1e-4, atol=1e-5, msg=name)


def test_a_fit_reports_which_rows_it_held_out_and_which_it_fitted_on():
    """The holdout pairs the u measurements and the holdout threshold use are rows this fit did
    not train on: disjoint from its training rows, together every row, as many as the ratio and
    the cap give."""
    inputs, targets = torch.randn(1500, OBS + ACT), torch.randn(1500, OBS + 1)
    model = _ensemble()
    report = fit_ensemble(model, inputs, targets, _adam_step(model), max_epochs=2, holdout_ratio=0.2, max_holdout=200,
                          generator=torch.Generator().manual_seed(0))
    hold, train = set(report.holdout_rows.tolist()), set(report.train_rows.tolist())
    assert len(hold) == report.holdout_rows.numel() == 200 and not hold & train and hold | train == set(range(1500))
