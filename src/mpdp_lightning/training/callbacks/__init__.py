"""Callbacks that drive a run on the env-step clock, and COPlanner's plug-in."""

from mpdp_lightning.training.callbacks.checkpointing import EnvStepCheckpoint
from mpdp_lightning.training.callbacks.coplanner import COPlanner
from mpdp_lightning.training.callbacks.env_interaction import EnvInteraction
from mpdp_lightning.training.callbacks.evaluation import Evaluation
from mpdp_lightning.training.callbacks.progress import EnvStepProgressBar
from mpdp_lightning.training.callbacks.video import EvaluationVideo

__all__ = ["COPlanner", "EnvInteraction", "Evaluation", "EnvStepCheckpoint", "EnvStepProgressBar", "EvaluationVideo"]
