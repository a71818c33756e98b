"""Actor heads, twin critics and the temperature, all on the batched MLP block.

The actor holds H squashed-Gaussian heads pi_0 .. pi_{H-1} in one BatchedMLP (SAC uses H = 1;
MPDP trains all H jointly and acts with pi_0 alone). The critic is SAC v2's twin Q, also one
BatchedMLP with two members.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterator, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from mpdp_lightning.models.nets import BatchedMLP, MemberWeights

Head = Union[int, MemberWeights]  # a head: its index, or its weights (BatchedMLP.member_weights)

_LOG_2 = math.log(2.0)
_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


class SquashedGaussianHeads(nn.Module):
    """H tanh-squashed Gaussian policies over a box action space, evaluated as one batched MLP.

    Actions come out in the environment's units: ``low + (tanh(u) + 1) / 2 * (high - low)``.
    The log-std is squashed into [log_std_min, log_std_max] with a tanh, as in CleanRL's SAC,
    which keeps it smooth where a hard clamp would cut the gradient.
    """

    def __init__(
        self,
        obs_dim: int,
        act_dim: int,
        action_low: Sequence[float],
        action_high: Sequence[float],
        heads: int = 1,
        hidden: int = 256,
        layers: int = 2,
        activation: str = "relu",
        log_std_min: float = -5.0,
        log_std_max: float = 2.0,
    ) -> None:
        super().__init__()
        self.heads, self.act_dim = heads, act_dim
        self.log_std_min, self.log_std_max = log_std_min, log_std_max
        self.net = BatchedMLP(heads, obs_dim, 2 * act_dim, hidden, layers, activation)
        low = torch.as_tensor(action_low, dtype=torch.float32)
        high = torch.as_tensor(action_high, dtype=torch.float32)
        self.register_buffer("action_scale", (high - low) / 2.0)
        self.register_buffer("action_bias", (high + low) / 2.0)

    def _split(self, out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, raw_log_std = out.chunk(2, dim=-1)
        log_std = self.log_std_min + 0.5 * (self.log_std_max - self.log_std_min) * (torch.tanh(raw_log_std) + 1.0)
        return mean, log_std

    def head_weights(self) -> list[MemberWeights]:
        """Each head's weights as views that carry gradient (see BatchedMLP.member_weights)."""
        return self.net.member_weights()

    def distribution_params(self, obs: torch.Tensor, head: Head = 0, detach: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and log-std of head ``head``'s pre-squash Gaussian for obs [B, obs_dim]."""
        return self._split(self.net.forward_member(obs, head, detach))

    def sample(
        self, obs: torch.Tensor, head: Head = 0, detach_params: bool = False, noise: Optional[torch.Tensor] = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A reparameterised action of head ``head`` and its log-probability (summed over dims).

        ``head``: its index, or its weights from ``head_weights()`` (one compiled graph serves
        every head, and the gradient of all heads is written once per backward).
        ``detach_params``: the head's weights enter as constants, so the action and its
        log-probability carry gradient to ``obs`` only (MPDP's value at the horizon).
        ``noise``: the standard normal draw [B, act_dim] (drawn here when None); given, the
        sample is a deterministic function of it (compiled and compacted runs use the same draw).
        """
        mean, log_std = self.distribution_params(obs, head, detach_params)
        if noise is None:
            noise = torch.randn_like(mean)
        pre_tanh = mean + noise * log_std.exp()
        action = torch.tanh(pre_tanh) * self.action_scale + self.action_bias
        # log N(u; mean, std) - log |d action / d u|, with log(1 - tanh(u)^2) written stably.
        log_prob = -0.5 * noise.pow(2) - log_std - _HALF_LOG_2PI
        log_abs_det = 2.0 * (_LOG_2 - pre_tanh - F.softplus(-2.0 * pre_tanh)) + self.action_scale.log()
        return action, (log_prob - log_abs_det).sum(dim=-1)

    @torch.no_grad()
    def act(self, obs: torch.Tensor, deterministic: bool = False, head: int = 0,
            noise: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Head ``head``'s action (pi_0's for acting in the environment): its mode if
        deterministic, else a sample (without the log-probability, which acting does not need)
        with the standard normal draw ``noise`` [B, act_dim] (drawn here when None)."""
        mean, log_std = self.distribution_params(obs, head)
        if not deterministic:
            mean = mean + (torch.randn_like(mean) if noise is None else noise) * log_std.exp()
        return torch.tanh(mean) * self.action_scale + self.action_bias


class TwinQ(nn.Module):
    """Two Q networks Q_j(s, a) in one batched MLP; ``forward`` returns [2, B].

    Always fp32, whatever the trainer's precision (autocast is switched off inside): bf16 keeps
    8 significant bits, so a Q of ~300 would be rounded by up to 1 and the TD targets quantised.
    """

    def __init__(self, obs_dim: int, act_dim: int, hidden: int = 256, layers: int = 2, activation: str = "relu") -> None:
        super().__init__()
        self.net = BatchedMLP(2, obs_dim + act_dim, 1, hidden, layers, activation)

    def forward(self, obs: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        with torch.autocast(obs.device.type, enabled=False):
            return self.net(torch.cat([obs, action], dim=-1).float()).squeeze(-1)


class Temperature(nn.Module):
    """SAC's entropy temperature alpha, kept as log(alpha); learnable only when auto-tuned."""

    def __init__(self, initial_alpha: float, learnable: bool) -> None:
        super().__init__()
        self.log_alpha = nn.Parameter(torch.tensor(math.log(initial_alpha)), requires_grad=learnable)

    @property
    def alpha(self) -> torch.Tensor:
        return self.log_alpha.detach().exp()


@contextmanager
def frozen(module: nn.Module) -> Iterator[nn.Module]:
    """Inside the block ``module``'s weights take no gradient, while gradients still flow through
    it to its inputs (the critics, and the world model, inside an actor update). Cheaper than
    ``torch.func.functional_call`` with detached weights: no reparametrisation, and autograd
    skips the weight gradients altogether."""
    params = [p for p in module.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield module
    finally:
        for p in params:
            p.requires_grad_(True)
