"""``mpdp fit --seeds 0,1``: a group of seeds run as a user runs it, and what each seed's MLflow run
shows (training/seed_runs.py, algorithms/seed_group.py)."""

import os

import pytest
import torch
from mlflow.tracking import MlflowClient

from helpers import fit_args, tracking_uri
import mpdp_lightning.algorithms.agent as agent_module
from mpdp_lightning.cli import main

# inverted_pendulum: 4 observations, so no weight gradient has the 11 rows whose two-thread GEMM
# rounds differently in a group (tests/test_seed_group.py); one thread all the same, as there.
TOTAL = 300


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _runs(client):
    [experiment] = [e for e in client.search_experiments() if e.name == "mpdp"]
    return client.search_runs([experiment.experiment_id])


def _history(client, run_id, metric):
    return [(m.step, m.value) for m in client.get_metric_history(run_id, metric)]


def test_each_seed_of_a_group_is_its_own_mlflow_run_with_the_curves_of_that_seed_alone(in_tmp, one_thread, capsys):
    main(fit_args("inverted_pendulum", TOTAL, "--seeds", "0,1"))
    out = capsys.readouterr().out
    assert "seeds 0,1 (one group)" in out
    client = MlflowClient(tracking_uri())
    group = {int(run.data.tags["seed"]): run for run in _runs(client)}
    assert sorted(group) == [0, 1]
    first = group[0].info.run_id
    for seed, run in group.items():
        assert run.data.tags["group"] == first and run.data.tags["group_seeds"] == "0,1"
        assert run.info.run_name == f"inverted_pendulum-{seed}" and run.info.status == "FINISHED"
    for seed in (0, 1):  # the same seed alone, in the same store
        main(fit_args("inverted_pendulum", TOTAL, "--seed_everything", str(seed)))
        alone = [r for r in _runs(client) if "group" not in r.data.tags and r.data.tags["seed"] == str(seed)]
        [alone] = alone
        for metric in ("eval/return", "train/critic_loss", "train/actor_loss", "train/alpha", "train/episode_return"):
            grouped = _history(client, group[seed].info.run_id, metric)
            assert grouped and grouped == _history(client, alone.info.run_id, metric), (seed, metric)


def test_a_group_resumes_from_its_checkpoint_into_the_same_runs(in_tmp, one_thread, capsys):
    main(fit_args("inverted_pendulum", 200, "--seeds", "0,1"))
    client = MlflowClient(tracking_uri())
    before = {run.data.tags["seed"]: run.info.run_id for run in _runs(client)}
    [checkpoint] = list(in_tmp.glob("runs/checkpoints/*/last.ckpt"))
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:  # only with the seeds it holds
        main(fit_args("inverted_pendulum", TOTAL, "--seeds", "0,2", "--ckpt_path", str(checkpoint)))
    assert exit_.value.code == 2
    assert "holds seeds 0,1, and the command gives --seeds 0,2" in capsys.readouterr().err
    main(fit_args("inverted_pendulum", TOTAL, "--seeds", "0,1", "--ckpt_path", str(checkpoint)))
    after = {run.data.tags["seed"]: run.info.run_id for run in _runs(client)}
    assert after == before  # no new run: each seed goes on in its own
    for run_id in before.values():
        steps = [step for step, _ in _history(client, run_id, "eval/return")]
        assert steps == [100, 200, 300]
    # resumed, seed 1's curves are those of seed 1 alone resumed the same way (the weights, the
    # optimizers, the buffer's seed column and the seed's random stream all came back)
    alone_folder = in_tmp / "alone"
    alone_folder.mkdir()
    os.chdir(alone_folder)
    main(fit_args("inverted_pendulum", 200, "--seed_everything", "1"))
    [alone_checkpoint] = list(alone_folder.glob("runs/checkpoints/*/last.ckpt"))
    main(fit_args("inverted_pendulum", TOTAL, "--seed_everything", "1", "--ckpt_path", str(alone_checkpoint)))
    alone_client = MlflowClient(tracking_uri())
    [alone] = _runs(alone_client)
    for metric in ("eval/return", "train/critic_loss", "train/alpha"):
        assert _history(alone_client, alone.info.run_id, metric) == _history(client, before["1"], metric), metric


@pytest.mark.parametrize("args, message", [
    (("--seeds", "0,0"), "seeds must differ"),
    (("--seeds", "0,x"), "comma-separated non-negative integers"),
    (("--seeds", "0,1", "--env_interaction.seed", "3"), "env_interaction.seed"),
    (("--seeds", "0,1", "--trainer.logger", "true"), "each seed to its own run"),
])
def test_a_bad_group_is_one_error_line_before_any_work(in_tmp, capsys, args, message):
    with pytest.raises(SystemExit) as exit_:
        main(fit_args("inverted_pendulum", TOTAL, *args))
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and message in err[0]
    assert list(in_tmp.iterdir()) == []


MBPO_TINY = ("--model.ensemble_size", "3", "--model.num_elites", "2", "--model.model_hidden", "32",
             "--model.model_layers", "2", "--model.model_train_every", "100", "--model.model_max_epochs", "2",
             "--model.rollout_batch_size", "64", "--env_interaction.updates_per_env_step", "1",
             "--coplanner.enabled", "true", "--coplanner.candidates", "3", "--coplanner.horizon", "2")


def _stopped_and_resumed(folder, *args):
    """A run to 200 env steps, then resumed from its checkpoint to 300, in ``folder``: its runs."""
    folder.mkdir()
    os.chdir(folder)
    main(fit_args("inverted_pendulum", 200, *args, algo="mbpo"))
    [checkpoint] = list(folder.glob("runs/checkpoints/*/last.ckpt"))
    main(fit_args("inverted_pendulum", TOTAL, *args, "--ckpt_path", str(checkpoint), algo="mbpo"))
    client = MlflowClient(tracking_uri())
    return client, {run.data.tags["seed"]: run.info.run_id for run in _runs(client)}


def test_an_mbpo_group_with_coplanner_trains_and_resumes_each_seed_as_that_seed_alone(in_tmp, one_thread):
    """MBPO's branched rollouts into a model replay per seed, each batch's real and model rows per
    seed, COPlanner's conservative rollouts and optimistic exploration per seed, and on resume each
    seed's rollouts branched again from its restored model: seed 1's curves in a group stopped at
    200 and resumed to 300 are those of seed 1 alone stopped and resumed likewise, to the bit."""
    client, group = _stopped_and_resumed(in_tmp / "group", "--seeds", "0,1", *MBPO_TINY)
    alone_client, alone = _stopped_and_resumed(in_tmp / "alone", "--seed_everything", "1", *MBPO_TINY)
    for metric in ("model/holdout_mse", "mbpo/rollout_transitions", "mbpo/rollout_u_mean", "mbpo/model_buffer_size",
                   "coplanner/rollout_u_chosen", "coplanner/explore_u_chosen", "train/critic_loss",
                   "train/actor_loss", "train/alpha", "eval/return"):
        grouped = _history(client, group["1"], metric)
        assert grouped and grouped == _history(alone_client, alone["1"], metric), metric
    assert [s for s, _ in _history(client, group["1"], "mbpo/rollout_transitions")] == [101, 200, 200, 300]
    assert _history(client, group["0"], "mbpo/rollout_u_mean") != _history(client, group["1"], "mbpo/rollout_u_mean")


MPDP_TINY = ("--model.ensemble_size", "3", "--model.num_elites", "2", "--model.model_hidden", "32",
             "--model.model_layers", "2", "--model.model_train_every", "100", "--model.model_max_epochs", "2",
             "--model.horizon", "3", "--env_interaction.log_every_env_steps", "10")


ONE_UPDATE = ("--env_interaction.updates_per_env_step", "1")  # MPDP's 20 would make this test minutes


def test_an_mpdp_group_trains_each_seed_as_that_seed_alone_but_for_the_fused_adams_rounding(in_tmp, one_thread,
                                                                                            monkeypatch):
    """Each seed's world model fitted on its own transitions with its own Adam slice, step count and
    generator, its H-step improvement vmapped: seed 1 in the group is seed 1 alone (rows masked alone
    too) to the bit over two fits and 100 updates, once the one kernel that rounds by offset is
    out of the way: the CPU's fused Adam steps the 6 floats of a seed's last actor bias (3 heads x
    2 outputs) partly in its vector loop in the group's stacked 12, all in its scalar tail alone
    (docs/seed-groups.md). The single-tensor Adam, in both runs, has no such loop split."""
    monkeypatch.setattr(agent_module, "ADAM", {"fused": False, "foreach": False})
    main(fit_args("inverted_pendulum", 200, "--seeds", "0,1", *MPDP_TINY, *ONE_UPDATE, algo="mpdp"))
    client = MlflowClient(tracking_uri())
    group = {run.data.tags["seed"]: run.info.run_id for run in _runs(client)}
    alone_folder = in_tmp / "alone"
    alone_folder.mkdir()
    os.chdir(alone_folder)
    main(fit_args("inverted_pendulum", 200, "--seed_everything", "1", "--model.compact_rows", "false", *MPDP_TINY,
                  *ONE_UPDATE, algo="mpdp"))
    alone_client = MlflowClient(tracking_uri())
    [alone] = _runs(alone_client)
    for metric in ("model/holdout_mse", "model/holdout_nll", "model/epochs", "model/u_mean", "train/critic_loss",
                   "train/actor_loss", "train/J", "train/u_mean", "train/horizon_mean", "train/alpha", "eval/return"):
        grouped = _history(client, group["1"], metric)
        assert grouped and grouped == _history(alone_client, alone.info.run_id, metric), metric
    assert [step for step, _ in _history(client, group["1"], "model/epochs")] == [101, 200]
    assert _history(client, group["0"], "model/holdout_mse") != _history(client, group["1"], "model/holdout_mse")


def test_a_seed_that_goes_non_finite_stops_alone_and_the_others_train_on_unchanged(in_tmp, one_thread, capsys):
    main(fit_args("inverted_pendulum", TOTAL, "--seeds", "0,1"))  # the reference: no seed breaks
    client = MlflowClient(tracking_uri())
    reference = {run.data.tags["seed"]: run.info.run_id for run in _runs(client)}
    broken_folder = in_tmp / "broken"
    broken_folder.mkdir()
    os.chdir(broken_folder)
    capsys.readouterr()
    main(fit_args("inverted_pendulum", TOTAL, "--seeds", "0,1", "--trainer.callbacks+=helpers.PoisonSeedAt",
                  "--trainer.callbacks.env_step", "150", "--trainer.callbacks.position", "1"))
    err = capsys.readouterr().err
    assert "seed 1 stopped: " in err and "the critic phase's loss became nan first" in err
    assert "the other seeds go on" in err
    broken_client = MlflowClient(tracking_uri())
    runs = {run.data.tags["seed"]: run for run in _runs(broken_client)}
    assert runs["1"].info.status == "FAILED" and "critic" in runs["1"].data.tags["stopped"]
    assert runs["0"].info.status == "FINISHED"
    assert [s for s, _ in _history(broken_client, runs["1"].info.run_id, "eval/return")] == [100]
    for metric in ("eval/return", "train/critic_loss", "train/actor_loss", "train/alpha"):  # seed 0: as if nothing happened
        assert _history(broken_client, runs["0"].info.run_id, metric) == _history(client, reference["0"], metric), metric
    [kept] = list(broken_folder.glob("runs/checkpoints/*/last-good-seed1.ckpt"))
    state = torch.load(kept, map_location="cpu", weights_only=False)
    assert state["counters"]["env_steps"] < 150  # written before the NaN
    assert all(torch.isfinite(v).all() for v in state["state_dict"].values() if v.is_floating_point())
