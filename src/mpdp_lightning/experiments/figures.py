"""Figures over seeds in the style of the paper's: per task, a curve and a shaded band per
algorithm and override values against env steps (Fig. 1), with MPDP's mean imagined horizon
(Fig. 2) and the world model's error (Fig. 3) as further panels where runs logged them, and the
final eval return against beta (Fig. 4) where the runs vary ``model.init_args.beta``.

The curve is the interquartile mean (IQM) over the runs and the band its 95 % stratified-bootstrap
CI (``intervals.iqm_interval``), as rliable's plots draw them, not the paper's mean ± std: a
bootstrap of resampled runs stays within the values the runs reached, where mean + std of seeds
at a capped return (inverted_pendulum's 1000) goes above the cap.

Aligning runs: a group's runs are put on the union of the env steps at which any of them logged
the metric, each run linearly interpolated between its own points and never extrapolated past
its first or last one. At each step the IQM and its CI are over the runs that cover it (of log
values for the model error, drawn on a log axis, so the band is taken on the axis the eye
reads). The line is solid where every run of the group covers the step and dotted where fewer
do (a run that stopped early or is still running); the band is drawn where at least two runs
cover the step (one run has no spread to show). With runs of one config, which evaluate at the
same env steps, the union grid is the common eval grid and nothing is interpolated.

Figures are ``matplotlib.figure.Figure`` objects drawn without pyplot (no global state, the Agg
renderer when saved to PNG), so the command line, the notebook and the sweep tool share them.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Iterable, Optional, Sequence

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter

from mpdp_lightning.experiments import intervals, seeds

BETA = "model.init_args.beta"
# metric: (panel title, y label, log scale)
PANELS = {
    "eval/return": ("Eval return (Fig. 1)", "eval return", False),
    "train/horizon_mean": ("Mean imagined horizon (Fig. 2)", "horizon (model steps)", False),
    "model/error_l2": ("Model error (Fig. 3)", "L2 error of predicted next obs", True),
}
PANEL_WIDTH, PANEL_HEIGHT = 5.2, 3.9


def aligned(curves: pd.DataFrame, log: bool = False, reps: int = intervals.REPS,
            bootstrap_seed: int = intervals.SEED) -> pd.DataFrame:
    """The runs of ``curves`` (run_id, env_steps, value) on the union of their env steps (see the
    module docstring): env_steps, mean, std (ddof=1; NaN where fewer than two runs), iqm, the
    band's lower and upper edges (the IQM's 95 % CI; NaN where fewer than two runs), runs (how
    many runs cover the step).

    With ``log`` (a positive quantity drawn on a log axis, the model error) the statistics are taken
    of log(value) and mapped back: the mean is the geometric mean, std the factor exp(std), and
    the band stays positive and within the runs' values.
    """
    grid = np.unique(curves["env_steps"].to_numpy(dtype=float))
    matrix = np.full((curves["run_id"].nunique(), len(grid)), np.nan)
    for row, (_, run) in enumerate(curves.sort_values("env_steps").groupby("run_id", sort=True)):
        steps, values = run["env_steps"].to_numpy(dtype=float), run["value"].to_numpy(dtype=float)
        if log:
            values = np.log(values)
        inside = (grid >= steps[0]) & (grid <= steps[-1])
        matrix[row, inside] = np.interp(grid[inside], steps, values)
    frame = pd.DataFrame(matrix)
    mean, std = frame.mean().to_numpy(), frame.std(ddof=1).to_numpy()
    iqm, lower, upper = intervals.iqm_interval(matrix, reps, bootstrap_seed)
    if log:
        mean, std, iqm, lower, upper = (np.exp(a) for a in (mean, std, iqm, lower, upper))
    return pd.DataFrame({"env_steps": grid, "mean": mean, "std": std, "iqm": iqm, "lower": lower,
                         "upper": upper, "runs": frame.count().to_numpy()})


def draw_band(ax: Axes, curve: pd.DataFrame, runs: int, color, label: str) -> None:
    """IQM line (solid where all ``runs`` cover the step, dotted where fewer) and its CI band."""
    steps, mean = curve["env_steps"].to_numpy(), curve["iqm"].to_numpy()
    full = curve["runs"].to_numpy() >= runs
    if not full.all():
        ax.plot(steps, mean, color=color, linestyle=":", linewidth=1.2, label="_partial")
    marker = "o" if len(steps) == 1 else None  # a line of one point would not show
    ax.plot(steps, np.where(full, mean, np.nan), color=color, linewidth=1.8, marker=marker, label=label)
    spread = curve["runs"].to_numpy() >= 2
    if spread.any():
        ax.fill_between(steps, curve["lower"].to_numpy(), curve["upper"].to_numpy(), where=spread, color=color,
                        alpha=0.2, linewidth=0)


def _env_steps_axis(ax: Axes) -> None:
    ax.set_xlabel("env steps")
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x / 1000:g}k" if abs(x) >= 1000 else f"{x:g}"))
    ax.grid(alpha=0.3)


def _groups(runs: pd.DataFrame, keys: Sequence[str]) -> list[tuple[dict, list[str]]]:
    """(key values, run ids) per group, in the table's order."""
    firsts = runs.drop_duplicates(list(keys))[list(keys)]
    ordered = seeds.sort_groups(firsts, keys)
    found = []
    for values in ordered.to_dict("records"):
        match = np.ones(len(runs), dtype=bool)
        for key in keys:
            column = runs[key]
            match &= column.isna().to_numpy() if pd.isna(values[key]) else (column == values[key]).to_numpy()
        found.append((values, runs.loc[match, "run_id"].tolist()))
    return found


def _colors(count: int) -> list:
    palette = matplotlib.colormaps["tab10" if count <= 10 else "tab20"]
    return [palette(i % palette.N) for i in range(count)]


def task_figure(task: str, runs: pd.DataFrame, curves: dict[str, pd.DataFrame], keys: Sequence[str],
                threshold: Optional[float] = None) -> Figure:
    """The figure of one task: a panel per metric of ``PANELS`` that its runs logged (eval return
    always), one IQM line and CI band per group of ``keys`` (``seeds.group_keys``), a shared legend
    below with each group's number of runs."""
    task_runs = runs[runs["task"] == task]
    ids = set(task_runs["run_id"])
    metrics = [m for m in PANELS if m == "eval/return" or
               (m in curves and curves[m]["run_id"].isin(ids).any())]
    groups = _groups(task_runs, keys)
    colors = _colors(len(groups))
    figure = Figure(figsize=(PANEL_WIDTH * len(metrics), PANEL_HEIGHT + 0.35 * math.ceil(len(groups) / 3)),
                    layout="constrained")
    axes = figure.subplots(1, len(metrics), squeeze=False, sharex=True)[0]  # one env-step range
    handles: dict[str, object] = {}
    for ax, metric in zip(axes, metrics):
        title, ylabel, log = PANELS[metric]
        frame = curves.get(metric, pd.DataFrame(columns=["run_id", "env_steps", "value"]))
        log = log and frame["run_id"].isin(ids).any() and (frame.loc[frame["run_id"].isin(ids), "value"] > 0).all()
        for (values, run_ids), color in zip(groups, colors):
            points = frame[frame["run_id"].isin(run_ids)]
            if points.empty:
                continue
            label = f"{seeds.group_label(values, keys)} (n={len(run_ids)})"
            draw_band(ax, aligned(points, log=log), points["run_id"].nunique(), color, label)
        if metric == "eval/return" and threshold is not None:
            ax.axhline(threshold, color="0.4", linestyle="--", linewidth=1, label=f"threshold {threshold:g}")
        if log:
            ax.set_yscale("log")
        ax.set_title(title)
        ax.set_ylabel(ylabel)
        _env_steps_axis(ax)
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    if any(line.get_label() == "_partial" for ax in axes for line in ax.lines):
        handles["dotted: fewer runs than n"] = Line2D([], [], color="0.3", linestyle=":", linewidth=1.2)
    sweeps = sorted(set(task_runs["sweep"].dropna()))
    where = f" (sweep {sweeps[0]})" if len(sweeps) == 1 else ""
    figure.suptitle(f"{task}{where}: IQM over seeds, shaded: its 95 % bootstrap CI", fontsize="large")
    if handles:
        figure.legend(list(handles.values()), list(handles), loc="outside lower center",
                      ncols=min(len(handles), max(1, len(metrics)) + 1), fontsize="small", frameon=False)
    return figure


def beta_figure(task: str, stats: pd.DataFrame, keys: Sequence[str], reps: int = intervals.REPS) -> Optional[Figure]:
    """Final eval return (``return@end`` of ``seeds.per_run``, with the runs' params as columns)
    against beta, the IQM and its 95 % bootstrap CI over the runs of each beta that reached the
    end of their budget (no bar for one run), one line per algorithm and other override values;
    None when no line has two betas."""
    if BETA not in stats:
        return None
    rows = stats[(stats["task"] == task) & stats[BETA].notna()].copy()
    rows["beta"] = pd.to_numeric(rows[BETA], errors="coerce")
    rows = rows[rows["beta"].notna() & rows["return@end"].notna()]  # runs that reached the end of the budget
    series_keys = [key for key in keys if key not in ("task", BETA)]
    series = [(values, rows[rows["run_id"].isin(ids)]) for values, ids in _groups(rows, series_keys)]
    series = [(values, part) for values, part in series if part["beta"].nunique() >= 2]
    if not series:
        return None
    figure = Figure(figsize=(PANEL_WIDTH + 0.6, PANEL_HEIGHT + 0.3), layout="constrained")
    ax = figure.subplots()
    for (values, part), color in zip(series, _colors(len(series))):
        by_beta = part.groupby("beta")["return@end"]
        n = by_beta.count()
        estimates = np.array([intervals.iqm_interval(runs_of_beta.to_numpy(), reps) for _, runs_of_beta in by_beta])
        iqm, low, high = estimates[:, :, 0].T
        counts = f"n={n.min()}" if n.min() == n.max() else f"n={n.min()}-{n.max()}"
        ax.errorbar(n.index, iqm, yerr=np.array([iqm - low, high - iqm]), color=color, marker="o", capsize=4,
                    label=f"{seeds.group_label(values, series_keys)} ({counts} per beta)")
    betas = sorted(rows["beta"].unique())
    ax.set_xticks(betas)
    ax.set_xlabel("beta (model.init_args.beta)")
    ax.set_ylabel("eval return at the end of the budget\n(IQM, bars: 95 % bootstrap CI)")
    ax.set_title(f"{task}: final eval return against beta (Fig. 4)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return figure


def _file_stem(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text)


def make_figures(runs: pd.DataFrame, curves: dict[str, pd.DataFrame], threshold: Optional[float] = None,
                 group_by: Iterable[str] = (), auto_group: bool = True) -> dict[str, Figure]:
    """Every figure for the runs (``compare.load_comparison``), by file stem: ``<task>_curves``
    per task and ``<task>_final_return_vs_beta`` where the task's runs vary beta."""
    keys = seeds.group_keys(runs, group_by, auto_group)
    stats = seeds.per_run(runs, curves["eval/return"])
    params = [key for key in (*keys, BETA) if key in runs and key not in stats]
    stats = stats.merge(runs[["run_id", *dict.fromkeys(params)]], on="run_id", how="left")
    made: dict[str, Figure] = {}
    for task in sorted(runs["task"].dropna().unique()):
        made[f"{_file_stem(task)}_curves"] = task_figure(task, runs, curves, keys, threshold)
        beta = beta_figure(task, stats, keys)
        if beta is not None:
            made[f"{_file_stem(task)}_final_return_vs_beta"] = beta
    return made


def write_figures(runs: pd.DataFrame, curves: dict[str, pd.DataFrame], out_dir: str | Path,
                  threshold: Optional[float] = None, group_by: Iterable[str] = (), auto_group: bool = True,
                  dpi: int = 120) -> list[Path]:
    """``make_figures`` saved as PNG into ``out_dir`` (created if missing); returns the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for stem, figure in make_figures(runs, curves, threshold, group_by, auto_group).items():
        path = out / f"{stem}.png"
        figure.savefig(path, dpi=dpi)
        paths.append(path)
    return paths
