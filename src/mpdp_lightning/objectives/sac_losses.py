"""SAC's three losses as pure functions of (nets, batch): each returns the loss and detached
diagnostics, and each reaches only the parameters it is meant to train.

- ``critic_loss``: soft Bellman regression of both Q networks on real transitions. The target
  uses the Polyak target critics and a fresh action from pi_0 under no gradient; ``terminated``
  (a true terminal) cuts the bootstrap, truncation by the time limit does not.
- ``actor_loss``: E[alpha log pi_0(a|s) - min_j Q_j(s, a)], a ~ pi_0 reparameterised, with the
  critics' weights frozen (gradients reach the action, not the critic).
- ``temperature_loss``: SAC v2's automatic entropy tuning towards ``target_entropy``.
"""

from __future__ import annotations

from typing import Optional

import torch
from tensordict import TensorDictBase

from mpdp_lightning.models.policy import SquashedGaussianHeads, TwinQ, frozen


def critic_loss(
    critic: TwinQ,
    critic_target: TwinQ,
    actor: SquashedGaussianHeads,
    batch: TensorDictBase,
    gamma: float,
    alpha: torch.Tensor,
    noise: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``noise``: the next action's standard normal draw [B, act_dim]; None: drawn here."""
    with torch.no_grad():
        next_action, next_log_prob = actor.sample(batch["next_obs"], 0, noise=noise)
        next_q = critic_target(batch["next_obs"], next_action).min(dim=0).values
        not_done = (~batch["terminated"]).to(next_q.dtype)
        target = batch["reward"] + gamma * not_done * (next_q - alpha * next_log_prob)
    q = critic(batch["obs"], batch["action"])  # [2, B]
    loss = (q - target).pow(2).mean(dim=1).sum()
    return loss, {"q_mean": q.detach().mean(), "target_mean": target.mean()}


def actor_loss(
    actor: SquashedGaussianHeads,
    critic: TwinQ,
    obs: torch.Tensor,
    alpha: torch.Tensor,
    noise: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``noise``: the action's standard normal draw [B, act_dim]; None: drawn here."""
    action, log_prob = actor.sample(obs, 0, noise=noise)
    with frozen(critic):
        q = critic(obs, action).min(dim=0).values
    loss = (alpha * log_prob - q).mean()
    return loss, {"log_prob": log_prob.detach(), "entropy": -log_prob.detach().mean()}


def temperature_loss(log_alpha: torch.Tensor, log_prob: torch.Tensor, target_entropy: float) -> torch.Tensor:
    # Gradient on log_alpha is -(E[log pi] + target_entropy): alpha grows while the entropy
    # -E[log pi] is below the target, and shrinks while it is above.
    return -(log_alpha * (log_prob.detach() + target_entropy)).mean()
