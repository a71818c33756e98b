"""The extended policy improvement (Algorithm 1 with decisions D1-D7)."""

import math

import pytest
import torch
from torch import nn

from mpdp_lightning.objectives.h_step_improvement import (
    STOP_HORIZON,
    STOP_TERMINAL,
    STOP_THRESHOLD,
    ImaginationNoise,
    ImprovementSettings,
    extended_improvement,
)
from mpdp_lightning.models.policy import SquashedGaussianHeads, TwinQ
from mpdp_lightning.objectives.sac_losses import actor_loss
from mpdp_lightning.models.world_model import GaussianEnsemble, ModelStep, nll_loss, ovr_uncertainty

OBS, ACT, B, H = 3, 2, 6, 5


def _nets(heads=H):
    actor = SquashedGaussianHeads(OBS, ACT, [-1.0] * ACT, [1.0] * ACT, heads=heads, hidden=16, layers=2)
    critic = TwinQ(OBS, ACT, hidden=16, layers=2)
    return actor, critic


class ScriptedModel(nn.Module):
    """A stand-in world model whose u and terminal flags follow a script [H, B]; its next state
    and reward are smooth functions of (s, a), and u can add a differentiable term in a."""

    def __init__(self, u_script, done_script, u_of_action=None, real_spread=0.0):
        super().__init__()
        self.weight = nn.Parameter(torch.tensor(0.5))
        self.u_script, self.done_script, self.u_of_action = u_script, done_script, u_of_action
        self.real_spread = real_spread
        self.t = 0

    def forward(self, obs, action):  # calibration: 3 members, u on real pairs is 0 unless they spread
        mean = torch.zeros(3, obs.shape[0], OBS + 1)
        mean[2] += self.real_spread
        return mean, torch.zeros_like(mean)

    def uncertainty(self, mean, logvar):
        return ovr_uncertainty(mean, logvar)

    num_elites = 1

    def step(self, obs, action, **randomness):
        t = min(self.t, len(self.u_script) - 1)
        self.t += 1
        u = self.u_script[t].clone()
        if self.u_of_action is not None:
            u = u + self.u_of_action(action)
        next_obs = obs + self.weight * torch.tanh(action).sum(-1, keepdim=True)
        reward = -(next_obs**2).sum(-1) * self.weight
        return ModelStep(next_obs, reward, self.done_script[t].clone(), u)


def test_all_rows_stopped_at_first_step_is_sacs_actor_loss():
    actor, critic = _nets()
    model = GaussianEnsemble(OBS, ACT, 4, 2, hidden=16, layers=2)
    obs, real_action = torch.randn(B, OBS), torch.rand(B, ACT) * 2 - 1
    alpha = torch.tensor(0.2)
    settings = ImprovementSettings(horizon=H, threshold="absolute", log_threshold=-math.inf)  # u >= 0 = u_T
    noise = ImaginationNoise.draw(H, obs, ACT, model.num_elites)
    result = extended_improvement(actor, critic, model, obs, real_action, alpha, settings, noise=noise)
    expected, _ = actor_loss(actor, critic, obs, alpha, noise=noise.action[0])
    torch.testing.assert_close(result.loss, expected)
    assert (result.horizon == 0).all() and (result.stop_reason == STOP_THRESHOLD).all()
    assert result.diagnostics["stopped_at_first_step"] == 1.0


def test_rows_stop_exactly_where_u_crosses_the_threshold_or_a_terminal_is_predicted():
    # rows 0-1 cross the threshold (u >= 1) at steps 2 and 0; rows 2-3 hit a terminal at steps 1
    # and 3; row 4 crosses and terminates at step 3 (the threshold is tested first); row 5 never stops
    u = torch.zeros(H, B)
    u[2, 0] = 1.5
    u[0, 1] = 1.0
    u[3, 4] = 2.0
    done = torch.zeros(H, B, dtype=torch.bool)
    done[1, 2] = True
    done[3, 3] = True
    done[3, 4] = True
    actor, critic = _nets()
    settings = ImprovementSettings(horizon=H, threshold="absolute", log_threshold=0.0, penalty_scale="none")
    result = extended_improvement(actor, critic, ScriptedModel(u, done), torch.randn(B, OBS), torch.zeros(B, ACT),
                                  torch.tensor(0.2), settings)
    assert result.horizon.tolist() == [2, 0, 2, 4, 3, H]
    assert result.stop_reason.tolist() == [STOP_THRESHOLD, STOP_THRESHOLD, STOP_TERMINAL, STOP_TERMINAL,
                                           STOP_THRESHOLD, STOP_HORIZON]
    assert result.diagnostics["horizon_mean"] == pytest.approx(sum([2, 0, 2, 4, 3, H]) / B)


def test_fixed_horizon_ignores_u():
    u = torch.full((H, B), 100.0)
    done = torch.zeros(H, B, dtype=torch.bool)
    actor, critic = _nets()
    settings = ImprovementSettings(horizon=H, adaptive=False, threshold="absolute", log_threshold=0.0)
    result = extended_improvement(actor, critic, ScriptedModel(u, done), torch.randn(B, OBS), torch.zeros(B, ACT),
                                  torch.tensor(0.2), settings)
    assert (result.horizon == H).all()


def test_gradients_reach_the_heads_used_and_none_past_the_longest_rollout():
    done = torch.zeros(H, B, dtype=torch.bool)
    done[1, :] = True  # every row ends with a terminal at its second step: heads 0 and 1 act
    actor, critic = _nets()
    settings = ImprovementSettings(horizon=H, threshold="absolute", log_threshold=10.0)
    model = ScriptedModel(torch.zeros(H, B), done)
    result = extended_improvement(actor, critic, model, torch.randn(B, OBS), torch.zeros(B, ACT), torch.tensor(0.2), settings)
    result.loss.backward()
    for linear in actor.net.linears:
        per_head = linear.weight.grad.abs().flatten(1).sum(1)
        assert (per_head[:2] > 0).all(), per_head
        assert (per_head[2:] == 0).all(), per_head


def test_actor_update_changes_no_model_or_critic_weight():
    actor, critic = _nets()
    model = GaussianEnsemble(OBS, ACT, 4, 2, hidden=16, layers=2)
    before = {n: p.detach().clone() for n, p in list(model.named_parameters()) + list(critic.named_parameters())}
    optimizer = torch.optim.Adam(actor.parameters(), lr=1e-2)
    result = extended_improvement(actor, critic, model, torch.randn(B, OBS), torch.rand(B, ACT) * 2 - 1,
                                  torch.tensor(0.2), ImprovementSettings(horizon=H))
    result.loss.backward()
    assert all(p.grad is None for p in list(model.parameters()) + list(critic.parameters()))
    optimizer.step()
    after = dict(list(model.named_parameters()) + list(critic.named_parameters()))
    assert all(torch.equal(before[n], after[n]) for n in before)
    assert all(p.requires_grad for p in list(model.parameters()) + list(critic.parameters()))


def _mean_action_distance(beta, steps=60):
    torch.manual_seed(0)
    actor, critic = _nets(heads=1)
    nn.init.zeros_(critic.net.linears[-1].weight)  # a flat critic: only the step's own terms matter
    target = torch.tensor([0.6, -0.4])
    model = ScriptedModel(torch.zeros(1, B), torch.zeros(1, B, dtype=torch.bool),
                          u_of_action=lambda a: ((a - target) ** 2).sum(-1))
    model.weight.data.fill_(0.0)  # no reward and no state change: the penalty is the only signal
    optimizer = torch.optim.Adam(actor.parameters(), lr=1e-2)
    obs = torch.randn(B, OBS)
    settings = ImprovementSettings(horizon=1, beta=beta, threshold="absolute", log_threshold=10.0, penalty_scale="none")
    for _ in range(steps):
        model.t = 0
        result = extended_improvement(actor, critic, model, obs, torch.zeros(B, ACT), torch.tensor(0.01), settings)
        optimizer.zero_grad()
        result.loss.backward()
        optimizer.step()
    return (actor.act(obs, deterministic=True) - target).norm(dim=-1).mean().item()


def test_penalty_moves_actions_toward_lower_model_error():
    start = _mean_action_distance(beta=0.0, steps=0)
    assert _mean_action_distance(beta=1.0) < 0.5 * start
    assert _mean_action_distance(beta=0.0) > 0.8 * start


@pytest.mark.parametrize("rule", ["median", "none"])
def test_penalty_is_measured_against_u_on_the_real_pairs(rule):
    # every imagined pair has exactly the u of the real pairs, m: u / m is 1 per step under the
    # median rule, and the raw rule charges m itself
    spread = ScriptedModel(None, None, real_spread=1.0)
    m = ovr_uncertainty(*spread(torch.zeros(B, OBS), torch.zeros(B, ACT)))[0].item()
    per_step = 1.0 if rule == "median" else m
    u, done = torch.full((H, B), m), torch.zeros(H, B, dtype=torch.bool)
    actor, critic = _nets()
    obs = torch.randn(B, OBS)

    def loss(beta):
        torch.manual_seed(3)
        settings = ImprovementSettings(horizon=H, beta=beta, adaptive=False, penalty_scale=rule)
        model = ScriptedModel(u, done, real_spread=1.0)
        return extended_improvement(actor, critic, model, obs, torch.zeros(B, ACT), torch.tensor(0.2), settings).loss

    gamma = ImprovementSettings().gamma
    assert m > 1.0
    torch.testing.assert_close(loss(0.5), loss(0.0) + 0.5 * per_step * sum(gamma**t for t in range(H)))


def test_quantile_threshold_and_median_scale_come_from_the_real_pairs():
    actor, critic = _nets()
    model = GaussianEnsemble(OBS, ACT, 4, 2, hidden=16, layers=2)
    obs, real_action = torch.randn(64, OBS), torch.rand(64, ACT) * 2 - 1
    result = extended_improvement(actor, critic, model, obs, real_action, torch.tensor(0.2),
                                  ImprovementSettings(horizon=2, threshold_quantile=0.5))
    u_real = ovr_uncertainty(*model(obs, real_action)).detach()
    torch.testing.assert_close(result.diagnostics["u_threshold"], torch.quantile(u_real, 0.5))


def test_the_real_pairs_statistics_are_computed_with_full_fp32_matmuls_when_the_run_allows_tf32():
    """--model.tf32 (on CUDA) lets matmuls use TF32; u on the real pairs, which sets the threshold
    and the penalty scale, is computed with full-precision matmuls all the same."""
    actor, critic = _nets()
    model = GaussianEnsemble(OBS, ACT, 4, 2, hidden=16, layers=2)
    seen = []
    forward = model.forward

    def recording_forward(obs, action):
        seen.append(torch.get_float32_matmul_precision())
        return forward(obs, action)

    model.forward = recording_forward
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        extended_improvement(actor, critic, model, torch.randn(8, OBS), torch.rand(8, ACT), torch.tensor(0.2),
                             ImprovementSettings(horizon=2))
        assert torch.get_float32_matmul_precision() == "high"  # as it was, after
    finally:
        torch.set_float32_matmul_precision(before)
    # the calibration's forward on the real pairs in full fp32, the imagined steps' with TF32
    assert seen[0] == "highest" and seen[1:] == ["high"] * (len(seen) - 1) and len(seen) > 1


def test_the_anchored_threshold_is_set_by_the_first_update_and_then_held():
    actor, critic = _nets()
    obs, real_action = torch.randn(64, OBS), torch.rand(64, ACT) * 2 - 1
    first, later = GaussianEnsemble(OBS, ACT, 4, 2, hidden=16, layers=2), GaussianEnsemble(OBS, ACT, 4, 2, hidden=16, layers=2)
    with torch.no_grad():
        later.max_logvar.fill_(-3.0)  # another model: its u on the real pairs is on another scale
    settings = ImprovementSettings(horizon=2, threshold="anchored", threshold_quantile=0.5)
    anchor = torch.tensor(float("nan"))

    def threshold(model, rule_settings):
        result = extended_improvement(actor, critic, model, obs, real_action, torch.tensor(0.2), rule_settings, anchor)
        return result.diagnostics["u_threshold"]

    set_by_first = threshold(first, settings)
    torch.testing.assert_close(set_by_first, torch.quantile(ovr_uncertainty(*first(obs, real_action)).detach(), 0.5))
    anchor.copy_(set_by_first)  # as MPDP keeps it
    torch.testing.assert_close(threshold(later, settings), set_by_first)
    quantile = ImprovementSettings(horizon=2, threshold="quantile", threshold_quantile=0.5)
    assert not torch.allclose(threshold(later, quantile), set_by_first), "the quantile rule follows the model"
    # nothing held (a bare call): the batch's quantile stands in
    unheld = extended_improvement(actor, critic, first, obs, real_action, torch.tensor(0.2), settings)
    torch.testing.assert_close(unheld.diagnostics["u_threshold"], set_by_first)


@pytest.mark.parametrize("bad", [dict(horizon=0), dict(beta=-0.1), dict(threshold_quantile=0.0), dict(threshold="relative"),
                                 dict(penalty_scale="mean")])
def test_bad_settings_are_refused(bad):
    with pytest.raises(ValueError):
        ImprovementSettings(**bad)


def _head_grads(actor, critic, model, obs, route_final):
    """Gradients of every head after one backward of J (adaptive off: every row reaches H).
    ``route_final(actor, orig_sample)`` decides which weights sample V(s_H)'s action a'."""
    orig = actor.sample
    actor.sample = lambda state, head=0, detach_params=False, noise=None: route_final(orig, state, head, detach_params, noise)
    try:
        torch.manual_seed(3)
        result = extended_improvement(actor, critic, model, obs, torch.zeros(B, ACT), torch.tensor(0.2),
                                      ImprovementSettings(horizon=2, adaptive=False))
    finally:
        del actor.sample
    actor.zero_grad()
    result.loss.backward()
    return [p.grad.clone() for p in actor.parameters()]


def test_the_value_at_the_horizon_reaches_the_heads_only_through_the_last_state():
    torch.manual_seed(0)
    actor, critic = _nets(heads=2)
    model = GaussianEnsemble(OBS, ACT, 4, 2, hidden=16, layers=2)
    obs = torch.randn(B, OBS)
    constant_pi0 = SquashedGaussianHeads(OBS, ACT, [-1.0] * ACT, [1.0] * ACT, heads=2, hidden=16, layers=2)
    constant_pi0.load_state_dict(actor.state_dict())
    constant_pi0.requires_grad_(False)  # V's a' from these weights: a function of s_H alone

    as_built = _head_grads(actor, critic, model, obs, lambda orig, s, h, d, n: orig(s, h, d, n))
    reference = _head_grads(actor, critic, model, obs,
                            lambda orig, s, h, d, n: constant_pi0.sample(s, h, noise=n) if d else orig(s, h, noise=n))
    live = _head_grads(actor, critic, model, obs, lambda orig, s, h, d, n: orig(s, h, noise=n))  # the old form
    for got, want in zip(as_built, reference):
        torch.testing.assert_close(got, want)
    assert any(not torch.allclose(a, b) for a, b in zip(live, reference)), "live weights would add a SAC gradient"


def _parity_setup(batch=64, horizon=4, quantile=0.99):
    """A small fitted ensemble whose rows end every way (threshold, terminal, horizon)."""
    torch.manual_seed(0)
    actor, critic = _nets(heads=horizon)
    done = lambda obs, action, next_obs: next_obs[..., 0] > 1.5  # noqa: E731
    model = GaussianEnsemble(OBS, ACT, 4, 3, hidden=16, layers=2, termination_fn=done)
    inputs = torch.randn(256, OBS + ACT)
    targets = torch.cat([0.3 * inputs[:, :OBS] + 0.1 * torch.randn(256, OBS), inputs[:, :1]], dim=-1)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(30):
        loss, _ = nll_loss(model, inputs[None].expand(4, -1, -1), targets[None].expand(4, -1, -1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    obs, real_action = torch.randn(batch, OBS), torch.rand(batch, ACT) * 2 - 1
    settings = ImprovementSettings(horizon=horizon, threshold_quantile=quantile)
    noise = ImaginationNoise.draw(horizon, obs, ACT, model.num_elites)
    return actor, critic, model, obs, real_action, settings, noise


def _loss_and_grads(actor, critic, model, obs, real_action, settings, noise, **how):
    result = extended_improvement(actor, critic, model, obs, real_action, torch.tensor(0.2), settings, noise=noise, **how)
    actor.zero_grad(set_to_none=True)
    result.loss.backward()
    return result, [p.grad.clone() for p in actor.parameters()]


def test_compacted_rows_give_the_masked_loss_gradients_and_stops():
    # dropping the rows that have ended must change nothing: same J, same head gradients, and
    # every row stops at the same step for the same reason
    setup = _parity_setup()
    masked, masked_grads = _loss_and_grads(*setup, compact=False)
    compacted, compacted_grads = _loss_and_grads(*setup, compact=True)
    assert set(masked.stop_reason.tolist()) == {STOP_THRESHOLD, STOP_TERMINAL, STOP_HORIZON}  # every path is covered
    torch.testing.assert_close(compacted.loss, masked.loss, atol=1e-5, rtol=1e-5)
    for got, want in zip(compacted_grads, masked_grads):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert torch.equal(compacted.horizon, masked.horizon) and torch.equal(compacted.stop_reason, masked.stop_reason)
    for name, value in masked.diagnostics.items():
        torch.testing.assert_close(compacted.diagnostics[name], value, atol=1e-5, rtol=1e-5, msg=name)


def test_compacted_rows_match_masked_when_every_row_stops_at_its_first_step():
    # no row survives the first step: the compacted loop ends early and J is SAC's actor term
    actor, critic, model, obs, real_action, _, noise = _parity_setup()
    settings = ImprovementSettings(horizon=4, threshold="absolute", log_threshold=-math.inf)
    masked, masked_grads = _loss_and_grads(actor, critic, model, obs, real_action, settings, noise, compact=False)
    compacted, compacted_grads = _loss_and_grads(actor, critic, model, obs, real_action, settings, noise, compact=True)
    assert (compacted.horizon == 0).all() and (compacted.stop_reason == STOP_THRESHOLD).all()
    torch.testing.assert_close(compacted.loss, masked.loss, atol=1e-5, rtol=1e-5)
    for got, want in zip(compacted_grads, masked_grads):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("compact", [False, True], ids=["masked", "compacted"])
def test_compiled_steps_give_the_eager_loss_and_gradients(compact):
    # torch.compile of the per-step function (a cold compile of a few seconds per variant)
    from torch._dynamo.utils import counters

    setup = _parity_setup()
    eager, eager_grads = _loss_and_grads(*setup, compact=compact)
    torch._dynamo.reset()
    counters.clear()
    compiled, compiled_grads = _loss_and_grads(*setup, compact=compact, compiled=True)
    assert counters["stats"]["unique_graphs"] >= 1  # it ran compiled (fullgraph: no silent eager fallback)
    torch.testing.assert_close(compiled.loss, eager.loss, atol=1e-5, rtol=1e-5)
    for got, want in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert torch.equal(compiled.horizon, eager.horizon)


def test_quantiles_are_torchs_bit_for_bit_and_batch_under_vmap():
    from mpdp_lightning.objectives.h_step_improvement import quantiles

    g = torch.Generator().manual_seed(0)
    for rows in (1, 5, 256, 1000):
        x = torch.randn(3, rows, generator=g).exp()
        for q in (0.1, 0.5, 0.9, 1.0):
            expected = torch.stack([torch.quantile(v, q) for v in x])
            assert torch.equal(torch.stack([quantiles(v, q)[0] for v in x]), expected)
            assert torch.equal(torch.func.vmap(lambda v, q=q: quantiles(v, q)[0])(x), expected)
    for special in ([1.0, float("nan"), 2.0], [1.0, float("inf"), 2.0], [float("-inf"), 0.0, float("inf")]):
        x = torch.tensor(special)
        for q in (0.0, 0.5, 0.9, 1.0):
            torch.testing.assert_close(quantiles(x, q)[0], torch.quantile(x, q), equal_nan=True)


def test_the_fresh_and_holdout_rules_hold_the_quantile_of_u_over_their_kind_of_real_pair():
    """After a fit, MPDP's improvement holds the ``threshold_quantile`` quantile of u over the fit's
    pairs of the kind its rule names (``calibrate``: holdout rows, or fresh ones) and every update
    until the next fit stops its rows there, not at the batch's quantile; the quantile rule ignores
    the fit's pairs and follows the batch."""
    from mpdp_lightning.algorithms.parts.improvement import HStepImprovement

    actor, critic = _nets()
    model = GaussianEnsemble(OBS, ACT, 4, 2, hidden=16, layers=2)
    obs, real_action = torch.randn(64, OBS), torch.rand(64, ACT) * 2 - 1
    holdout_u = torch.rand(500) * 3
    part = HStepImprovement(ImprovementSettings(horizon=2, threshold="holdout", threshold_quantile=0.8))
    assert part.held_threshold.isnan()  # nothing held before a fit
    part.calibrate({"holdout": holdout_u, "fresh": holdout_u * 2, "insample": holdout_u / 2})
    torch.testing.assert_close(part.held_threshold, torch.quantile(holdout_u, 0.8))
    result = extended_improvement(actor, critic, model, obs, real_action, torch.tensor(0.2), part.settings,
                                  part.held_threshold)
    torch.testing.assert_close(result.diagnostics["u_threshold"], torch.quantile(holdout_u, 0.8))
    quantile_rule = HStepImprovement(ImprovementSettings(horizon=2, threshold="quantile", threshold_quantile=0.8))
    quantile_rule.calibrate({"holdout": holdout_u, "fresh": holdout_u * 2})
    assert quantile_rule.held_threshold.isnan()
    u_real = ovr_uncertainty(*model(obs, real_action)).detach()
    batch_rule = extended_improvement(actor, critic, model, obs, real_action, torch.tensor(0.2), quantile_rule.settings,
                                      quantile_rule.held_threshold)
    torch.testing.assert_close(batch_rule.diagnostics["u_threshold"], torch.quantile(u_real, 0.8))
    fresh_rule = HStepImprovement(ImprovementSettings(horizon=2, threshold="fresh", threshold_quantile=0.8))
    fresh_rule.calibrate({"holdout": holdout_u, "insample": holdout_u})  # the first fit: no fresh pairs yet
    assert fresh_rule.held_threshold.isnan()
    fresh_rule.calibrate({"holdout": holdout_u, "fresh": holdout_u * 2})
    torch.testing.assert_close(fresh_rule.held_threshold, torch.quantile(holdout_u * 2, 0.8))


def test_u_on_the_imagined_pairs_is_logged_over_the_rows_alive_at_steps_after_the_first():
    """``log_u_imagined_q*`` are the quantiles of u over the pairs at steps 1 .. H-1 of the rows
    still imagining there, masked or compacted alike; none reached (H 1): NaN."""
    actor, critic = _nets()
    model = GaussianEnsemble(OBS, ACT, 4, 2, hidden=16, layers=2)
    obs, real_action = torch.randn(32, OBS), torch.rand(32, ACT) * 2 - 1
    settings = ImprovementSettings(horizon=4, threshold="quantile", threshold_quantile=0.7)
    noise = ImaginationNoise.draw(4, obs, ACT, 2)
    seen = []
    step = model.step

    def recording_step(state, action, **kwargs):
        out = step(state, action, **kwargs)
        seen.append(out.u.detach())
        return out

    model.step = recording_step
    masked = extended_improvement(actor, critic, model, obs, real_action, torch.tensor(0.2), settings, noise=noise)
    model.step = step
    compacted = extended_improvement(actor, critic, model, obs, real_action, torch.tensor(0.2), settings, noise=noise,
                                     compact=True)
    # masked: every row runs every step; the alive ones at step t are those whose horizon reached t
    alive = [masked.horizon >= t for t in range(1, 4)]
    expected = torch.cat([u[a] for u, a in zip(seen[1:], alive)])
    assert expected.numel() > 0
    for q in (10, 50, 90):
        want = torch.quantile(expected, q / 100).log()
        torch.testing.assert_close(masked.diagnostics[f"log_u_imagined_q{q}"], want)
        torch.testing.assert_close(compacted.diagnostics[f"log_u_imagined_q{q}"], want, rtol=1e-4, atol=1e-5)
    one_step = extended_improvement(actor, critic, model, obs, real_action, torch.tensor(0.2),
                                    ImprovementSettings(horizon=1))
    assert one_step.diagnostics["log_u_imagined_q50"].isnan()
