"""The replay buffer as a LightningDataModule.

A TorchRL ``ReplayBuffer`` over a ``LazyTensorStorage`` (uniform sampling with replacement)
holds real transitions (obs, action, reward, next_obs, terminated). The storage lives on the
trainer's device and batches are indexed there, so sampling never waits on the host. The
EnvInteraction callback writes into it with ``add``; the training loop reads an endless stream
of batches through an IterableDataset. Its contents travel with the checkpoint.

The stream yields ``PendingBatch``es, drawn only when the update asks (``draw``), not when
Lightning fetches them: Lightning fetches the next batch before the current update has run
(and before that update's env step), while the paper's order within an update is collect,
fit the model, then sample.

A group of seeds (algorithms/seed_group.py) keeps one storage with a seed axis: each env step
adds a transition per seed (an item of batch size [seeds]), and each seed samples rows of its own
transitions with its own generator (``PendingBatch.draw`` with the agent's ``draw``).
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Optional, Union

import lightning.pytorch as pl
import torch
from jsonargparse.typing import PositiveInt
from tensordict import TensorDict, TensorDictBase
from torch.utils.data import DataLoader, IterableDataset
from torchrl.data import LazyTensorStorage, ReplayBuffer

TRANSITION_KEYS = ("obs", "action", "reward", "next_obs", "terminated")


# how the random indices are drawn: ``draw(sample)`` calls ``sample(generator)`` (Agent.draw:
# once with the default generator alone, once per seed with its own in a group, stacked)
Draw = Callable[[Callable[[Optional[torch.Generator]], torch.Tensor]], torch.Tensor]


def _default_draw(sample: Callable[[Optional[torch.Generator]], torch.Tensor]) -> torch.Tensor:
    return sample(None)


class PendingBatch:
    """A uniform batch that a replay buffer will give when the update draws it (``draw``)."""

    def __init__(self, buffer: ReplayBuffer, batch_size: int) -> None:
        self.buffer, self.batch_size = buffer, batch_size

    def draw(self, draw: Draw = _default_draw) -> TensorDictBase:
        """The batch, its indices drawn by ``draw``: [batch_size] rows, or with a seed axis
        [seeds, batch_size], each seed's rows of its own transitions."""
        if len(self.buffer) == 0:
            raise RuntimeError("the replay buffer is empty: collect transitions before the first update")
        storage = self.buffer.storage
        indices = draw(lambda generator: torch.randint(len(self.buffer), (self.batch_size,), device=storage.device,
                                                        generator=generator))
        if indices.dim() == 1:
            return storage.get(indices)
        seeds = torch.arange(indices.shape[0], device=indices.device).unsqueeze(1)
        return storage.get((indices, seeds))  # seed s: rows indices[s] of its own column


def drawn(batch: Union[PendingBatch, TensorDictBase], draw: Draw = _default_draw) -> TensorDictBase:
    """The transitions of ``batch``: drawn now (by ``draw``) if it is pending, as given otherwise."""
    return batch.draw(draw) if isinstance(batch, PendingBatch) else batch


def uniform_sample(buffer: ReplayBuffer, batch_size: int, generator: Optional[torch.Generator] = None,
                   seed_position: Optional[int] = None) -> TensorDictBase:
    """``batch_size`` stored items drawn uniformly with replacement, as TorchRL's RandomSampler,
    but with the indices drawn on the storage's device: indices drawn on the host would be copied
    to a GPU with a blocking copy, a host sync in every update. ``generator``: whose stream draws
    them (None: the default's). ``seed_position``: a group's storage (a seed axis): that seed's
    column of the drawn items."""
    storage = buffer.storage
    indices = torch.randint(len(buffer), (batch_size,), device=storage.device, generator=generator)
    if seed_position is None:
        return storage.get(indices)
    return storage.get((indices, torch.full_like(indices, seed_position)))


def newest(buffer: ReplayBuffer, n: int) -> TensorDictBase:
    """The ``n`` most recently written items of ``buffer`` (a circular storage), oldest first (a copy)."""
    size = len(buffer)
    n = min(n, size)
    cursor = buffer.writer.state_dict()["_cursor"]
    index = (cursor - n + torch.arange(n)) % max(size, 1)
    return buffer.storage.get(index).clone()


class ReplaySampleStream(IterableDataset):
    """An endless stream of pending uniform batches from a replay buffer (one per update)."""

    def __init__(self, buffer: ReplayBuffer, batch_size: int) -> None:
        self.buffer, self.batch_size = buffer, batch_size

    def __iter__(self) -> Iterator[PendingBatch]:
        while True:
            yield PendingBatch(self.buffer, self.batch_size)


def _as_is(batch: PendingBatch) -> PendingBatch:
    return batch


class ReplayDataModule(pl.LightningDataModule):
    """Replay buffer of real transitions.

    Args:
        capacity: transitions kept; the oldest are overwritten first.
        batch_size: transitions per sampled batch (one batch per update).
    """

    def __init__(self, capacity: PositiveInt = 1_000_000, batch_size: PositiveInt = 256) -> None:
        super().__init__()
        if capacity <= 0 or batch_size <= 0:
            raise ValueError(f"capacity and batch_size must be positive, got {capacity} and {batch_size}")
        self.save_hyperparameters(logger=False)
        self.capacity, self.batch_size = capacity, batch_size
        self.buffer: Optional[ReplayBuffer] = None
        self._pending_state: Optional[dict[str, Any]] = None

    @property
    def device(self) -> torch.device:
        if self.trainer is not None:
            return self.trainer.strategy.root_device
        return torch.device("cpu")

    def setup(self, stage: str) -> None:
        if self.buffer is None:
            self.buffer = ReplayBuffer(storage=LazyTensorStorage(self.capacity, device=self.device))
        if self._pending_state is not None:
            self._restore(self._pending_state)
            self._pending_state = None

    def __len__(self) -> int:
        return 0 if self.buffer is None else len(self.buffer)

    def add(self, transition: TensorDictBase) -> None:
        """Append one transition (a TensorDict with TRANSITION_KEYS and empty batch size), or a
        group's transition per seed (batch size [seeds]: one item of the storage)."""
        if self.buffer is None:
            self.setup("fit")
        if transition.batch_dims:
            self.buffer.extend(transition.unsqueeze(0))  # one item; ``add`` warns on a batched one
        else:
            self.buffer.add(transition)

    def contents(self) -> TensorDictBase:
        """Every stored transition, in storage order (a copy)."""
        return self.buffer.storage.get(torch.arange(len(self.buffer))).clone()

    def latest(self, n: int) -> TensorDictBase:
        """The ``n`` most recently written transitions, oldest first (a copy)."""
        return newest(self.buffer, n)

    def train_dataloader(self) -> DataLoader:
        # batch_size=None: each item already is a batch; the identity collate keeps the TensorDict.
        # A generator of its own: the iterator draws a base seed for workers (there are none), which
        # from the default generator would move the run's stream, and a group's seeds would not
        # see that draw (each has its own generator), so a seed would differ from itself alone.
        return DataLoader(ReplaySampleStream(self.buffer, self.batch_size), batch_size=None, collate_fn=_as_is,
                          generator=torch.Generator())

    # ---- checkpoint: only the filled part of the storage, plus the write cursor ---------------
    def state_dict(self) -> dict[str, Any]:
        if self.buffer is None or len(self.buffer) == 0:
            return {"size": 0}
        data = self.contents().to("cpu")
        return {
            "size": len(self.buffer),
            "data": {key: data[key] for key in data.keys()},
            "writer": self.buffer.writer.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.buffer is None:  # restored before setup: apply once the buffer exists
            self._pending_state = state
            return
        self._restore(state)

    def _restore(self, state: dict[str, Any]) -> None:
        self.buffer.empty()
        if state["size"] == 0:
            return
        if state["size"] > self.capacity:
            raise ValueError(f"the checkpoint holds {state['size']} transitions, more than capacity {self.capacity}")
        data = TensorDict(state["data"], batch_size=[state["size"]]).to(self.device)
        self.buffer.extend(data)
        self.buffer.writer.load_state_dict(state["writer"])
