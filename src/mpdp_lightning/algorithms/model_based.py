"""The world model's arguments, shared by MBPO and MPDP: an agent with the probabilistic ensemble
and the model phase that fits it (algorithms/parts/model_phase.py), and COPlanner's planners when
given one (planners/coplanner.py)."""

from __future__ import annotations

from typing import Any, Optional

from jsonargparse.typing import PositiveFloat, PositiveInt

from mpdp_lightning.algorithms.agent import Agent
from mpdp_lightning.algorithms.parts.model_phase import EnsembleFit
from mpdp_lightning.envs.tasks import get_task
from mpdp_lightning.models.world_model import GaussianEnsemble
from mpdp_lightning.planners.coplanner import COPlanner


class ModelBasedAgent(Agent):
    """An agent with a probabilistic ensemble world model, fitted as the first phase of an update
    when due (see Agent for the actor-critic arguments).

    Args:
        ensemble_size: K, members of the ensemble.
        num_elites: members that sample rollouts, the best K' on holdout after each fit.
        model_hidden: width of the model's hidden layers; None: the task's (200, humanoid 400).
        model_layers: hidden layers of each member.
        model_lr: Adam learning rate of the model.
        model_train_every: env steps between two fits of the model on the whole buffer.
        model_batch_size: rows per member in each model minibatch.
        holdout_ratio: fraction of the buffer held out for early stopping and elite selection.
        max_holdout: cap on the holdout rows.
        model_patience: a fit stops once no member's holdout MSE has improved by 1 % for more
            than this many epochs (MBPO's 5: it stops at the 6th such epoch).
        model_max_epochs: cap on the epochs of one fit; None: none, as MBPO (early stopping ends it).
        normalize_targets: standardise the model's targets as its inputs; False (MBPO's): raw
            targets, so that the early stop and the elites rank members on raw-unit holdout MSE.
        u_covers_reward: the One-vs-Rest model error u covers the reward output as well as the
            next observation; False: the next observation only.
        compile: run the model fit's minibatch loss (and MPDP's imagined step) through
            torch.compile (the same losses and gradients as eager up to rounding, a fraction of
            the kernels; the cold compile is cached on disk for later runs); None: where it pays
            (on CUDA, see execution.compile_pays), and should the compiler fail, warn once and go
            on eagerly (True: stop with the compiler's error).
    """

    def __init__(
        self,
        task: str,
        *args: Any,
        ensemble_size: PositiveInt = 7,
        num_elites: PositiveInt = 5,
        model_hidden: Optional[PositiveInt] = None,
        model_layers: PositiveInt = 4,
        model_lr: PositiveFloat = 1e-3,
        model_train_every: PositiveInt = 250,
        model_batch_size: PositiveInt = 256,
        holdout_ratio: PositiveFloat = 0.2,
        max_holdout: PositiveInt = 5000,
        model_patience: PositiveInt = 5,
        model_max_epochs: Optional[PositiveInt] = None,
        normalize_targets: bool = False,
        u_covers_reward: bool = True,
        compile: Optional[bool] = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(task, *args, **kwargs)
        if not holdout_ratio < 1.0:
            raise ValueError(f"holdout_ratio must be below 1, got {holdout_ratio}")
        spec = get_task(task)
        self.world_model = GaussianEnsemble(
            self.obs_dim, self.act_dim, ensemble_size, num_elites, model_hidden or spec.model_hidden, model_layers,
            "silu", termination_fn=spec.termination_fn, u_covers_reward=u_covers_reward,
            normalize_targets=normalize_targets,
        )
        self.model_phase = EnsembleFit(model_train_every, model_batch_size, holdout_ratio, max_holdout,
                                       model_patience, model_max_epochs)

    def use_coplanner(self, coplanner: COPlanner) -> None:
        """Plan with COPlanner's UP-MPC where it applies (see planners/coplanner.py): the
        training environment's actions (optimistic) and MBPO's model rollouts (conservative)."""
        if coplanner.enabled:
            self.explorer = coplanner.optimistic
            self.rollout_planner = coplanner.conservative


class ModelBasedSAC(ModelBasedAgent):
    """SAC with the world model fitted as a phase but not used by the update: the model's errors
    (model/*) on SAC's own data, at SAC's cost plus the fits (``--model
    mpdp_lightning.algorithms.model_based.ModelBasedSAC``)."""
