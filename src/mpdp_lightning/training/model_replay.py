"""MBPO's model replay: the transitions of the latest branched rollouts, and SAC batches that
mix real and model transitions.

The buffer is a TorchRL ``LazyTensorStorage`` on the trainer's device, sized to keep the rollouts
of the last ``retain_fits`` model fits (MBPO keeps one model epoch's: its ``model_retain_epochs``
of 1 at 4 fits per epoch on most tasks); when the rollout length, and with it that size,
changes, the buffer is rebuilt with its newest transitions kept (as mbrl-lib does). Model
transitions carry the same keys as real ones, so a mixed batch is one concatenation.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
from tensordict import TensorDictBase
from torchrl.data import LazyTensorStorage, ReplayBuffer

from mpdp_lightning.training.data import TRANSITION_KEYS, newest, uniform_sample


class ModelReplay:
    """Model-generated transitions, the newest ``capacity`` of them."""

    def __init__(self, capacity: int, device: Union[str, torch.device] = "cpu") -> None:
        self.device = torch.device(device)
        self.capacity = capacity
        self.buffer = self._empty(capacity)

    def _empty(self, capacity: int) -> ReplayBuffer:
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1, got {capacity}")
        return ReplayBuffer(storage=LazyTensorStorage(capacity, device=self.device))

    def __len__(self) -> int:
        return len(self.buffer)

    def resize(self, capacity: int) -> None:
        """Hold ``capacity`` transitions from now on, keeping the newest of those already held."""
        if capacity == self.capacity:
            return
        kept = newest(self.buffer, capacity) if len(self.buffer) else None
        self.buffer, self.capacity = self._empty(capacity), capacity
        if kept is not None:
            self.buffer.extend(kept)

    def add(self, transitions: TensorDictBase) -> None:
        """Append rollout transitions (extra keys such as u are dropped)."""
        self.buffer.extend(transitions.select(*TRANSITION_KEYS).to(self.device))

    def sample_batch(self, batch_size: int, generator: Optional[torch.Generator] = None) -> TensorDictBase:
        return uniform_sample(self.buffer, batch_size, generator)


def split_batch(batch_size: int, real_ratio: float) -> tuple[int, int]:
    """(real, model) rows of a batch: MBPO's int(batch_size * real_ratio) real ones, the rest model."""
    if not 0.0 <= real_ratio <= 1.0:
        raise ValueError(f"real_ratio must be in [0, 1], got {real_ratio}")
    real = int(batch_size * real_ratio)
    return real, batch_size - real
