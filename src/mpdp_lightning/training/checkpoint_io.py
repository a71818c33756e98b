"""Reading a checkpoint's header before any work: is it there, readable, and from this task?"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from mpdp_lightning.errors import CheckpointError


@dataclass(frozen=True)
class CheckpointHeader:
    env_steps: int
    updates: int
    task: str
    mlflow_run_id: Optional[str]
    hyper_parameters: dict
    class_path: Optional[str]  # the LightningModule that wrote it (LightningCLI records it), if known


def upgrade_hyperparameters(hparams: dict) -> dict:
    """A checkpoint's model hyperparameters as this version reads them, so that runs saved before
    MBPO followed its published code (issue 19) resume with the settings they were trained with:
    ``rollouts_per_env_step`` (per env step since the last fit) becomes ``rollout_batch_size``
    (per fit), its schedule keeps epochs of 1000 env steps, and a world model trained on
    normalised targets keeps them."""
    upgraded = dict(hparams)
    if "rollouts_per_env_step" in upgraded:
        per_env_step = upgraded.pop("rollouts_per_env_step")
        upgraded.setdefault("rollout_batch_size", int(per_env_step) * int(upgraded.get("model_train_every") or 250))
        upgraded.setdefault("epoch_length", 1000)
    if "ensemble_size" in upgraded and "normalize_targets" not in upgraded:
        upgraded["normalize_targets"] = True
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
    if expected_task is not None and task != expected_task:
        raise CheckpointError(f"checkpoint {path} is for task {task!r}, not {expected_task!r}")
    return CheckpointHeader(
        int(counters["env_steps"]), int(counters["updates"]), task, checkpoint.get("mlflow_run_id"),
        upgrade_hyperparameters(checkpoint["hyper_parameters"]), checkpoint["hyper_parameters"].get("_class_path"),
    )
