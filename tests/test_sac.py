"""SAC's pieces: each loss reaches only its own parameters, and each phase moves only its nets."""

import math

import pytest
import torch
from tensordict import TensorDict
from torch.distributions import AffineTransform, Normal, TanhTransform, TransformedDistribution

from mpdp_lightning.models.policy import SquashedGaussianHeads, Temperature, TwinQ
from mpdp_lightning.algorithms.parts.improvement import one_step_improvement
from mpdp_lightning.algorithms.sac import SAC
from mpdp_lightning.objectives.sac_losses import actor_loss, critic_loss, temperature_loss

OBS, ACT, B = 4, 1, 16  # inverted_pendulum's sizes


def _batch(terminated=False):
    return TensorDict(
        obs=torch.randn(B, OBS),
        action=torch.rand(B, ACT) * 6 - 3,
        reward=torch.randn(B),
        next_obs=torch.randn(B, OBS),
        terminated=torch.full((B,), terminated),
        batch_size=[B],
    )


def _nets():
    actor = SquashedGaussianHeads(OBS, ACT, [-3.0], [3.0], heads=1, hidden=16, layers=2)
    critic = TwinQ(OBS, ACT, hidden=16, layers=2)
    target = TwinQ(OBS, ACT, hidden=16, layers=2)
    target.load_state_dict(critic.state_dict())
    return actor, critic, target


def _grads(module):
    return [p.grad for p in module.parameters()]


def test_log_prob_matches_torch_distributions():
    actor, _, _ = _nets()
    obs = torch.randn(B, OBS)
    action, log_prob = actor.sample(obs)
    mean, log_std = actor.distribution_params(obs)
    reference = TransformedDistribution(
        Normal(mean, log_std.exp()), [TanhTransform(), AffineTransform(actor.action_bias, actor.action_scale)]
    )
    torch.testing.assert_close(log_prob, reference.log_prob(action).sum(-1), atol=1e-4, rtol=1e-4)
    assert action.abs().max() <= 3.0


def test_critic_loss_reaches_only_the_critic():
    actor, critic, target = _nets()
    loss, _ = critic_loss(critic, target, actor, _batch(), 0.99, torch.tensor(0.2))
    loss.backward()
    assert all(g is not None for g in _grads(critic))
    assert all(g is None for g in _grads(actor) + _grads(target))


def test_actor_loss_reaches_only_the_actor():
    actor, critic, _ = _nets()
    loss, info = actor_loss(actor, critic, torch.randn(B, OBS), torch.tensor(0.2))
    loss.backward()
    assert all(g is not None for g in _grads(actor))
    assert all(g is None for g in _grads(critic))
    assert not info["log_prob"].requires_grad


def test_temperature_loss_raises_alpha_when_entropy_is_below_target():
    temperature = Temperature(0.2, learnable=True)
    low_entropy_log_prob = torch.full((B,), 3.0)  # entropy -3, below a target of -1
    temperature_loss(temperature.log_alpha, low_entropy_log_prob, target_entropy=-1.0).backward()
    assert temperature.log_alpha.grad < 0  # gradient descent increases log alpha


def test_terminal_cuts_the_bootstrap_and_truncation_does_not():
    actor, critic, target = _nets()
    batch = _batch(terminated=True)
    _, info = critic_loss(critic, target, actor, batch, 0.99, torch.tensor(0.2))
    torch.testing.assert_close(info["target_mean"], batch["reward"].mean())
    batch["terminated"] = torch.zeros(B, dtype=torch.bool)  # a time-limit truncation is stored like this
    _, info = critic_loss(critic, target, actor, batch, 0.99, torch.tensor(0.2))
    assert not torch.allclose(info["target_mean"], batch["reward"].mean())


def _module_without_trainer(**kwargs):
    """A SAC module whose phases run with plain optimizers, outside a Trainer."""
    module = SAC("inverted_pendulum", hidden=16, layers=2, **kwargs)
    optimizers = module.configure_optimizers()
    module.optimizers = lambda use_pl_optimizer=True: optimizers
    return module


def _snapshot(module):
    return {name: p.detach().clone() for name, p in module.named_parameters()}


def _changed(before, module):
    return {name for name, p in module.named_parameters() if not torch.equal(before[name], p)}


def test_critic_phase_moves_only_the_critic_and_polyak_moves_the_target():
    module = _module_without_trainer()
    before, target_before = _snapshot(module), _snapshot(module.critic_target)
    module.critic_step(_batch())
    changed = _changed(before, module)
    assert any(name.startswith("critic.") for name in changed)
    assert all(name.startswith(("critic.", "critic_target.")) for name in changed)
    tau = module.hparams.tau
    for (name, p), online in zip(module.critic_target.named_parameters(), module.critic.parameters()):
        torch.testing.assert_close(p, (1 - tau) * target_before[name] + tau * online.detach())


def test_actor_phase_moves_no_critic_weight():
    module = _module_without_trainer(auto_alpha=True)
    before = _snapshot(module)
    _, log_prob = one_step_improvement(module, _batch())
    changed = _changed(before, module)
    assert changed and all(name.startswith("actor.") for name in changed)
    module.temperature_step(log_prob)
    assert _changed(before, module) - changed == {"temperature.log_alpha"}


def test_fixed_alpha_is_not_trained():
    module = _module_without_trainer(alpha=0.2, auto_alpha=False)
    assert len(module.configure_optimizers()) == 2
    module.temperature_step(torch.zeros(B))
    assert math.isclose(module.temperature.alpha.item(), 0.2, rel_tol=1e-6)


@pytest.mark.parametrize("bad", [dict(actor_lr=0.0), dict(critic_lr=-1e-3), dict(gamma=1.5), dict(task="walker")])
def test_bad_settings_fail_at_construction(bad):
    kwargs = dict(task="inverted_pendulum") | bad
    with pytest.raises(ValueError):
        SAC(**kwargs)


def test_q_under_bf16_autocast_is_computed_in_fp32():
    # A critic trained to values near 300: bf16 keeps 8 significant bits, so Q would be rounded
    # by up to 1 and the TD targets quantised; the critic must stay in fp32 whatever the precision.
    torch.manual_seed(0)
    critic = TwinQ(OBS, ACT, hidden=32, layers=2)
    optimizer = torch.optim.Adam(critic.parameters(), lr=1e-2)
    obs, action = torch.randn(256, OBS), torch.rand(256, ACT) * 6 - 3
    value = 300.0 + 10.0 * obs[:, 0] + action[:, 0]
    for _ in range(300):
        optimizer.zero_grad()
        (critic(obs, action) - value).pow(2).mean().backward()
        optimizer.step()
    with torch.no_grad():
        q32 = critic(obs, action)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            q16 = critic(obs, action)
    assert (q32.mean() - 300.0).abs() < 20.0, "the critic should have learned values near 300"
    assert q16.dtype == torch.float32
    torch.testing.assert_close(q16, q32, rtol=1e-6, atol=1e-6)  # bf16 would be off by ~0.5
