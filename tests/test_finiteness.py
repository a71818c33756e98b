"""The NaN/inf guard names the phase that broke first, not the first broken metric."""

import torch

from mpdp_lightning.training.finiteness import NonFiniteGuard, non_finite_parameters
from mpdp_lightning.models.policy import TwinQ

PHASES = ("model", "critic", "actor", "temperature")
NAN, INF = float("nan"), float("inf")


def _ok():
    return [torch.ones(3)]


def test_nothing_non_finite_reads_none():
    guard = NonFiniteGuard(PHASES)
    for update in range(3):
        for phase in PHASES:
            guard.record_finiteness(phase, torch.tensor(1.0), _ok())
        guard.advance()
    assert guard.first() is None


def test_an_earlier_update_wins_over_an_earlier_phase():
    guard = NonFiniteGuard(PHASES)
    guard.start_at(3)
    guard.record_finiteness("critic", torch.tensor(1.0), _ok())
    guard.record_finiteness("temperature", torch.tensor(INF), _ok())  # the temperature broke in update 3 ...
    guard.advance()
    guard.record_finiteness("critic", torch.tensor(NAN), _ok())  # ... and the critic, which runs first, in update 4
    guard.record_finiteness("actor", torch.tensor(NAN), _ok())
    first = guard.first()
    assert (first.phase, first.update, first.what) == ("temperature", 3, "loss became inf")


def test_within_an_update_the_phase_that_runs_first_wins():
    guard = NonFiniteGuard(PHASES)
    guard.start_at(7)
    guard.record_finiteness("actor", torch.tensor(NAN), _ok())
    guard.record_finiteness("critic", torch.tensor(NAN), _ok())
    assert (guard.first().phase, guard.first().what) == ("critic", "loss became nan")


def test_parameters_broken_by_a_step_with_a_finite_loss():
    guard = NonFiniteGuard(PHASES)
    guard.start_at(2)
    guard.record_finiteness("temperature", torch.tensor(0.5), [torch.tensor([1.0, NAN])])
    first = guard.first()
    assert (first.phase, first.update, first.what) == ("temperature", 2, "parameters became non-finite")


def test_non_finite_parameters_names_the_submodule():
    module = torch.nn.Module()
    module.critic, module.actor = TwinQ(3, 1, 8, 1, "relu"), torch.nn.Linear(3, 1)
    assert non_finite_parameters(module) == []
    with torch.no_grad():
        module.actor.weight[0, 1] = NAN
    assert non_finite_parameters(module) == ["actor"]
