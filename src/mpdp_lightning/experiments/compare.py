"""Compare runs from the MLflow store and from trial records (``records``, JSON files kept in git):
load them, and the command line that prints the table over seeds and writes the figures.

    python -m mpdp_lightning.experiments.compare --experiment mpdp --sweep ip-beta --threshold 900 --out compare/
    python -m mpdp_lightning.experiments.compare --records benchmarks/results --sweep ip-all-algos --threshold 900

``seeds`` aggregates over seeds, ``figures`` draws the paper-style figures and ``summary_run`` puts
them into the sweep's summary run in MLflow; notebooks/runs.ipynb uses the same functions.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Iterable, Optional

import pandas as pd
from mlflow.entities import Run
from mlflow.tracking import MlflowClient

from mpdp_lightning.experiments.mlflow_runs import FIGURE_METRICS, latest_attempt, training_runs

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
FIGURE_SUFFIXES = (".png", ".pdf", ".svg")


def _run_columns(run: Run) -> dict:
    info, data = run.info, run.data
    return {
        "run_id": info.run_id,
        "run_name": info.run_name,
        "task": data.tags.get("task", data.params.get("task")),
        "algo": data.tags.get("algo"),
        "seed": data.tags.get("seed", data.params.get("seed_everything")),
        "status": info.status,
    }


def _run_row(run: Run) -> dict:
    row = {**run.data.params}
    row.update(_run_columns(run))
    row.update(sweep=run.data.tags.get("sweep"), preset=run.data.tags.get("preset", run.data.params.get("preset")),
               start_time=run.info.start_time, wall_seconds=_wall_seconds(run))
    return row


def _wall_seconds(run: Run) -> Optional[float]:
    """A finished run's wall time from MLflow (a resumed run's includes the time it lay stopped)."""
    if run.info.status != "FINISHED" or not run.info.end_time or not run.info.start_time:
        return None
    return (run.info.end_time - run.info.start_time) / 1000.0


def _runs_frame(rows: list[dict]) -> pd.DataFrame:
    meta = ["run_id", "run_name", "task", "algo", "seed", "status", "sweep", "preset", "start_time", "wall_seconds"]
    frame = pd.DataFrame(rows, columns=list(dict.fromkeys(meta + sorted({k for row in rows for k in row}))))
    return frame.sort_values(["task", "algo", "start_time"], ignore_index=True)


def _curve_rows(client: MlflowClient, run: Run, metric: str) -> list[dict]:
    columns = _run_columns(run)
    return [{**columns, "env_steps": point.step, "value": point.value}
            for point in latest_attempt(client.get_metric_history(run.info.run_id, metric))]


def _curves_frame(rows: list[dict]) -> pd.DataFrame:
    columns = ["run_id", "run_name", "task", "algo", "seed", "status", "env_steps", "value"]
    return pd.DataFrame(rows, columns=columns).sort_values(["run_name", "env_steps"], ignore_index=True)


def load_runs(
    tracking_uri: str = DEFAULT_TRACKING_URI,
    experiment: str = "mpdp",
    filter_string: str = "",
    sweep: Optional[str] = None,
) -> pd.DataFrame:
    """One row per training run (see ``training_runs``): run_id, run_name, task, algo, seed (the
    tag ``seed``, else the param ``seed_everything``), status, sweep, preset, start_time, then
    every param under its own name (``model.init_args.beta``, ...), as text."""
    client = MlflowClient(tracking_uri)
    return _runs_frame([_run_row(run) for run in training_runs(client, experiment, filter_string, sweep)])


def load_curves(
    tracking_uri: str = DEFAULT_TRACKING_URI,
    experiment: str = "mpdp",
    metric: str = "eval/return",
    filter_string: str = "",
    sweep: Optional[str] = None,
) -> pd.DataFrame:
    """One row per env step of ``metric`` and training run: run_id, run_name, task, algo, seed,
    status, env_steps, value. Where a resumed run logged a step twice, the latest attempt's value
    (see ``latest_attempt``)."""
    client = MlflowClient(tracking_uri)
    return _curves_frame([row for run in training_runs(client, experiment, filter_string, sweep)
                          for row in _curve_rows(client, run, metric)])


def load_comparison(
    tracking_uri: Optional[str] = DEFAULT_TRACKING_URI,
    experiment: str = "mpdp",
    filter_string: str = "",
    sweep: Optional[str] = None,
    metrics: Iterable[str] = FIGURE_METRICS,
    records: Iterable[str | os.PathLike] = (),
) -> tuple[pd.DataFrame, dict[str, pd.DataFrame]]:
    """``load_runs`` and ``load_curves`` of each of ``metrics`` from one search:
    ``(runs, {metric: curves})``, what ``seeds.seed_table`` and ``figures.make_figures`` take.

    ``records``: folders of trial records (``records.record_files``), read as well; a trial
    (sweep and trial key) both in MLflow and in the records counts once: as its record, unless its
    MLflow run has FINISHED (a resumed trial may have taken it further since its record; an
    interrupted or failed attempt must not hide a finished record). With records, a store without
    ``experiment`` adds no runs; ``tracking_uri`` None: the records alone, MLflow untouched."""
    from mpdp_lightning.experiments import records as trial_records

    metrics, records = list(metrics), list(records)
    found: list[Run] = []
    client = MlflowClient(tracking_uri) if tracking_uri is not None else None
    if client is not None and (not records or client.get_experiment_by_name(experiment) is not None):
        found = training_runs(client, experiment, filter_string, sweep)
    loaded = trial_records.load_records(records, sweep)
    recorded = {(record["sweep"], record["trial"]) for record in loaded}
    found = [run for run in found if run.info.status == "FINISHED"
             or (run.data.tags.get("sweep"), run.data.tags.get("trial")) not in recorded]
    rows = [_run_row(run) for run in found]
    curves = {metric: [row for run in found for row in _curve_rows(client, run, metric)] for metric in metrics}
    in_mlflow = {(run.data.tags.get("sweep"), run.data.tags.get("trial")) for run in found}
    for record in loaded:
        if (record["sweep"], record["trial"]) not in in_mlflow:
            rows.append(trial_records.run_row(record))
            for metric in metrics:
                curves[metric] += trial_records.curve_rows(record, metric)
    return _runs_frame(rows), {metric: _curves_frame(rows_) for metric, rows_ in curves.items()}


def write_comparison(
    tracking_uri: str,
    experiment: str,
    out_dir: str | os.PathLike,
    sweep: Optional[str] = None,
    threshold: Optional[float] = None,
    group_by: Iterable[str] = (),
    filter_string: str = "",
    auto_group: bool = True,
    records: Iterable[str | os.PathLike] = (),
) -> list[Path]:
    """Load the training runs of ``experiment`` (of ``sweep``, when given) and those of the
    ``records`` folders (see ``load_comparison``) and ``write_report`` them into ``out_dir``.
    Returns the paths written. Raises ValueError when there are none."""
    records = list(records)
    runs, curves = load_comparison(tracking_uri, experiment, filter_string, sweep, records=records)
    if runs.empty:
        raise ValueError(_no_runs_message(tracking_uri, experiment, sweep, filter_string, records))
    return write_report(runs, curves, out_dir, threshold, group_by, auto_group,
                        source=_source(tracking_uri, experiment, sweep, records))


def write_report(
    runs: pd.DataFrame,
    curves: dict[str, pd.DataFrame],
    out_dir: str | os.PathLike,
    threshold: Optional[float] = None,
    group_by: Iterable[str] = (),
    auto_group: bool = True,
    source: str = "",
) -> list[Path]:
    """Write into ``out_dir`` the table over seeds (``seed_table.csv``, numeric; ``seed_table.md``,
    as printed, with what its columns mean), the per-run measures (``runs.csv``), the probability
    of improvement between groups (``improvement.csv``, ``seeds.improvement_table``) and the figures
    (``figures.write_figures``). Returns the paths written, tables first."""
    from mpdp_lightning.experiments import figures, seeds

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = seeds.seed_table(runs, curves["eval/return"], threshold, group_by, auto_group)
    written = [out / "seed_table.csv", out / "seed_table.md", out / "runs.csv"]
    table.to_csv(written[0], index=False)
    improvement = seeds.improvement_table(runs, curves["eval/return"], group_by, auto_group)
    improvement.to_csv(out / "improvement.csv", index=False)
    written[1].write_text(_markdown_report(table, source, threshold, improvement))
    keys = [key for key in table.columns[: list(table.columns).index("runs")] if key not in ("task", "algo", "sweep")]
    per_run = seeds.per_run(runs, curves["eval/return"], threshold).merge(
        runs[["run_id", *keys]], on="run_id", how="left")
    per_run.to_csv(written[2], index=False)
    written.append(out / "improvement.csv")
    written += figures.write_figures(runs, curves, out, threshold=threshold, group_by=group_by, auto_group=auto_group)
    return written


def _source(tracking_uri: Optional[str], experiment: str, sweep: Optional[str], records: Iterable = ()) -> str:
    records = ", ".join(map(str, records))
    if tracking_uri is None:
        return (f"sweep {sweep!r} in " if sweep else "") + f"records {records}"
    return (f"experiment {experiment!r}" + (f", sweep {sweep!r}" if sweep else "") + f" in {tracking_uri}"
            + (f" and records {records}" if records else ""))


def _no_runs_message(tracking_uri: Optional[str], experiment: str, sweep: Optional[str], filter_string: str,
                     records: Iterable = ()) -> str:
    records = list(records)
    message = f"no training runs in {_source(tracking_uri, experiment, sweep, records)}"
    if filter_string:
        message += f" matching {filter_string!r}"
    if sweep:
        names: set = set()
        client = MlflowClient(tracking_uri) if tracking_uri is not None else None
        if client is not None and client.get_experiment_by_name(experiment) is not None:
            names |= {run.data.tags.get("sweep") for run in training_runs(client, experiment)}
        names |= {path.parent.name for folder in records for path in Path(folder).glob("*/*.json")}
        names = sorted(name for name in names if name)
        message += f"; sweeps there: {', '.join(names) if names else 'none'}"
    return message


def _markdown_report(table: pd.DataFrame, source: str, threshold: Optional[float],
                     improvement: Optional[pd.DataFrame] = None) -> str:
    """seed_table.md: what the columns mean, the table over seeds and, given ``improvement``
    (``seeds.improvement_table``), the probability of improvement between its groups."""
    from mpdp_lightning.experiments import intervals, seeds

    lines = [
        "# Eval return over seeds" + (f": {source}" if source else ""),
        "",
        "return@p%: the latest evaluation at or before p % of the budget (env_interaction.total_env_steps),"
        " mean ± sample std (ddof=1; nan for a single run) over the runs; (n=k) where only k runs got that far.",
        "",
        "mean return (AUC): trapezoid area under eval return against env steps over the span of the"
        " evaluations, divided by that span; runs that reached the end of their budget.",
        "",
        "IQM ...: the interquartile mean over the runs, the mean of the middle 50 % (int(n/4) runs cut at"
        " each end: none of 3 runs, the lowest and the highest of 4-7), and [its 95 % CI] by the stratified"
        f" bootstrap over runs (rliable; {intervals.REPS} resamples, seed {intervals.SEED}); nan for a single run.",
    ]
    if threshold is not None:
        lines += ["", f"first >= {threshold:g}: per seed, the first env step with eval return >= {threshold:g};"
                     " median first: never-reached counts as infinitely late; stays: every later evaluation"
                     " stays >= the threshold."]
    lines += ["", "ms per env step: a finished run's wall time (warm-up, evaluations and model fits included;"
                  " a trial record's, or MLflow's start to end) over its budget, mean over the runs."]
    report = "\n".join(lines) + "\n\n" + seeds.to_markdown(seeds.format_table(table))
    if improvement is not None and not improvement.empty:
        report += "\n".join([
            "", "## Probability of improvement", "",
            "P(X > Y): the probability that a run of X has a higher value than a run of Y (ties count half),"
            " over the runs of each that have one, and [its 95 % CI] by the stratified bootstrap (rliable);"
            " each pair once, the likelier winner first (P(Y > X) = 1 - P(X > Y)); nan CI when an arm has a"
            " single run. improvement.csv has both orders.", "", ""])
        report += seeds.to_markdown(seeds.format_improvement(improvement))
    return report


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
    parser = argparse.ArgumentParser(
        prog="python -m mpdp_lightning.experiments.compare",
        description="Compare training runs from the MLflow store: a table over seeds (mean ± std of"
        " eval return at 25/50/75 % of the budget and at the end, area under the curve, first env step"
        " at a threshold) per task, algorithm and override values, and the paper-style figures.")
    parser.add_argument("--tracking-uri", default=None,
                        help=f"the MLflow store (default {DEFAULT_TRACKING_URI}; with --records, only where it exists)")
    parser.add_argument("--experiment", default="mpdp")
    parser.add_argument("--records", action="append", default=[], metavar="DIR",
                        help="trial records too (repeatable): a folder of *.json records, or a parent such as"
                        " benchmarks/results (its --sweep subfolder, or every sweep's); a trial also in MLflow"
                        " counts once, as its MLflow run")
    parser.add_argument("--sweep", default=None, metavar="NAME", help="only the runs tagged sweep=NAME")
    parser.add_argument("--filter", default="", help="MLflow search filter, e.g. \"tags.task = 'hopper'\"")
    parser.add_argument("--threshold", type=float, default=None,
                        help="report per seed the first env step with eval return >= it, and whether it stays")
    parser.add_argument("--group-by", action="append", default=[], metavar="KEY",
                        help="a param whose values make separate groups (repeatable), e.g. model.init_args.beta"
                        " (or model.beta, beta); params that differ within a sweep are found without it")
    parser.add_argument("--no-auto-group", action="store_true",
                        help="group only by task, algo, sweep and the --group-by params")
    parser.add_argument("--out", default=None, metavar="DIR",
                        help="write seed_table.csv, seed_table.md, runs.csv and the figures (PNG) into DIR;"
                        " a file name ending in .png, .pdf or .svg saves only the per-run curves of --metric")
    parser.add_argument("--log-to-mlflow", action="store_true",
                        help="log the table and figures as artifacts of the sweep's summary run (needs --sweep)")
    parser.add_argument("--runs", action="store_true", help="print the per-run table of --metric too")
    parser.add_argument("--metric", default="eval/return", help="the metric of --runs and of a figure file --out")
    args = parser.parse_args(argv)
    if args.log_to_mlflow and not args.sweep:
        parser.error("--log-to-mlflow needs --sweep NAME: the figures go to that sweep's summary run")
    try:
        _compare(args)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None


def _compare(args: argparse.Namespace) -> None:
    from mpdp_lightning.experiments import seeds

    store = args.tracking_uri
    if store is None:  # records alone read no MLflow store, and create none
        store = None if args.records and not Path("mlflow.db").is_file() else DEFAULT_TRACKING_URI
    if args.records and args.filter:
        raise ValueError("--filter searches MLflow runs; records cannot be filtered by it (use --sweep)")
    if args.log_to_mlflow and store is None:
        raise ValueError("--log-to-mlflow needs an MLflow store (--tracking-uri): there is no mlflow.db here")
    for folder in args.records:
        if not Path(folder).is_dir():
            raise ValueError(f"--records {folder} is not a folder")
    source = _source(store, args.experiment, args.sweep, args.records)
    runs, curves = load_comparison(store, args.experiment, args.filter, args.sweep,
                                   list(dict.fromkeys([*FIGURE_METRICS, args.metric])), args.records)
    if runs.empty:
        raise ValueError(_no_runs_message(store, args.experiment, args.sweep, args.filter, args.records))
    table = seeds.seed_table(runs, curves["eval/return"], args.threshold, args.group_by, not args.no_auto_group)
    keys = [seeds.short_name(key) for key in table.columns[: list(table.columns).index("runs")]]
    with pd.option_context("display.width", 250, "display.max_columns", 60, "display.max_colwidth", 80):
        if args.runs:
            print(summarize(curves[args.metric], args.threshold).to_string(index=False))
            print()
        print(f"{len(runs)} runs in {len(table)} groups ({', '.join(keys)}) from"
              f" {source}; mean ± std (ddof=1) over seeds:")
        print(seeds.format_table(table).to_string(index=False))
    out = Path(args.out) if args.out else None
    if out is not None and out.suffix.lower() in FIGURE_SUFFIXES:
        import matplotlib

        matplotlib.use("Agg")
        plot_curves(curves[args.metric], args.metric).savefig(out, dpi=120, bbox_inches="tight")
        print(f"saved {out}")
        out = None
    if out is None and not args.log_to_mlflow:
        return
    import tempfile

    with tempfile.TemporaryDirectory(prefix="mpdp-compare-") as scratch:
        written = write_report(runs, curves, out or scratch, args.threshold, args.group_by,
                               not args.no_auto_group, source)
        if out is not None:
            print(f"wrote {len(written)} files into {out}: {', '.join(path.name for path in written)}")
        if args.log_to_mlflow:
            from mpdp_lightning.experiments.summary_run import log_to_mlflow

            run_id = log_to_mlflow(written, store, args.experiment, args.sweep)
            print(f"logged {len(written)} files to the summary run {run_id} of sweep {args.sweep!r}")


if __name__ == "__main__":
    main()
