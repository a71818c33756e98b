"""Metrics kept on the device: exact means between log points, and the NaN check names the phase."""

import pytest
import torch

from mpdp_lightning.errors import NonFiniteLossError
from mpdp_lightning.metrics import MetricAccumulator


def test_means_since_the_last_pop():
    acc = MetricAccumulator()
    for value in (1.0, 2.0, 6.0):
        acc.add({"train/a": torch.tensor(value), "train/b": torch.tensor(-value)})
    acc.add({"eval/c": torch.tensor(5.0)})
    assert acc.pop_means() == {"train/a": 3.0, "train/b": -3.0, "eval/c": 5.0}
    assert acc.pop_means() == {}


def test_non_finite_loss_names_its_phase():
    acc = MetricAccumulator()
    acc.add({"train/critic_loss": torch.tensor(1.0), "train/actor_loss": torch.tensor(2.0)})
    acc.raise_if_not_finite({"train/critic_loss": "critic", "train/actor_loss": "actor"}, env_steps=10)
    acc.add({"train/critic_loss": torch.tensor(1.0), "train/actor_loss": torch.tensor(float("inf"))})
    with pytest.raises(NonFiniteLossError, match="the actor loss .* became inf before env step 20"):
        acc.raise_if_not_finite({"train/critic_loss": "critic", "train/actor_loss": "actor"}, env_steps=20)
