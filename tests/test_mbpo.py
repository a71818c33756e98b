"""MBPO's settings per task and its mixed batches."""

import pytest
import torch
from tensordict import TensorDict
from torchrl.data import LazyTensorStorage, ReplayBuffer

from mpdp_lightning.training.data import PendingBatch
from mpdp_lightning.algorithms.mbpo import MBPO
from mpdp_lightning.training.model_replay import ModelReplay


def _transitions(n, reward, obs_dim=11, act_dim=3):
    return TensorDict({"obs": torch.zeros(n, obs_dim), "action": torch.zeros(n, act_dim), "reward": torch.full((n,), reward),
                       "next_obs": torch.zeros(n, obs_dim), "terminated": torch.zeros(n, dtype=torch.bool)}, batch_size=[n])


@pytest.mark.parametrize("ratio,real", [(0.05, 1), (0.5, 16), (0.0, 0)])
def test_each_batch_holds_the_real_ratio_of_real_transitions(ratio, real):
    module = MBPO("hopper", hidden=16, model_hidden=16, model_layers=1, ensemble_size=2, num_elites=1, real_ratio=ratio)
    buffer = ReplayBuffer(storage=LazyTensorStorage(100))
    buffer.extend(_transitions(50, reward=1.0))
    assert module.rollouts.mixed_batch(module, PendingBatch(buffer, 32))["reward"].eq(1.0).all()  # no rollouts yet: all real
    module.rollouts.model_replay = ModelReplay(100)
    module.rollouts.model_replay.add(_transitions(100, reward=-1.0))
    batch = module.rollouts.mixed_batch(module, PendingBatch(buffer, 32))
    assert batch.batch_size == torch.Size([32]) and int(batch["reward"].eq(1.0).sum()) == real


SMALL = dict(hidden=16, model_hidden=16, model_layers=1, ensemble_size=2, num_elites=1)


def test_the_tasks_settings_come_from_mbpos_configs():
    hopper = MBPO("hopper", **SMALL)
    assert hopper.target_entropy == -1.0 and hopper.hparams.rollout_schedule == [20, 150, 1, 15]  # every original's 150
    humanoid = MBPO("humanoid", **SMALL)
    assert humanoid.hparams.model_train_every == 1000 and humanoid.rollouts.retain_epochs == 5
    # jannerm/mbpo examples/config/inverted_pendulum/0.py
    pendulum = MBPO("inverted_pendulum", **SMALL)
    assert pendulum.target_entropy == -0.05 and pendulum.default_updates_per_env_step() == 10
    assert pendulum.rollouts.schedule.epoch_length == 250 and MBPO.default_warmup_steps_for("inverted_pendulum") == 500
    assert {pendulum.rollouts.schedule.length(n) for n in range(0, 20_000, 250)} == {1}
    own = MBPO("hopper", **SMALL, rollout_schedule=[0, 10, 2, 4], target_entropy=-2.5)
    assert own.target_entropy == -2.5 and own.rollouts.schedule.length(5_000) == 3


def test_every_fit_branches_rollout_batch_size_starts_whatever_its_interval():
    # MBPO branches rollout_batch_size (100k) start states per fit: humanoid, refitted every 1000
    # env steps, branches as many per fit as hopper, refitted every 250 (not 4x as many)
    hopper, humanoid = MBPO("hopper", **SMALL), MBPO("humanoid", **SMALL)
    assert hopper.hparams.rollout_batch_size == humanoid.hparams.rollout_batch_size == 100_000
    # the model replay as MBPO sizes its pool: starts x length x fits per epoch x retained epochs
    assert hopper.rollouts.capacity(length=3) == 100_000 * 3 * 4
    assert humanoid.rollouts.capacity(length=3) == 100_000 * 3 * 1 * 5  # 1.5M, not 6M
    latest_fit = MBPO("hopper", **SMALL, retain_epochs=0.25)  # COPlanner's pool: the latest fit's only
    assert latest_fit.rollouts.capacity(length=1) == 100_000


@pytest.mark.parametrize("env_steps,length", [(5_000, 1), (25_000, 1), (26_000, 1), (100_000, 9), (105_000, 9),
                                              (155_000, 15), (300_000, 15)])
def test_the_schedules_epochs_start_after_the_warm_up(env_steps, length):
    # hopper's [20, 150, 1, 15] after MBPO's 5000 initial steps: 9 at 100k env steps (epoch 95),
    # as in MBPO's code; counting the warm-up as epochs gave 15 there
    hopper = MBPO("hopper", **SMALL)
    hopper.rollouts.schedule_start = 5_000
    assert hopper.rollouts.rollout_length(env_steps) == length


def test_the_schedule_takes_its_warm_up_from_the_runs_env_interaction():
    from types import SimpleNamespace

    from mpdp_lightning.training.callbacks import EnvInteraction

    hopper = MBPO("hopper", **SMALL)
    callback = EnvInteraction(total_env_steps=200_000, warmup_steps=None)
    callback.setup(None, hopper, "fit")  # None: MBPO's own for hopper
    hopper._trainer = SimpleNamespace(callbacks=[callback])
    hopper.on_fit_start()
    callback.teardown(None, None, "fit")
    assert hopper.rollouts.schedule_start == 5_000


def test_updates_per_env_step_default_to_the_tasks_and_an_explicit_value_wins():
    from mpdp_lightning.training.callbacks import EnvInteraction

    small = SMALL
    assert MBPO("hopper", **small).default_updates_per_env_step() == 20
    assert MBPO("halfcheetah", **small).default_updates_per_env_step() == 40  # MBPO's num_train_repeat there
    for given, expected in ((None, 40), (3, 3)):
        callback = EnvInteraction(total_env_steps=100, warmup_steps=10, updates_per_env_step=given)
        callback.setup(None, MBPO("halfcheetah", **small), "fit")
        assert callback.updates_per_env_step == expected
        callback.teardown(None, None, "fit")


@pytest.mark.parametrize("bad", [dict(real_ratio=1.5), dict(rollout_schedule=[1, 2, 3])])
def test_bad_settings_are_refused(bad):
    with pytest.raises(ValueError):
        MBPO("hopper", **bad)
