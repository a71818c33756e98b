"""The model phase of an update: the probabilistic ensemble fitted on every stored transition,
first at the first update, then every ``train_every`` env steps (MBPO's and MPDP's).

Each fit also measures the One-vs-Rest error u on three kinds of real pairs (``pair_u``), logged
as the logs of u's quantiles (``model/log_u_<kind>_q10/q50/q90``): ``insample``, rows the
ensemble was just fitted on (as many as the holdout); ``holdout``, this fit's held-out rows,
which this fit did not train on (but earlier fits, whose weights it starts from, mostly did);
``fresh``, the transitions stored since the last fit, under the model before this fit, which no
fit had seen. MPDP's out-of-sample thresholds are a quantile of one of these
(algorithms/parts/improvement.py), and its improvement logs u on the imagined pairs beside them
(``train/log_u_imagined_*``)."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from tensordict import TensorDictBase

from mpdp_lightning.algorithms.parts.agent_view import AgentView
from mpdp_lightning.models.world_model import FitReport, GaussianEnsemble, fit_ensemble
from mpdp_lightning.objectives.h_step_improvement import full_fp32_matmuls, quantiles
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
    # u on the last fit's pairs of each kind (PAIR_KINDS), by seed position (None alone); not
    # saved: what is derived from it (MPDP's held threshold) is
    pair_u: dict[Optional[int], dict[str, torch.Tensor]] = field(default_factory=dict)

    def due(self, env_steps: int) -> bool:
        """First at the first update, then at multiples of ``train_every`` env steps."""
        return self.trained_at is None or passed_multiple(self.trained_at, env_steps, self.train_every)

    def fit_world_model(self, agent: AgentView) -> dict[str, Any]:
        """Fit the ensemble on every stored transition with the "model" optimizer; log model/*.
        In a group of seeds, each seed's model on its own transitions, one seed after another
        (``fit_each_seed``)."""
        if agent.seed_axis is not None:
            return self.fit_each_seed(agent)
        start = time.perf_counter()
        datamodule = agent.trainer.datamodule
        metrics: dict[str, float] = {}
        pair_u: dict[str, torch.Tensor] = {}
        if self.trained_at is not None:  # Fig. 3: error on transitions the model has not seen
            fresh = datamodule.latest(agent.env_steps - self.trained_at)
            metrics["model/error_l2"] = prediction_error(agent.world_model, fresh)
            pair_u["fresh"] = pair_uncertainty(agent.world_model, fit_rows(fresh)[0])
        inputs, targets = fit_rows(datamodule.contents())

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
        metrics.update(report_metrics(report))
        pair_u.update(fitted_pair_u(agent.world_model, inputs, report))
        self.pair_u = {None: pair_u}
        for kind, u in pair_u.items():
            metrics.update(log_u_quantiles(kind, u))
        return self._finish(agent, metrics, start)

    def fit_each_seed(self, agent: AgentView) -> dict[str, Any]:
        """A group's fits: each seed's model, with its own slice of the Adam moments and its own
        step count, fitted on its own column of the storage with its own generator (holdout,
        bootstraps, minibatch orders), exactly as that seed alone fits it; then written back into
        the stacked state. The fits have per-seed host decisions (early stopping, elites), so they
        run one after another: N times one fit's cost, every ``train_every`` env steps."""
        start = time.perf_counter()
        datamodule = agent.trainer.datamodule
        axis = agent.seed_axis
        solo, stacked = axis.solo_world_model.to(agent.device), agent.world_model
        data = datamodule.contents()
        latest = datamodule.latest(agent.env_steps - self.trained_at) if self.trained_at is not None else None
        per_seed: list[dict[str, float]] = []
        self.pair_u = {}
        for position, generator in enumerate(axis.streams.generators):
            if position in agent.stopped_seeds:  # stopped by a NaN: nothing to fit
                per_seed.append(dict.fromkeys(REPORTED, None))
                continue
            seed_slice_into(solo, stacked, position)
            optimizer = SeedSliceOptimizer(agent.optimizer("model"), stacked, solo, position)
            metrics: dict[str, float] = {}
            pair_u: dict[str, torch.Tensor] = {}
            if latest is not None:
                metrics["model/error_l2"] = prediction_error(solo, latest[:, position])
                pair_u["fresh"] = pair_uncertainty(solo, fit_rows(latest[:, position])[0])

            def step(loss: torch.Tensor) -> None:  # what agent.optimize("model", ...) does alone
                optimizer.solo.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.solo.step()

            inputs, targets = fit_rows(data[:, position])
            report = fit_ensemble(solo, inputs, targets, step=step, batch_size=self.batch_size,
                                  holdout_ratio=self.holdout_ratio, max_holdout=self.max_holdout,
                                  max_epochs=self.max_epochs, patience=self.patience, generator=generator)
            seed_slice_from(solo, stacked, position)
            optimizer.write_back()
            metrics.update(report_metrics(report))
            pair_u.update(fitted_pair_u(solo, inputs, report))
            self.pair_u[position] = pair_u
            for kind, u in pair_u.items():
                metrics.update(log_u_quantiles(kind, u))
            per_seed.append({name: metrics.get(name) for name in REPORTED})
        nll = torch.tensor([m["model/holdout_nll"] if m["model/holdout_nll"] is not None else 0.0 for m in per_seed],
                           device=agent.device)
        agent.record_phase("model", nll)
        if not torch.isfinite(nll).all():
            agent.raise_if_not_finite()
        return self._finish(agent, {name: [m[name] for m in per_seed] for name in per_seed[0]}, start)

    def _finish(self, agent: AgentView, metrics: dict[str, Any], start: float) -> dict[str, Any]:
        self.trained_at = agent.env_steps
        self.fits += 1
        metrics["time/model_fit_seconds"] = time.perf_counter() - start
        log_metrics(agent.trainer, metrics, step=agent.env_steps)
        return metrics

    def counters(self) -> dict[str, Any]:
        return {"model_trained_at": self.trained_at, "model_fits": self.fits}

    def load_counters(self, counters: dict[str, Any]) -> None:
        self.trained_at = counters.get("model_trained_at")
        self.fits = int(counters.get("model_fits", 0))


PAIR_KINDS = ("insample", "holdout", "fresh")  # the real pairs u is measured on at each fit
U_QUANTILES = (10, 50, 90)

# what a fit logs per seed (model/error_l2 and the fresh pairs' u from the second fit on)
REPORTED = ("model/error_l2", "model/holdout_mse", "model/holdout_nll", "model/epochs", "model/elites",
            "model/u_mean", "model/mean_spread",
            *(f"model/log_u_{kind}_q{q}" for kind in PAIR_KINDS for q in U_QUANTILES))


@torch.no_grad()
def pair_uncertainty(model: GaussianEnsemble, inputs: torch.Tensor) -> torch.Tensor:
    """u of real (obs, action) rows [N, obs_dim + act_dim], in full fp32 (as MPDP's threshold)."""
    obs, action = inputs.split([model.obs_dim, model.act_dim], dim=-1)
    with full_fp32_matmuls():
        return model.uncertainty(*model(obs, action))


def log_u_quantiles(kind: str, u: torch.Tensor) -> dict[str, float]:
    """``model/log_u_<kind>_q10/q50/q90``: the quantiles of log u over one kind of pair."""
    if u.numel() == 0:
        return {}
    values = quantiles(u, *(q / 100 for q in U_QUANTILES))  # u's quantiles, then their logs: as u_T's
    return {f"model/log_u_{kind}_q{q}": value.clamp_min(1e-12).log().item() for q, value in zip(U_QUANTILES, values)}


def fitted_pair_u(model: GaussianEnsemble, inputs: torch.Tensor, report: FitReport) -> dict[str, torch.Tensor]:
    """After a fit, u on its holdout pairs and on as many of its training rows."""
    return {
        "insample": pair_uncertainty(model, inputs[report.train_rows[: report.holdout_rows.numel()]]),
        "holdout": pair_uncertainty(model, inputs[report.holdout_rows]),
    }


def fit_rows(data: TensorDictBase) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's inputs (obs, action) and targets (obs change, reward) of stored transitions."""
    inputs = torch.cat([data["obs"], data["action"]], dim=-1)
    targets = torch.cat([data["next_obs"] - data["obs"], data["reward"].unsqueeze(-1)], dim=-1)
    return inputs, targets


def report_metrics(report: FitReport) -> dict[str, float]:
    return {
        "model/holdout_mse": report.holdout_mse,
        "model/holdout_nll": report.holdout_nll,
        "model/epochs": float(report.epochs),
        "model/elites": float(len(report.elites)),
        "model/u_mean": report.u_mean,
        "model/mean_spread": report.mean_spread,
    }


@torch.no_grad()
def prediction_error(world_model: torch.nn.Module, transitions: TensorDictBase) -> float:
    """Mean L2 distance between the elites' mean predicted next observation and the real one."""
    predicted, _ = world_model.predict_mean(transitions["obs"], transitions["action"])
    return (predicted - transitions["next_obs"]).norm(dim=-1).mean().item()


@torch.no_grad()
def seed_slice_into(solo: torch.nn.Module, stacked: torch.nn.Module, position: int) -> None:
    """Seed ``position``'s slice of a group's stacked module into ``solo`` (one seed's module)."""
    for (name, value), (_, source) in zip(_state(solo), _state(stacked)):
        value.copy_(source[position])


@torch.no_grad()
def seed_slice_from(solo: torch.nn.Module, stacked: torch.nn.Module, position: int) -> None:
    """``solo``'s state back into seed ``position``'s slice of the stacked module."""
    for (name, value), (_, target) in zip(_state(solo), _state(stacked)):
        target[position].copy_(value)


def _state(module: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    return [*module.named_parameters(), *module.named_buffers()]


class SeedSliceOptimizer:
    """One seed's view of a group's optimizer: ``solo``, an optimizer of the same class and
    settings (param groups) over one seed's module, holding that seed's slice of the group's state
    (Adam's moments, and a step count per seed: kept [seeds] in the group's state, since seeds
    stop their fits at different epochs); ``write_back`` returns it to the group's state."""

    def __init__(self, group: torch.optim.Optimizer, stacked: torch.nn.Module, solo: torch.nn.Module,
                 position: int) -> None:
        self.group, self.position = group, position
        solo_of = {id(p): q for (_, p), (_, q) in zip(stacked.named_parameters(), solo.named_parameters())}
        self.pairs = [(p, solo_of[id(p)]) for g in group.param_groups for p in g["params"]]
        settings = [{**{k: v for k, v in g.items() if k != "params"}, "params": [solo_of[id(p)] for p in g["params"]]}
                    for g in group.param_groups]
        self.solo = type(group)(settings)
        for stacked_param, solo_param in self.pairs:
            state = group.state.get(stacked_param)
            if state:
                self.solo.state[solo_param] = {key: value[position].clone() for key, value in state.items()}

    @torch.no_grad()
    def write_back(self) -> None:
        for stacked_param, solo_param in self.pairs:
            solo_state = self.solo.state.get(solo_param)
            if not solo_state:
                continue
            state = self.group.state.setdefault(stacked_param, {})
            seeds = stacked_param.shape[0]
            for key, value in solo_state.items():
                if key not in state:
                    state[key] = value.new_zeros((seeds, *value.shape))
                state[key][self.position].copy_(value)
