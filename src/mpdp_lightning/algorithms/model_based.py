"""SAC with a learned world model: the probabilistic ensemble trained as a phase of the module.

Every ``model_train_every`` env steps the ensemble is fitted on the whole replay buffer with its
own optimizer (manual optimization, like the other phases), before that update's critic and
actor steps. The policy improvement is still SAC's here; MPDP overrides it with the H-step
improvement through this model, and the MBPO baseline uses the same model for rollouts.
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable, Optional, TypeVar, Union

import torch
from jsonargparse.typing import PositiveFloat, PositiveInt
from lightning.pytorch.utilities import rank_zero_warn
from tensordict import TensorDictBase

from mpdp_lightning.errors import MPDPError
from mpdp_lightning.training.clock import passed_multiple
from mpdp_lightning.training.data import PendingBatch
from mpdp_lightning.training.metrics import log_metrics
from mpdp_lightning.algorithms.sac import SAC
from mpdp_lightning.envs.tasks import get_task
from mpdp_lightning.models.world_model import FitReport, GaussianEnsemble, fit_ensemble
from mpdp_lightning.planners.up_mpc import UPMPC


def compile_pays(device: torch.device) -> bool:
    """Whether ``--model.compile`` defaults to on for ``device``: on CUDA, where the model fit's
    minibatches and MPDP's imagined steps are bound by kernel launches. Not on the CPU, where they
    are bound by the matmuls: with rows compacted, compiling MPDP's step gained 0-6 % (quick
    shapes) and lost 10 % (paper shapes) in `make bench` on one thread, for a cold compile of
    5-16 s per process."""
    return device.type == "cuda"


def is_compile_error(error: BaseException) -> bool:
    """Whether ``error`` is torch.compile's (Dynamo's or Inductor's), not the code's it compiles."""
    return isinstance(error, torch._dynamo.exc.TorchDynamoException) or type(error).__module__.startswith(
        ("torch._dynamo", "torch._inductor")
    )


def capturing() -> bool:
    """Whether a CUDA graph is being captured on the current stream."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


T = TypeVar("T")


class ModelBasedSAC(SAC):
    """SAC plus a probabilistic ensemble world model (see SAC for the actor-critic arguments).

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
            (see ``compile_pays``), and should the compiler fail, warn once and go on eagerly
            (True: stop with the compiler's error).
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
            self.obs_dim,
            self.act_dim,
            ensemble_size,
            num_elites,
            model_hidden or spec.model_hidden,
            model_layers,
            "silu",
            termination_fn=spec.termination_fn,
            u_covers_reward=u_covers_reward,
            normalize_targets=normalize_targets,
        )
        self.model_trained_at: Optional[int] = None  # env step of the last fit
        self._compiles: Optional[bool] = None  # decided at the first update (see compiles)
        self.model_fits = 0
        # COPlanner's UP-MPC, when the COPlanner callback plugs it in: conservative for model
        # rollouts (MBPO), optimistic for the training environment's actions
        self.rollout_planner: Optional[UPMPC] = None
        self.exploration_planner: Optional[UPMPC] = None

    def optimizer_groups(self) -> dict[str, tuple[list[torch.nn.Parameter], float]]:
        groups = super().optimizer_groups()
        groups["model"] = (list(self.world_model.parameters()), self.hparams.model_lr)
        return groups

    # ---- compiled parts ----------------------------------------------------------------------
    def compiles(self, device: torch.device) -> bool:
        """Whether the compiled parts run compiled on ``device``: ``--model.compile``, or where it is
        None, where it pays; decided once, and turned off for good by a failed compile."""
        if self._compiles is None:
            wanted = self.hparams.get("compile")
            self._compiles = bool(wanted) if wanted is not None else compile_pays(device)
        return self._compiles

    def run_compiled(self, device: torch.device, what: str, run: Callable[[bool], T]) -> T:
        """``run(compiled)``, compiled where ``compiles(device)``. Should torch.compile fail on
        ``what`` with ``--model.compile`` left to its default, warn once and redo it, and every
        compiled part from now on, eagerly (a compiler that fails, say on an unsupported construct
        in another torch, costs a warning, never the run); with ``--model.compile true``, stop with
        a one-line error. While a CUDA graph is being captured the error is left to the capture,
        whose own fallback applies."""
        compiled = self.compiles(device)
        try:
            return run(compiled)
        except Exception as error:
            if not (compiled and is_compile_error(error)) or capturing():
                raise
            self.compile_failed(error, what)
            return run(False)

    def compile_failed(self, error: BaseException, what: str) -> None:
        why = f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0][:300]}"
        if self.hparams.get("compile"):
            raise MPDPError(f"model.compile true: {what} could not be compiled ({why})") from error
        self._compiles = False
        rank_zero_warn(f"{what} could not be compiled ({why}); running it and every compiled part eagerly from "
                       f"now on (--model.compile false skips the attempt, true makes it an error)")

    # ---- the model phase ---------------------------------------------------------------------
    def model_is_due(self) -> bool:
        # first on the first update, then at multiples of model_train_every env steps
        return self.model_trained_at is None or passed_multiple(
            self.model_trained_at, self.env_steps, self.hparams.model_train_every
        )

    def train_world_model(self) -> dict[str, float]:
        """Fit the ensemble on every stored transition; log model/* against env steps."""
        start = time.perf_counter()
        datamodule = self.trainer.datamodule
        metrics: dict[str, float] = {}
        if self.model_trained_at is not None:  # Fig. 3: error on transitions the model has not seen
            newest = datamodule.latest(self.env_steps - self.model_trained_at)
            metrics["model/error_l2"] = self.prediction_error(newest)
        data = datamodule.contents()
        inputs = torch.cat([data["obs"], data["action"]], dim=-1)
        targets = torch.cat([data["next_obs"] - data["obs"], data["reward"].unsqueeze(-1)], dim=-1)
        hp = self.hparams
        model_optimizer = self.optimizer("model")

        def fit(compiled: bool) -> FitReport:
            return fit_ensemble(
                self.world_model,
                inputs,
                targets,
                step=lambda loss: self._step(model_optimizer, loss),
                batch_size=hp.model_batch_size,
                holdout_ratio=hp.holdout_ratio,
                max_holdout=hp.max_holdout,
                max_epochs=hp.model_max_epochs,
                patience=hp.model_patience,
                compiled=compiled,
            )

        # a fit redone eagerly after a failed compile starts from where the failed one left the weights
        report = self.run_compiled(inputs.device, "the model fit's minibatch loss", fit)
        self.check_phase("model", torch.tensor(report.holdout_nll, device=self.device), model_optimizer)
        if not math.isfinite(report.holdout_nll):
            self.raise_if_not_finite()
        self.model_trained_at = self.env_steps
        self.model_fits += 1
        metrics.update(
            {
                "model/holdout_mse": report.holdout_mse,
                "model/holdout_nll": report.holdout_nll,
                "model/epochs": float(report.epochs),
                "model/elites": float(len(report.elites)),
                "model/u_mean": report.u_mean,
                "model/mean_spread": report.mean_spread,
                "time/model_fit_seconds": time.perf_counter() - start,
            }
        )
        log_metrics(self.trainer, metrics, step=self.env_steps)
        return metrics

    def explore(self, obs: torch.Tensor) -> torch.Tensor:
        """With an exploration planner and a fitted model, UP-MPC's optimistic choice; the
        uncertainty of the chosen and the candidate actions goes into the train metrics."""
        if self.exploration_planner is None or self.model_trained_at is None:
            return super().explore(obs)
        plan = self.exploration_planner.plan(self.world_model, self.planning_action, obs)
        self.train_metrics.add({
            "coplanner/explore_u_chosen": plan.chosen_uncertainty.mean(),
            "coplanner/explore_u_candidates": plan.candidate_uncertainty.mean(),
        })
        return plan.action

    @torch.no_grad()
    def prediction_error(self, transitions: TensorDictBase) -> float:
        """Mean L2 distance between the elites' mean predicted next observation and the real one."""
        predicted, _ = self.world_model.predict_mean(transitions["obs"], transitions["action"])
        return (predicted - transitions["next_obs"]).norm(dim=-1).mean().item()

    def training_step(self, batch: Union[PendingBatch, TensorDictBase], batch_idx: int) -> None:
        # the paper's order: this update's env step is collected (callback), the model is fitted
        # on it, then the batch is drawn (SAC.training_step)
        if self.model_is_due():
            with self.timer.phase("model"):
                self.train_world_model()
        super().training_step(batch, batch_idx)

    # ---- checkpoint ----------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["counters"].update(model_trained_at=self.model_trained_at, model_fits=self.model_fits)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        self.model_trained_at = checkpoint["counters"].get("model_trained_at")
        self.model_fits = int(checkpoint["counters"].get("model_fits", 0))
