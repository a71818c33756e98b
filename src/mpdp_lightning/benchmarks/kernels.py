"""Kernels per call: what predicts the time of a launch-bound GPU update, counted on any device.

An MPDP update at the paper's shapes is thousands of small kernels, and on a GPU its time is the
time to launch them (about 2.5 us each from a replayed CUDA graph on an H200), so fewer kernels
is what makes it faster there; the count is measured the same way on the CPU machines.

- On CUDA: the kernels the profiler saw run on the GPU (memory copies and fills included).
- On the CPU: the kernels a GPU would launch for the same calls. Eager, each ATen op called from
  Python or from autograd that does work, once however many ops it calls inside (a view or an
  allocation is no kernel; the CPU's own internals, such as a Python scalar wrapped into a tensor,
  are not counted). Compiled, each kernel Inductor generated, plus the ATen ops its code calls
  (extern kernels: the matmuls). Inductor's C++ kernels show in the profiler only when compiled
  with ``cpp.enable_kernel_profile``: ``count_kernels`` recompiles under it (a cold compile).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
from torch.profiler import ProfilerActivity, profile

# ATen ops that launch no kernel: views, metadata, allocation, host reads.
NO_KERNEL_OPS = frozenset(
    "aten::" + name
    for name in (
        "view as_strided expand expand_as unsqueeze squeeze t transpose permute select slice detach alias "
        "_reshape_alias reshape view_as unbind split split_with_sizes chunk narrow _unsafe_view flatten unflatten "
        "movedim contiguous to lift_fresh resolve_conj resolve_neg result_type is_nonzero size stride numel dim "
        "squeeze_ unsqueeze_ as_strided_ detach_ empty empty_like empty_strided new_empty new_empty_strided "
        "resize_ set_ item _local_scalar_dense is_same_size broadcast_tensors"
    ).split()
)

INDUCTOR_KERNEL_MARKS = ("cpp_fused", "triton_")


@dataclass(frozen=True)
class KernelCount:
    """Kernels of one call: ``aten`` from ATen ops (eager, and a compiled region's extern calls),
    ``generated`` by Inductor (on the CPU; on CUDA all kernels are counted in ``aten``)."""

    aten: int
    generated: int

    @property
    def total(self) -> int:
        return self.aten + self.generated


def _does_work(event: Any) -> bool:
    """Whether an ATen op runs a kernel: one not of the kinds that do not, or one of them that
    calls one that does (``to`` that copies, ``reshape`` of a non-contiguous tensor)."""
    if event.name.startswith("aten::") and event.name not in NO_KERNEL_OPS:
        return True
    return any(_does_work(child) for child in event.cpu_children)


def _has_aten_ancestor(event: Any) -> bool:
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith("aten::"):
            return True
        parent = parent.cpu_parent
    return False


def count_events(events: Any, device: torch.device) -> KernelCount:
    """Kernels among a profiler's events (see the module's docstring)."""
    if device.type == "cuda":
        return KernelCount(sum(1 for e in events if e.device_type == torch.autograd.DeviceType.CUDA), 0)
    aten = generated = 0
    for event in events:
        if event.name.startswith("aten::"):
            aten += not _has_aten_ancestor(event) and _does_work(event)
        elif not event.cpu_children and any(mark in event.name for mark in INDUCTOR_KERNEL_MARKS):
            generated += 1
    return KernelCount(aten, generated)


@contextlib.contextmanager
def inductor_kernels_profiled(device: torch.device) -> Iterator[None]:
    """Compiled code recompiled so that Inductor's CPU kernels record profiler events (no-op on
    CUDA, whose kernels the profiler sees anyway). Code compiled inside is dropped on leaving."""
    if device.type == "cuda":
        yield
        return
    import torch._inductor.config as inductor_config

    torch._dynamo.reset()
    try:
        with inductor_config.patch({"cpp.enable_kernel_profile": True, "fx_graph_cache": False}):
            yield
    finally:
        torch._dynamo.reset()  # later calls compile as usual again


def count_kernels(fn: Callable[[], object], device: torch.device, warmup: int = 2) -> KernelCount:
    """Kernels of one call of ``fn`` on ``device``, after ``warmup`` calls (a cold compile, an
    optimizer's first step that allocates its state)."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with inductor_kernels_profiled(device):
        for _ in range(warmup):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        with profile(activities=activities) as profiler:
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
    return count_events(profiler.events(), device)
