"""The model phase of an update: the probabilistic ensemble fitted on every stored transition,
first at the first update, then every ``train_every`` env steps (MBPO's and MPDP's)."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Optional

import torch
from tensordict import TensorDictBase

from mpdp_lightning.algorithms.parts.agent_view import AgentView
from mpdp_lightning.errors import MPDPError
from mpdp_lightning.models.world_model import FitReport, fit_ensemble
from mpdp_lightning.training.clock import passed_multiple
from mpdp_lightning.training.metrics import log_metrics


@dataclass
class EnsembleFit:
    """When and how the world model is fitted (the arguments are ModelBasedAgent's ``model_*``)."""

    train_every: int
    batch_size: int
    holdout_ratio: float
    max_holdout: int
    patience: int
    max_epochs: Optional[int]
    trained_at: Optional[int] = None  # env step of the last fit
    fits: int = 0

    def due(self, env_steps: int) -> bool:
        """First at the first update, then at multiples of ``train_every`` env steps."""
        return self.trained_at is None or passed_multiple(self.trained_at, env_steps, self.train_every)

    def fit_world_model(self, agent: AgentView) -> dict[str, float]:
        """Fit the ensemble on every stored transition with the "model" optimizer; log model/*."""
        start = time.perf_counter()
        if agent.seed_axis is not None:
            raise MPDPError("a group of seeds cannot fit its world models yet (each seed stops early and picks "
                            "its elites on the host); run model-based seeds one per process")
        datamodule = agent.trainer.datamodule
        metrics: dict[str, float] = {}
        if self.trained_at is not None:  # Fig. 3: error on transitions the model has not seen
            metrics["model/error_l2"] = prediction_error(agent, datamodule.latest(agent.env_steps - self.trained_at))
        data = datamodule.contents()
        inputs = torch.cat([data["obs"], data["action"]], dim=-1)
        targets = torch.cat([data["next_obs"] - data["obs"], data["reward"].unsqueeze(-1)], dim=-1)

        def fit(compiled: bool) -> FitReport:
            return fit_ensemble(
                agent.world_model, inputs, targets, step=lambda loss: agent.optimize("model", loss, record=False),
                batch_size=self.batch_size, holdout_ratio=self.holdout_ratio, max_holdout=self.max_holdout,
                max_epochs=self.max_epochs, patience=self.patience, compiled=compiled,
            )

        # a fit redone eagerly after a failed compile starts from where the failed one left the weights
        report = agent.plan.run_compiled("the model fit's minibatch loss", fit)
        agent.record_phase("model", torch.tensor(report.holdout_nll, device=agent.device))
        if not math.isfinite(report.holdout_nll):
            agent.raise_if_not_finite()
        self.trained_at = agent.env_steps
        self.fits += 1
        metrics.update({
            "model/holdout_mse": report.holdout_mse,
            "model/holdout_nll": report.holdout_nll,
            "model/epochs": float(report.epochs),
            "model/elites": float(len(report.elites)),
            "model/u_mean": report.u_mean,
            "model/mean_spread": report.mean_spread,
            "time/model_fit_seconds": time.perf_counter() - start,
        })
        log_metrics(agent.trainer, metrics, step=agent.env_steps)
        return metrics

    def counters(self) -> dict[str, Any]:
        return {"model_trained_at": self.trained_at, "model_fits": self.fits}

    def load_counters(self, counters: dict[str, Any]) -> None:
        self.trained_at = counters.get("model_trained_at")
        self.fits = int(counters.get("model_fits", 0))


@torch.no_grad()
def prediction_error(agent: AgentView, transitions: TensorDictBase) -> float:
    """Mean L2 distance between the elites' mean predicted next observation and the real one."""
    predicted, _ = agent.world_model.predict_mean(transitions["obs"], transitions["action"])
    return (predicted - transitions["next_obs"]).norm(dim=-1).mean().item()
