"""Run comparison: the notebook and compare.py read curves back from an MLflow store."""

import nbformat
import pytest
from mlflow.tracking import MlflowClient
from nbclient import NotebookClient

from helpers import ROOT
from mpdp_lightning.compare import load_curves, main, summarize


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


def test_curves_and_summary(small_store):
    curves = load_curves(small_store, "mpdp")
    assert len(curves) == 6 and set(curves["run_name"]) == {"hopper-0", "hopper-1"}
    summary = summarize(curves, threshold=900).set_index("run_name")
    assert summary.loc["hopper-0", "first_step_at_900"] == 3000
    assert summary.loc["hopper-1", "best"] == 300.0
    assert summary.loc["hopper-1", "first_step_at_900"] != summary.loc["hopper-1", "first_step_at_900"]  # NaN


def test_compare_command_saves_a_figure(small_store, in_tmp, capsys):
    main(["--tracking-uri", small_store, "--out", str(in_tmp / "curves.png")])
    assert "hopper-0" in capsys.readouterr().out
    assert (in_tmp / "curves.png").stat().st_size > 1000


def test_notebook_runs_on_a_small_store(small_store, monkeypatch):
    monkeypatch.setenv("MPDP_TRACKING_URI", small_store)
    notebook = nbformat.read(ROOT / "notebooks/runs.ipynb", as_version=4)
    NotebookClient(notebook, timeout=120, kernel_name="python3",
                   resources={"metadata": {"path": str(ROOT / "notebooks")}}).execute()
    outputs = [out for cell in notebook.cells if cell.cell_type == "code" for out in cell.outputs]
    assert any("2 runs, 6 evaluations" in out.get("text", "") for out in outputs)
    figures = sum("image/png" in out.get("data", {}) for out in outputs)
    assert figures == 2, f"the notebook drew {figures} figures, not the return and MPDP's diagnostics"
    lines = [line for cell in notebook.cells if cell.cell_type == "code" for out in cell.outputs
             for line in out.get("data", {}).get("text/plain", "").splitlines()]
    assert any("hopper-0" in line for line in lines)
