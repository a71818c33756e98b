"""The warm-up of the env-interaction callback: its length and how it acts."""

from types import SimpleNamespace

import numpy as np
import pytest

from mpdp_lightning.algorithms.mbpo import MBPO
from mpdp_lightning.algorithms.sac import SAC
from mpdp_lightning.training.callbacks import EnvInteraction


class PolicyProbe:
    """The parts of a module the warm-up touches; counts the policy's actions."""

    task = "inverted_pendulum"

    def __init__(self) -> None:
        self.env_steps, self.policy_actions = 0, 0

    @classmethod
    def default_warmup_steps_for(cls, task: str) -> int:
        return 20

    def default_updates_per_env_step(self) -> int:
        return 1

    def act_on_host(self, obs, where, explore):
        self.policy_actions += 1
        return np.zeros((1, 1), dtype=np.float32)


@pytest.mark.parametrize("policy,expected", [("random", 0), ("policy", 20)])
def test_the_warm_up_acts_with_uniform_actions_or_the_untrained_policy(policy, expected):
    module, added = PolicyProbe(), []
    callback = EnvInteraction(total_env_steps=100, warmup_steps=None, log_every_env_steps=1000, warmup_policy=policy)
    callback.setup(None, module, "fit")
    try:
        callback.on_fit_start(SimpleNamespace(datamodule=SimpleNamespace(add=added.append)), module)
    finally:
        callback.teardown(None, None, "fit")
    assert module.env_steps == len(added) == 20  # the algorithm's own warm-up, as none was given
    assert module.policy_actions == expected


def test_the_default_warm_up_is_the_algorithms_for_the_task():
    assert SAC.default_warmup_steps_for("hopper") == 5000 and SAC.default_warmup_steps_for("inverted_pendulum") == 1000
    assert MBPO.default_warmup_steps_for("hopper") == 5000 and MBPO.default_warmup_steps_for("inverted_pendulum") == 500


def test_a_default_warm_up_past_the_budget_is_refused_at_setup():
    callback = EnvInteraction(total_env_steps=10, warmup_steps=None)
    with pytest.raises(ValueError, match="warmup_steps"):
        callback.setup(None, PolicyProbe(), "fit")
    with pytest.raises(ValueError, match="warmup_policy"):
        EnvInteraction(warmup_policy="greedy")


def test_a_runs_params_hold_the_warm_up_and_updates_per_env_step_it_used(in_tmp):
    """Left to the algorithm (None in the config, logged as given), the values used are logged
    beside them as ``resolved.*``: a run is reproducible from its params alone."""
    from mlflow import MlflowClient

    from helpers import fit_args, tracking_uri
    from mpdp_lightning.cli import main

    main(fit_args("inverted_pendulum", 1050, "--env_interaction.warmup_steps", "null",
                  "--env_interaction.updates_per_env_step", "null"))
    (run,) = MlflowClient(tracking_uri()).search_runs(["1"])
    params = run.data.params
    assert (params["env_interaction.warmup_steps"], params["env_interaction.updates_per_env_step"]) == ("None", "None")
    assert (params["resolved.env_interaction.warmup_steps"],
            params["resolved.env_interaction.updates_per_env_step"]) == ("1000", "1")
