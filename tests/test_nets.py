"""The batched MLP block equals its members evaluated one by one."""

import torch
from torch import nn

from mpdp_lightning.models.nets import BatchedMLP


def _member_as_sequential(mlp: BatchedMLP, m: int) -> nn.Sequential:
    layers = []
    for i, linear in enumerate(mlp.linears):
        lin = nn.Linear(linear.in_features, linear.out_features)
        with torch.no_grad():
            lin.weight.copy_(linear.weight[m].T)
            lin.bias.copy_(linear.bias[m, 0])
        layers.append(lin)
        if i < len(mlp.linears) - 1:
            layers.append(nn.SiLU())
    return nn.Sequential(*layers)


def test_batched_forward_equals_each_member_alone():
    mlp = BatchedMLP(members=4, in_features=5, out_features=3, hidden=8, layers=3, activation="silu")
    x = torch.randn(4, 10, 5)
    out = mlp(x)
    assert out.shape == (4, 10, 3)
    for m in range(4):
        torch.testing.assert_close(out[m], _member_as_sequential(mlp, m)(x[m]))
        torch.testing.assert_close(mlp.forward_member(x[m], m), out[m])


def test_shared_input_is_broadcast_to_every_member():
    mlp = BatchedMLP(members=3, in_features=4, out_features=2, hidden=6, layers=2)
    x = torch.randn(7, 4)
    torch.testing.assert_close(mlp(x), mlp(x.expand(3, 7, 4)))


def test_members_are_independent_in_the_backward_pass():
    mlp = BatchedMLP(members=3, in_features=4, out_features=2, hidden=6, layers=2)
    mlp(torch.randn(3, 7, 4))[1].sum().backward()
    for linear in mlp.linears:
        assert linear.weight.grad[1].abs().sum() > 0
        assert linear.weight.grad[0].abs().sum() == 0 and linear.weight.grad[2].abs().sum() == 0
