"""The CUDA path: whenever torch sees a GPU, updates run without a host synchronisation.

Skipped on machines without CUDA (CI's and the 2-core CPU machine); run wherever one is present.
"""

import pytest
import torch

from helpers import fit_args
from mpdp_lightning.cli import main
from mpdp_lightning.algorithms.sac import SAC

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

TINY = ("--model.ensemble_size", "3", "--model.num_elites", "2", "--model.model_hidden", "32",
        "--model.model_layers", "2", "--model.model_train_every", "100", "--model.model_max_epochs", "2",
        "--model.horizon", "3", "--env_interaction.updates_per_env_step", "2")


@pytest.mark.parametrize("algo", ["sac", "mpdp"])
def test_updates_never_synchronise_with_the_host(in_tmp, monkeypatch, algo):
    # Every update (batch draw, critic, policy improvement, temperature, their optimizer steps and
    # metrics) runs under sync debug mode "error": a .item(), a nonzero, a blocking copy raises.
    # Env steps and model fits (every 100 env steps here) stay outside, as in a run.
    update = SAC.training_step
    updates = []

    def strict_update(self, batch, batch_idx):
        if self.updates < 2:  # warm-up: the compiled improvement's first calls compile (and autotune)
            return update(self, batch, batch_idx)
        torch.cuda.set_sync_debug_mode("error")
        try:
            update(self, batch, batch_idx)
        finally:
            torch.cuda.set_sync_debug_mode(0)
        updates.append(self.updates)

    monkeypatch.setattr(SAC, "training_step", strict_update)
    extra = TINY if algo == "mpdp" else ()
    main(fit_args("hopper", 200, "--trainer.accelerator", "gpu", "--trainer.devices", "1", *extra, algo=algo))
    assert len(updates) >= 90  # strict updates (100 env steps after the warm-up)
