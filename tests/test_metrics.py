"""Metrics kept on the device: exact means between log points."""

import torch

from mpdp_lightning.training.metrics import MetricAccumulator


def test_means_since_the_last_pop():
    acc = MetricAccumulator()
    for value in (1.0, 2.0, 6.0):
        acc.accumulate({"train/a": torch.tensor(value), "train/b": torch.tensor(-value)})
    acc.accumulate({"eval/c": torch.tensor(5.0)})
    assert acc.pop_means() == {"train/a": 3.0, "train/b": -3.0, "eval/c": 5.0}
    assert acc.pop_means() == {}


def test_a_groups_metrics_average_per_seed():
    acc = MetricAccumulator()
    for value in (1.0, 2.0, 6.0):  # three seeds' values per update
        acc.accumulate({"train/a": torch.tensor([value, 10 * value, -value])})
    assert acc.pop_means() == {"train/a": [3.0, 30.0, -3.0]}


def test_phase_times_are_seconds_per_update_since_the_last_pop_and_paused_phases_are_not_timed():
    import time

    from mpdp_lightning.training.metrics import PhaseTimer

    timer = PhaseTimer()
    for _ in range(2):
        with timer.phase("fit"):
            time.sleep(0.05)
        with timer.phase("update"), timer.paused():
            with timer.phase("critic"):  # inside a graph's update: timed whole, not by phase
                pass
        timer.count_update()
    means = timer.pop_means()
    assert set(means) == {"time/fit_seconds", "time/update_seconds"}
    assert 0.05 <= means["time/fit_seconds"] < 0.2
    assert timer.pop_means() == {}
