"""Run comparison: the notebook and compare.py read curves back from an MLflow store."""

import nbformat
import pytest
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient
from nbclient import NotebookClient

from helpers import ROOT
from mpdp_lightning.experiments.compare import latest_attempt, load_curves, main, summarize

T0 = 1_700_000_000_000  # ms, a timestamp MLflow would have stamped


@pytest.fixture
def small_store(in_tmp):
    """Two runs logged the way a training run logs them (eval/return at env steps)."""
    uri = f"sqlite:///{in_tmp / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment_id = client.create_experiment("mpdp")
    for name, returns in {"hopper-0": [10.0, 200.0, 950.0], "hopper-1": [12.0, 80.0, 300.0]}.items():
        run = client.create_run(experiment_id, run_name=name, tags={"task": "hopper", "algo": "SAC"})
        for step, value in zip([1000, 2000, 3000], returns):
            client.log_metric(run.info.run_id, "eval/return", value, step=step)
            if name == "hopper-0":  # an MPDP run: its horizon and model error too
                client.log_metric(run.info.run_id, "train/horizon_mean", 5.0, step=step)
                client.log_metric(run.info.run_id, "model/error_l2", 0.1, step=step)
        client.set_terminated(run.info.run_id)
    return uri


@pytest.fixture
def resumed_store(small_store):
    """The small store plus hopper-2, interrupted at 3000 env steps and resumed from its checkpoint
    at 1000: 2000 and 3000 are logged twice, the resumed attempt's points a minute later. The
    interrupted attempt reached 950 at 3000, the resumed one only 700 there and 920 at 4000."""
    client = MlflowClient(small_store)
    experiment_id = client.get_experiment_by_name("mpdp").experiment_id
    run_id = client.create_run(experiment_id, run_name="hopper-2", tags={"task": "hopper", "algo": "SAC"}).info.run_id
    interrupted = {1000: 10.0, 2000: 400.0, 3000: 950.0}
    resumed = {2000: 350.0, 3000: 700.0, 4000: 920.0}
    for start, attempt in ((T0, interrupted), (T0 + 60_000, resumed)):
        for i, (step, value) in enumerate(attempt.items()):
            client.log_metric(run_id, "eval/return", value, timestamp=start + 1000 * i, step=step)
    client.set_terminated(run_id)
    return small_store


def test_latest_attempt_keeps_the_last_logged_point_of_each_step():
    points = [
        Metric("eval/return", 1.0, T0, 1000),
        Metric("eval/return", 2.0, T0 + 20, 2000),
        Metric("eval/return", 5.0, T0 + 10, 2000),  # later in the list but logged earlier
        Metric("eval/return", 3.0, T0 + 20, 2000),  # same timestamp as 2.0, later in the list
        Metric("eval/return", 4.0, T0 + 5, 500),
    ]
    kept = latest_attempt(points)
    assert [(p.step, p.value) for p in kept] == [(500, 4.0), (1000, 1.0), (2000, 3.0)]
    assert latest_attempt([]) == []


def test_a_resumed_run_reads_as_its_latest_attempt(resumed_store):
    curves = load_curves(resumed_store, "mpdp")
    run = curves[curves["run_name"] == "hopper-2"]
    assert run["env_steps"].tolist() == [1000, 2000, 3000, 4000]  # one row per step
    assert run["value"].tolist() == [10.0, 350.0, 700.0, 920.0]
    assert len(curves) == 10  # the other two runs untouched
    summary = summarize(curves, threshold=900).set_index("run_name")
    assert summary.loc["hopper-2", "first_step_at_900"] == 4000  # not 3000, the interrupted attempt's
    assert summary.loc["hopper-2", "best"] == 920.0
    assert summary.loc["hopper-2", "last"] == 920.0
    assert summary.loc["hopper-2", "env_steps"] == 4000
    assert summary.loc["hopper-0", "first_step_at_900"] == 3000


def test_compare_command_reports_the_latest_attempt(resumed_store, capsys):
    main(["--tracking-uri", resumed_store, "--threshold", "900", "--runs"])
    out = capsys.readouterr().out.splitlines()
    line = next(line for line in out if "hopper-2" in line)
    # env_steps, best, last, first_step_at_900: the interrupted attempt's 950 at 3000 is gone
    assert line.split()[-4:] == ["4000", "920.0", "920.0", "4000.0"]
    # the table over seeds: the three runs (no seed logged, shown as ?) in one group; first >= 900
    # at 3000 (hopper-0), never (hopper-1) and 4000 (hopper-2), of which 3000 is the median
    assert "3 runs in 1 groups (task, algo)" in " ".join(out)
    row = out[-1].split()
    assert row[:6] == ["hopper", "SAC", "3", "?", "?", "?"]
    cost = row.index("?:3000")  # the threshold's columns, then the cost per env step
    assert row[cost:cost + 8] == ["?:3000", "?:never", "?:4000", "4000", "?:yes", "?:no", "?:yes", "2/3"]
    assert row[cost + 8:cost + 12] == ["?:3000", "?:never", "?:4000", "4000"]  # >= 900 for good from, and its median
    assert len(row) in (cost + 13, cost + 14)  # ms per env step: a value, "-", or a value "(n=k)"


def test_curves_and_summary(small_store):
    curves = load_curves(small_store, "mpdp")
    assert len(curves) == 6 and set(curves["run_name"]) == {"hopper-0", "hopper-1"}
    summary = summarize(curves, threshold=900).set_index("run_name")
    assert summary.loc["hopper-0", "first_step_at_900"] == 3000
    assert summary.loc["hopper-1", "best"] == 300.0
    assert summary.loc["hopper-1", "first_step_at_900"] != summary.loc["hopper-1", "first_step_at_900"]  # NaN


def test_compare_command_saves_a_figure(small_store, in_tmp, capsys):
    """--out with a figure's suffix saves only the per-run learning curves, as it did before --out
    took a folder."""
    main(["--tracking-uri", small_store, "--out", str(in_tmp / "curves.png"), "--runs"])
    assert "hopper-0" in capsys.readouterr().out
    assert (in_tmp / "curves.png").stat().st_size > 1000
    assert not (in_tmp / "seed_table.csv").exists()


def test_notebook_runs_on_a_small_store(resumed_store, monkeypatch):
    monkeypatch.setenv("MPDP_TRACKING_URI", resumed_store)
    notebook = nbformat.read(ROOT / "notebooks/runs.ipynb", as_version=4)
    NotebookClient(notebook, timeout=120, kernel_name="python3",
                   resources={"metadata": {"path": str(ROOT / "notebooks")}}).execute()
    outputs = [out for cell in notebook.cells if cell.cell_type == "code" for out in cell.outputs]
    assert any("3 runs, 10 evaluations" in out.get("text", "") for out in outputs)  # hopper-2's latest attempt
    figures = sum("image/png" in out.get("data", {}) for out in outputs)
    # hopper's curves over seeds (return, horizon and model error panels) and the per-run curves;
    # no beta figure, as these runs do not vary beta
    assert figures == 2, f"the notebook drew {figures} figures, not the seed bands and the per-run curves"
    lines = [line for cell in notebook.cells if cell.cell_type == "code" for out in cell.outputs
             for line in out.get("data", {}).get("text/plain", "").splitlines()]
    tables = [out["data"]["text/html"] for out in outputs if "text/html" in out.get("data", {})]
    assert any("SAC" in html and "?:3000 ?:never ?:4000" in html and "2/3" in html for html in tables)  # over seeds
    assert any("hopper-0" in line for line in lines)  # per-run table
