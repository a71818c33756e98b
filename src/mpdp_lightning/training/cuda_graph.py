"""One update captured once as a CUDA graph and replayed: PyTorch's whole-network capture
(``torch.cuda.graphs``), with the optimizer steps inside, as LeanRL does for SAC.

Eager, an MPDP update at the paper's shapes issues about 6,400 kernels, and on a GPU its time is
the time to launch them; a replay launches them all at once. What the captured function must be
(``Agent.update``, algorithms/agent.py, is written so, and ``tests/host_sync.py`` checks the first two on any device):

- device work only: no ``.item()``, no tensor read on the host, no shape that depends on data
  (MPDP's compacted rows are therefore refused with a graph);
- no host state that changes between updates read inside: a replay repeats the kernels with the
  values they had at capture (the update index the NaN guard records is a device counter);
- the same tensors every time: the batch is copied into the graph's own input tensors; weights,
  optimizer states and buffers change in place (a model fit copies into the same tensors);
- optimizers built with ``capturable=True`` (Adam's step count on the device).

The first ``warmup`` calls run eagerly on a side stream, as PyTorch's recipe asks: they allocate
the gradients' and optimizer states' memory and compile the compiled parts, none of which may
happen while capturing. They run in the very context of the capture (``update_context``):
torch.compile guards on global state such as the autocast cache, and a guard that failed at the
capture would recompile there, which cannot be captured; a recompile while capturing is made an
error. The random draws inside (actions, model samples) come from the default CUDA generator,
whose state a captured graph advances at every replay.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Optional, Sequence

import torch
from tensordict import TensorDictBase

Update = Callable[[TensorDictBase], dict[str, torch.Tensor]]


class CaptureError(RuntimeError):
    """The capture failed; nothing of the call's update has run (a capture runs no kernel)."""


@contextlib.contextmanager
def update_context(device_type: str = "cuda", capturing: bool = False) -> Iterator[None]:
    """Where the warm-up calls and the capture run: autocast as it is (bf16-mixed or off) but
    without its cache of cast weights, as PyTorch asks of a capture (a cast made once and reused
    would not be redone at a replay); while capturing, a recompile of a compiled part raises."""
    autocast = torch.autocast(device_type, dtype=torch.get_autocast_dtype(device_type),
                              enabled=torch.is_autocast_enabled(device_type), cache_enabled=False)
    strict = torch._dynamo.config.patch(error_on_recompile=True) if capturing else contextlib.nullcontext()
    with autocast, strict:
        yield


class CapturedUpdate:
    """Call it as the update itself: ``metrics = captured(batch)``.

    The returned metrics are the graph's own output tensors: a replay overwrites them, so read or
    copy them before the next call (``MetricAccumulator.accumulate`` copies them).

    Args:
        update: one whole update on a batch, returning detached scalar metrics.
        warmup: eager calls before the capture (at least 1).
        generators: CUDA generators other than the device's default that the update draws from
            (a group of seeds' own streams, algorithms/seed_group.py), registered with the graph
            so that each replay advances them as an eager update would.
    """

    def __init__(self, update: Update, warmup: int = 3, generators: Sequence[torch.Generator] = ()) -> None:
        if warmup < 1:
            raise ValueError(f"warmup must be at least 1, got {warmup}")
        self.update = update
        self.warmup = warmup
        self.generators = tuple(generators)
        self.calls = 0
        self.graph: Optional[torch.cuda.CUDAGraph] = None
        self._side_stream: Optional[torch.cuda.Stream] = None
        self._batch: Optional[TensorDictBase] = None
        self._metrics: dict[str, torch.Tensor] = {}

    @property
    def captured(self) -> bool:
        return self.graph is not None

    def __call__(self, batch: TensorDictBase) -> dict[str, torch.Tensor]:
        device = batch["obs"].device
        if device.type != "cuda":
            raise ValueError(f"a CUDA graph captures CUDA work; the batch is on {device}")
        self.calls += 1
        if self.graph is not None:
            if batch.batch_size != self._batch.batch_size or set(batch.keys()) != set(self._batch.keys()):
                # copy_ would broadcast a smaller batch, or leave a missing key's old rows
                raise ValueError(f"a replay needs the captured batch's size {tuple(self._batch.batch_size)} and keys "
                                 f"{sorted(self._batch.keys())}; got {tuple(batch.batch_size)} and {sorted(batch.keys())}")
            self._batch.copy_(batch)  # into the tensors the graph reads
            self.graph.replay()
            return self._metrics
        current = torch.cuda.current_stream(device)
        if self.calls <= self.warmup:
            if self._side_stream is None:
                self._side_stream = torch.cuda.Stream(device)
            self._side_stream.wait_stream(current)
            with torch.cuda.stream(self._side_stream), update_context():
                metrics = self.update(batch)
            current.wait_stream(self._side_stream)
            return metrics
        self._batch = batch.clone()
        graph = torch.cuda.CUDAGraph()
        try:
            for generator in self.generators:
                graph.register_generator_state(generator)
            with torch.cuda.graph(graph), update_context(capturing=True):
                self._metrics = self.update(self._batch)
        except Exception as error:
            # a failed capture_end leaves the capture's stream current (torch.cuda.graph's exit)
            torch.cuda.set_stream(current)
            raise CaptureError(f"{type(error).__name__}: {error}") from error
        self.graph = graph
        graph.replay()  # capturing ran nothing: this is the call's update
        return self._metrics
