"""The CUDA path: whenever torch sees a GPU, each update is captured once as a CUDA graph and
replayed, trains as the eager update does, and runs without a host synchronisation.

Skipped on machines without CUDA (CI's and the 2-core CPU machine); run wherever one is present.
test_update_capture.py checks the captured function's contract on any machine.
"""

import pytest
import torch
from tensordict import TensorDict

from helpers import TINY_MODEL, fit_args
from mpdp_lightning.algorithms.mpdp import MPDP
from mpdp_lightning.algorithms.agent import Agent
from mpdp_lightning.cli import main
from mpdp_lightning.training.cuda_graph import CapturedUpdate

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

TINY = {"sac": (), "mbpo": TINY_MODEL, "mpdp": (*TINY_MODEL, "--model.horizon", "3")}
WARMUP = 3  # CapturedUpdate's eager calls; the next call captures


@pytest.mark.parametrize("algo,precision", [("sac", "32-true"), ("mbpo", "32-true"), ("mpdp", "32-true"),
                                            ("mpdp", "bf16-mixed")])
def test_updates_are_replayed_from_a_cuda_graph_and_never_synchronise_with_the_host(in_tmp, monkeypatch, algo, precision):
    # Every update after the capture (batch draw, graph replay, metrics) runs under sync debug
    # mode "error": a .item(), a nonzero, a blocking copy raises. Env steps and model fits
    # (every 100 env steps here) stay outside, as in a run. MPDP's imagined step is compiled, as
    # by default on CUDA.
    step = Agent.training_step
    strict = []

    def strict_step(self, batch, batch_idx):
        if self.updates <= WARMUP:  # the eager warm-up calls and the capture
            return step(self, batch, batch_idx)
        torch.cuda.set_sync_debug_mode("error")
        try:
            step(self, batch, batch_idx)
        finally:
            torch.cuda.set_sync_debug_mode(0)
        strict.append(self.captured_update is not None and self.captured_update.captured)

    monkeypatch.setattr(Agent, "training_step", strict_step)
    main(fit_args("hopper", 200, "--trainer.accelerator", "gpu", "--trainer.devices", "1",
                  "--trainer.precision", precision, *TINY[algo], algo=algo))
    assert len(strict) >= 90 and all(strict)  # every strict update was a replay


def _module(graph: bool, compiled: bool) -> MPDP:
    """A small MPDP on the GPU with plain optimizers, outside a Trainer, as setup() makes it."""
    torch.manual_seed(0)
    module = MPDP("hopper", hidden=32, layers=2, ensemble_size=3, num_elites=2, model_hidden=32, model_layers=2,
                  horizon=3, auto_alpha=True, compile=compiled).cuda()
    module.execution_plan(torch.device("cuda"), "32-true")
    module.captured_update = CapturedUpdate(module.update, warmup=WARMUP) if graph else None
    optimizers = module.configure_optimizers()  # capturable where captured
    module.optimizers = lambda use_pl_optimizer=True: optimizers
    return module


def _batches(n: int, size: int = 64) -> list[TensorDict]:
    generator = torch.Generator().manual_seed(1)
    return [
        TensorDict(
            obs=torch.randn(size, 11, generator=generator),
            action=torch.rand(size, 3, generator=generator) * 2 - 1,
            reward=torch.randn(size, generator=generator),
            next_obs=torch.randn(size, 11, generator=generator),
            terminated=torch.rand(size, generator=generator) < 0.1,
            batch_size=[size],
        ).cuda()
        for _ in range(n)
    ]


@pytest.mark.parametrize("compiled", [False, True])
def test_a_captured_update_trains_as_the_eager_one_and_sees_a_refitted_model(compiled):
    """The same weights, batches and random draws (the generator reseeded before each update:
    a replay draws from its current seed and offset as the eager kernels do): the same weights
    after every update, including after the world model changes in place between two updates,
    as a model fit changes it."""
    batches = _batches(8)
    results = []
    for graph in (False, True):
        module = _module(graph, compiled)
        losses = []
        for i, batch in enumerate(batches):
            if i == 5:  # a "fit": new weights and elites, in the same tensors
                with torch.no_grad():
                    for p in module.world_model.parameters():
                        p.mul_(1.05)
                    module.world_model.elites.copy_(torch.tensor([2, 0]))
            torch.cuda.manual_seed(100 + i)
            metrics = module.captured_update(batch) if graph else module.update(batch)
            losses.append(torch.stack([metrics["train/critic_loss"], metrics["train/actor_loss"]]).cpu())
        if graph:
            assert module.captured_update.captured and module.captured_update.calls == len(batches)
        results.append((torch.stack(losses), {k: v.detach().cpu() for k, v in module.state_dict().items()}))
    (eager_losses, eager_weights), (graph_losses, graph_weights) = results
    torch.testing.assert_close(graph_losses, eager_losses, rtol=1e-4, atol=1e-5)
    for name, value in eager_weights.items():
        torch.testing.assert_close(graph_weights[name], value, rtol=1e-4, atol=1e-5, equal_nan=True, msg=name)


def test_a_replay_refuses_a_batch_of_another_size_or_keys():
    module = _module(graph=True, compiled=False)
    batches = _batches(WARMUP + 1)
    for batch in batches:
        module.captured_update(batch)
    assert module.captured_update.captured
    with pytest.raises(ValueError, match="a replay needs the captured batch's size"):
        module.captured_update(_batches(1, size=32)[0])
    with pytest.raises(ValueError, match="and keys"):
        module.captured_update(batches[0].exclude("terminated"))


def test_compacted_rows_cannot_be_captured(in_tmp, capsys):
    with pytest.raises(SystemExit):
        main(fit_args("hopper", 200, "--trainer.accelerator", "gpu", "--trainer.devices", "1", *TINY["mpdp"],
                      "--model.cuda_graph", "true", "--model.compact_rows", "true", algo="mpdp"))
    assert "model.cuda_graph: model.compact_rows true counts the live rows" in capsys.readouterr().err
    assert list(in_tmp.iterdir()) == []


def test_phase_times_on_a_gpu_are_the_gpus_time_read_at_log_points():
    """time/* on CUDA: the GPU's time of the phase (CUDA events), not the host's time to queue
    its kernels, which is what a replayed graph's host-timed phase showed (0.1-0.2 ms)."""
    import time

    from mpdp_lightning.training.metrics import PhaseTimer

    timer = PhaseTimer()
    timer.use_cuda_events(True)
    a = torch.randn(4096, 4096, device="cuda")
    b = torch.randn(4096, 4096, device="cuda") / 64
    for _ in range(3):  # cuBLAS warm-up
        a @ b
    torch.cuda.synchronize()
    start = time.perf_counter()
    with timer.phase("work"):
        for _ in range(40):
            a = a @ b
    queued = time.perf_counter() - start
    torch.cuda.synchronize()
    total = time.perf_counter() - start
    timer.count_update()
    seconds = timer.pop_means()["time/work_seconds"]
    assert seconds > 3 * queued  # more than the host's time to queue the work
    assert 0.7 * total < seconds <= 1.05 * total  # the device's time of it


def test_a_replayed_update_is_timed_by_what_it_costs_the_gpu():
    module = _module(graph=True, compiled=False)
    module.timer.use_cuda_events(True)
    batches = _batches(WARMUP + 11, size=4096)
    for batch in batches[: WARMUP + 1]:  # the warm-up calls and the capture
        module.captured_update(batch)
    module.timer.pop_means()
    for batch in batches[WARMUP + 1:]:
        with module.timer.phase("update"), module.timer.paused():
            module.captured_update(batch)
        module.timer.count_update()
    gpu = module.timer.pop_means()["time/update_seconds"]
    torch.cuda.synchronize()
    import time

    start = time.perf_counter()
    for batch in batches[WARMUP + 1:]:
        module.captured_update(batch)
    torch.cuda.synchronize()
    wall = (time.perf_counter() - start) / 10
    assert 0.5 * wall < gpu <= 1.1 * wall


@pytest.mark.parametrize("tf32,precision", [(None, "high"), (False, "highest")])
def test_a_gpu_run_lets_its_matmuls_use_tf32_unless_told_not_to(in_tmp, tf32, precision):
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        extra = () if tf32 is None else ("--model.tf32", "false")
        main(fit_args("hopper", 150, "--trainer.accelerator", "gpu", "--trainer.devices", "1", *extra))
        assert torch.get_float32_matmul_precision() == precision
    finally:
        torch.set_float32_matmul_precision(before)
