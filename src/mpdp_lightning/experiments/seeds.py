"""Aggregation over seeds: one row per task, algorithm and override values, the way the paper
reports its curves (mean and spread over seeds), computed from the runs ``compare`` loads.

Per run (``per_run``), from its ``eval/return`` curve against env steps (one point per step, the
latest attempt's, see ``mlflow_runs.latest_attempt``):

- ``return@25%``, ``return@50%``, ``return@75%``, ``return@end``: the latest evaluation at or
  before that fraction of the budget (the param ``env_interaction.total_env_steps``; a run
  without it is taken to have ended at its last evaluation). NaN when the run has not got that
  far (its last evaluation is before the point), so a stopped or still running run is not counted
  with a value from earlier in training.
- ``auc``: the area under the curve, the trapezoid rule over the run's evaluations up to the
  budget, divided by the env steps they span (last minus first evaluation): the time-averaged
  eval return, in return units, comparable between tasks' budgets and eval intervals. A single
  evaluation gives its value. NaN for a run that has not reached the end of its budget.
- with a threshold: ``first_step``, the first env step whose evaluation is >= the threshold (NaN
  when never), ``stays``, whether every later evaluation is >= the threshold too (False when
  never reached; judged on the evaluations the run has), and ``settled_step``, the env step from
  which every evaluation is >= the threshold (NaN when the last one is below it): a run that
  dips once after first reaching it settles later than it first reached it.

Per group (``seed_table``): ``runs`` (how many runs, i.e. seeds), ``seeds``, then for each of the
returns above and ``auc`` the mean, the sample standard deviation (ddof=1, so the spread of the
seeds as a sample of all seeds; one run gives NaN, not 0) and ``_n``, the runs that have a value;
with a threshold, the per-seed first steps, stays flags and settled steps, the medians of the
first and settled steps (a run that never reached or settled counts as infinitely late, so the
median is ``inf``, "never", when at most half the runs did) and ``stays``, how many runs stayed.
Beside each mean, ``_iqm``, ``_iqm_low`` and ``_iqm_high``: the interquartile mean over the runs
that have a value and its 95 % stratified-bootstrap CI (``intervals.iqm_interval``; NaN CI for
one run).

Between groups (``improvement_table``): per task and measure, the probability that a run of one
group beats a run of another, with its 95 % CI (``intervals.probability_of_improvement``).

Groups are task and algorithm, the sweep when the runs come from several, the params the user
names (``group_by``) and the params found to differ between runs of the same task and algorithm
of one sweep (``varying_params``), so that seeds of one setting are pooled and settings are not.
"""

from __future__ import annotations

import difflib
import math
from typing import Iterable, Optional, Sequence

import numpy as np
import pandas as pd

from mpdp_lightning.experiments import intervals

FRACTIONS = (0.25, 0.5, 0.75)
BUDGET_PARAM = "env_interaction.total_env_steps"
MODEL_PREFIX = "model.init_args."
# Columns of compare.load_runs that are not params.
RUN_COLUMNS = ("run_id", "run_name", "task", "algo", "seed", "status", "sweep", "preset", "start_time", "wall_seconds")
# Params that differ between seeds of one setting, or say where and how a run was watched, not
# what it learned: never a reason to split seeds into groups (each entry also covers "entry.*").
BOOKKEEPING = (
    "seed_everything",
    "env_interaction.seed",
    "evaluation.seed",
    "trainer.logger",
    "trainer.callbacks",
    "trainer.enable_progress_bar",
    "trainer.default_root_dir",
    "checkpoint",
    "progress_bar",
    "video",
    "git_commit",
    "mpdp_version",
    "ckpt_path",
    "weights_only",
    "config",
    "plan",  # how the update ran (eager or captured, ...): the same run on another device
    "resolved",  # what the algorithm chose for options left to it: follows from the other params
)


def fraction_column(fraction: float) -> str:
    return "return@end" if fraction == 1 else f"return@{fraction * 100:g}%"


def short_name(key: str) -> str:
    """``model.init_args.beta`` -> ``beta`` (the CLI's own short form), other keys as they are."""
    return key[len(MODEL_PREFIX):] if key.startswith(MODEL_PREFIX) else key


def group_label(group: dict, keys: Sequence[str]) -> str:
    """``MPDP, beta=0.2``: the algorithm and the group's other key values (task left out)."""
    parts = [f"{short_name(key)}={group[key]}" for key in keys
             if key not in ("task", "algo") and isinstance(group[key], str)]
    return ", ".join([str(group["algo"]), *parts])


def _is_bookkeeping(key: str) -> bool:
    return any(key == entry or key.startswith(entry + ".") for entry in BOOKKEEPING)


def param_columns(runs: pd.DataFrame) -> list[str]:
    return [column for column in runs.columns if column not in RUN_COLUMNS]


def varying_params(runs: pd.DataFrame) -> list[str]:
    """Params whose value differs between runs of the same sweep, task and algorithm (runs outside
    any sweep form one pool per task and algorithm), leaving out ``BOOKKEEPING`` and params that
    some runs of the pool lack (a param added by a later version of the code is not an override)."""
    found: list[str] = []
    params = [key for key in param_columns(runs) if not _is_bookkeeping(key)]
    pools = runs.groupby([runs["sweep"].fillna(""), "task", "algo"], dropna=False, sort=False)
    for _, pool in pools:
        if len(pool) < 2:
            continue
        for key in params:
            values = pool[key]
            if key not in found and values.notna().all() and values.nunique() > 1:
                found.append(key)
    return found


def resolve_key(runs: pd.DataFrame, key: str) -> str:
    """The column a user's ``--group-by`` names: the param itself, or ``model.beta`` / ``beta``
    for ``model.init_args.beta``. Raises ValueError naming the closest params when none matches."""
    candidates = [key]
    if key.startswith("model.") and not key.startswith(MODEL_PREFIX):
        candidates.append(MODEL_PREFIX + key[len("model."):])
    candidates.append(MODEL_PREFIX + key)
    for candidate in candidates:
        if candidate in runs.columns:
            return candidate
    close = difflib.get_close_matches(candidates[-1], param_columns(runs), n=3, cutoff=0.8)
    close += [c for c in difflib.get_close_matches(key, param_columns(runs), n=3) if c not in close]
    hint = f"; did you mean {', '.join(close[:3])}?" if close else ""
    raise ValueError(f"no run has the param {key!r} to group by{hint}")


def group_keys(runs: pd.DataFrame, group_by: Iterable[str] = (), auto: bool = True) -> list[str]:
    """task, algo, sweep (when the runs come from more than one), the named params, then those
    ``varying_params`` finds (with ``auto``)."""
    keys = ["task", "algo"]
    if runs["sweep"].fillna("").nunique() > 1:
        keys.append("sweep")
    for key in group_by:
        column = resolve_key(runs, key)
        if column not in keys:
            keys.append(column)
    if auto:
        keys += [key for key in varying_params(runs) if key not in keys]
    return keys


def _numeric_order(values: pd.Series) -> pd.Series:
    """Sort key: numbers as numbers when every value of the column is one, text otherwise."""
    as_numbers = pd.to_numeric(values, errors="coerce")
    if (values.isna() == as_numbers.isna()).all():
        return as_numbers
    return values.astype(str)


def sort_groups(frame: pd.DataFrame, keys: Sequence[str]) -> pd.DataFrame:
    return frame.sort_values(list(keys), key=_numeric_order, ignore_index=True, na_position="first")


def _value_at(steps: np.ndarray, values: np.ndarray, point: float, reached: bool) -> float:
    """The latest evaluation at or before ``point`` env steps, if the run got to ``point``."""
    index = int(np.searchsorted(steps, point + 1e-6, side="right")) - 1
    return float(values[index]) if reached and index >= 0 else math.nan


def _area(steps: np.ndarray, values: np.ndarray) -> float:
    if len(steps) == 0:
        return math.nan
    if len(steps) == 1 or steps[-1] == steps[0]:
        return float(values[-1])
    return float(np.trapezoid(values, steps) / (steps[-1] - steps[0]))


def first_reach(steps: np.ndarray, values: np.ndarray, threshold: float) -> tuple[float, bool]:
    """The first env step whose value is >= ``threshold`` (NaN if none) and whether every later
    value is >= it as well."""
    above = values >= threshold
    if not above.any():
        return math.nan, False
    first = int(np.argmax(above))
    return float(steps[first]), bool(above[first:].all())


def settled_from(steps: np.ndarray, values: np.ndarray, threshold: float) -> float:
    """The env step from which every value is >= ``threshold``; NaN when the last one is below it."""
    below = np.flatnonzero(values < threshold)
    if len(values) == 0 or (len(below) and below[-1] == len(values) - 1):
        return math.nan
    return float(steps[below[-1] + 1]) if len(below) else float(steps[0])


def _budget(run: dict, steps: np.ndarray) -> float:
    try:
        return float(run.get(BUDGET_PARAM))
    except (TypeError, ValueError):
        return float(steps[-1]) if len(steps) else math.nan


def per_run(
    runs: pd.DataFrame,
    curves: pd.DataFrame,
    threshold: Optional[float] = None,
    fractions: Sequence[float] = FRACTIONS,
) -> pd.DataFrame:
    """One row per run of ``runs`` (``compare.load_runs``) with the measures of the module
    docstring, from ``curves`` (``compare.load_curves`` of ``eval/return``)."""
    by_run = {run_id: run.sort_values("env_steps") for run_id, run in curves.groupby("run_id")}
    empty = pd.DataFrame({"env_steps": [], "value": []})
    rows = []
    for run in runs.to_dict("records"):
        curve = by_run.get(run["run_id"], empty)
        steps = curve["env_steps"].to_numpy(dtype=float)
        values = curve["value"].to_numpy(dtype=float)
        budget = _budget(run, steps)
        last = float(steps[-1]) if len(steps) else math.nan
        row = {key: run.get(key) for key in ("run_id", "run_name", "task", "algo", "seed", "status", "sweep")}
        row.update(budget=budget, last_eval_step=last, evaluations=len(steps))
        for fraction in (*fractions, 1):
            point = fraction * budget
            row[fraction_column(fraction)] = _value_at(steps, values, point, reached=last >= point - 1e-6)
        within = steps <= budget + 1e-6
        row["auc"] = _area(steps[within], values[within]) if last >= budget - 1e-6 else math.nan
        # the cost of an env step: the whole run's wall time (warm-up, evaluations and fits
        # included) over its budget, for a run that finished it
        wall = run.get("wall_seconds")
        finished = run.get("status") == "FINISHED" and last >= budget - 1e-6
        row["ms_per_env_step"] = 1000.0 * float(wall) / budget if finished and wall is not None and not pd.isna(wall) else math.nan
        if threshold is not None:
            row["first_step"], row["stays"] = first_reach(steps, values, threshold)
            row["settled_step"] = settled_from(steps, values, threshold)
        rows.append(row)
    columns = ["run_id", "run_name", "task", "algo", "seed", "status", "sweep", "budget", "last_eval_step",
               "evaluations", *(fraction_column(f) for f in (*fractions, 1)), "auc", "ms_per_env_step"]
    if threshold is not None:
        columns += ["first_step", "stays", "settled_step"]
    return pd.DataFrame(rows, columns=columns)


def _step_text(step: float) -> str:
    return "never" if math.isnan(step) or math.isinf(step) else f"{step:.0f}"


def grouped_per_run(
    runs: pd.DataFrame,
    curves: pd.DataFrame,
    threshold: Optional[float] = None,
    group_by: Iterable[str] = (),
    auto_group: bool = True,
    fractions: Sequence[float] = FRACTIONS,
) -> tuple[list[str], pd.DataFrame]:
    """The grouping keys (``group_keys``) and ``per_run`` with every key as a column."""
    keys = group_keys(runs, group_by, auto_group)
    stats = per_run(runs, curves, threshold, fractions)
    extra = [key for key in keys if key not in stats.columns]
    return keys, stats.merge(runs[["run_id", *extra]], on="run_id", how="left")


def measure_columns(fractions: Sequence[float] = FRACTIONS) -> list[str]:
    return [*(fraction_column(f) for f in (*fractions, 1)), "auc"]


def seed_table(
    runs: pd.DataFrame,
    curves: pd.DataFrame,
    threshold: Optional[float] = None,
    group_by: Iterable[str] = (),
    auto_group: bool = True,
    fractions: Sequence[float] = FRACTIONS,
    reps: int = intervals.REPS,
    bootstrap_seed: int = intervals.SEED,
) -> pd.DataFrame:
    """One row per group (see ``group_keys``), numeric: the module docstring says what each
    column holds. The grouping keys come first, in order; rows are sorted by them. ``reps`` and
    ``bootstrap_seed``: the bootstrap of the IQM's CI."""
    keys, stats = grouped_per_run(runs, curves, threshold, group_by, auto_group, fractions)
    measures = measure_columns(fractions)
    rows = []
    for values, group in stats.groupby(keys, dropna=False, sort=False):
        row = dict(zip(keys, values))
        group = group.sort_values("seed", key=_numeric_order, kind="stable")
        seeds = ["?" if pd.isna(seed) else str(seed) for seed in group["seed"]]  # "?": a run without a seed
        row.update(runs=len(group), seeds=" ".join(seeds), budget=group["budget"].max())
        iqm, low, high = intervals.iqm_interval(group[measures].to_numpy(dtype=float), reps, bootstrap_seed)
        for i, measure in enumerate(measures):
            column = group[measure].dropna()
            row[measure] = column.mean() if len(column) else math.nan
            row[f"{measure}_std"] = column.std(ddof=1) if len(column) else math.nan
            row[f"{measure}_n"] = len(column)
            row[f"{measure}_iqm"], row[f"{measure}_iqm_low"], row[f"{measure}_iqm_high"] = iqm[i], low[i], high[i]
        cost = group["ms_per_env_step"].dropna()
        row["ms_per_env_step"] = cost.mean() if len(cost) else math.nan
        row["ms_per_env_step_n"] = len(cost)
        if threshold is not None:
            firsts = group["first_step"].to_numpy(dtype=float)
            row["threshold"] = threshold
            row["first_step_per_seed"] = " ".join(f"{s}:{_step_text(f)}" for s, f in zip(seeds, firsts))
            row["first_step_median"] = float(np.median(np.where(np.isnan(firsts), np.inf, firsts)))
            row["stays_per_seed"] = " ".join(f"{s}:{'yes' if stay else 'no'}" for s, stay in zip(seeds, group["stays"]))
            row["stays"] = int(group["stays"].sum())
            settled = group["settled_step"].to_numpy(dtype=float)
            row["settled_per_seed"] = " ".join(f"{s}:{_step_text(f)}" for s, f in zip(seeds, settled))
            row["settled_median"] = float(np.median(np.where(np.isnan(settled), np.inf, settled)))
        rows.append(row)
    table = pd.DataFrame(rows)
    if table.empty:
        return pd.DataFrame(columns=[*keys, "runs", "seeds", "budget"])
    return sort_groups(table, keys)


IMPROVEMENT_MEASURES = ("return@end", "auc")
IMPROVEMENT_COLUMNS = ["task", "measure", "arm", "other", "p_improvement", "low", "high", "arm_n", "other_n"]


def improvement_table(
    runs: pd.DataFrame,
    curves: pd.DataFrame,
    group_by: Iterable[str] = (),
    auto_group: bool = True,
    measures: Sequence[str] = IMPROVEMENT_MEASURES,
    reps: int = intervals.REPS,
    bootstrap_seed: int = intervals.SEED,
) -> pd.DataFrame:
    """Per task, measure (columns of ``per_run``) and ordered pair of groups (arms, named by
    ``group_label``): ``p_improvement``, P(a run of ``arm`` > a run of ``other``), its 95 % CI
    (``low``, ``high``) and how many runs of each had a value. Both orders of a pair are rows;
    the second is derived from the first, P(Y > X) = 1 - P(X > Y) (ties count half), with the
    same bootstrap resamples, so its CI is [1 - high, 1 - low]."""
    keys, stats = grouped_per_run(runs, curves, None, group_by, auto_group)
    rows = []
    for task, of_task in stats.groupby("task", sort=True):
        arms = [(group_label(dict(zip(keys, values)), keys), group)
                for values, group in sort_groups(of_task, keys).groupby(keys, dropna=False, sort=False)]
        for measure in measures:
            for i, (arm, x) in enumerate(arms):
                for other, y in arms[i + 1:]:
                    p, low, high = intervals.probability_of_improvement(x[measure], y[measure], reps, bootstrap_seed)
                    n_x, n_y = int(x[measure].notna().sum()), int(y[measure].notna().sum())
                    rows.append([task, measure, arm, other, p, low, high, n_x, n_y])
                    rows.append([task, measure, other, arm, 1 - p, 1 - high, 1 - low, n_y, n_x])
    return pd.DataFrame(rows, columns=IMPROVEMENT_COLUMNS)


def _interval(point: float, low: float, high: float, digits: int) -> str:
    return f"{point:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"  # NaN (one run) prints as "nan"


def format_improvement(improvement: pd.DataFrame) -> pd.DataFrame:
    """``improvement_table`` for reading: each pair of arms once, the more likely winner first
    (of a tie, the pair's first order), as "P(X > Y)" and "p [low, high]"; "-" where an arm has no
    run with a value."""
    shown = []
    rows = list(improvement.itertuples(index=False))
    for first, reverse in zip(rows[0::2], rows[1::2]):  # improvement_table's pairs of rows
        row = reverse if first.p_improvement < 0.5 else first  # NaN compares False: the first
        value = "-" if math.isnan(row.p_improvement) else _interval(row.p_improvement, row.low, row.high, 2)
        shown.append({"task": row.task, "measure": "mean return (AUC)" if row.measure == "auc" else row.measure,
                      "comparison": f"P({row.arm} > {row.other})", "P [95 % CI]": value,
                      "runs": f"{row.arm_n} vs {row.other_n}"})
    return pd.DataFrame(shown, columns=["task", "measure", "comparison", "P [95 % CI]", "runs"])


def _mean_std(mean: float, std: float, n: int, runs: int) -> str:
    if n == 0:
        return "-"
    text = f"{mean:.1f} ± {std:.1f}"  # NaN std (one run) prints as "nan"
    return text if n == runs else f"{text} (n={n})"


def format_table(table: pd.DataFrame) -> pd.DataFrame:
    """``seed_table`` for reading: "mean ± std" per measure, then "IQM [low, high]" per measure
    (each with "(n=k)" where fewer runs than the group's have a value), params by their short
    names, never-reached steps as "never"."""
    keys = list(table.columns[: list(table.columns).index("runs")])
    shown = pd.DataFrame({short_name(key): table[key].fillna("-").astype(str) for key in keys})
    shown["runs"] = table["runs"].astype(int)
    shown["seeds"] = table["seeds"]
    measures = [c for c in table.columns if c.startswith("return@") and "_" not in c] + ["auc"]
    measures = [measure for measure in measures if measure in table]
    for measure in measures:
        label = "mean return (AUC)" if measure == "auc" else measure
        shown[label] = [
            _mean_std(m, s, int(n), int(r))
            for m, s, n, r in zip(table[measure], table[f"{measure}_std"], table[f"{measure}_n"], table["runs"])
        ]
    for measure in measures:
        label = "IQM " + ("mean return (AUC)" if measure == "auc" else measure)
        shown[label] = [
            "-" if n == 0 else _interval(q, low, high, 1) + ("" if n == r else f" (n={int(n)})")
            for q, low, high, n, r in zip(table[f"{measure}_iqm"], table[f"{measure}_iqm_low"],
                                          table[f"{measure}_iqm_high"], table[f"{measure}_n"], table["runs"])
        ]
    if "threshold" in table:
        at = f"{table['threshold'].iloc[0]:g}"
        shown[f"first >= {at}"] = table["first_step_per_seed"]
        shown["median first"] = [_step_text(step) for step in table["first_step_median"]]
        shown["stays per seed"] = table["stays_per_seed"]
        shown["stay"] = [f"{s}/{r}" for s, r in zip(table["stays"], table["runs"])]
        shown[f">= {at} for good from"] = table["settled_per_seed"]
        shown["median for good"] = [_step_text(step) for step in table["settled_median"]]
    if "ms_per_env_step" in table:
        shown["ms per env step"] = ["-" if n == 0 else f"{ms:.1f}" + ("" if n == r else f" (n={int(n)})")
                                    for ms, n, r in zip(table["ms_per_env_step"], table["ms_per_env_step_n"], table["runs"])]
    return shown


def to_markdown(shown: pd.DataFrame) -> str:
    """A formatted table (``format_table``) as a GitHub markdown table."""
    def cell(value) -> str:
        return str(value).replace("|", "\\|")

    lines = ["| " + " | ".join(cell(c) for c in shown.columns) + " |", "|" + " --- |" * len(shown.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in shown.itertuples(index=False)]
    return "\n".join(lines) + "\n"
