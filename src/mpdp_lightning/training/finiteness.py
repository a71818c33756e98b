"""Which phase produced the first NaN or inf of a run, remembered on the device.

A NaN spreads: a temperature that turns NaN makes the next critic target NaN, and that the next
actor loss, so by the time anyone looks every phase is broken and naming the first broken metric
names the wrong culprit. Each phase therefore records, right after its optimizer step, whether its
loss and its parameters are still finite; the guard keeps the smallest (update, phase) at which one
was not. Recording is a few device ops and no host sync; reading (``first``) syncs once, so it is
done at log points, before checkpoints and when an action comes out non-finite. The update index
is a device counter too (``advance`` at the end of each update), so a CUDA graph that captures an
update records the right index at every replay instead of the one it was captured at.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

import torch
from torch import nn

NEVER = torch.iinfo(torch.int64).max
KINDS = ("loss became nan", "loss became inf", "parameters became non-finite")


@dataclass(frozen=True)
class FirstNonFinite:
    phase: str
    update: int
    what: str  # one of KINDS


class NonFiniteGuard(nn.Module):
    """Args:
    phases: the phases in the order they run within one update (the order breaks ties).
    """

    def __init__(self, phases: Sequence[str]) -> None:
        super().__init__()
        self.phases = tuple(phases)
        # code = ((update * phases) + phase) * kinds + kind; NEVER while everything is finite
        self.register_buffer("code", torch.tensor(NEVER, dtype=torch.int64), persistent=False)
        self.register_buffer("update", torch.zeros((), dtype=torch.int64), persistent=False)

    @torch.no_grad()
    def advance(self) -> None:
        """The current update is over: the next records belong to the next one (on the device)."""
        self.update.add_(1)

    def start_at(self, update: int) -> None:
        """Set the update index from the host (a resumed run)."""
        self.update.fill_(update)

    @torch.no_grad()
    def record_finiteness(self, phase: str, loss: torch.Tensor, parameters: Iterable[torch.Tensor]) -> None:
        loss = loss.detach().float()
        params = [p.detach() for p in parameters]
        if not params:
            params_finite = torch.ones_like(loss, dtype=torch.bool)
        elif self.code.dim() == 0:
            params_finite = torch.isfinite(torch.nn.utils.get_total_norm(params))
        else:  # a group of seeds (algorithms/seed_group.py): a record per seed, each its own slices
            params_finite = torch.stack([torch.isfinite(p.reshape(len(p), -1)).all(dim=1) for p in params]).all(dim=0)
        kind = torch.where(torch.isnan(loss), 0, torch.where(torch.isinf(loss), 1, 2))
        bad = ~(torch.isfinite(loss) & params_finite)
        base = (self.update * len(self.phases) + self.phases.index(phase)) * len(KINDS)
        self.code.copy_(torch.where(bad, torch.minimum(self.code, base + kind), self.code))

    def first(self, seed: Optional[int] = None) -> Optional[FirstNonFinite]:
        """The first phase that went non-finite, or None (one host sync); in a group of seeds,
        seed ``seed``'s (its position in the group)."""
        code = int((self.code if seed is None else self.code[seed]).item())
        if code == NEVER:
            return None
        position, kind = divmod(code, len(KINDS))
        update, phase = divmod(position, len(self.phases))
        return FirstNonFinite(self.phases[phase], update, KINDS[kind])


def non_finite_parameters(module: nn.Module) -> list[str]:
    """Top-level submodules (``critic``, ``actor``, ...) holding a NaN or inf parameter."""
    broken = []
    for name, child in module.named_children():
        params = [p.detach() for p in child.parameters()]
        if params and not torch.isfinite(torch.nn.utils.get_total_norm(params)):
            broken.append(name)
    return broken
