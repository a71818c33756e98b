"""The figures over seeds and the sweep's summary run, on the synthetic store of tests/seed_store.py."""

import math

import matplotlib.image
import numpy as np
import pandas as pd
import pytest
from matplotlib.collections import PolyCollection
from mlflow.tracking import MlflowClient

from mpdp_lightning.experiments import figures
from mpdp_lightning.experiments.compare import load_comparison, main
from mpdp_lightning.experiments.summary_run import log_to_mlflow


@pytest.fixture(scope="module")
def made(s1):
    runs, curves = s1
    return figures.make_figures(runs, curves, threshold=900)


def _labels(ax):
    return [line.get_label() for line in ax.lines if not line.get_label().startswith("_")]


def _bands(ax):
    return [c for c in ax.collections if isinstance(c, PolyCollection)]


def test_runs_are_aligned_on_the_union_of_their_steps():
    curves = pd.DataFrame({"run_id": ["a", "a", "b", "b"], "env_steps": [1000, 2000, 1500, 2500],
                           "value": [0.0, 100.0, 10.0, 30.0]})
    curve = figures.aligned(curves)
    assert curve["env_steps"].tolist() == [1000, 1500, 2000, 2500]
    assert curve["runs"].tolist() == [1, 2, 2, 1]  # no extrapolation past a run's own points
    assert curve["mean"].tolist() == pytest.approx([0.0, 30.0, 60.0, 30.0])  # a at 1500: 50, b at 2000: 20
    assert curve["std"].iloc[1] == pytest.approx(40 / math.sqrt(2))  # ddof=1
    assert math.isnan(curve["std"].iloc[0])


def test_a_log_axis_gets_a_geometric_band_that_stays_positive():
    # model errors spread over a decade: on a log axis the line and band are taken of log(error)
    curves = pd.DataFrame({"run_id": ["a", "b", "c"], "env_steps": [1000] * 3, "value": [0.001, 0.01, 0.1]})
    assert figures.aligned(curves)["iqm"].iloc[0] == pytest.approx(0.111 / 3)  # arithmetic: 3 runs, none cut
    curve = figures.aligned(curves, log=True)
    assert curve["mean"].iloc[0] == pytest.approx(0.01)  # the geometric mean
    assert curve["iqm"].iloc[0] == pytest.approx(0.01)
    # three runs: all three resamples equal to the smallest (or largest) run is 1/27 > 2.5 %, so
    # the 95 % band spans exactly from the smallest to the largest error, positive
    assert curve["lower"].iloc[0] == pytest.approx(0.001) and curve["upper"].iloc[0] == pytest.approx(0.1)


CAP = 1000.0  # inverted_pendulum's maximum return
CAPPED = {"a": [200.0, 600.0, CAP, CAP, CAP], "b": [300.0, CAP, CAP, CAP, CAP],
          "c": [100.0, 900.0, CAP, CAP, CAP], "d": [50.0, 400.0, 400.0, 400.0, 400.0]}


def _capped_runs() -> tuple[pd.DataFrame, pd.DataFrame]:
    """Four seeds of one group, three of which sit at the maximum return from 3000 env steps on."""
    curves = pd.DataFrame([{"run_id": run, "env_steps": 1000 * (i + 1), "value": value}
                           for run, values in CAPPED.items() for i, value in enumerate(values)])
    runs = pd.DataFrame({"run_id": list(CAPPED), "task": "inverted_pendulum", "algo": "MPDP", "sweep": None})
    return runs, curves


def test_the_band_stays_within_the_returns_the_runs_reached():
    runs, curves = _capped_runs()
    values = np.array(list(CAPPED.values()))
    low, high = values.min(axis=0), values.max(axis=0)
    assert (values.mean(axis=0) + values.std(axis=0, ddof=1) > CAP).any()  # what mean + std drew
    curve = figures.aligned(curves, reps=300)
    assert (curve["lower"] >= low).all() and (curve["upper"] <= high).all()
    assert (curve["lower"] <= curve["iqm"]).all() and (curve["iqm"] <= curve["upper"]).all()
    assert curve["iqm"].iloc[-1] == CAP  # of four runs the IQM cuts the lowest and the highest
    figure = figures.task_figure("inverted_pendulum", runs, {"eval/return": curves}, ["task", "algo"])
    (band,) = _bands(figure.axes[0])
    steps = curve["env_steps"].to_numpy()
    for x, y in band.get_paths()[0].vertices:  # every corner of the drawn band, at an env step
        at = np.flatnonzero(np.isclose(steps, x))
        assert len(at) == 1 and low[at[0]] - 1e-9 <= y <= high[at[0]] + 1e-9
    assert "IQM" in figure.get_suptitle() and "95 % bootstrap CI" in figure.get_suptitle()


def test_a_band_is_reproducible():
    _, curves = _capped_runs()
    first, again = figures.aligned(curves, reps=200), figures.aligned(curves, reps=200)
    pd.testing.assert_frame_equal(first, again)
    other = figures.aligned(curves, reps=200, bootstrap_seed=1)
    assert not np.allclose(first["lower"], other["lower"]) or not np.allclose(first["upper"], other["upper"])


def test_one_band_per_algorithm_and_override(made):
    assert set(made) == {"hopper_curves", "hopper_final_return_vs_beta"}
    ret, horizon, error = made["hopper_curves"].axes
    assert [ax.get_title() for ax in (ret, horizon, error)] == [
        "Eval return (Fig. 1)", "Mean imagined horizon (Fig. 2)", "Model error (Fig. 3)"]
    assert all(ax.get_xlabel() == "env steps" for ax in (ret, horizon, error))
    assert _labels(ret) == ["MPDP, beta=0.2 (n=2)", "MPDP, beta=0.5 (n=1)", "SAC (n=3)", "threshold 900"]
    assert len(_bands(ret)) == 2  # SAC and beta 0.2; a single run has no spread to draw
    assert any(line.get_linestyle() == ":" for line in ret.lines)  # beta 0.2's seed 1 stopped at 3000
    assert _labels(horizon) == ["MPDP, beta=0.2 (n=2)", "MPDP, beta=0.5 (n=1)"]  # SAC logs none
    assert error.get_yscale() == "log"
    legend = made["hopper_curves"].legends[0]
    assert "SAC (n=3)" in [text.get_text() for text in legend.get_texts()]


def test_final_return_against_beta(made):
    (ax,) = made["hopper_final_return_vs_beta"].axes
    (bars,) = ax.containers  # one errorbar line: MPDP, the only algorithm whose runs vary beta
    assert bars.get_label() == "MPDP (n=1 per beta)"
    line = bars.lines[0]
    assert line.get_xdata().tolist() == [0.2, 0.5]
    assert line.get_ydata().tolist() == [900.0, 400.0]  # seed 1 of beta 0.2 has no final return
    assert "beta" in ax.get_xlabel() and "Fig. 4" in ax.get_title()


def test_figures_are_written_as_png(store, tmp_path):
    runs, curves = load_comparison(store, "mpdp", sweep="s1")
    paths = figures.write_figures(runs, curves, tmp_path / "figs", threshold=900)
    assert [path.name for path in paths] == ["hopper_curves.png", "hopper_final_return_vs_beta.png"]
    curves_png = matplotlib.image.imread(paths[0])
    height, width = curves_png.shape[:2]
    assert 400 < height < 900 and 1500 < width < 2200  # three panels side by side, at 120 dpi
    assert np.ptp(curves_png[..., :3]) > 0.5  # something is drawn
    beta_png = matplotlib.image.imread(paths[1])
    assert 400 < beta_png.shape[0] < 900 and 500 < beta_png.shape[1] < 1200


def test_summary_run_is_created_once_and_reused(store, tmp_path):
    runs, curves = load_comparison(store, "mpdp", sweep="s2")
    paths = figures.write_figures(runs, curves, tmp_path)
    table = tmp_path / "seed_table.md"
    table.write_text("| task |\n")
    first = log_to_mlflow([table, *paths], store, "mpdp", "s2")
    second = log_to_mlflow([table, *paths], store, "mpdp", "s2")
    assert first == second
    client = MlflowClient(store)
    experiment_id = client.get_experiment_by_name("mpdp").experiment_id
    summaries = [run for run in client.search_runs([experiment_id], "tags.sweep_summary = 'true'")
                 if run.data.tags["sweep"] == "s2"]
    assert [run.info.run_name for run in summaries] == ["s2-summary"]
    assert summaries[0].info.status == "FINISHED" and "algo" not in summaries[0].data.tags
    assert [a.path for a in client.list_artifacts(first)] == ["figures", "seed_table.md"]
    assert [a.path for a in client.list_artifacts(first, "figures")] == ["figures/hopper_curves.png"]


def test_command_logs_to_the_existing_summary_run(store, capsys):
    client = MlflowClient(store)
    experiment_id = client.get_experiment_by_name("mpdp").experiment_id
    existing = client.search_runs([experiment_id], "attributes.run_name = 's1-summary'")
    main(["--tracking-uri", store, "--sweep", "s1", "--threshold", "900", "--log-to-mlflow"])
    assert f"summary run {existing[0].info.run_id} of sweep 's1'" in capsys.readouterr().out
    assert len(client.search_runs([experiment_id], "attributes.run_name = 's1-summary'")) == 1
    artifacts = {a.path for a in client.list_artifacts(existing[0].info.run_id)}
    assert artifacts == {"figures", "seed_table.csv", "seed_table.md", "runs.csv", "improvement.csv"}
    figures_logged = {a.path for a in client.list_artifacts(existing[0].info.run_id, "figures")}
    assert figures_logged == {"figures/hopper_curves.png", "figures/hopper_final_return_vs_beta.png"}
