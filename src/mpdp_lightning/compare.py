"""Compare runs from the MLflow store: a table and learning curves against env steps.

    python -m mpdp_lightning.compare --experiment mpdp --out curves.png

notebooks/runs.ipynb uses the same functions interactively.
"""

from __future__ import annotations

import argparse
import os
from typing import Iterable, Optional

import pandas as pd
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"


def latest_attempt(points: Iterable[Metric]) -> list[Metric]:
    """One point per step of a metric history, the one the latest attempt logged, in step order.

    A resumed run continues the same MLflow run from its last checkpoint, so the env steps
    between that checkpoint and the interruption are logged twice: by the attempt that was
    interrupted and again by the resumed one, generally with other values (the episode under
    way starts afresh, so the data and the nets differ). The resumed attempt is the one the
    rest of the run builds on, so at each step keep the point with the largest ``timestamp``
    (ms); of points with equal timestamps, the one that comes later in ``points``. (That tie
    never separates two attempts, as a resumed one starts seconds after the interruption; and
    MLflow's SQLite store returns equal timestamps ordered by value, not by when they were logged.)
    """
    latest: dict[int, Metric] = {}
    for point in points:
        kept = latest.get(point.step)
        if kept is None or point.timestamp >= kept.timestamp:
            latest[point.step] = point
    return [latest[step] for step in sorted(latest)]


def load_curves(
    tracking_uri: str = DEFAULT_TRACKING_URI,
    experiment: str = "mpdp",
    metric: str = "eval/return",
    filter_string: str = "",
) -> pd.DataFrame:
    """One row per env step of ``metric`` and run: run_id, run_name, task, algo, seed, status,
    env_steps, value. Where a resumed run logged a step twice, the latest attempt's value
    (see ``latest_attempt``)."""
    client = MlflowClient(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        raise ValueError(f"no experiment {experiment!r} in {tracking_uri}")
    rows = []
    for run in client.search_runs([found.experiment_id], filter_string=filter_string):
        info, data = run.info, run.data
        for point in latest_attempt(client.get_metric_history(info.run_id, metric)):
            rows.append(
                {
                    "run_id": info.run_id,
                    "run_name": info.run_name,
                    "task": data.tags.get("task", data.params.get("task")),
                    "algo": data.tags.get("algo"),
                    "seed": data.params.get("seed_everything"),
                    "status": info.status,
                    "env_steps": point.step,
                    "value": point.value,
                }
            )
    columns = ["run_id", "run_name", "task", "algo", "seed", "status", "env_steps", "value"]
    return pd.DataFrame(rows, columns=columns).sort_values(["run_name", "env_steps"], ignore_index=True)


def summarize(curves: pd.DataFrame, threshold: Optional[float] = None) -> pd.DataFrame:
    """Per run: the last and best value, the env steps reached and, with ``threshold``, the first
    env step at which the curve reached it (NaN if never)."""
    groups = curves.groupby(["run_id", "run_name", "task", "algo", "seed"], dropna=False)
    summary = groups.agg(env_steps=("env_steps", "max"), best=("value", "max"), last=("value", "last"))
    if threshold is not None:
        reached = curves[curves["value"] >= threshold].groupby("run_id")["env_steps"].min()
        summary[f"first_step_at_{threshold:g}"] = summary.index.get_level_values("run_id").map(reached)
    return summary.reset_index()


def plot_curves(curves: pd.DataFrame, metric: str = "eval/return", ax=None):
    """One line per run, value against env steps; returns the matplotlib figure."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(7, 4))
    for (run_name, run_id), run in curves.groupby(["run_name", "run_id"], sort=True):
        ax.plot(run["env_steps"], run["value"], marker=".", label=run_name or run_id[:8])
    ax.set_xlabel("env steps")
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    if len(ax.lines):
        ax.legend(fontsize="small")
    return ax.figure


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tracking-uri", default=DEFAULT_TRACKING_URI)
    parser.add_argument("--experiment", default="mpdp")
    parser.add_argument("--metric", default="eval/return")
    parser.add_argument("--filter", default="", help="MLflow search filter, e.g. \"tags.task = 'hopper'\"")
    parser.add_argument("--threshold", type=float, default=None, help="report the first env step reaching it")
    parser.add_argument("--out", default=None, help="save the learning-curve figure here (png, pdf, svg)")
    args = parser.parse_args(argv)
    curves = load_curves(args.tracking_uri, args.experiment, args.metric, args.filter)
    with pd.option_context("display.width", 160, "display.max_columns", 20):
        print(summarize(curves, args.threshold).to_string(index=False))
    if args.out:
        import matplotlib

        matplotlib.use("Agg")
        plot_curves(curves, args.metric).savefig(args.out, dpi=120, bbox_inches="tight")
        print(f"saved {args.out}")


if __name__ == "__main__":
    main()
