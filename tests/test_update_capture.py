"""The update a CUDA graph captures, checked on any machine: it never waits on the host (the
NoHostSync stand-in for CUDA's sync debug mode), it steps its optimizers one way (torch's, never
Lightning's wrappers), and the execution plan is resolved once, named in the first line and
logged. test_cuda.py checks the capture itself wherever CUDA is present."""

import pytest
import torch

from helpers import TINY_MODEL, fit_args
from host_sync import HostSyncError, NoHostSync
from mpdp_lightning.algorithms.agent import Agent
from mpdp_lightning.algorithms.execution import cuda_graph_problem, resolve_plan
from mpdp_lightning.cli import main
from mpdp_lightning.errors import MPDPError
from mpdp_lightning.training.cuda_graph import CaptureError, update_context

TINY_MPDP = (*TINY_MODEL, "--model.horizon", "3")
# the CUDA configuration: rows masked, not compacted; the anchored rule and the heads' clip too
CUDA_LIKE_MPDP = (*TINY_MPDP, "--model.compact_rows", "false", "--model.threshold", "anchored",
                  "--model.head_grad_clip", "1.0")


def test_no_host_sync_catches_what_would_wait_for_a_gpu():
    x = torch.randn(8)
    for read in (lambda: x.sum().item(), lambda: bool(x.max() > 0), lambda: x[x > 0], lambda: x.nonzero()):
        with pytest.raises(HostSyncError), NoHostSync():
            read()
    with NoHostSync():  # device work alone passes, a quantile at a float q included
        torch.where(x > 0, x, 0.0).sum() + torch.quantile(x, 0.9)


@pytest.mark.parametrize("algo", ["sac", "mpdp", "mbpo"])
def test_the_update_never_waits_on_the_host(in_tmp, monkeypatch, algo):
    # every update after the first two runs under NoHostSync: critic, policy improvement,
    # temperature, their optimizer steps, the NaN guard and the metrics
    update = Agent.update
    strict = []

    def strict_update(self, batch):
        if self.updates < 2:  # the first updates of a run may allocate (optimizer states)
            return update(self, batch)
        with NoHostSync():
            metrics = update(self, batch)
        strict.append(self.updates)
        return metrics

    monkeypatch.setattr(Agent, "update", strict_update)
    extra = {"sac": (), "mpdp": CUDA_LIKE_MPDP, "mbpo": TINY_MODEL}
    main(fit_args("hopper", 200, *extra[algo], algo=algo))
    assert len(strict) >= 90


@pytest.mark.parametrize("algo", ["sac", "mpdp", "mbpo"])
def test_every_optimizer_steps_one_way_torchs_own(in_tmp, monkeypatch, algo):
    """Eager or captured, every phase's optimizer steps through torch directly: Lightning's
    optimizer wrapper and manual_backward, which a CUDA graph would run only once, at capture,
    are never called; ``updates`` counts the updates (Lightning's global_step does not)."""
    from lightning.pytorch.core.module import LightningModule
    from lightning.pytorch.core.optimizer import LightningOptimizer

    def refused(*args, **kwargs):
        raise AssertionError("a step went through Lightning's wrappers")

    monkeypatch.setattr(LightningOptimizer, "step", refused)
    monkeypatch.setattr(LightningModule, "manual_backward", refused)
    steps = []
    adam_step = torch.optim.Adam.step
    monkeypatch.setattr(torch.optim.Adam, "step", lambda self, *a, **k: steps.append(1) or adam_step(self, *a, **k))
    extra = {"sac": (), "mpdp": TINY_MPDP, "mbpo": TINY_MODEL}[algo]
    main(fit_args("hopper", 150, *extra, algo=algo))
    assert len(steps) >= 50 * 2  # 50 updates or more after the warm-up, each at least the critic's and the actor's


def test_a_resumed_run_sets_its_optimizers_capturable_flag_for_its_own_device(in_tmp):
    """A checkpoint carries its optimizers' param groups from where it was saved (capturable, on
    a GPU with a graph); resumed on this CPU, the run updates eagerly, without the flag."""
    main(fit_args("hopper", 200))
    (ckpt,) = in_tmp.glob("runs/checkpoints/*/last.ckpt")
    saved = torch.load(ckpt, weights_only=False)
    for state in saved["optimizer_states"]:
        for group in state["param_groups"]:
            group["capturable"] = True
    torch.save(saved, ckpt)
    record = f'--trainer.callbacks+={{"class_path": "helpers.RecordCapturable", "init_args": {{"path": "{in_tmp}/flags.pt"}}}}'
    main(fit_args("hopper", 300, "--ckpt_path", str(ckpt), record))
    flags = torch.load(in_tmp / "flags.pt")
    assert len(flags) == 3 and not any(flags)  # critic, actor, temperature


def test_a_failed_capture_warns_and_the_run_goes_on_eagerly(in_tmp, monkeypatch):
    """With --model.cuda_graph left to its default, a capture that fails (stood in for here:
    no CUDA) costs a warning, not the run: the update it was for runs eagerly, as all after it."""
    setup, calls = Agent.setup, []

    class FailingCapture:
        def __init__(self, update):
            self.update = update

        def __call__(self, batch):
            calls.append(len(calls))
            if len(calls) == 1:
                return self.update(batch)  # a warm-up call
            raise CaptureError("RuntimeError: operation not permitted when stream is capturing")

    def capturing_setup(self, stage):
        setup(self, stage)
        self.captured_update = FailingCapture(self.update)

    monkeypatch.setattr(Agent, "setup", capturing_setup)
    updates = Agent.update
    eager = []
    monkeypatch.setattr(Agent, "update", lambda self, batch: eager.append(self.captured_update is not None)
                        or updates(self, batch))
    with pytest.warns(UserWarning, match="could not be captured as a CUDA graph .*operation not permitted"):
        main(fit_args("hopper", 200))
    assert calls == [0, 1]  # one warm-up, one failed capture, then never again
    # 100 updates (env steps 101-200): the warm-up's, then the failed capture's and all later
    # ones eagerly
    assert eager == [True] + [False] * 99
    # the params logged at the start say captured; a tag says when and why it was withdrawn
    from mlflow import MlflowClient

    (run,) = MlflowClient(f"sqlite:///{in_tmp / 'mlflow.db'}").search_runs(["1"])
    assert run.data.params["plan.cuda_graph"] == "false"  # this CPU's plan: the capture was forced in
    assert run.data.tags["plan.cuda_graph_withdrawn"].startswith("capture failed at update 1: RuntimeError")


def test_what_cannot_be_captured_is_named():
    cuda = torch.device("cuda", 0)
    assert cuda_graph_problem(cuda) is None
    assert "a CUDA graph needs a CUDA device, and this run's is cpu" in cuda_graph_problem(torch.device("cpu"))
    assert "compact_rows true counts the live rows on the host" in cuda_graph_problem(cuda, compact_rows=True)
    with pytest.raises(MPDPError, match="trainer.precision: precision 16-mixed needs a loss scaler"):
        resolve_plan(cuda, "16-mixed", None, None, None, has_compiled_parts=False)


def test_the_execution_plan_is_the_devices_unless_an_option_says_otherwise():
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    plan = resolve_plan(cpu, "32-true", None, None, None, has_compiled_parts=True, imagines=True)
    assert (plan.cuda_graph, plan.compiled, plan.compact_rows, plan.tf32) == (False, False, True, False)
    assert plan.describe() == "eager, compacted rows, 32-true"
    plan = resolve_plan(cuda, "bf16-mixed", None, None, None, has_compiled_parts=True, imagines=True)
    assert (plan.cuda_graph, plan.compiled, plan.compact_rows, plan.tf32) == (True, True, False, True)
    assert plan.describe() == "captured, compiled, masked rows, bf16-mixed, TF32"
    assert plan.params()["plan.cuda_graph"] == "true" and "plan.compact_rows" in plan.params()
    sac = resolve_plan(cuda, "32-true", None, None, False, has_compiled_parts=False)
    assert (sac.compiled, sac.compact_rows, sac.tf32) == (False, None, False) and "plan.compact_rows" not in sac.params()
    # compacted rows on CUDA: no graph by default, an error when one is asked for
    assert not resolve_plan(cuda, "32-true", None, None, None, True, compact_rows=True, imagines=True).cuda_graph
    with pytest.raises(MPDPError, match="^model.cuda_graph: model.compact_rows true counts"):
        resolve_plan(cuda, "32-true", True, None, None, True, compact_rows=True, imagines=True)
    with pytest.raises(MPDPError, match="^model.cuda_graph: a CUDA graph needs a CUDA device"):
        resolve_plan(cpu, "32-true", True, None, None, False)
    with pytest.raises(MPDPError, match="^trainer.precision: precision 16-mixed needs a loss scaler"):
        resolve_plan(cuda, "16-mixed", None, None, None, False)


def test_a_run_names_its_execution_plan_in_its_first_line_and_logs_it(in_tmp, capsys):
    from mlflow import MlflowClient

    main(fit_args("hopper", 150, *TINY_MPDP, algo="mpdp"))
    first = capsys.readouterr().out.splitlines()[0]
    assert "cpu (eager, compacted rows, 32-true)" in first, first
    (run,) = MlflowClient(f"sqlite:///{in_tmp / 'mlflow.db'}").search_runs(["1"])
    params = run.data.params
    assert (params["plan.device"], params["plan.cuda_graph"], params["plan.compiled"], params["plan.compact_rows"]) == (
        "cpu", "false", "false", "true")


def test_a_contradictory_plan_is_one_error_line_before_any_work(in_tmp, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(fit_args("hopper", 150, "--model.cuda_graph", "true"))
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("error: model.cuda_graph: a CUDA graph needs a CUDA device")
    assert list(in_tmp.iterdir()) == []


def test_warm_up_and_capture_share_the_state_compiled_code_is_guarded_on():
    """torch.compile guards on global state, the autocast cache among it: a compiled step warmed
    up outside the capture's context would recompile while capturing, which a capture cannot
    hold, so the warm-up calls run in the capture's context and a recompile there raises."""
    x = torch.randn(4)
    step = torch.compile(lambda x: (2 * x).sin(), fullgraph=True)
    with update_context("cpu"):  # a warm-up call
        step(x)
    with update_context("cpu", capturing=True):  # the capture: no recompile
        step(x)
    elsewhere = torch.compile(lambda x: (3 * x).cos(), fullgraph=True)
    elsewhere(x)  # warmed up in another context
    with pytest.raises(torch._dynamo.exc.RecompileError), update_context("cpu", capturing=True):
        elsewhere(x)


class SimulatedUnsupported(torch._dynamo.exc.TorchDynamoException):
    """Stands in for what torch 2.11's compiler raised on a GPU at MPDP's first update:
    ``Unsupported: ... UserDefinedObjectVariable(PositiveInt)``."""


def _failing_compiler(monkeypatch, part="the imagined step"):
    """The compiled parts are on by default here (as on CUDA), and the compiler fails on ``part``
    (the other one runs eagerly, to keep the test short)."""
    from mpdp_lightning.algorithms import execution
    from mpdp_lightning.models import world_model
    from mpdp_lightning.objectives import h_step_improvement

    calls = []

    def failing():
        def compiled(*args):
            calls.append(len(calls))
            raise SimulatedUnsupported("UserDefinedObjectVariable(PositiveInt) is not supported")
        return compiled

    monkeypatch.setattr(execution, "compile_pays", lambda device: True)
    imagined = failing if part == "the imagined step" else (lambda: h_step_improvement.imagine_step)
    for compiled in ("compiled_imagine_step", "compiled_masked_step"):  # compacted rows, masked rows
        monkeypatch.setattr(h_step_improvement, compiled, imagined)
    monkeypatch.setattr(world_model, "compiled_nll_loss", failing if part != "the imagined step" else lambda: world_model.nll_loss)
    return calls


def test_a_failed_compile_warns_once_and_the_run_goes_on_eagerly(in_tmp, monkeypatch):
    """With --model.compile left to its default, a compiler that fails at update 1 costs one
    warning, not the run: that update and all after it imagine eagerly."""
    calls = _failing_compiler(monkeypatch)
    improvements = []
    from mpdp_lightning.algorithms.parts.improvement import HStepImprovement

    improve = HStepImprovement.improve
    monkeypatch.setattr(HStepImprovement, "improve", lambda self, agent, batch: improvements.append(1)
                        or improve(self, agent, batch))
    with pytest.warns(UserWarning, match=r"could not be compiled \(SimulatedUnsupported: .*PositiveInt") as warned:
        main(fit_args("hopper", 200, *TINY_MPDP, algo="mpdp"))
    assert len([w for w in warned if "could not be compiled" in str(w.message)]) == 1
    assert len(calls) == 1  # tried once, at the first update, never again
    assert len(improvements) == 200  # every update ran: 100 env steps after warm-up, 2 updates each
    from mlflow import MlflowClient

    (run,) = MlflowClient(f"sqlite:///{in_tmp / 'mlflow.db'}").search_runs(["1"])
    assert run.info.status == "FINISHED"


def test_an_explicit_compile_true_makes_a_failed_compile_an_error(in_tmp, monkeypatch, capsys):
    _failing_compiler(monkeypatch)
    with pytest.raises(SystemExit) as exit_:
        main(fit_args("hopper", 200, *TINY_MPDP, "--model.compile", "true", algo="mpdp"))
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: model.compile true: the imagined step could not be compiled (SimulatedUnsupported")


def test_a_failed_compile_of_the_model_fit_warns_once_and_mbpo_goes_on_eagerly(in_tmp, monkeypatch):
    calls = _failing_compiler(monkeypatch, part="the model fit")
    with pytest.warns(UserWarning, match=r"the model fit's minibatch loss could not be compiled \(SimulatedUnsupported") as warned:
        main(fit_args("hopper", 300, *TINY_MODEL, "--model.model_batch_size", "32", algo="mbpo"))
    assert len([w for w in warned if "could not be compiled" in str(w.message)]) == 1
    assert len(calls) == 1  # the first fit's first minibatch; that fit and the later ones eagerly


def test_a_group_of_seeds_masks_rows_and_compiles_nothing():
    cuda = torch.device("cuda", 0)
    plan = resolve_plan(cuda, "32-true", None, None, None, has_compiled_parts=True, imagines=True, grouped=True)
    assert (plan.compact_rows, plan.compiled) == (False, False)
    with pytest.raises(MPDPError, match="model.compact_rows true: a group of seeds masks"):
        resolve_plan(torch.device("cpu"), "32-true", None, None, None, has_compiled_parts=True, compact_rows=True,
                     imagines=True, grouped=True)
    with pytest.raises(MPDPError, match="model.compile true: a group of seeds runs its steps under torch.func.vmap"):
        resolve_plan(cuda, "32-true", None, True, None, has_compiled_parts=True, imagines=True, grouped=True)
