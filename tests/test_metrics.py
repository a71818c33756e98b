"""Metrics kept on the device: exact means between log points."""

import torch

from mpdp_lightning.training.metrics import MetricAccumulator


def test_means_since_the_last_pop():
    acc = MetricAccumulator()
    for value in (1.0, 2.0, 6.0):
        acc.add({"train/a": torch.tensor(value), "train/b": torch.tensor(-value)})
    acc.add({"eval/c": torch.tensor(5.0)})
    assert acc.pop_means() == {"train/a": 3.0, "train/b": -3.0, "eval/c": 5.0}
    assert acc.pop_means() == {}
