"""What a run records in MLflow beside its metrics, so that it can be reproduced from MLflow alone:
the resolved config as params and as a config.yaml artifact, the package version and git commit."""

from __future__ import annotations

import subprocess
import warnings
from pathlib import Path
from typing import Any, Mapping

import lightning.pytorch as pl
from lightning.pytorch.loggers import MLFlowLogger

import mpdp_lightning
from mpdp_lightning.training.seed_runs import parse_seeds, seed_position

MLFLOW_PARAM_LIMIT = 6000  # characters of one param value in MLflow
# How a run was started or continued, not how it trains: differ between a run and its resumption.
NOT_PARAMS = ("config", "ckpt_path", "trainer.logger.init_args.run_id")


def git_commit() -> str:
    """The commit of the source tree (with ``-dirty`` when it has uncommitted changes), or ``unknown``."""
    where = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=where,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("-dirty" if dirty else "")


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config -> {"model.init_args.gamma": "0.99", ...} (lists and None as text)."""
    flat: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = str(value)[:MLFLOW_PARAM_LIMIT]
    return flat


def algo_name(config: Mapping[str, Any]) -> str:
    """The algorithm a run is compared as: the module's class, ``+COPlanner`` with the plug-in on."""
    name = str((config.get("model") or {}).get("class_path", "?")).rsplit(".", 1)[-1]
    return name + ("+COPlanner" if (config.get("coplanner") or {}).get("enabled") else "")


def log_run_config(trainer: pl.Trainer, parser: Any, config: Any, resumed: bool,
                   extra: Mapping[str, str] = {}) -> None:
    """Log the resolved ``config`` to every MLflow logger of ``trainer``, with ``extra`` params
    beside it (the execution plan's ``plan.*``, the algorithm's defaults as ``resolved.*``).

    A resumed run keeps its params: new keys are added, and a value that differs from the
    original (MLflow params are immutable) is recorded as a ``resume_override.<key>`` tag.
    """
    loggers = [lg for lg in trainer.loggers if isinstance(lg, MLFlowLogger)]
    if not loggers:
        return
    as_dict = config.as_dict() if hasattr(config, "as_dict") else dict(config)
    params = {k: v for k, v in flatten(as_dict).items() if not k.startswith(NOT_PARAMS)}
    params["mpdp_version"] = mpdp_lightning.__version__
    params["git_commit"] = git_commit()
    params.update(extra)
    yaml_text = parser.dump(config, skip_none=False)
    seeds = parse_seeds(as_dict.get("seeds"))
    group = _group_name(loggers, seeds)
    for logger in loggers:
        client, run_id = logger.experiment, logger.run_id
        existing = client.get_run(run_id).data.params if resumed else {}
        new = {k: v for k, v in params.items() if k not in existing}
        for key, value in params.items():
            if key in existing and existing[key] != value:
                if key.startswith("model.") and existing[key] == "None":
                    # left to the algorithm at the start (MBPO's task settings) and resolved into the
                    # checkpoint's hyperparameters, which a resume takes: the same setting, now named
                    if f"resolved.{key}" not in existing:
                        new[f"resolved.{key}"] = value
                    continue
                client.set_tag(run_id, f"resume_override.{key}", value[:5000])
                warnings.warn(f"resumed with {key}={value} (was {existing[key]}); kept as a tag", stacklevel=2)
        if new:
            logger.log_hyperparams(new)
        client.set_tag(run_id, "task", str(as_dict.get("task")))
        position = seed_position(logger)
        client.set_tag(run_id, "seed", str(as_dict.get("seed_everything") if position is None else seeds[position]))
        if group is not None:  # a group's runs: compared as seeds, found together by this tag
            client.set_tag(run_id, "group", group)
            client.set_tag(run_id, "group_seeds", ",".join(map(str, seeds)))
        if as_dict.get("preset"):
            client.set_tag(run_id, "preset", str(as_dict["preset"]))
        client.set_tag(run_id, "algo", algo_name(as_dict))
        client.log_text(run_id, yaml_text, "config_resumed.yaml" if resumed else "config.yaml")


def _group_name(loggers: list, seeds: Any) -> Any:
    """A group's name: the MLflow run id of its first seed's run (stable when it is resumed)."""
    if seeds is None:
        return None
    first = [lg for lg in loggers if seed_position(lg) == 0]
    return first[0].run_id if first else None


def set_run_tag(trainer: pl.Trainer, key: str, value: str) -> None:
    """Tag every MLflow run of ``trainer`` (what happened during the run, which its params, logged
    at the start and immutable, cannot say)."""
    for logger in trainer.loggers:
        if isinstance(logger, MLFlowLogger):
            logger.experiment.set_tag(logger.run_id, key, value[:5000])
