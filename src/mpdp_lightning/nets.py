"""The batched MLP: several independent MLPs evaluated at once.

The ensemble members of the world model, the twin critics and the H actor heads are all "M
small MLPs of the same shape". Storing each layer as one weight tensor [M, in, out] turns M
forward passes into one batched matmul (``torch.baddbmm``) per layer, with no Python loop over
members in the forward or backward pass.
"""

from __future__ import annotations

import math

import torch
from torch import nn

ACTIVATIONS = {"relu": nn.ReLU, "silu": nn.SiLU, "tanh": nn.Tanh, "elu": nn.ELU}


class BatchedLinear(nn.Module):
    """M independent affine maps: x [M, B, in] -> x @ W[m] + b[m], shape [M, B, out].

    Each member is initialised like ``nn.Linear`` (uniform in +-1/sqrt(in)), so a batched layer
    with M members matches M separate ``nn.Linear`` layers in distribution.
    """

    def __init__(self, members: int, in_features: int, out_features: int) -> None:
        super().__init__()
        self.members, self.in_features, self.out_features = members, in_features, out_features
        self.weight = nn.Parameter(torch.empty(members, in_features, out_features))
        self.bias = nn.Parameter(torch.empty(members, 1, out_features))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        bound = 1.0 / math.sqrt(self.in_features)
        nn.init.uniform_(self.weight, -bound, bound)
        nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.baddbmm(self.bias, x, self.weight)

    def forward_member(self, x: torch.Tensor, member: int, detach: bool = False) -> torch.Tensor:
        """Only member ``member`` on x [B, in] (used when one head acts alone); ``detach``: its
        weights as constants, so gradients reach x but not the weights."""
        weight, bias = self.weight[member], self.bias[member]
        if detach:
            weight, bias = weight.detach(), bias.detach()
        return torch.addmm(bias, x, weight)

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
    ) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; choose from {', '.join(ACTIVATIONS)}")
        self.members = members
        sizes = [in_features] + [hidden] * layers + [out_features]
        self.linears = nn.ModuleList(BatchedLinear(members, a, b) for a, b in zip(sizes[:-1], sizes[1:]))
        self.activation = ACTIVATIONS[activation]()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:
            x = x.unsqueeze(0).expand(self.members, -1, -1)
        for i, linear in enumerate(self.linears):
            x = linear(x)
            if i < len(self.linears) - 1:
                x = self.activation(x)
        return x

    def forward_member(self, x: torch.Tensor, member: int, detach: bool = False) -> torch.Tensor:
        """Member ``member`` alone on x [B, in] -> [B, out], without computing the others;
        ``detach``: with its weights as constants (gradients reach x only)."""
        for i, linear in enumerate(self.linears):
            x = linear.forward_member(x, member, detach)
            if i < len(self.linears) - 1:
                x = self.activation(x)
        return x
