"""The batched MLP: several independent MLPs evaluated at once.

The ensemble members of the world model, the twin critics and the H actor heads are all "M
small MLPs of the same shape". Storing each layer as one weight tensor [M, in, out] turns M
forward passes into one batched matmul (``torch.bmm``) per layer, with no Python loop over
members in the forward or backward pass.

The bias is added after the matmul rather than fused into it (``baddbmm``, ``addmm``): under
``torch.func.vmap`` (a group of seeds, algorithms/seed_group.py) ``bmm`` + bias is the same kernel
as alone, so a seed in a group computes bit-identically to the seed alone, while the fused ops'
batching rules take another kernel for a 1-wide output (the critics' last layer) and round
differently. On the CPU the two cost the same within noise (forward and backward at the nets'
shapes, 0.91-1.08x).
"""

from __future__ import annotations

import math
from typing import Sequence, Union

import torch
from torch import nn

# One member's (weight [in, out], bias [1, out]) per layer, input layer first.
MemberWeights = Sequence[tuple[torch.Tensor, torch.Tensor]]

ACTIVATIONS = {"relu": nn.ReLU, "silu": nn.SiLU, "tanh": nn.Tanh, "elu": nn.ELU}
INITS = ("linear", "mbpo")


class BatchedLinear(nn.Module):
    """M independent affine maps: x [M, B, in] -> x @ W[m] + b[m], shape [M, B, out].

    ``init``: "linear", each member like ``nn.Linear`` (uniform in +-1/sqrt(in)), so a batched
    layer with M members matches M separate ``nn.Linear`` layers in distribution; "mbpo", MBPO's
    world-model layers (jannerm/mbpo fc.py, mbrl-lib): weights from a normal of std
    1/(2 sqrt(in)) truncated at two stds, zero biases.
    """

    def __init__(self, members: int, in_features: int, out_features: int, init: str = "linear") -> None:
        super().__init__()
        if init not in INITS:
            raise ValueError(f"unknown init {init!r}; choose from {', '.join(INITS)}")
        self.members, self.in_features, self.out_features = members, in_features, out_features
        self.init_scheme = init
        self.weight = nn.Parameter(torch.empty(members, in_features, out_features))
        self.bias = nn.Parameter(torch.empty(members, 1, out_features))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.init_scheme == "mbpo":
            std = 1.0 / (2.0 * math.sqrt(self.in_features))
            nn.init.trunc_normal_(self.weight, std=std, a=-2.0 * std, b=2.0 * std)
            nn.init.zeros_(self.bias)
            return
        bound = 1.0 / math.sqrt(self.in_features)
        nn.init.uniform_(self.weight, -bound, bound)
        nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.bmm(x, self.weight)
        return out + self.bias.to(out.dtype)  # under autocast: bf16 as baddbmm gave, not promoted to fp32

    def extra_repr(self) -> str:
        return f"members={self.members}, in_features={self.in_features}, out_features={self.out_features}"


class BatchedMLP(nn.Module):
    """M MLPs ``in -> hidden x layers -> out`` with one batched matmul per layer.

    ``forward`` takes x of shape [M, B, in] (each member its own inputs) or [B, in] (the same
    inputs for every member) and returns [M, B, out].
    """

    def __init__(
        self,
        members: int,
        in_features: int,
        out_features: int,
        hidden: int = 256,
        layers: int = 2,
        activation: str = "relu",
        init: str = "linear",
    ) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; choose from {', '.join(ACTIVATIONS)}")
        self.members = members
        sizes = [in_features] + [hidden] * layers + [out_features]
        self.linears = nn.ModuleList(BatchedLinear(self.members, a, b, init) for a, b in zip(sizes[:-1], sizes[1:]))
        self.activation = ACTIVATIONS[activation]()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:
            x = x.unsqueeze(0).expand(self.members, -1, -1)
        for i, linear in enumerate(self.linears):
            x = linear(x)
            if i < len(self.linears) - 1:
                x = self.activation(x)
        return x

    def member_weights(self) -> list[MemberWeights]:
        """Every member's (weight, bias) of every layer, as views of the stacked parameters.

        One ``unbind`` per parameter: its backward writes all members' gradients in one stack.
        Indexing one member per call instead allocates and zero-fills the whole stacked gradient
        on every call (measured: 18 % of an MPDP improvement with H 10 heads on the CPU).
        """
        per_layer = [(linear.weight.unbind(0), linear.bias.unbind(0)) for linear in self.linears]
        return [[(weights[m], biases[m]) for weights, biases in per_layer] for m in range(self.members)]

    def forward_member(self, x: torch.Tensor, member: Union[int, MemberWeights], detach: bool = False) -> torch.Tensor:
        """Member ``member`` alone on x [B, in] -> [B, out], without computing the others.

        ``member``: its index, or its weights from ``member_weights`` (tensors, so that one
        compiled graph serves every member). ``detach``: its weights as constants (gradients
        reach x only).
        """
        if isinstance(member, int):
            member = [(linear.weight[member], linear.bias[member]) for linear in self.linears]
        for i, (weight, bias) in enumerate(member):
            if detach:
                weight, bias = weight.detach(), bias.detach()
            x = torch.mm(x, weight)
            x = x + bias.to(x.dtype)
            if i < len(member) - 1:
                x = self.activation(x)
        return x
