"""MBPO's model replay buffer and the real/model split of a batch."""

import pytest
import torch
from tensordict import TensorDict

from mpdp_lightning.training.model_replay import ModelReplay, split_batch


def _transitions(start, n, obs=2):
    ids = torch.arange(start, start + n, dtype=torch.float32)
    return TensorDict({"obs": ids[:, None].expand(n, obs), "action": ids[:, None], "reward": ids,
                       "next_obs": ids[:, None].expand(n, obs) + 1, "terminated": torch.zeros(n, dtype=torch.bool),
                       "u": ids}, batch_size=[n])


def test_the_buffer_keeps_the_newest_transitions_and_drops_extra_keys():
    replay = ModelReplay(capacity=5)
    replay.add(_transitions(0, 4))
    replay.add(_transitions(4, 4))
    assert len(replay) == 5
    batch = replay.sample_batch(200)
    assert set(batch["reward"].tolist()) == {3.0, 4.0, 5.0, 6.0, 7.0} and "u" not in batch.keys()


def test_resizing_keeps_the_newest_that_fit():
    replay = ModelReplay(capacity=6)
    replay.add(_transitions(0, 9))  # holds 3..8, written circularly
    replay.resize(4)
    assert len(replay) == 4 and set(replay.sample_batch(200)["reward"].tolist()) == {5.0, 6.0, 7.0, 8.0}
    replay.resize(10)
    replay.add(_transitions(100, 3))
    assert len(replay) == 7 and set(replay.sample_batch(400)["reward"].tolist()) == {5.0, 6.0, 7.0, 8.0, 100.0, 101.0, 102.0}


@pytest.mark.parametrize("batch,ratio,split", [(256, 0.05, (12, 244)), (256, 0.0, (0, 256)), (100, 1.0, (100, 0))])
def test_mbpos_real_ratio_gives_int_of_the_real_share(batch, ratio, split):
    assert split_batch(batch, ratio) == split


def test_bad_ratio_and_capacity_are_refused():
    with pytest.raises(ValueError):
        split_batch(256, 1.5)
    with pytest.raises(ValueError):
        ModelReplay(0)
