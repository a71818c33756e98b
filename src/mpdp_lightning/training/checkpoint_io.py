"""Reading a checkpoint's header before any work (is it there, readable, from this task and a
layout this version reads?), and the mapping of older layouts onto this one."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from mpdp_lightning.errors import CheckpointError

# The layout of what the agent saves (``checkpoint["format"]``): 1 (no key) before the composed
# agent, where MPDP's anchored threshold and horizon history sat on the module itself; 2 with the
# parts (``h_step.threshold_anchor``, the history among the counters); 3 with the held threshold
# shared by the holdout and anchored rules (``h_step.held_threshold``).
CHECKPOINT_FORMAT = 3

# state_dict keys of an older format -> this one's
RENAMED_KEYS = {
    1: {"threshold_anchor": "h_step.held_threshold"},
    2: {"h_step.threshold_anchor": "h_step.held_threshold"},
}


def upgrade_checkpoint(checkpoint: dict) -> dict:
    """``checkpoint`` (in place) in this version's layout: an older format's keys renamed
    (``RENAMED_KEYS``) and, from format 1, MPDP's horizon history moved among the counters and,
    from before the anchored rule existed, its held threshold unset (NaN). Its hyperparameters
    are not touched: a run resumes with the threshold rule it was trained with (the CLI takes
    them over the config's). A later format than this version reads is one error line naming
    the version that wrote it."""
    check_format(checkpoint, "the checkpoint")
    written = checkpoint.get("format", 1)
    if written < CHECKPOINT_FORMAT:
        state = checkpoint["state_dict"]
        for old, new in RENAMED_KEYS.get(written, {}).items():
            if old in state:
                state[new] = state.pop(old)
        if written == 1 and "horizon" in checkpoint.get("hyper_parameters", {}):  # MPDP's
            state.setdefault("h_step.held_threshold", torch.tensor(float("nan")))
            checkpoint["counters"].setdefault("horizon_history", checkpoint.pop("horizon_history", {}))
        checkpoint["format"] = CHECKPOINT_FORMAT
    return checkpoint


def check_format(checkpoint: dict, name: str) -> None:
    written = checkpoint.get("format", 1)
    if not isinstance(written, int) or written > CHECKPOINT_FORMAT:
        version = checkpoint.get("mpdp_version", "a later version")
        raise CheckpointError(f"{name} was written by mpdp-lightning {version} in checkpoint format {written}; this "
                              f"version reads formats 1 to {CHECKPOINT_FORMAT}: resume it with the version that wrote it")


@dataclass(frozen=True)
class CheckpointHeader:
    env_steps: int
    updates: int
    task: str
    mlflow_run_id: Optional[str]
    hyper_parameters: dict
    class_path: Optional[str]  # the LightningModule that wrote it (LightningCLI records it), if known
    seeds: Optional[tuple[int, ...]] = None  # a group's seeds (``--seeds``); None: a run of one seed
    mlflow_run_ids: Optional[list] = None  # a group's MLflow run per seed, in the group's order


def upgrade_hyperparameters(hparams: dict) -> dict:
    """A checkpoint's model hyperparameters as this version reads them, so that runs saved before
    MBPO followed its published code (issue 19) resume with the settings they were trained with:
    ``rollouts_per_env_step`` (per env step since the last fit) becomes ``rollout_batch_size``
    (per fit), its schedule keeps epochs of 1000 env steps, and a world model trained on
    normalised targets keeps them; an MPDP run saved without a threshold rule keeps the quantile
    rule, the default before the holdout rule."""
    upgraded = dict(hparams)
    if "rollouts_per_env_step" in upgraded:
        per_env_step = upgraded.pop("rollouts_per_env_step")
        upgraded.setdefault("rollout_batch_size", int(per_env_step) * int(upgraded.get("model_train_every") or 250))
        upgraded.setdefault("epoch_length", 1000)
    if "ensemble_size" in upgraded and "normalize_targets" not in upgraded:
        upgraded["normalize_targets"] = True
    if "horizon" in upgraded and "threshold" not in upgraded:  # MPDP's, from before the holdout rule's default
        upgraded["threshold"] = "quantile"
    return upgraded


def read_checkpoint_header(path: str | Path, expected_task: Optional[str] = None) -> CheckpointHeader:
    """Open ``path`` (memory-mapped: cheap even with a large replay buffer inside) and check it."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        checkpoint = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as error:  # torch raises many kinds for a truncated or foreign file
        raise CheckpointError(f"checkpoint {path} is not readable ({type(error).__name__}: {' '.join(str(error).split())[:200]})") from None
    try:
        counters, task = checkpoint["counters"], checkpoint["hyper_parameters"]["task"]
    except (KeyError, TypeError):
        raise CheckpointError(f"{path} is not an mpdp-lightning checkpoint (no counters or task)") from None
    check_format(checkpoint, f"checkpoint {path}")
    if expected_task is not None and task != expected_task:
        raise CheckpointError(f"checkpoint {path} is for task {task!r}, not {expected_task!r}")
    return CheckpointHeader(
        int(counters["env_steps"]), int(counters["updates"]), task, checkpoint.get("mlflow_run_id"),
        upgrade_hyperparameters(checkpoint["hyper_parameters"]), checkpoint["hyper_parameters"].get("_class_path"),
        tuple(int(s) for s in checkpoint["seeds"]) if checkpoint.get("seeds") is not None else None,
        checkpoint.get("mlflow_run_ids"),
    )
