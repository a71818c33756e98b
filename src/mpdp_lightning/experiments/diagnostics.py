"""The diagnostics of a sweep's trial records as one table: per arm (the params that differ
within the sweep) and env-step window, the mean over the window of each diagnostic curve
(``records.DIAGNOSTIC_METRICS`` and the figures'), then mean ± std over the arm's seeds. What
``make compare`` is to the return, this is to what explains it: u on each kind of pair and what
stopped MPDP's imagined rows, or MBPO's critics against the returns they predicted.

    python -m mpdp_lightning.experiments.diagnostics --records benchmarks/results --sweep NAME
        [--windows 5000,10000,20000,30000] [--metric train/horizon_mean ...] [--out table.md]

A window (a, b] holds the points logged at env steps above a and up to b; a seed with no point in
it counts for no mean there.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

from mpdp_lightning.errors import MPDPError
from mpdp_lightning.experiments.records import DIAGNOSTIC_METRICS, load_records

# the default rows: u on each kind of pair beside u_T, what ended MPDP's rows, the horizon
DEFAULT_METRICS = (
    "model/log_u_insample_q50", "model/log_u_holdout_q50", "model/log_u_fresh_q50", "train/log_u_real_q50",
    "train/log_u_imagined_q50", "model/log_u_insample_q90", "model/log_u_holdout_q90", "model/log_u_fresh_q90",
    "train/log_u_imagined_q90", "train/log_u_threshold", "train/stop_threshold", "train/stop_terminal",
    "train/stop_horizon", "train/horizon_mean", "eval/return",
)
KNOWN_METRICS = set(DIAGNOSTIC_METRICS) | set(DEFAULT_METRICS)


def arm_of(record: dict[str, Any], varied: Sequence[str]) -> str:
    """An arm's name: its algorithm and the values of the params that differ within the sweep."""
    values = [f"{name.rsplit('.', 1)[-1]}={record['config'].get(name)}" for name in varied]
    return " ".join([record["algo"], *values])


def varied_params(records: Sequence[dict[str, Any]]) -> list[str]:
    """Params with more than one value among the records, but for the per-trial ones (seed, names)."""
    per_trial = ("seed", "run_name", "tags", "dirpath", "experiment_name", "run_id")
    names = sorted({name for record in records for name in record["config"]})
    return [name for name in names if not any(part in name for part in per_trial)
            and len({str(record["config"].get(name)) for record in records}) > 1]


def window_mean(curve: list[list[Any]], low: int, high: int) -> Optional[float]:
    values = [value for step, value in curve if low < step <= high and value is not None and math.isfinite(value)]
    return statistics.fmean(values) if values else None


def diagnostics_table(records: Sequence[dict[str, Any]], windows: Sequence[int], metrics: Sequence[str]) -> str:
    """The table as markdown: a row per metric and arm, a column per window."""
    varied = varied_params(records)
    arms: dict[str, list[dict[str, Any]]] = {}
    for record in sorted(records, key=lambda r: (arm_of(r, varied), r["seed"] if r["seed"] is not None else -1)):
        arms.setdefault(arm_of(record, varied), []).append(record)
    bounds = list(zip(windows, windows[1:]))
    header = ["metric", "arm", "seeds", *(f"{low // 1000}-{high // 1000}k" for low, high in bounds)]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for metric in metrics:
        for arm, members in arms.items():
            cells = []
            for low, high in bounds:
                means = [m for m in (window_mean(r["curves"].get(metric, []), low, high) for r in members) if m is not None]
                if not means:
                    cells.append("")
                elif len(means) == 1:
                    cells.append(f"{means[0]:.2f}")
                else:
                    cells.append(f"{statistics.fmean(means):.2f} ± {statistics.stdev(means):.2f}")
            if any(cells):
                seeds = ",".join(str(r["seed"]) for r in members)
                lines.append(f"| {metric} | {arm} | {seeds} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m mpdp_lightning.experiments.diagnostics",
                                     description="A sweep's diagnostic curves per arm and env-step window, from its trial records.")
    parser.add_argument("--records", required=True, metavar="DIR", help="a folder of records, or a parent such as benchmarks/results")
    parser.add_argument("--sweep", default=None, metavar="NAME", help="only the records of sweep NAME")
    parser.add_argument("--windows", default="5000,10000,20000,30000", metavar="STEPS",
                        help="the windows' edges in env steps, increasing (default 5000,10000,20000,30000)")
    parser.add_argument("--metric", action="append", metavar="NAME",
                        help="a curve to tabulate (repeatable; default: u per kind of pair, the stop reasons, the horizon, the return)")
    parser.add_argument("--out", default=None, metavar="FILE", help="also write the table to FILE")
    args = parser.parse_args(argv)
    try:
        try:
            windows = [int(edge) for edge in args.windows.split(",")]
        except ValueError:
            raise MPDPError(f"--windows: env steps separated by commas, got {args.windows!r}") from None
        if len(windows) < 2 or windows != sorted(set(windows)):
            raise MPDPError(f"--windows: at least two increasing env steps, got {args.windows!r}")
        metrics = args.metric or list(DEFAULT_METRICS)
        unknown = [m for m in metrics if m not in KNOWN_METRICS]
        if unknown:
            raise MPDPError(f"--metric: records keep no curve {', '.join(unknown)}; known: {', '.join(sorted(KNOWN_METRICS))}")
        records = load_records([args.records], args.sweep)
        if not records:
            raise MPDPError(f"no records{f' of sweep {args.sweep!r}' if args.sweep else ''} in {args.records}")
    except MPDPError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    table = diagnostics_table(records, windows, metrics)
    print(table)
    if args.out:
        Path(args.out).write_text(table + "\n")


if __name__ == "__main__":
    main()
