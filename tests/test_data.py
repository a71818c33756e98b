"""The replay datamodule: uniform batches, and contents that survive a checkpoint round trip."""

import torch
from tensordict import TensorDict

from mpdp_lightning.training.data import ReplayDataModule


def _transition(i):
    return TensorDict(
        obs=torch.full((3,), float(i)),
        action=torch.full((2,), float(i)),
        reward=torch.tensor(float(i)),
        next_obs=torch.full((3,), float(i + 1)),
        terminated=torch.tensor(i % 7 == 0),
    )


def _filled(capacity, n):
    dm = ReplayDataModule(capacity=capacity, batch_size=4)
    dm.setup("fit")
    for i in range(n):
        dm.add(_transition(i))
    return dm


def test_dataloader_serves_batches_of_stored_transitions():
    dm = _filled(capacity=50, n=20)
    batch = next(iter(dm.train_dataloader())).draw()
    assert batch.batch_size == torch.Size([4])
    assert set(batch.keys()) == {"obs", "action", "reward", "next_obs", "terminated"}
    # every sampled row is a stored transition: next_obs = obs + 1 and reward = obs
    torch.testing.assert_close(batch["next_obs"], batch["obs"] + 1)
    torch.testing.assert_close(batch["reward"], batch["obs"][:, 0])


def test_state_round_trip_keeps_contents_and_write_position_after_wrap_around():
    dm = _filled(capacity=10, n=23)  # wrapped twice: slots hold 20..22 then 13..19
    state = dm.state_dict()
    assert state["size"] == 10
    restored = ReplayDataModule(capacity=10, batch_size=4)
    restored.load_state_dict(state)  # before setup, as Lightning may do
    restored.setup("fit")
    assert len(restored) == 10
    assert torch.equal(restored.contents()["reward"], dm.contents()["reward"])
    # the next write overwrites the oldest transition (13) in both
    dm.add(_transition(99))
    restored.add(_transition(99))
    assert torch.equal(restored.contents()["reward"], dm.contents()["reward"])
    assert 13.0 not in restored.contents()["reward"].tolist()


def test_empty_buffer_round_trip():
    dm = ReplayDataModule(capacity=10, batch_size=4)
    restored = ReplayDataModule(capacity=10, batch_size=4)
    restored.setup("fit")
    restored.load_state_dict(dm.state_dict())
    assert len(restored) == 0


def test_a_fetched_batch_is_drawn_when_the_update_asks_not_when_it_is_fetched():
    # Lightning fetches the next batch before the update (and its env step) runs: the batch must
    # still be able to hold a transition added after it was fetched.
    dm = _filled(capacity=50, n=1)
    pending = next(iter(dm.train_dataloader()))
    dm.add(_transition(5))
    assert (pending.draw()["reward"] == 5.0).any()  # 4 rows from 2 transitions: P(no row 5) = 1/16
    rewards = torch.cat([pending.draw()["reward"] for _ in range(20)])
    assert set(rewards.tolist()) == {0.0, 5.0}


def test_a_groups_storage_gives_each_seed_its_own_rows_as_its_buffer_alone_would():
    """One storage with a seed axis (a transition per seed per env step): seed s's batch is the
    rows its own buffer alone gives for the same generator state."""
    from mpdp_lightning.algorithms.seed_group import SeedStreams
    from mpdp_lightning.training.data import PendingBatch, ReplayDataModule

    seeds, steps = (0, 1, 2), 40
    group, alone = ReplayDataModule(capacity=100, batch_size=8), [ReplayDataModule(capacity=100, batch_size=8) for _ in seeds]
    for t in range(steps):
        per_seed = [_transition(float(100 * s + t)) for s in seeds]
        group.add(torch.stack(per_seed))
        for module, transition in zip(alone, per_seed):
            module.add(transition)
    assert len(group) == steps
    states = []
    for seed in seeds:
        torch.manual_seed(seed)
        states.append(torch.get_rng_state())
    streams = SeedStreams(seeds, states)
    batch = PendingBatch(group.buffer, 8).draw(streams.draw)
    assert batch.batch_size == (3, 8)
    for position, seed in enumerate(seeds):
        torch.manual_seed(seed)
        assert torch.equal(batch[position]["reward"], PendingBatch(alone[position].buffer, 8).draw()["reward"])
    restored = ReplayDataModule(capacity=100, batch_size=8)  # the checkpoint keeps the seed axis
    restored.load_state_dict(group.state_dict())
    restored.setup("fit")
    assert restored.contents()["reward"].shape == (steps, 3)
    assert torch.equal(restored.contents()["reward"], group.contents()["reward"])
