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
    assert module.draw_batch(PendingBatch(buffer, 32))["reward"].eq(1.0).all()  # no rollouts yet: all real
    module.model_replay = ModelReplay(100)
    module.model_replay.add(_transitions(100, reward=-1.0))
    batch = module.draw_batch(PendingBatch(buffer, 32))
    assert batch.batch_size == torch.Size([32]) and int(batch["reward"].eq(1.0).sum()) == real


def test_the_tasks_settings_come_from_mbpos_configs():
    hopper = MBPO("hopper", hidden=16, model_hidden=16, model_layers=1, ensemble_size=2, num_elites=1)
    assert hopper.target_entropy == -1.0 and hopper.hparams.rollout_schedule == [20, 100, 1, 15]
    assert hopper.schedule.length(60_000) == 8
    humanoid = MBPO("humanoid", hidden=16, model_hidden=16, model_layers=1, ensemble_size=2, num_elites=1)
    assert humanoid.hparams.model_train_every == 1000 and humanoid.retain_epochs == 5
    own = MBPO("hopper", hidden=16, model_hidden=16, model_layers=1, ensemble_size=2, num_elites=1,
               rollout_schedule=[0, 10, 2, 4], target_entropy=-2.5)
    assert own.target_entropy == -2.5 and own.schedule.length(5_000) == 3


def test_updates_per_env_step_default_to_the_tasks_and_an_explicit_value_wins():
    from mpdp_lightning.training.callbacks import EnvInteraction

    small = dict(hidden=16, model_hidden=16, model_layers=1, ensemble_size=2, num_elites=1)
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
