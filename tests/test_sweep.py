"""Sweeps on Ray Tune: a tiny sweep runs its trials into one MLflow experiment and writes each
finished trial's record, running it again starts no trial, a trial interrupted mid-run resumes
from its checkpoint, same MLflow run, and a mistyped sweep file is one error line before any work."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from helpers import ROOT
from mpdp_lightning.errors import MPDPError
from mpdp_lightning.experiments.sweep import Place, Process, Sweep, Trial, plan, trial_argv

TINY_RUN = ["--env_interaction.total_env_steps", "300", "--env_interaction.warmup_steps", "100",
            "--evaluation.eval_every", "100", "--evaluation.eval_episodes", "1", "--checkpoint.checkpoint_every", "100",
            "--model.hidden", "32", "--data.batch_size", "32", "--video.enabled", "false",
            "--progress_bar.log_every_env_steps", "100"]


def _sweep_file(folder: Path, seeds=(0, 1), **more) -> Path:
    path = folder / "tiny.yaml"
    path.write_text(yaml.safe_dump({"name": "tiny", "tasks": ["inverted_pendulum"], "algos": ["sac"],
                                    "seeds": list(seeds), "args": TINY_RUN, **more}))
    return path


def _place(folder: Path) -> Place:
    """Where ``_run_sweep`` writes (its records: the default benchmarks/results of its folder)."""
    return Place(ROOT / "conf", folder / "store", f"sqlite:///{folder / 'mlflow.db'}", folder / "benchmarks/results/tiny")


def _run_sweep(folder: Path, sweep_file: Path, compare: bool = False, *more: str) -> subprocess.CompletedProcess:
    place = _place(folder)
    return subprocess.run(
        [sys.executable, "-m", "mpdp_lightning.experiments.sweep", str(sweep_file), "--conf", str(place.conf_dir),
         "--storage", str(place.storage), "--tracking-uri", place.tracking_uri, *([] if compare else ["--no-compare"]),
         *more],
        cwd=folder, capture_output=True, text=True, timeout=400,
    )


def _runs(folder: Path):
    """The sweep's training runs (not its summary run), by trial."""
    client = MlflowClient(_place(folder).tracking_uri)
    experiment = client.get_experiment_by_name("tiny")
    return client.search_runs([experiment.experiment_id], "tags.algo != ''", order_by=["tags.trial"])


def test_a_sweep_file_expands_to_one_trial_per_combination(tmp_path):
    path = _sweep_file(tmp_path, seeds=(0, 1, 2), algos=["sac", "mpdp"], grid={"model.beta": [0.0, 0.5]})
    sweep = Sweep.load(path, ROOT / "conf")
    trials = sweep.trials()
    assert len(trials) == 2 * 2 * 3 and len({t.key for t in trials}) == 12
    mpdp = Trial("inverted_pendulum", "mpdp", 2, (("model.beta", 0.5),))
    assert mpdp in trials and mpdp.key == "inverted_pendulum-mpdp-s2-beta=0.5"
    argv = trial_argv(sweep, mpdp, _place(tmp_path), ["--model.gamma", "0.98"], preset="quick")
    assert argv[argv.index("--seed_everything") + 1] == "2"
    assert str(ROOT / "conf/preset/mpdp/quick.yaml") in argv  # MPDP's preset, as make train
    assert argv[argv.index("--model.beta") + 1] == "0.5" and argv[-2:] == ["--model.gamma", "0.98"]
    assert json.loads(argv[argv.index("--trainer.logger.init_args.tags") + 1]) == {"sweep": "tiny", "trial": mpdp.key}
    sac_argv = trial_argv(sweep, Trial("inverted_pendulum", "sac", 0, (("model.beta", 0.0),)), _place(tmp_path), [], "quick")
    assert not any("preset" in arg for arg in sac_argv)  # SAC has no presets
    mbpo_argv = trial_argv(sweep, Trial("inverted_pendulum", "mbpo", 0), _place(tmp_path), [], "paper")
    assert str(ROOT / "conf/preset/mbpo/paper.yaml") in mbpo_argv


def test_trials_run_seed_major_so_a_sweep_cut_short_has_every_arm(tmp_path):
    path = _sweep_file(tmp_path, seeds=(0, 1), algos=["sac", "mbpo"], grid={"coplanner.enabled": [False, True]})
    sweep = Sweep.load(path, ROOT / "conf")
    sweep.grid_algos = ["mbpo"]
    assert [t.key for t in sweep.trials()] == [
        "inverted_pendulum-sac-s0", "inverted_pendulum-mbpo-s0-enabled=False", "inverted_pendulum-mbpo-s0-enabled=True",
        "inverted_pendulum-sac-s1", "inverted_pendulum-mbpo-s1-enabled=False", "inverted_pendulum-mbpo-s1-enabled=True",
    ]


def test_a_grid_limited_to_some_algos_runs_the_others_once_per_seed(tmp_path):
    path = _sweep_file(tmp_path, seeds=(0, 1), algos=["sac", "mpdp"], grid={"model.u_covers_reward": [True, False]},
                       grid_algos=["mpdp"])
    trials = Sweep.load(path, ROOT / "conf").trials()
    assert sorted(t.key for t in trials if t.algo == "sac") == ["inverted_pendulum-sac-s0", "inverted_pendulum-sac-s1"]
    assert {t.overrides for t in trials if t.algo == "mpdp"} == {(("model.u_covers_reward", True),),
                                                                  (("model.u_covers_reward", False),)}
    assert len(trials) == 2 + 2 * 2


@pytest.mark.parametrize("content,expected", [
    ({"name": "x", "tasks": ["hopper"], "algos": ["sac"], "seeds": [0], "grid_algos": ["mpdp"]}, "grid_algos"),
    ({"name": "x", "tasks": ["walker"], "algos": ["sac"], "seeds": [0]}, "unknown task 'walker'"),
    ({"name": "x", "tasks": ["hopper"], "algos": ["ppo"], "seeds": [0]}, "unknown algo 'ppo'"),
    ({"name": "x", "tasks": ["hopper"], "algos": ["sac"], "seeds": [0], "sedes": [1]}, "unknown key(s) sedes"),
    ({"name": "x", "tasks": ["hopper"], "algos": ["sac"], "seeds": [0, 0]}, "distinct"),
    ({"name": "x", "tasks": ["hopper"], "algos": ["sac"], "seeds": [0], "grid": {"model.beta": 0.5}}, "grid"),
    ({"name": "x", "tasks": ["hopper"], "algos": ["sac"]}, "missing seeds"),
    ({"name": "x", "tasks": ["hopper"], "algos": ["sac"], "seeds": [0], "seeds_per_process": 0}, "seeds_per_process"),
])
def test_a_bad_sweep_file_is_one_line(tmp_path, content, expected):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(content))
    with pytest.raises(MPDPError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        Sweep.load(path, ROOT / "conf")


def test_seeds_per_process_groups_each_arms_seeds_into_one_command(tmp_path):
    path = _sweep_file(tmp_path, seeds=(0, 1, 2), algos=["sac"], grid={"model.gamma": [0.98, 0.99]}, seeds_per_process=2)
    sweep = Sweep.load(path, ROOT / "conf")
    processes = sweep.processes(sweep.trials())
    assert [p.key for p in processes] == ["inverted_pendulum-sac-s0+1-gamma=0.98", "inverted_pendulum-sac-s0+1-gamma=0.99",
                                          "inverted_pendulum-sac-s2-gamma=0.98", "inverted_pendulum-sac-s2-gamma=0.99"]
    argv = trial_argv(sweep, processes[0], _place(tmp_path), [], "quick")
    assert argv[argv.index("--seeds") + 1] == "0,1" and "--seed_everything" not in argv
    name = "inverted_pendulum-sac-s{seed}-gamma=0.98"  # each seed's run fills in its own trial key
    assert argv[argv.index("--trainer.logger.init_args.run_name") + 1] == name
    assert json.loads(argv[argv.index("--trainer.logger.init_args.tags") + 1])["trial"] == name
    assert argv[argv.index("--checkpoint.dirpath") + 1].endswith("inverted_pendulum-sac-s0+1-gamma=0.98")
    single = trial_argv(sweep, processes[2], _place(tmp_path), [], "quick")
    assert single == trial_argv(sweep, processes[2].members[0], _place(tmp_path), [], "quick")  # a lone seed: as before


def test_a_tiny_sweep_runs_its_trials_and_running_it_again_starts_none(tmp_path):
    """Three seeds, two to a process (``seeds_per_process``): a group of seeds 0 and 1, then seed 2
    alone; every seed its own trial, MLflow run, done.json and record either way."""
    pytest.importorskip("ray")
    sweep_file = _sweep_file(tmp_path, seeds=(0, 1, 2), seeds_per_process=2)
    first = _run_sweep(tmp_path, sweep_file, False, "--max-concurrent", "1")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "3 trials: 0 finished (0 of them from records in" in first.stdout and "0 to resume, 3 to start" in first.stdout
    assert "(up to 1 at a time)" in first.stdout

    runs = _runs(tmp_path)
    assert [r.data.tags["trial"] for r in runs] == [f"inverted_pendulum-sac-s{seed}" for seed in (0, 1, 2)]
    for run, seed in zip(runs, (0, 1, 2)):
        assert run.info.status == "FINISHED" and run.info.run_name == run.data.tags["trial"]
        tags = run.data.tags
        assert (tags["task"], tags["algo"], tags["seed"], tags["sweep"]) == ("inverted_pendulum", "SAC", str(seed), "tiny")
    assert runs[0].data.tags["group"] == runs[1].data.tags["group"] == runs[0].info.run_id
    assert "group" not in runs[2].data.tags
    assert (tmp_path / "store/inverted_pendulum-sac-s0+1/last.ckpt").is_file()  # the group's checkpoint
    # --max-concurrent 1: one process after the other, never side by side
    group_end = max(r.info.end_time for r in runs[:2])
    assert group_end <= runs[2].info.start_time, (group_end, runs[2].info.start_time)
    assert all((tmp_path / "store" / r.data.tags["trial"] / "done.json").is_file() for r in runs)
    # each finished trial wrote its record: its curve, config, commit and wall time
    client = MlflowClient(_place(tmp_path).tracking_uri)
    for run in runs:
        record = json.loads((tmp_path / f"benchmarks/results/tiny/{run.data.tags['trial']}.json").read_text())
        assert (record["trial"], record["algo"], record["seed"], record["written_by"]) == (
            run.data.tags["trial"], "SAC", int(run.data.tags["seed"]), "sweep")
        history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "eval/return"))
        assert [tuple(point) for point in record["curves"]["eval/return"]] == history and len(history) == 3
        # every param but the two that name places on this machine
        from mpdp_lightning.experiments.records import MACHINE_PATHS

        assert record["config"] == {k: v for k, v in run.data.params.items() if k not in MACHINE_PATHS}
        assert record["git_commit"] == run.data.params["git_commit"]
        done = json.loads((tmp_path / "store" / run.data.tags["trial"] / "done.json").read_text())
        assert record["wall_seconds"] == round(done["seconds"], 3) and record["env_steps"] == 300
        assert record["machine"]["trial_threads"] == 1

    again = _run_sweep(tmp_path, sweep_file, compare=True)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "3 trials: 3 finished (0 of them from records in" in again.stdout and "0 to resume, 0 to start" in again.stdout
    assert "Ray" not in again.stdout + again.stderr, "no trial, so not even Ray is started"
    assert [(r.info.run_id, r.info.end_time) for r in _runs(tmp_path)] == [(r.info.run_id, r.info.end_time) for r in runs]
    # the comparison over the seeds, written beside the trials and logged to the sweep's summary run
    assert (tmp_path / "store/comparison/inverted_pendulum_curves.png").is_file()
    client = MlflowClient(_place(tmp_path).tracking_uri)
    (summary,) = client.search_runs([runs[0].info.experiment_id], "tags.sweep_summary = 'true'")
    figures = [a.path for a in client.list_artifacts(summary.info.run_id, "figures")]
    assert "figures/inverted_pendulum_curves.png" in figures


def test_a_sweep_stopped_mid_trial_resumes_that_trial_from_its_checkpoint(tmp_path, monkeypatch):
    """Ctrl-C to the sweep (as a cut-off session or a pre-empted driver would): the trial saves
    at an update boundary, even one that takes seconds to come (Ray SIGKILLs its workers'
    process groups as it stops); the same command again resumes it, in the same MLflow run."""
    pytest.importorskip("ray")
    monkeypatch.setenv("PYTHONPATH", f"{ROOT / 'tests'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    run = ["--env_interaction.total_env_steps", "2000", "--env_interaction.warmup_steps", "100",
           "--evaluation.eval_every", "500", "--evaluation.eval_episodes", "1", "--checkpoint.checkpoint_every", "5000",
           "--model.hidden", "32", "--data.batch_size", "32", "--video.enabled", "false",
           "--progress_bar.log_every_env_steps", "100",
           '--trainer.callbacks+={"class_path": "helpers.SlowBoundaryAfterSigterm", "init_args": {"seconds": 3}}']
    sweep_file = _sweep_file(tmp_path, seeds=(0,), args=run)
    sweep, place = Sweep.load(sweep_file, ROOT / "conf"), _place(tmp_path)
    (trial,) = sweep.trials()
    log = place.trial_dir(trial) / "trial.log"
    command = [sys.executable, "-m", "mpdp_lightning.experiments.sweep", str(sweep_file), "--conf", str(place.conf_dir),
               "--storage", str(place.storage), "--tracking-uri", place.tracking_uri, "--no-compare"]
    driver = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and not (log.is_file() and "env steps 500/2000" in log.read_text()):
        time.sleep(0.5)
    assert log.is_file() and "env steps 500/2000" in log.read_text(), "the trial never got going"
    driver.send_signal(signal.SIGINT)
    driver.communicate(timeout=120)
    assert driver.returncode != 0  # the sweep did not finish
    deadline = time.monotonic() + 60  # the trial's process saves after its worker is gone
    while time.monotonic() < deadline and "saved: " not in log.read_text():
        time.sleep(0.5)
    found = re.search(r"saved: .*last\.ckpt at env step (\d+)", log.read_text())
    assert found and 500 <= int(found[1]) < 2000, log.read_text()[-2000:]
    assert plan(sweep, place)["resume"] == [trial]
    (interrupted,) = _runs(tmp_path)
    assert interrupted.info.status == "KILLED"

    resumed = _run_sweep(tmp_path, sweep_file)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "1 trials: 0 finished (0 of them from records in" in resumed.stdout and "1 to resume, 0 to start" in resumed.stdout
    assert f"resumed at env step {found[1]}" in log.read_text() and "run finished at 2000 of 2000 env steps" in log.read_text()
    (run,) = _runs(tmp_path)
    assert run.info.run_id == interrupted.info.run_id and run.info.status == "FINISHED"
    assert (place.trial_dir(trial) / "done.json").is_file()
    record = json.loads(place.record(trial).read_text())
    assert record["run"]["run_id"] == run.info.run_id and record["env_steps"] == 2000


def test_a_bad_max_concurrent_is_refused_before_any_work(tmp_path, capsys):
    sweep_file = _sweep_file(tmp_path)
    from mpdp_lightning.experiments.sweep import main

    with pytest.raises(SystemExit) as stopped:
        main([str(sweep_file), "--max-concurrent", "0", "--storage", str(tmp_path / "store")])
    assert stopped.value.code == 2
    assert "--max-concurrent: must be a positive integer, got '0'" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.yaml"]


@pytest.mark.parametrize("mistake,trial,key", [
    ({"grid": {"model.betta": [0.1]}}, "inverted_pendulum-mpdp-s0-betta=0.1", "'betta'"),
    ({"args": ["--model.gamma", "1.5"]}, "inverted_pendulum-mpdp-s0", "gamma=1.5"),
    ({"grid": {"model.beta": [0.5, "abc"]}}, "inverted_pendulum-mpdp-s0-beta=abc", "model.beta"),
])
def test_a_mistyped_sweep_file_is_one_line_naming_the_trial_and_key_before_any_work(in_tmp, capsys, mistake, trial, key):
    """Checked with make train's parser and checks, trial by trial, before Ray, MLflow or any
    folder: the sweep file's own checks cannot know the CLI's keys, types and ranges."""
    sweep_file = in_tmp / "x.yaml"
    sweep_file.write_text(yaml.safe_dump({"name": "x", "tasks": ["inverted_pendulum"], "algos": ["mpdp"],
                                          "seeds": [0, 1], **mistake}))
    from mpdp_lightning.experiments.sweep import main

    with pytest.raises(SystemExit) as stopped:
        main([str(sweep_file), "--conf", str(ROOT / "conf")])
    assert stopped.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: sweep file {sweep_file}: trial {trial}: "), err
    assert key in err[0]
    assert [p.name for p in in_tmp.iterdir()] == ["x.yaml"]  # no mlflow.db, runs/ or benchmarks/results


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "conf/sweep").glob("*.yaml")))
def test_every_trial_of_the_projects_sweep_files_passes_the_check(in_tmp, name):
    from mpdp_lightning.experiments.sweep import check_trials

    sweep = Sweep.load(ROOT / "conf/sweep" / name, ROOT / "conf")
    check_trials(sweep, _place(in_tmp), [], f"conf/sweep/{name}")  # raises on any trial it refuses
    assert list(in_tmp.iterdir()) == []


def test_a_sweep_runs_an_algorithms_own_preset_and_refuses_one_an_algorithm_lacks(tmp_path):
    good = {"name": "x", "tasks": ["hopper"], "algos": ["sac", "mbpo"], "seeds": [0], "preset": "coplanner"}
    path = tmp_path / "good.yaml"
    path.write_text(yaml.safe_dump(good))
    sweep = Sweep.load(path, ROOT / "conf")  # SAC has no presets: it runs as configured
    place = _place(tmp_path)
    argv = {trial.algo: trial_argv(sweep, trial, place, [], sweep.resolved_preset()) for trial in sweep.trials()}
    assert str(ROOT / "conf/preset/mbpo/coplanner.yaml") in argv["mbpo"]
    assert not any("preset" in arg for arg in argv["sac"])
    path.write_text(yaml.safe_dump(dict(good, algos=["mbpo", "mpdp"])))
    with pytest.raises(MPDPError, match="algo mpdp has no preset 'coplanner'"):
        Sweep.load(path, ROOT / "conf")
