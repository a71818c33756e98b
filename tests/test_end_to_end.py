"""Short real runs through the command line: SAC on hopper with MLflow logging, an interrupted
run resumed from its checkpoint, and a diverging run stopped with its last good checkpoint."""

import json
import os
import shlex
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from helpers import ROOT, fit_args, tracking_uri
from mpdp_lightning.training.checkpoint_io import CHECKPOINT_FORMAT, read_checkpoint_header
from mpdp_lightning.cli import main
from mpdp_lightning.training.data import PendingBatch


# A world model small enough for a few seconds of CPU, refitted every 100 env steps
TINY_WORLD_MODEL = (
    "--model.ensemble_size", "3", "--model.num_elites", "2", "--model.model_hidden", "32",
    "--model.model_layers", "2", "--model.model_train_every", "100",
)


def _only_run(client):
    experiment = client.get_experiment_by_name("mpdp")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1, "a resumed run must continue its MLflow run, not start another"
    return runs[0]


def _steps(client, run_id, metric):
    return [m.step for m in client.get_metric_history(run_id, metric)]


def test_sac_on_hopper_logs_to_mlflow_and_checkpoints(in_tmp):
    main(fit_args("hopper", 300, "--model.gamma", "0.98"))

    client = MlflowClient(tracking_uri())
    run = _only_run(client)
    run_id = run.info.run_id
    assert run.info.status == "FINISHED"
    # every metric is on the env-step clock
    assert _steps(client, run_id, "eval/return") == [100, 200, 300]
    for metric in ("train/critic_loss", "train/actor_loss", "train/alpha", "train/q_mean", "train/episode_return",
                   "time/env_steps_per_second"):
        steps = _steps(client, run_id, metric)
        assert steps and all(s % 50 == 0 and 0 < s <= 300 for s in steps), metric
    # the resolved config, overrides included, plus version and commit
    params = run.data.params
    assert params["task"] == "hopper"
    assert params["model.init_args.gamma"] == "0.98"
    assert params["model.init_args.task"] == "hopper"
    assert params["data.batch_size"] == "32"
    assert "git_commit" in params and "mpdp_version" in params
    assert run.data.tags["algo"] == "SAC"
    config_path = client.download_artifacts(run_id, "config.yaml", str(in_tmp))
    assert "gamma: 0.98" in open(config_path).read()

    header = read_checkpoint_header(in_tmp / "runs/checkpoints" / run_id / "last.ckpt")
    assert header.env_steps == 300 and header.updates == 200  # 100 warm-up steps take no update
    assert header.mlflow_run_id == run_id


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["sigterm", "ctrl-c"])
def test_interrupted_run_resumes_with_counters_buffer_and_optimizers_intact(in_tmp, capsys, signum):
    probe = f'--trainer.callbacks+={{"class_path": "helpers.SignalAt", "init_args": {{"env_step": 250, "signum": {int(signum)}}}}}'
    with pytest.raises(SystemExit) as exit_info:
        main(fit_args("hopper", 400, probe))
    assert exit_info.value.code == 128 + signum  # 143 for SIGTERM, 130 for Ctrl-C, as shells report them

    client = MlflowClient(tracking_uri())
    interrupted = _only_run(client)
    run_id = interrupted.info.run_id
    assert interrupted.info.status == "KILLED", "an interrupted run must not look finished, nor failed"
    ckpt = in_tmp / "runs/checkpoints" / run_id / "last.ckpt"
    header = read_checkpoint_header(ckpt)
    assert header.env_steps == 250 and header.updates == 150  # saved at the update boundary
    saved = torch.load(ckpt, weights_only=True)
    assert saved["ReplayDataModule"]["size"] == 250

    out = capsys.readouterr().out
    assert f"run interrupted by {'Ctrl-C (SIGINT)' if signum == signal.SIGINT else 'SIGTERM'} at 250 of 400 env steps" in out
    assert f"saved: runs/checkpoints/{run_id}/last.ckpt at env step 250" in out
    resume = shlex.split(next(line for line in out.splitlines() if line.startswith("resume: "))[len("resume: "):])
    assert resume[1:3] == ["-m", "mpdp_lightning"] and resume[-2:] == ["--ckpt_path", f"runs/checkpoints/{run_id}/last.ckpt"]

    # the printed command, as it is, continues the run (in this process, to record its start)
    record = f'--trainer.callbacks+={{"class_path": "helpers.RecordStartState", "init_args": {{"path": "{in_tmp}/start.pt"}}}}'
    main([*resume[3:], record])

    start = torch.load(in_tmp / "start.pt", weights_only=False)
    assert start["env_steps"] == 250 and start["updates"] == 150
    assert torch.equal(start["buffer"]["obs"], saved["ReplayDataModule"]["data"]["obs"])
    assert torch.equal(start["buffer"]["reward"], saved["ReplayDataModule"]["data"]["reward"])
    assert start["optimizer_steps"][:2] == [150, 150]  # Adam's step counts came back (critic, actor)
    for key, value in start["actor"].items():
        torch.testing.assert_close(value, saved["state_dict"][f"actor.{key}"])

    run = _only_run(client)
    assert run.info.status == "FINISHED"
    assert _steps(client, run_id, "eval/return") == [100, 200, 300, 400]
    final = read_checkpoint_header(ckpt)
    assert final.env_steps == 400 and final.updates == 300
    assert "run finished at 400 of 400 env steps" in capsys.readouterr().out


def test_nan_loss_stops_the_run_naming_the_phase_and_keeps_the_last_good_checkpoint(in_tmp, capsys):
    poison = '--trainer.callbacks+={"class_path": "helpers.PoisonAt", "init_args": {"env_step": 230, "module": "critic"}}'
    with pytest.raises(SystemExit) as exit_info:
        main(fit_args("hopper", 400, poison))
    assert exit_info.value.code == 2
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert message.startswith("error:") and "critic" in message

    run_id = _only_run(MlflowClient(tracking_uri())).info.run_id
    ckpt = in_tmp / "runs/checkpoints" / run_id / "last.ckpt"
    assert read_checkpoint_header(ckpt).env_steps == 200
    state = torch.load(ckpt, weights_only=True)["state_dict"]
    assert all(torch.isfinite(v).all() for v in state.values())


def test_a_nan_from_the_temperature_is_blamed_on_the_temperature(in_tmp, capsys):
    # log(alpha) gets a NaN gradient at env step 150; from the next update on, the critic's
    # target (which uses alpha) and every later loss are NaN too
    poison = '--trainer.callbacks+={"class_path": "helpers.PoisonTemperatureAt", "init_args": {"env_step": 150}}'
    with pytest.raises(SystemExit) as exit_info:
        main(fit_args("hopper", 400, poison))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0]
    # found by whichever check comes first (here pi_0's next action, already NaN), blamed on the temperature
    assert err[0].startswith("error: ")
    assert "the temperature phase's parameters became non-finite first, in update 50;" in err[0]
    assert "last good checkpoint is kept" in err[0]


def test_a_nan_action_never_reaches_the_environment(in_tmp, capsys):
    spy = in_tmp / "actions.txt"
    poison = '--trainer.callbacks+={"class_path": "helpers.PoisonAt", "init_args": {"env_step": 150, "module": "actor"}}'
    record = f'--trainer.callbacks+={{"class_path": "helpers.ActionSpy", "init_args": {{"path": "{spy}"}}}}'
    with pytest.raises(SystemExit) as exit_info:
        main(fit_args("hopper", 400, poison, record))
    assert exit_info.value.code == 2
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert message.startswith("error: pi_0's action at env step 151 was [nan")
    assert "non-finite parameters in actor" in message
    given, non_finite = map(int, spy.read_text().split())
    assert given == 50 and non_finite == 0  # env steps 101..150 with pi_0; none of them NaN


def test_a_nan_action_never_reaches_an_evaluation_environment_either(in_tmp, capsys):
    # pi_0 turns NaN in the update at env step 200, where an evaluation is due right after it
    poison = '--trainer.callbacks+={"class_path": "helpers.PoisonAt", "init_args": {"env_step": 200, "module": "actor"}}'
    with pytest.raises(SystemExit) as exit_info:
        main(fit_args("hopper", 400, poison))
    assert exit_info.value.code == 2
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert message.startswith("error: pi_0's action in the evaluation at env step 200 was [nan")


def test_a_kill_while_writing_a_checkpoint_leaves_no_temporary_file(in_tmp):
    tmpdir = in_tmp / "tmpdir"
    tmpdir.mkdir()
    kill = '--trainer.callbacks+={"class_path": "helpers.KillDuringCheckpointWrite", "init_args": {"env_step": 200}}'
    env = dict(os.environ, TMPDIR=str(tmpdir), PYTHONPATH=str(Path(__file__).parent), OMP_NUM_THREADS="1")
    killed = subprocess.run([sys.executable, "-m", "mpdp_lightning", *fit_args("hopper", 300, kill)],
                            cwd=in_tmp, env=env, capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL
    assert list(tmpdir.iterdir()) == [], "nothing may be left in $TMPDIR"
    (folder,) = (in_tmp / "runs/checkpoints").iterdir()
    assert [p.name for p in folder.glob(".last.ckpt.tmp*")], "the kill should have struck mid-write, beside the checkpoint"
    assert read_checkpoint_header(folder / "last.ckpt").env_steps == 101  # the last whole one (first update)

    main(fit_args("hopper", 300, "--ckpt_path", str(folder / "last.ckpt")))
    assert sorted(p.name for p in folder.iterdir()) == ["last.ckpt"], "the stale temporary is removed"
    assert read_checkpoint_header(folder / "last.ckpt").env_steps == 300


def test_world_model_phase_runs_in_training_and_is_checkpointed(in_tmp):
    main(fit_args(
        "hopper", 300,
        "--model", "mpdp_lightning.algorithms.model_based.ModelBasedSAC",
        *TINY_WORLD_MODEL, "--model.model_max_epochs", "5",
    ))
    client = MlflowClient(tracking_uri())
    run_id = _only_run(client).info.run_id
    # first fit on the first update (after 100 warm-up steps), then at multiples of 100
    assert _steps(client, run_id, "model/holdout_mse") == [101, 200, 300]
    assert _steps(client, run_id, "model/error_l2") == [200, 300]  # needs a model fitted before
    for metric in ("model/holdout_nll", "model/epochs", "model/elites", "model/u_mean", "model/mean_spread"):
        assert _steps(client, run_id, metric) == [101, 200, 300], metric
    checkpoint = torch.load(in_tmp / "runs/checkpoints" / run_id / "last.ckpt", weights_only=True)
    assert checkpoint["counters"]["model_trained_at"] == 300 and checkpoint["counters"]["model_fits"] == 3
    for key in ("world_model.elites", "world_model.input_norm.mean", "world_model.target_norm.std"):
        assert key in checkpoint["state_dict"], key
    assert len(checkpoint["optimizer_states"]) == 4  # critic, actor, temperature, model


def test_short_mpdp_run_on_hopper_logs_its_metrics(in_tmp):
    main(fit_args(
        "hopper", 250,
        "--env_interaction.updates_per_env_step", "2",
        *TINY_WORLD_MODEL, "--model.model_max_epochs", "3",
        "--model.horizon", "3",
        algo="mpdp",
    ))
    client = MlflowClient(tracking_uri())
    run = _only_run(client)
    assert run.data.tags["algo"] == "MPDP" and run.info.status == "FINISHED"
    for metric in ("train/horizon_mean", "train/u_mean", "train/J", "train/critic_loss", "train/actor_loss",
                   "train/head_grad_norm", "train/stop_threshold", "train/stop_terminal", "train/stop_horizon",
                   "train/log_u_real_q50", "model/holdout_mse", "model/error_l2", "eval/return"):
        assert _steps(client, run.info.run_id, metric), metric
    for metric in ("time/critic_seconds", "time/policy_seconds", "time/model_seconds"):
        assert _steps(client, run.info.run_id, metric), metric
    horizon = client.get_metric_history(run.info.run_id, "train/horizon_mean")
    assert all(0.0 <= m.value <= 3.0 for m in horizon)
    histogram = json.load(open(client.download_artifacts(run.info.run_id, "horizon_histogram.json", str(in_tmp))))
    assert set(histogram) == {str(m.step) for m in horizon}
    # H + 1 bins; every update adds its 32 rows
    assert all(len(counts) == 4 and sum(counts) > 0 and sum(counts) % 32 == 0 for counts in histogram.values())
    header = read_checkpoint_header(in_tmp / "runs/checkpoints" / run.info.run_id / "last.ckpt")
    assert header.env_steps == 250 and header.updates == 300  # 150 env steps after warm-up, 2 updates each


def test_each_update_draws_its_batch_after_its_own_env_step_is_stored(in_tmp, monkeypatch):
    # The paper's order within an update: collect, fit, then sample. With 1 warm-up step and
    # batches of 64, a batch drawn after the update's env step holds it (P(miss) <= (1/2)^64).
    seen = []
    draw = PendingBatch.draw

    def spying_draw(self, *args):
        batch = draw(self, *args)
        newest = self.buffer.storage.get(torch.tensor([len(self.buffer) - 1]))
        seen.append((len(self.buffer), bool((batch["obs"] == newest["obs"]).all(dim=-1).any())))
        return batch

    monkeypatch.setattr(PendingBatch, "draw", spying_draw)
    main(fit_args("inverted_pendulum", 6, "--env_interaction.warmup_steps", "1", "--data.batch_size", "64"))
    assert [size for size, _ in seen] == [2, 3, 4, 5, 6]  # every update drew after its env step
    assert all(holds for _, holds in seen)


def test_the_anchored_threshold_holds_from_the_first_update_and_travels_with_the_checkpoint(in_tmp):
    main(fit_args(
        "hopper", 250, "--env_interaction.updates_per_env_step", "1", *TINY_WORLD_MODEL,
        "--model.model_max_epochs", "3", "--model.horizon", "3",
        "--model.threshold", "anchored", algo="mpdp",
    ))
    client = MlflowClient(tracking_uri())
    run_id = _only_run(client).info.run_id
    held = [m.value for m in client.get_metric_history(run_id, "train/u_threshold")]
    assert len(held) >= 2 and max(held) == pytest.approx(min(held), rel=1e-6)  # refits do not move it
    checkpoint = torch.load(in_tmp / "runs/checkpoints" / run_id / "last.ckpt", weights_only=True)
    assert checkpoint["state_dict"]["h_step.held_threshold"].item() == pytest.approx(held[-1], rel=1e-6)


def test_an_mpdp_checkpoint_from_before_the_composed_agent_resumes_with_its_anchor_and_history(in_tmp):
    """Format 1 (before algorithms/agent.py): the anchor was ``threshold_anchor`` on the module and
    the horizon history beside the counters. Such a checkpoint resumes, its keys mapped."""
    args = ("--env_interaction.updates_per_env_step", "1", *TINY_WORLD_MODEL, "--model.model_max_epochs", "2",
            "--model.horizon", "3", "--model.threshold", "anchored")
    main(fit_args("hopper", 150, *args, algo="mpdp"))
    (ckpt,) = in_tmp.glob("runs/checkpoints/*/last.ckpt")
    saved = torch.load(ckpt, weights_only=True)
    anchor = saved["state_dict"]["h_step.held_threshold"].item()
    history = saved["counters"]["horizon_history"]
    old = dict(saved, state_dict=dict(saved["state_dict"]), counters=dict(saved["counters"]))
    old["state_dict"]["threshold_anchor"] = old["state_dict"].pop("h_step.held_threshold")
    old["horizon_history"] = old["counters"].pop("horizon_history")
    del old["format"], old["mpdp_version"]
    torch.save(old, ckpt)
    main(fit_args("hopper", 250, *args, "--ckpt_path", str(ckpt), algo="mpdp"))
    resumed = torch.load(ckpt, weights_only=True)
    assert resumed["format"] == CHECKPOINT_FORMAT and resumed["counters"]["env_steps"] == 250
    assert resumed["state_dict"]["h_step.held_threshold"].item() == pytest.approx(anchor, rel=1e-6)
    assert set(history) < set(resumed["counters"]["horizon_history"])  # the old windows kept, new ones added


def test_an_mpdp_checkpoint_from_before_the_holdout_rule_resumes_with_the_rule_it_was_trained_with(in_tmp):
    """Format 2 (before the holdout threshold): the held u_T was ``h_step.threshold_anchor`` and the
    quantile rule was the default. Saved with the quantile rule, or with no rule among its
    hyperparameters, it resumes under the quantile rule (the batch's u_T, not a fit's holdout), its
    key mapped, whatever the config's default now is."""
    args = ("--env_interaction.updates_per_env_step", "1", *TINY_WORLD_MODEL, "--model.model_max_epochs", "2",
            "--model.horizon", "3")
    main(fit_args("hopper", 150, *args, "--model.threshold", "quantile", algo="mpdp"))
    (ckpt,) = in_tmp.glob("runs/checkpoints/*/last.ckpt")
    saved = torch.load(ckpt, weights_only=True)
    assert saved["hyper_parameters"]["threshold"] == "quantile"
    old = dict(saved, state_dict=dict(saved["state_dict"]), hyper_parameters=dict(saved["hyper_parameters"]))
    old["state_dict"]["h_step.threshold_anchor"] = old["state_dict"].pop("h_step.held_threshold")
    del old["hyper_parameters"]["threshold"]
    old["format"] = 2
    torch.save(old, ckpt)
    main(fit_args("hopper", 250, *args, "--ckpt_path", str(ckpt), algo="mpdp"))  # the config says holdout
    resumed = torch.load(ckpt, weights_only=True)
    assert resumed["format"] == CHECKPOINT_FORMAT and resumed["counters"]["env_steps"] == 250
    assert resumed["hyper_parameters"]["threshold"] == "quantile"
    assert resumed["state_dict"]["h_step.held_threshold"].isnan()  # the quantile rule holds nothing
    client = MlflowClient(tracking_uri())
    run_id = _only_run(client).info.run_id
    assert client.get_run(run_id).data.params["model.init_args.threshold"] == "quantile"


def test_the_fresh_threshold_is_set_by_each_fit_and_held_between_fits(in_tmp):
    """The default rule: u_T is the quantile of u over the transitions stored since the last fit,
    under the model before it (so from the second fit on), set at each fit (every 50 env steps
    here) and held between fits; each fit logs u on its in-sample, holdout and fresh pairs, and the
    improvement u on the imagined pairs (the holdout rule differs only in the kind:
    test_improvement.py)."""
    rule = "fresh"
    main(fit_args(
        "hopper", 250, "--env_interaction.updates_per_env_step", "1", *TINY_WORLD_MODEL,
        "--model.model_max_epochs", "3", "--model.horizon", "3", "--model.model_train_every", "50",
        "--env_interaction.log_every_env_steps", "10", algo="mpdp",
    ))
    client = MlflowClient(tracking_uri())
    run_id = _only_run(client).info.run_id
    history = lambda name: {m.step: m.value for m in client.get_metric_history(run_id, name)}  # noqa: E731
    threshold, calibration = history("train/log_u_threshold"), history(f"model/log_u_{rule}_q90")
    fits = sorted(history("model/holdout_mse"))
    assert len(fits) >= 3 and sorted(calibration) == fits[1:]
    # each log window between two fits (not those at either end) holds the earlier fit's quantile
    for fit, following in zip(fits, fits[1:]):
        if fit not in calibration:  # the first fit has no fresh pairs: the batch's quantile stands in
            continue
        windows = [value for step, value in threshold.items() if fit + 10 < step < following]
        assert windows and all(v == pytest.approx(calibration[fit], abs=1e-5) for v in windows), (fit, windows)
    for kind in ("insample", "holdout", "fresh"):
        q10, q50, q90 = (history(f"model/log_u_{kind}_q{q}") for q in (10, 50, 90))
        assert q10 and all(q10[s] <= q50[s] <= q90[s] for s in q10), kind
    assert history("train/log_u_imagined_q50")


def test_a_checkpoint_of_a_later_format_is_refused_in_one_line_naming_its_version(in_tmp, capsys):
    main(fit_args("hopper", 150))
    (ckpt,) = in_tmp.glob("runs/checkpoints/*/last.ckpt")
    saved = torch.load(ckpt, weights_only=True)
    saved["format"], saved["mpdp_version"] = CHECKPOINT_FORMAT + 1, "0.9.0"
    torch.save(saved, ckpt)
    before = ckpt.stat().st_mtime_ns
    with pytest.raises(SystemExit) as exit_:
        main(fit_args("hopper", 250, "--ckpt_path", str(ckpt)))
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: checkpoint ") and f"written by mpdp-lightning 0.9.0 in checkpoint format {CHECKPOINT_FORMAT + 1}" in err[0]
    assert ckpt.stat().st_mtime_ns == before


def test_mpdp_trains_under_bf16_mixed_precision_with_the_model_and_critics_in_fp32(in_tmp, monkeypatch):
    # Lightning's bf16-mixed autocasts the update; the model's outputs, u and Q must stay fp32.
    from mpdp_lightning.models.world_model import GaussianEnsemble

    dtypes = set()
    step = GaussianEnsemble.step

    def recording_step(self, obs, action, *args, **kwargs):
        result = step(self, obs, action, *args, **kwargs)
        dtypes.update({result.u.dtype, result.next_obs.dtype, torch.is_autocast_enabled("cpu")})
        return result

    monkeypatch.setattr(GaussianEnsemble, "step", recording_step)
    main(fit_args(
        "hopper", 160, "--env_interaction.updates_per_env_step", "1", *TINY_WORLD_MODEL,
        "--model.model_max_epochs", "2", "--model.horizon", "3", "--trainer.precision", "bf16-mixed", algo="mpdp",
    ))
    assert dtypes == {torch.float32, True}, dtypes  # inside autocast, and still fp32
    run = _only_run(MlflowClient(tracking_uri()))
    assert run.info.status == "FINISHED" and run.data.params["trainer.precision"] == "bf16-mixed"


def test_mbpo_trains_on_its_rollouts_and_logs_them(in_tmp, monkeypatch):
    # a short MBPO run: the model is fitted every 100 env steps, each fit branches 2 rollouts per
    # env step from real states, and SAC's batches are half real, half model
    from mpdp_lightning.algorithms.parts.model_rollouts import BranchedRollouts

    drawn_batches = []
    draw = BranchedRollouts.mixed_batch

    def recording_draw(self, agent, batch):
        result = draw(self, agent, batch)
        drawn_batches.append((result.batch_size[0], len(self.model_replay) if self.model_replay else 0))
        return result

    monkeypatch.setattr(BranchedRollouts, "mixed_batch", recording_draw)
    main(fit_args(
        "hopper", 300, "--env_interaction.updates_per_env_step", "1", *TINY_WORLD_MODEL, "--model.model_max_epochs", "2",
        "--model.rollout_batch_size", "200", "--model.real_ratio", "0.5", "--model.rollout_schedule", "[0, 1, 1, 3]",
        algo="mbpo",
    ))
    run = _only_run(MlflowClient(tracking_uri()))
    assert run.info.status == "FINISHED" and run.data.tags["algo"] == "MBPO"
    client = MlflowClient(tracking_uri())
    lengths = client.get_metric_history(run.info.run_id, "mbpo/rollout_length")
    # a fit, then rollouts, at the first update (after 100 warm-up steps) and every 100 env steps;
    # epoch 0 of the schedule: length 1, so each fit adds one transition per start state
    assert [(m.step, m.value) for m in lengths] == [(101, 1.0), (200, 1.0), (300, 1.0)]
    sizes = [m.value for m in client.get_metric_history(run.info.run_id, "mbpo/model_buffer_size")]
    assert sizes == [200.0, 400.0, 600.0]  # 200 rollouts per fit, kept for an epoch (10 fits of 100 env steps)
    assert all(size == 32 for size, _ in drawn_batches)  # the batch size, real and model together
    assert drawn_batches[0][1] == 200 and drawn_batches[-1][1] == 600


def test_a_resumed_mbpo_run_branches_its_rollouts_again_before_its_first_update(in_tmp):
    # the model replay is not in the checkpoint: the resumed run branches new rollouts from the
    # restored model when training starts (at the checkpoint's env step), not only at the next fit
    args = ("--env_interaction.updates_per_env_step", "1", *TINY_WORLD_MODEL, "--model.model_max_epochs", "2",
            "--model.rollout_batch_size", "200")
    main(fit_args("hopper", 150, *args, algo="mbpo"))
    (folder,) = (in_tmp / "runs/checkpoints").iterdir()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        main(fit_args("hopper", 250, *args, "--ckpt_path", str(folder / "last.ckpt"), algo="mbpo"))
    client = MlflowClient(tracking_uri())
    run = _only_run(client)
    run_id = run.info.run_id
    assert _steps(client, run_id, "mbpo/rollout_length") == [101, 150, 200]
    assert _steps(client, run_id, "model/holdout_mse") == [101, 200]  # the model itself was not refitted at 150
    # the settings MBPO resolved from the task (None at the start) are no override: named, not flagged
    overrides = sorted(key for key in run.data.tags if key.startswith("resume_override."))
    assert overrides == ["resume_override.env_interaction.total_env_steps"]
    assert [str(w.message) for w in caught if "kept as a tag" in str(w.message)] == [
        "resumed with env_interaction.total_env_steps=250 (was 150); kept as a tag"]
    assert run.data.params["model.init_args.target_entropy"] == "None"
    assert run.data.params["resolved.model.init_args.target_entropy"] == "-1.0"


def test_an_mbpo_checkpoint_from_before_issue_19_resumes_with_the_settings_it_was_trained_with(in_tmp):
    # saved when MBPO took rollouts per env step, counted its schedule from env step 0 in epochs
    # of 1000, and normalised the model's targets: it resumes with those, not today's defaults
    args = ("--env_interaction.updates_per_env_step", "1", *TINY_WORLD_MODEL, "--model.model_max_epochs", "2",
            "--model.rollout_batch_size", "200")
    main(fit_args("hopper", 150, *args, algo="mbpo"))
    (folder,) = (in_tmp / "runs/checkpoints").iterdir()
    path = folder / "last.ckpt"
    old = torch.load(path, weights_only=False)
    hparams = old["hyper_parameters"]
    hparams["rollouts_per_env_step"] = hparams.pop("rollout_batch_size") // hparams["model_train_every"]
    for key in ("normalize_targets", "epoch_length"):
        hparams.pop(key)
    old["counters"].pop("schedule_start")
    torch.save(old, path)
    main(fit_args("hopper", 250, "--env_interaction.updates_per_env_step", "1", *TINY_WORLD_MODEL,
                  "--model.model_max_epochs", "2", "--ckpt_path", str(path), algo="mbpo"))
    resumed = torch.load(path, weights_only=False)
    assert resumed["counters"]["env_steps"] == 250 and resumed["counters"]["schedule_start"] == 0
    new = resumed["hyper_parameters"]
    assert new["rollout_batch_size"] == 200 and new["epoch_length"] == 1000 and new["normalize_targets"] is True
    assert not torch.equal(resumed["state_dict"]["world_model.target_norm.std"], torch.ones_like(
        resumed["state_dict"]["world_model.target_norm.std"]))  # refitted at 200 on normalised targets, as trained


def test_coplanners_published_preset_runs_as_shipped(in_tmp, monkeypatch):
    # conf/preset/mbpo/coplanner.yaml at tiny shapes: half real batches, a fixed temperature of
    # 0.2, the warm-up acting with the untrained policy, the model replay holding the latest fit's
    # rollouts only, COPlanner's planner on
    from mpdp_lightning.algorithms.agent import Agent

    acted = []
    act = Agent.act_on_host

    def recording_act(self, obs, *args, **kwargs):
        if kwargs.get("explore"):  # the training environment's actions, not evaluation's
            acted.append(self.env_steps)
        return act(self, obs, *args, **kwargs)

    monkeypatch.setattr(Agent, "act_on_host", recording_act)
    main(fit_args("hopper", 300, "--config", str(ROOT / "conf/preset/mbpo/coplanner.yaml"), *TINY_WORLD_MODEL,
                  "--model.model_max_epochs", "2", "--env_interaction.warmup_steps", "100",
                  "--env_interaction.updates_per_env_step", "1", "--model.rollout_batch_size", "200",
                  "--coplanner.max_rows", "512", "--model.model_train_every", "250", algo="mbpo"))
    client = MlflowClient(tracking_uri())
    run = _only_run(client)
    params = run.data.params
    assert run.info.status == "FINISHED" and run.data.tags["algo"] == "MBPO+COPlanner"
    assert (params["model.init_args.real_ratio"], params["model.init_args.alpha"], params["model.init_args.auto_alpha"],
            params["env_interaction.warmup_policy"], params["preset"]) == ("0.5", "0.2", "False", "policy", "coplanner")
    assert acted[:100] == list(range(100))  # the warm-up's 100 steps acted with the policy
    sizes = [m.value for m in client.get_metric_history(run.info.run_id, "mbpo/model_buffer_size")]
    assert sizes == [200.0, 200.0]  # fits at 101 and 250: the latest fit's 200 one-step rollouts, not an epoch's


def test_coplanner_plans_rollouts_conservatively_and_real_actions_optimistically_never_evaluation(in_tmp, monkeypatch):
    # MBPO with COPlanner: every rollout step is planned with the penalty (outside any acting),
    # every training action after the first fit with the bonus; evaluation acts with pi_0 alone
    from mpdp_lightning.algorithms.agent import Agent
    from mpdp_lightning.planners.up_mpc import UPMPC

    calls, acting = [], []
    plan, act_on_host = UPMPC.plan, Agent.act_on_host

    def recording_plan(self, model, policy, obs):
        calls.append((self.rate, obs.shape[0], acting[-1] if acting else None))
        return plan(self, model, policy, obs)

    def recording_act(self, obs, deterministic=False, where="", explore=False):
        acting.append("explore" if explore else "evaluate")
        try:
            return act_on_host(self, obs, deterministic, where, explore)
        finally:
            acting.pop()

    monkeypatch.setattr(UPMPC, "plan", recording_plan)
    monkeypatch.setattr(Agent, "act_on_host", recording_act)
    main(fit_args(
        "hopper", 250, "--env_interaction.updates_per_env_step", "1", *TINY_WORLD_MODEL, "--model.model_max_epochs", "2",
        "--model.rollout_batch_size", "200", "--model.rollout_schedule", "[0, 1, 2, 2]",
        "--coplanner.enabled", "true", "--coplanner.candidates", "3", "--coplanner.horizon", "2", algo="mbpo",
    ))
    run = _only_run(MlflowClient(tracking_uri()))
    assert run.info.status == "FINISHED" and run.data.tags["algo"] == "MBPO+COPlanner"
    assert all(context != "evaluate" for _, _, context in calls), "evaluation must never plan"
    conservative = [(n, context) for rate, n, context in calls if rate < 0]
    optimistic = [(n, context) for rate, n, context in calls if rate > 0]
    # fits at env steps 101 and 200, each branching 2 x 100 start states over 2 planned steps
    assert [n for n, _ in conservative][:1] == [200] and len(conservative) >= 4
    assert all(context is None for _, context in conservative)
    # one plan per training env step from the first fit on (the env step before it has no model)
    assert len(optimistic) == 250 - 101 and all(n == 1 and context == "explore" for n, context in optimistic)
    client = MlflowClient(tracking_uri())
    for metric in ("coplanner/rollout_u_chosen", "coplanner/rollout_u_candidates"):
        assert _steps(client, run.info.run_id, metric) == [101, 200], metric
    for metric in ("coplanner/explore_u_chosen", "coplanner/explore_u_candidates"):
        assert _steps(client, run.info.run_id, metric) == [150, 200, 250], metric


def test_mpdp_explores_with_coplanner_through_its_heads(in_tmp, monkeypatch):
    # MPDP has no rollout buffer: only its real actions are planned, with head i acting at step i
    from mpdp_lightning.models.policy import SquashedGaussianHeads

    heads = []  # the head of every action drawn for the 5 candidates of a planned state
    act = SquashedGaussianHeads.act

    def recording_act(self, obs, deterministic=False, head=0, noise=None):
        if obs.shape[0] == 5:
            heads.append(head)
        return act(self, obs, deterministic, head, noise)

    monkeypatch.setattr(SquashedGaussianHeads, "act", recording_act)
    main(fit_args(
        "hopper", 150, "--env_interaction.updates_per_env_step", "1", *TINY_WORLD_MODEL, "--model.model_max_epochs", "2",
        "--model.horizon", "3", "--coplanner.enabled", "true", "--coplanner.horizon", "4", algo="mpdp",
    ))
    run = _only_run(MlflowClient(tracking_uri()))
    assert run.info.status == "FINISHED" and run.data.tags["algo"] == "MPDP+COPlanner"
    assert heads[:4] == [0, 1, 2, 2] and len(heads) == 4 * (150 - 101)  # H = 3 heads: the last one beyond
    assert _steps(MlflowClient(tracking_uri()), run.info.run_id, "coplanner/explore_u_chosen") == [150]
