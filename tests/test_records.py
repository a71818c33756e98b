"""Trial records (benchmarks/results/<sweep>/<trial>.json): written from a sweep's MLflow runs,
they carry a trial's results to another machine: a sweep there starts no recorded trial, and
compare gives the same table over seeds from the records alone as from MLflow."""

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
import yaml
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

from helpers import ROOT
from mpdp_lightning.experiments import compare, records, seeds, sweep

T0 = 1_700_000_000_000
STEPS = [1000, 2000, 3000]
# trial -> (algo, eval returns at STEPS, status); MPDP seed 1 was stopped, so it has no record
TRIALS = {
    "inverted_pendulum-sac-s0": ("SAC", [100.0, 500.0, 900.0], "FINISHED"),
    "inverted_pendulum-sac-s1": ("SAC", [200.0, 950.0, 980.0], "FINISHED"),
    "inverted_pendulum-mpdp-s0": ("MPDP", [300.0, 900.0, 1000.0], "FINISHED"),
    "inverted_pendulum-mpdp-s1": ("MPDP", [50.0, 100.0], "KILLED"),
}
SWEEP = {"name": "tiny", "tasks": ["inverted_pendulum"], "algos": ["sac", "mpdp"], "seeds": [0, 1]}


@pytest.fixture(scope="module")
def trial_store(tmp_path_factory):
    """A sweep's MLflow store as its trials leave it, and its folder with sac-s0's done.json.
    sac-s0 was resumed: its interrupted attempt logged 400 at 2000 before the resumed one's 500."""
    folder = tmp_path_factory.mktemp("trial_store")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment_id = client.create_experiment("tiny", artifact_location=(folder / "artifacts").as_uri())
    for i, (trial, (algo, returns, status)) in enumerate(TRIALS.items()):
        seed = int(trial[-1])
        start = T0 + 3_600_000 * i
        tags = {"task": "inverted_pendulum", "algo": algo, "seed": str(seed), "sweep": "tiny", "trial": trial}
        if algo == "MPDP":
            tags["preset"] = "quick"  # as on this CPU machine (SAC has no presets)
        run_id = client.create_run(experiment_id, start_time=start, tags=tags, run_name=trial).info.run_id
        metrics = [Metric("eval/return", value, start + 1000 * k, step) for k, (step, value) in enumerate(zip(STEPS, returns))]
        metrics += [Metric("time/env_steps_per_second", 20.0 + k, start + 1000 * k, step) for k, step in enumerate(STEPS)]
        metrics += [Metric("loss/critic", 1.0, start, step) for step in range(100, 3001, 100)]  # not in a record
        if algo == "MPDP":
            metrics += [Metric("train/horizon_mean", 5.0 + k, start, step) for k, step in enumerate(STEPS)]
        if trial == "inverted_pendulum-sac-s0":
            metrics.append(Metric("eval/return", 400.0, start - 60_000, 2000))
        params = {"task": "inverted_pendulum", "seed_everything": str(seed), "env_interaction.total_env_steps": "3000",
                  "model.class_path": f"mpdp_lightning.algorithms.{algo.lower()}.{algo}", "model.init_args.gamma": "0.99",
                  "trainer.accelerator": "auto", "git_commit": "0123abcd", "mpdp_version": "0.1.0"}
        client.log_batch(run_id, metrics=metrics, params=[Param(k, v) for k, v in params.items()])
        client.set_terminated(run_id, status, end_time=start + 600_000)
    storage = folder / "runs/sweeps/tiny"
    (storage / "inverted_pendulum-sac-s0").mkdir(parents=True)
    (storage / "inverted_pendulum-sac-s0/done.json").write_text(json.dumps({"seconds": 123.25, "finished_at": 0}))
    return uri, storage


@pytest.fixture(scope="module")
def written(trial_store, tmp_path_factory):
    """The records the records command writes from the store: benchmarks/results/tiny/*.json."""
    uri, storage = trial_store
    results = tmp_path_factory.mktemp("records") / "benchmarks/results"
    records.main(["--tracking-uri", uri, "--sweep", "tiny", "--storage", str(storage), "--out", str(results)])
    return results


def test_a_record_holds_its_runs_curves_config_commit_and_wall_time(trial_store, written):
    uri, _ = trial_store
    assert sorted(p.name for p in (written / "tiny").iterdir()) == [
        "inverted_pendulum-mpdp-s0.json", "inverted_pendulum-sac-s0.json", "inverted_pendulum-sac-s1.json"]  # no KILLED run
    record = records.read_record(written / "tiny/inverted_pendulum-sac-s0.json")
    assert (record["sweep"], record["trial"], record["task"], record["algo"], record["seed"], record["status"]) == (
        "tiny", "inverted_pendulum-sac-s0", "inverted_pendulum", "SAC", 0, "FINISHED")
    assert record["curves"]["eval/return"] == [[1000, 100.0], [2000, 500.0], [3000, 900.0]]  # the resumed attempt's 500
    assert set(record["curves"]) == {"eval/return", "time/env_steps_per_second"}  # no per-update metrics
    assert record["config"] == MlflowClient(uri).get_run(record["run"]["run_id"]).data.params  # every param
    assert record["config"]["model.init_args.gamma"] == "0.99"
    assert (record["git_commit"], record["version"]) == ("0123abcd", "0.1.0")
    assert record["wall_seconds"] == 123.25 and record["env_steps"] == 3000  # done.json's
    assert record["env_steps_per_second"] == {"whole_run": round(3000 / 123.25, 3), "logged_mean": 21.0}
    assert record["machine"]["accelerator"] == "auto" and record["machine"]["cpu_count"] >= 1
    other = records.read_record(written / "tiny/inverted_pendulum-sac-s1.json")
    assert other["wall_seconds"] == 600.0  # no done.json: the MLflow run's start to end
    mpdp = records.read_record(written / "tiny/inverted_pendulum-mpdp-s0.json")
    assert mpdp["curves"]["train/horizon_mean"] == [[1000, 5.0], [2000, 6.0], [3000, 7.0]]
    # diff-friendly: sorted keys, one line per curve point, the same bytes when written again
    text = (written / "tiny/inverted_pendulum-sac-s0.json").read_text()
    assert "[2000, 500.0]" in text and list(json.loads(text)) == sorted(json.loads(text))
    again = records.write_record(record, written.parent / "again.json")
    assert again.read_text() == text


def _fresh_clone(folder: Path, written: Path) -> Path:
    """A folder with the sweep file and the committed records only: no runs/, no mlflow.db."""
    shutil.copytree(written, folder / "benchmarks/results")
    (folder / "tiny.yaml").write_text(yaml.safe_dump(SWEEP))
    return folder / "tiny.yaml"


def test_a_sweep_on_a_fresh_clone_starts_no_recorded_trial(written, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    sweep_file = _fresh_clone(tmp_path, written)
    place = sweep.Place(ROOT / "conf", tmp_path / "runs/sweeps/tiny", f"sqlite:///{tmp_path / 'mlflow.db'}",
                        tmp_path / "benchmarks/results/tiny")
    state = sweep.plan(sweep.Sweep.load(sweep_file, ROOT / "conf"), place)
    assert [t.key for t in state["finished"]] == ["inverted_pendulum-sac-s0", "inverted_pendulum-mpdp-s0",
                                                  "inverted_pendulum-sac-s1"]
    assert [t.key for t in state["start"]] == ["inverted_pendulum-mpdp-s1"] and not state["resume"]
    before = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    sweep.main([str(sweep_file), "--conf", str(ROOT / "conf"), "--dry-run"])
    out = capsys.readouterr().out
    assert "4 trials: 3 finished (3 of them from records in" in out and "0 to resume, 1 to start" in out
    commands = [line for line in out.splitlines() if " fit " in line]
    assert len(commands) == 1 and "--trainer.logger.init_args.run_name inverted_pendulum-mpdp-s1" in commands[0]
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == before


def _seed_table_csv(args: list[str], out: Path) -> pd.DataFrame:
    compare.main([*args, "--sweep", "tiny", "--threshold", "900", "--out", str(out)])
    return pd.read_csv(out / "seed_table.csv")


def test_compare_gives_the_same_table_from_the_records_alone_as_from_mlflow(trial_store, written, tmp_path,
                                                                            monkeypatch, capsys):
    uri, _ = trial_store
    from_mlflow = _seed_table_csv(["--tracking-uri", uri, "--experiment", "tiny",
                                   "--filter", "attributes.status = 'FINISHED'"], tmp_path / "from_mlflow")
    monkeypatch.chdir(tmp_path)  # no mlflow.db here, and compare must not create one
    from_records = _seed_table_csv(["--records", str(written)], tmp_path / "from_records")
    assert not (tmp_path / "mlflow.db").exists()
    assert "3 runs in 2 groups" in capsys.readouterr().out
    # the same results; the cost per env step from each source's wall time: a record's is its
    # trial's done.json (sac-s0: 123.25 s), MLflow's the run's start to end (600 s each)
    cost = [c for c in from_records.columns if c.startswith("ms_per_env_step")]
    pd.testing.assert_frame_equal(from_records.drop(columns=cost), from_mlflow.drop(columns=cost))
    sac_records, sac_mlflow = from_records.set_index("algo").loc["SAC"], from_mlflow.set_index("algo").loc["SAC"]
    assert sac_records["runs"] == 2 and sac_records["ms_per_env_step_n"] == sac_mlflow["ms_per_env_step_n"] == 2
    assert sac_records["ms_per_env_step"] == pytest.approx((1000 * 123.25 / 3000 + 1000 * 600 / 3000) / 2)
    assert sac_mlflow["ms_per_env_step"] == pytest.approx(200.0)
    for name in ("runs.csv",):
        by_records = pd.read_csv(tmp_path / "from_records" / name)
        by_mlflow = pd.read_csv(tmp_path / "from_mlflow" / name)
        pd.testing.assert_frame_equal(by_records.drop(columns="ms_per_env_step"), by_mlflow.drop(columns="ms_per_env_step"))


def test_a_trial_both_in_mlflow_and_in_the_records_counts_once_as_its_mlflow_run(trial_store, written, tmp_path):
    uri, _ = trial_store
    changed = tmp_path / "tiny"
    shutil.copytree(written / "tiny", changed)
    record = records.read_record(changed / "inverted_pendulum-sac-s0.json")
    record["curves"]["eval/return"] = [[1000, 0.0], [2000, 0.0], [3000, 0.0]]
    records.write_record(record, changed / "inverted_pendulum-sac-s0.json")
    extra = dict(record, trial="inverted_pendulum-sac-s2", seed=2, run=dict(record["run"], run_id="elsewhere", run_name="inverted_pendulum-sac-s2"))
    records.write_record(extra, changed / "inverted_pendulum-sac-s2.json")  # a trial MLflow has not

    runs, curves = compare.load_comparison(uri, "tiny", sweep="tiny", records=[changed])
    assert sorted(runs["run_name"]) == sorted([*TRIALS, "inverted_pendulum-sac-s2"])
    returns = curves["eval/return"].groupby("run_name")["value"].last()
    assert returns["inverted_pendulum-sac-s0"] == 900.0  # MLflow's, not the changed record's 0
    assert returns["inverted_pendulum-sac-s2"] == 0.0
    table = seeds.seed_table(runs, curves["eval/return"])
    assert table.set_index("algo").loc["SAC", "runs"] == 3


@pytest.mark.parametrize("content,reason", [
    ("{not json", "not valid JSON"),
    ('{"schema": 1, "sweep": "tiny"}', "trial must be a str"),
    ("[1, 2]", "not a JSON object"),
    ("CURVE", "curve eval/return must be a list of [env_steps, value] pairs"),
])
def test_a_malformed_record_is_refused_with_one_error_line(written, tmp_path, monkeypatch, capsys, content, reason):
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "results/tiny"
    shutil.copytree(written / "tiny", folder)
    bad = folder / "inverted_pendulum-sac-s1.json"
    if content == "CURVE":
        record = json.loads(bad.read_text())
        record["curves"]["eval/return"] = [[1000, "high"]]
        content = json.dumps(record)
    bad.write_text(content)
    with pytest.raises(SystemExit) as stopped:
        compare.main(["--records", str(tmp_path / "results"), "--sweep", "tiny", "--out", str(tmp_path / "out")])
    assert stopped.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: record {bad}: {reason}"), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results"]  # no out/, no mlflow.db


def test_the_records_command_refuses_a_missing_store_and_creates_none(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as stopped:
        records.main(["--sweep", "tiny"])
    assert stopped.value.code == 2
    assert capsys.readouterr().err.strip() == "error: no MLflow store at sqlite:///mlflow.db"
    assert list(tmp_path.iterdir()) == []


def test_a_finished_record_is_not_hidden_by_an_unfinished_mlflow_run_of_its_trial(trial_store, written, tmp_path):
    # mpdp-s1 was stopped here (KILLED in MLflow) but finished on another machine: its record counts
    uri, _ = trial_store
    folder = tmp_path / "tiny"
    shutil.copytree(written / "tiny", folder)
    elsewhere = records.read_record(folder / "inverted_pendulum-mpdp-s0.json")
    elsewhere = dict(elsewhere, trial="inverted_pendulum-mpdp-s1", seed=1,
                     run=dict(elsewhere["run"], run_id="elsewhere", run_name="inverted_pendulum-mpdp-s1"))
    elsewhere["curves"]["eval/return"] = [[1000, 10.0], [2000, 20.0], [3000, 30.0]]
    records.write_record(elsewhere, folder / "inverted_pendulum-mpdp-s1.json")
    runs, curves = compare.load_comparison(uri, "tiny", sweep="tiny", records=[folder])
    assert runs.set_index("run_name").loc["inverted_pendulum-mpdp-s1", "status"] == "FINISHED"
    assert curves["eval/return"].groupby("run_name")["value"].last()["inverted_pendulum-mpdp-s1"] == 30.0


def test_a_record_of_another_preset_does_not_pass_for_this_machines_trial(written, tmp_path, monkeypatch, capsys):
    # preset auto runs MPDP quick on this CPU machine; a record of its paper preset (a GPU's) must
    # not count as that trial: one error line, nothing written
    monkeypatch.chdir(tmp_path)
    sweep_file = _fresh_clone(tmp_path, written)
    path = tmp_path / "benchmarks/results/tiny/inverted_pendulum-mpdp-s0.json"
    record = records.read_record(path)
    records.write_record(dict(record, preset="paper"), path)
    before = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    with pytest.raises(SystemExit) as stopped:
        sweep.main([str(sweep_file), "--conf", str(ROOT / "conf"), "--dry-run"])
    assert stopped.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: record {path} ran preset paper, where this sweep runs mpdp "
                                               f"with preset quick"), err
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == before


def test_a_record_leaves_out_the_paths_of_the_machine_that_ran_it(tmp_path):
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment_id = client.create_experiment("tiny", artifact_location=(tmp_path / "artifacts").as_uri())
    tags = {"task": "hopper", "algo": "SAC", "seed": "0", "sweep": "tiny", "trial": "hopper-sac-s0"}
    run_id = client.create_run(experiment_id, tags=tags, run_name="hopper-sac-s0").info.run_id
    params = {"model.init_args.gamma": "0.99", "checkpoint.dirpath": "/home/someone/runs/sweeps/tiny/hopper-sac-s0",
              "trainer.logger.init_args.tracking_uri": "sqlite:////home/someone/mlflow.db"}
    client.log_batch(run_id, metrics=[Metric("eval/return", 1.0, T0, 1000)], params=[Param(k, v) for k, v in params.items()])
    record = records.record_of_run(client, client.get_run(run_id), 1.0, "test", "test")
    assert record["config"] == {"model.init_args.gamma": "0.99"}
