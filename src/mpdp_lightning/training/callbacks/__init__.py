"""Callbacks that drive a run on the env-step clock."""

from mpdp_lightning.training.callbacks.checkpointing import EnvStepCheckpoint
from mpdp_lightning.training.callbacks.env_interaction import EnvInteraction
from mpdp_lightning.training.callbacks.evaluation import Evaluation
from mpdp_lightning.training.callbacks.progress import EnvStepProgressBar
from mpdp_lightning.training.callbacks.video import EvaluationVideo

__all__ = ["EnvInteraction", "Evaluation", "EnvStepCheckpoint", "EnvStepProgressBar", "EvaluationVideo"]
