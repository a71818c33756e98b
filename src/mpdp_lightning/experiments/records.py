"""A sweep trial's results as a small JSON file meant for git: ``benchmarks/results/<sweep>/<trial>.json``.

A sweep's MLflow store and trial folders stay on the machine that ran it; a record does not. It
holds what the comparison needs (the curves of ``mlflow_runs.FIGURE_METRICS`` and the env-step rate,
one point per env step as ``mlflow_runs.latest_attempt`` keeps them) and the diagnostics that
explain them (``DIAGNOSTIC_METRICS``), the run's resolved config (its
MLflow params), version and commit, wall time and the machine, so that ``compare --records``
reproduces the table over seeds without the store, a sweep re-run on a fresh clone skips the
recorded trials, and anyone can compare their runs with ours (as rliable and openrlbenchmark do).

    python -m mpdp_lightning.experiments.records --sweep NAME [--tracking-uri sqlite:///mlflow.db]
        [--experiment NAME] [--storage runs/sweeps/NAME] [--out benchmarks/results]

(re)writes the records of a sweep's FINISHED runs from an MLflow store, e.g. of runs that
finished before sweeps wrote records themselves.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterable, Optional

from mlflow.entities import Run
from mlflow.tracking import MlflowClient

from mpdp_lightning.errors import MPDPError
from mpdp_lightning.experiments.mlflow_runs import FIGURE_METRICS, latest_attempt, training_runs

SCHEMA = 1
DEFAULT_RESULTS = Path("benchmarks/results")
RATE_METRIC = "time/env_steps_per_second"
# What explains a curve, kept beside it so that a diagnosis needs no MLflow store: what stops MPDP's
# imagined rows and u on each kind of pair (real in-sample, holdout and fresh at each fit; the
# imagined pairs and the threshold at each log point), the critic's estimates and the temperature,
# MBPO's rollout length and model replay, the model's fit (absent curves are left out).
DIAGNOSTIC_METRICS = (
    "train/stop_threshold", "train/stop_terminal", "train/stop_horizon", "train/stopped_at_first_step",
    "train/log_u_threshold", "train/log_u_real_q50", "train/log_u_imagined_q50", "train/log_u_imagined_q90",
    *(f"model/log_u_{kind}_q{q}" for kind in ("insample", "holdout", "fresh") for q in (50, 90)),
    "train/q_mean", "train/q_target", "train/alpha", "train/entropy", "train/episode_return",
    "mbpo/rollout_length", "mbpo/model_buffer_size", "mbpo/model_replay_fits", "model/holdout_mse", "model/epochs",
    "eval/length", "eval/q_start", "eval/discounted_return",
)
RECORD_METRICS = (*FIGURE_METRICS, RATE_METRIC, *DIAGNOSTIC_METRICS)
# Each [env_steps, value] pair of a curve on one line: a curve of 200 points is 200 lines, not 800.
_PAIR = re.compile(r"\[\s+(-?[\d.eE+-]+),\s+(-?[\d.eE+-]+|null)\s+\]")


class RecordError(MPDPError, ValueError):
    """A record that cannot be read or written; the message names the file."""


def record_path(results: str | os.PathLike, sweep: str, trial: str) -> Path:
    return Path(results) / sweep / f"{trial}.json"


def machine(threads: Optional[int] = None) -> dict[str, Any]:
    """The machine that describes itself, without its name: versions, cores, processor, GPU."""
    import torch

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "cpu_count": os.cpu_count(),
        "trial_threads": threads,
        "processor": platform.processor() or None,
        "machine": platform.machine(),
        "system": platform.system(),
    }


def find_trial_run(client: MlflowClient, experiment: str, sweep: str, trial: str) -> Run:
    """The FINISHED training run tagged ``sweep`` and ``trial`` (the latest, should a trial have
    been started afresh)."""
    runs = [run for run in training_runs(client, experiment, sweep=sweep)
            if run.data.tags.get("trial") == trial and run.info.status == "FINISHED"]
    if not runs:
        raise RecordError(f"no FINISHED run of trial {trial} (sweep {sweep}) in experiment {experiment!r} of {client.tracking_uri}")
    return max(runs, key=lambda run: run.info.end_time or 0)


def _number(value: float) -> Optional[float]:
    return value if math.isfinite(value) else None  # JSON has no NaN; null reads back as NaN


def _preset(value: Optional[str]) -> Optional[str]:
    """The run's preset; None for an algorithm without presets (MLflow keeps that param as "None")."""
    return None if value in (None, "", "None") else str(value)


def record_of_run(client: MlflowClient, run: Run, wall_seconds: Optional[float], wall_seconds_from: str,
                  written_by: str, threads: Optional[int] = None) -> dict[str, Any]:
    """The record of a training run of a sweep. ``wall_seconds`` None: from the run's start and
    end time in MLflow."""
    info, tags, params = run.info, run.data.tags, run.data.params
    curves = {}
    for metric in RECORD_METRICS:
        points = latest_attempt(client.get_metric_history(info.run_id, metric))
        if points:
            curves[metric] = [[int(point.step), _number(float(point.value))] for point in points]
    if wall_seconds is None and info.end_time and info.start_time:
        wall_seconds, wall_seconds_from = (info.end_time - info.start_time) / 1000, "the MLflow run's start and end"
    env_steps = max((curve[-1][0] for curve in curves.values()), default=0)
    rates = [value for _, value in curves.get(RATE_METRIC, []) if value is not None]
    seed = tags.get("seed", params.get("seed_everything"))
    return {
        "schema": SCHEMA,
        "written_by": written_by,
        "sweep": tags.get("sweep"),
        "trial": tags.get("trial"),
        "task": tags.get("task", params.get("task")),
        "algo": tags.get("algo"),
        "seed": int(seed) if seed is not None and str(seed).isdigit() else None,
        "preset": _preset(tags.get("preset", params.get("preset"))),
        "status": info.status,
        "run": {"run_id": info.run_id, "run_name": info.run_name, "start_time": info.start_time,
                "end_time": info.end_time},
        "env_steps": env_steps,
        "wall_seconds": round(wall_seconds, 3) if wall_seconds is not None else None,
        "wall_seconds_from": wall_seconds_from,
        "env_steps_per_second": {
            "whole_run": round(env_steps / wall_seconds, 3) if wall_seconds else None,
            "logged_mean": round(sum(rates) / len(rates), 3) if rates else None,
        },
        "version": params.get("mpdp_version"),
        "git_commit": params.get("git_commit"),
        "machine": {**machine(threads), "accelerator": params.get("trainer.accelerator"),
                    "devices": params.get("trainer.devices"), "precision": params.get("trainer.precision")},
        "config": {key: value for key, value in params.items() if key not in MACHINE_PATHS},
        "curves": curves,
    }


# Params that name a place on the machine that ran the trial, not how it trained: left out of
# records, which are committed and read elsewhere.
MACHINE_PATHS = ("trainer.logger.init_args.tracking_uri", "checkpoint.dirpath")


def write_record(record: dict[str, Any], path: str | os.PathLike) -> Path:
    """Pretty-printed with sorted keys (small diffs in git), written to a temporary file and
    renamed, so a reader never sees half a record."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = _PAIR.sub(r"[\1, \2]", json.dumps(record, indent=2, sort_keys=True)) + "\n"
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w") as out:
            out.write(text)
        os.chmod(temporary, 0o644)  # mkstemp's 0600 would keep the record from other users of the checkout
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def write_trial_record(tracking_uri: str, experiment: str, sweep: str, trial: str, path: str | os.PathLike,
                       wall_seconds: float, threads: Optional[int] = None) -> Path:
    """What a sweep trial writes once it has finished: its record, read from its MLflow run."""
    client = MlflowClient(tracking_uri)
    run = find_trial_run(client, experiment, sweep, trial)
    return write_record(record_of_run(client, run, wall_seconds, "the trial's done.json", "sweep", threads), path)


# ---- reading ----------------------------------------------------------------------------------
_FIELDS = {"sweep": str, "trial": str, "task": str, "algo": str, "status": str, "run": dict, "config": dict, "curves": dict}


def read_record(path: str | os.PathLike) -> dict[str, Any]:
    """A record, checked: RecordError naming the file and what is wrong with it."""
    path = Path(path)

    def fail(reason: str) -> RecordError:
        return RecordError(f"record {path}: {reason}")

    try:
        record = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as error:
        raise fail(f"cannot be read ({error})") from None
    except json.JSONDecodeError as error:
        raise fail(f"not valid JSON ({error})") from None
    if not isinstance(record, dict):
        raise fail("not a JSON object")
    if record.get("schema") != SCHEMA:
        raise fail(f"schema {record.get('schema')!r}, this version reads schema {SCHEMA}")
    for name, kind in _FIELDS.items():
        if not isinstance(record.get(name), kind):
            raise fail(f"{name} must be a {kind.__name__}, got {record.get(name)!r}"[:300])
    if not (record["seed"] is None or isinstance(record.get("seed"), int)):
        raise fail(f"seed must be an integer or null, got {record.get('seed')!r}")
    if not all(isinstance(record["run"].get(key), kind) for key, kind in (("run_id", str), ("start_time", int))):
        raise fail("run must hold run_id (text) and start_time (ms)")
    for metric, curve in record["curves"].items():
        if not (isinstance(curve, list) and all(
                isinstance(point, list) and len(point) == 2 and isinstance(point[0], int)
                and (point[1] is None or isinstance(point[1], (int, float))) for point in curve)):
            raise fail(f"curve {metric} must be a list of [env_steps, value] pairs")
    return record


def record_files(folder: str | os.PathLike, sweep: Optional[str] = None) -> list[Path]:
    """The records of ``folder``: its own *.json, else those of its sweep's subfolder (with
    ``sweep``) or of every subfolder (a parent folder such as benchmarks/results)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise RecordError(f"records folder {folder} does not exist")
    own = sorted(folder.glob("*.json"))
    if own:
        return own
    if sweep is not None:
        return sorted((folder / sweep).glob("*.json"))
    return sorted(folder.glob("*/*.json"))


def load_records(folders: Iterable[str | os.PathLike], sweep: Optional[str] = None) -> list[dict[str, Any]]:
    """The records of ``folders`` (see ``record_files``), of ``sweep`` when given; a trial found
    twice counts once, as its later run."""
    found: dict[tuple[str, str], dict[str, Any]] = {}
    for folder in folders:
        for path in record_files(folder, sweep):
            record = read_record(path)
            if sweep is not None and record["sweep"] != sweep:
                continue
            key = (record["sweep"], record["trial"])
            if key not in found or (record["run"].get("end_time") or 0) > (found[key]["run"].get("end_time") or 0):
                found[key] = record
    return list(found.values())


def run_columns(record: dict[str, Any]) -> dict[str, Any]:
    """The columns ``compare`` gives a training run, from its record (the seed as text, as MLflow's tag)."""
    return {
        "run_id": record["run"]["run_id"],
        "run_name": record["run"].get("run_name"),
        "task": record["task"],
        "algo": record["algo"],
        "seed": None if record["seed"] is None else str(record["seed"]),
        "status": record["status"],
    }


def run_row(record: dict[str, Any]) -> dict[str, Any]:
    """The row of ``compare.load_runs``: every param, then the run's columns."""
    return {**record["config"], **run_columns(record), "sweep": record["sweep"], "preset": record.get("preset"),
            "start_time": record["run"]["start_time"], "wall_seconds": record.get("wall_seconds")}


def curve_rows(record: dict[str, Any], metric: str) -> list[dict[str, Any]]:
    """The rows of ``compare.load_curves`` for ``metric``."""
    columns = run_columns(record)
    return [{**columns, "env_steps": step, "value": math.nan if value is None else float(value)}
            for step, value in record["curves"].get(metric, [])]


# ---- the command --------------------------------------------------------------------------------
def _done_seconds(storage: Optional[Path], trial: str) -> Optional[float]:
    done = storage / trial / "done.json" if storage is not None else None
    if done is None or not done.is_file():
        return None
    try:
        return float(json.loads(done.read_text())["seconds"])
    except (ValueError, KeyError, TypeError):
        raise RecordError(f"{done} holds no seconds") from None


def write_sweep_records(tracking_uri: str, experiment: str, sweep: str, out: str | os.PathLike,
                        storage: Optional[str | os.PathLike] = None) -> list[Path]:
    """Write the record of every FINISHED training run of ``sweep`` into ``out/<sweep>/``; the
    wall time from ``<storage>/<trial>/done.json`` where there is one."""
    client = MlflowClient(tracking_uri)
    runs = [run for run in training_runs(client, experiment, sweep=sweep)
            if run.info.status == "FINISHED" and run.data.tags.get("trial")]
    if not runs:
        raise RecordError(f"no FINISHED runs of sweep {sweep!r} with a trial tag in experiment {experiment!r} of {tracking_uri}")
    latest: dict[str, Run] = {}
    for run in runs:  # a trial started afresh has two runs: the later one stands
        trial = run.data.tags["trial"]
        if trial not in latest or (run.info.end_time or 0) > (latest[trial].info.end_time or 0):
            latest[trial] = run
    storage = Path(storage) if storage is not None else None
    records = []
    for trial, run in sorted(latest.items()):
        seconds = _done_seconds(storage, trial)
        records.append((trial, record_of_run(client, run, seconds, "the trial's done.json", "records command")))
    return [write_record(record, record_path(out, sweep, trial)) for trial, record in records]


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m mpdp_lightning.experiments.records",
                                     description="(Re)write the records of a sweep's finished runs from an MLflow store.")
    parser.add_argument("--sweep", required=True, metavar="NAME", help="the runs tagged sweep=NAME")
    parser.add_argument("--tracking-uri", default="sqlite:///mlflow.db")
    parser.add_argument("--experiment", default=None, help="the MLflow experiment (default: the sweep's name, as sweeps log)")
    parser.add_argument("--storage", default=None, metavar="DIR",
                        help="the sweep's folder (runs/sweeps/NAME): wall time from each trial's done.json; "
                        "without it, from the MLflow run's start and end")
    parser.add_argument("--out", default=str(DEFAULT_RESULTS), metavar="DIR", help="records go to DIR/NAME/<trial>.json")
    args = parser.parse_args(argv)
    try:
        if args.tracking_uri.startswith("sqlite:///") and not Path(args.tracking_uri[len("sqlite:///"):]).is_file():
            raise RecordError(f"no MLflow store at {args.tracking_uri}")  # MLflow would create an empty one
        if args.storage is not None and not Path(args.storage).is_dir():
            raise RecordError(f"--storage {args.storage} is not a folder")
        from mpdp_lightning.preflight import check_writable_folder

        check_writable_folder(Path(args.out) / args.sweep, "the records folder")
        written = write_sweep_records(args.tracking_uri, args.experiment or args.sweep, args.sweep, args.out, args.storage)
    except (MPDPError, ValueError) as error:
        print(f"error: {' '.join(str(error).split())}", file=sys.stderr)
        raise SystemExit(2) from None
    print(f"wrote {len(written)} records into {Path(args.out) / args.sweep}")


if __name__ == "__main__":
    main()
