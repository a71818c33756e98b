"""How an agent's update runs on this device: the execution plan, resolved when the run is set
up (again if the module is fitted on another device or precision), logged as ``plan.*`` params and
shown in the run's first line.

Four choices, each from its ``--model.*`` option where one is given, else from the device:

- ``cuda_graph``: the whole update captured once as a CUDA graph and replayed (CUDA only;
  training/cuda_graph.py). It wraps ``Agent.update`` from outside, as LeanRL does.
- ``compiled``: the model fit's minibatch loss and MPDP's imagined step through torch.compile
  (on CUDA, where they are bound by kernel launches; see ``compile_pays``).
- ``compact_rows``: MPDP's imagination goes on with the live rows only (the CPU), or masks the
  stopped ones (CUDA: no host reads, capturable). None for the algorithms that do not imagine.
- ``precision`` and ``tf32``: the trainer's precision, and TF32 matmuls on CUDA.

Two of them can be withdrawn during the run, each with one warning: a failed capture (the update
goes on eagerly) and a failed compile (the compiled parts go on eagerly) when their option was
left to its default; with the option set to true they are one-line errors instead.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Callable, Optional, TypeVar

import torch
from lightning.pytorch.utilities import rank_zero_warn

from mpdp_lightning.errors import MPDPError

T = TypeVar("T")

# Precisions whose Lightning plugin scales the loss and skips steps from the host (fp16's loss
# scaler): the update steps its optimizers itself, one way on every device, without a scaler.
LOSS_SCALED_PRECISIONS = ("16-mixed", "16")


def compile_pays(device: torch.device) -> bool:
    """Whether ``--model.compile`` defaults to on for ``device``: on CUDA, where the model fit's
    minibatches and MPDP's imagined steps are bound by kernel launches. Not on the CPU, where they
    are bound by the matmuls: with rows compacted, compiling MPDP's step gained 0-6 % (quick
    shapes) and lost 10 % (paper shapes) in `make bench` on one thread, for a cold compile of
    5-16 s per process."""
    return device.type == "cuda"


def is_compile_error(error: BaseException) -> bool:
    """Whether ``error`` is torch.compile's (Dynamo's or Inductor's), not the code's it compiles."""
    return isinstance(error, torch._dynamo.exc.TorchDynamoException) or type(error).__module__.startswith(
        ("torch._dynamo", "torch._inductor")
    )


def capturing() -> bool:
    """Whether a CUDA graph is being captured on the current stream."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def check_precision(precision: str) -> None:
    """One ``MPDPError`` line where the update cannot run at ``precision`` (the run's plan and the
    sweep's check before Ray both ask here)."""
    if str(precision) in LOSS_SCALED_PRECISIONS:
        raise MPDPError(f"trainer.precision: precision {precision} needs a loss scaler that skips steps from the "
                        f"host, and the update steps its optimizers itself; use 32-true or bf16-mixed")


def cuda_graph_problem(device: torch.device, compact_rows: Optional[bool] = None) -> Optional[str]:
    """Why the update cannot be captured as a CUDA graph on ``device``, or None (a precision the
    update cannot run at is refused before: ``check_precision``)."""
    if device.type != "cuda":
        return f"a CUDA graph needs a CUDA device, and this run's is {device.type}"
    if compact_rows:
        return "model.compact_rows true counts the live rows on the host at every imagined step; leave it unset on CUDA"
    return None


@dataclass
class ExecutionPlan:
    """The resolved choices (see the module's docstring); ``wanted_*`` keep whether the option
    asked for it (True), left it to the device (None) or refused it (False)."""

    device: str
    precision: str
    cuda_graph: bool
    compiled: bool
    compact_rows: Optional[bool]
    tf32: bool
    wanted_cuda_graph: Optional[bool] = None
    wanted_compile: Optional[bool] = None
    # told of each withdrawal, (choice, why): the agent records it in the run (a tag), since the
    # plan.* params logged at the start cannot change
    on_withdraw: Optional[Callable[[str, str], None]] = field(default=None, repr=False, compare=False)

    def params(self) -> dict[str, str]:
        """The plan as MLflow params (``plan.*``)."""
        shown = {k: v for k, v in asdict(self).items()
                 if not k.startswith(("wanted_", "on_")) and v is not None}
        return {f"plan.{k}": str(v).lower() if isinstance(v, bool) else str(v) for k, v in shown.items()}

    def describe(self) -> str:
        """A few words for the run's first line, e.g. "captured, compiled, masked rows, bf16-mixed, TF32"."""
        words = ["captured" if self.cuda_graph else "eager"]
        if self.compiled:
            words.append("compiled")
        if self.compact_rows is not None:
            words.append("compacted rows" if self.compact_rows else "masked rows")
        words.append(self.precision)
        if self.tf32:
            words.append("TF32")
        return ", ".join(words)

    # ---- withdrawals during the run ----------------------------------------------------------
    def run_compiled(self, what: str, run: Callable[[bool], T]) -> T:
        """``run(compiled)``. Should torch.compile fail on ``what`` with ``--model.compile`` left to
        its default, warn once and redo it, and every compiled part from now on, eagerly (a
        compiler that fails, say on a construct another torch does not support, costs a warning,
        never the run); with ``--model.compile true``, stop with a one-line error. While a CUDA
        graph is being captured the error is left to the capture, whose own fallback applies."""
        compiled = self.compiled
        try:
            return run(compiled)
        except Exception as error:
            if not (compiled and is_compile_error(error)) or capturing():
                raise
            why = f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0][:300]}"
            if self.wanted_compile:
                raise MPDPError(f"model.compile true: {what} could not be compiled ({why})") from error
            self.compiled = False
            self._withdrawn("compiled", f"{what} could not be compiled ({why})")
            rank_zero_warn(f"{what} could not be compiled ({why}); running it and every compiled part eagerly from "
                           f"now on (--model.compile false skips the attempt, true makes it an error)")
            return run(False)

    def capture_failed(self, error: BaseException, update: int) -> None:
        """Go on with eager updates after a failed capture at ``update``, saying why (an error
        with ``--model.cuda_graph true``)."""
        if self.wanted_cuda_graph:
            raise error
        self.cuda_graph = False
        self._withdrawn("cuda_graph", f"capture failed at update {update}: {error}")
        rank_zero_warn(f"the update could not be captured as a CUDA graph ({error}); updating eagerly from "
                       f"now on (--model.cuda_graph false skips the attempt, true makes it an error)")


    def _withdrawn(self, choice: str, why: str) -> None:
        if self.on_withdraw is not None:
            self.on_withdraw(choice, why)


def resolve_plan(device: torch.device, precision: str, cuda_graph: Optional[bool], compile: Optional[bool],
                 tf32: Optional[bool], has_compiled_parts: bool, compact_rows: Optional[bool] = None,
                 imagines: bool = False, grouped: bool = False) -> ExecutionPlan:
    """The plan for an agent on ``device`` at ``precision`` from its options (None: the device's
    choice); a contradiction is one ``MPDPError`` line naming the option. ``grouped``: the agent
    holds a group of seeds (algorithms/seed_group.py), whose imagined rows are masked: each seed
    stops its own rows, and vmap needs the same shapes for all."""
    check_precision(precision)
    if grouped and compact_rows:
        raise MPDPError("model.compact_rows true: a group of seeds masks the stopped rows (each seed stops its own); "
                        "leave it unset")
    if grouped and compile:
        raise MPDPError("model.compile true: a group of seeds runs its steps under torch.func.vmap, which "
                        "torch.compile refuses to enter from eager code; leave it unset")
    graph_problem = cuda_graph_problem(device, compact_rows)
    if cuda_graph and graph_problem:
        raise MPDPError(f"model.cuda_graph: {graph_problem}")
    compacts = (bool(compact_rows) if compact_rows is not None else device.type == "cpu" and not grouped) if imagines else None
    return ExecutionPlan(
        device=device.type,
        precision=str(precision),
        cuda_graph=bool(cuda_graph) if cuda_graph is not None else graph_problem is None,
        # a group's steps run under vmap, which Dynamo refuses to enter from eager code
        compiled=has_compiled_parts and not grouped and (bool(compile) if compile is not None else compile_pays(device)),
        compact_rows=compacts,
        tf32=device.type == "cuda" and tf32 is not False,
        wanted_cuda_graph=cuda_graph,
        wanted_compile=compile,
    )
