"""The policy improvement of an update: SAC's one step (``one_step_improvement``: SAC, MBPO) or
MPDP's H-step objective through the world model (``HStepImprovement.improve``). Either computes
its loss on the batch, steps the actor's optimizer through the agent and returns its detached
metrics and pi_0's log-probs on the batch's real states (for the temperature)."""

from __future__ import annotations

from typing import Any, Optional

import torch
from lightning.pytorch.utilities import rank_zero_warn
from tensordict import TensorDictBase
from torch import nn

from mpdp_lightning.algorithms.parts.agent_view import AgentView
from mpdp_lightning.objectives.h_step_improvement import (
    CALIBRATED_RULES,
    ImaginationNoise,
    ImprovementSettings,
    extended_improvement,
    quantiles,
)
from mpdp_lightning.objectives.sac_losses import actor_loss
from mpdp_lightning.training.metrics import log_json_artifact

Improved = tuple[dict[str, torch.Tensor], torch.Tensor]


def one_step_improvement(agent: AgentView, batch: TensorDictBase) -> Improved:
    """SAC's: pi_0 maximises min Q - alpha log pi on the batch's states."""
    noise = agent.standard_normal(batch.shape[-1], agent.act_dim)
    loss, info = agent.per_seed("actor", lambda agent, obs, noise: actor_loss(
        agent.actor, agent.critic, obs, agent.temperature.alpha, noise), batch["obs"], noise)
    agent.optimize("actor", loss)
    return {"train/actor_loss": loss.detach(), "train/entropy": info["entropy"]}, info["log_prob"]


class HStepImprovement(nn.Module):
    """MPDP's Algorithm 1: one backward of the H-step objective (objectives/h_step_improvement.py)
    into every head, the heads' gradient clipped (D6), then one step of the actor's optimizer.

    It keeps the held threshold of the "fresh", "holdout" and "anchored" rules (a buffer saved
    with the weights: the first two set by ``calibrate`` after each model fit), the rows per horizon
    value of the current log window, and their history: the data of the paper's Fig. 2, written as
    the run's ``horizon_histogram.json`` artifact at every log point.

    Args:
        settings: the objective's settings.
        head_grad_clip: clip the heads' gradient norm to this value; None: no clipping.
    """

    def __init__(self, settings: ImprovementSettings, head_grad_clip: Optional[float] = None) -> None:
        super().__init__()
        self.settings = settings
        self.head_grad_clip = head_grad_clip
        # the u_T of the "fresh" and "holdout" rules (set at each fit) or the "anchored" one (at
        # the first update); NaN until then, saved with the weights
        self.register_buffer("held_threshold", torch.tensor(float("nan")))
        # rows per horizon value (0 .. H) since the last log point (a buffer: it follows the device)
        self.register_buffer("horizon_counts", torch.zeros(settings.horizon + 1, dtype=torch.long), persistent=False)
        self.horizon_history: dict[int, list[int]] = {}
        self._sac_windows = 0  # consecutive log windows in which every row stopped at its first step

    def improve(self, agent: AgentView, batch: TensorDictBase) -> Improved:
        obs, action = batch["obs"], batch["action"]
        settings, compact = self.settings, bool(agent.plan.compact_rows)
        # every draw up front (a retry after a failed compile sees the same ones)
        noise = agent.draw(lambda generator: ImaginationNoise.for_rows(
            settings.horizon, obs.shape[-2], obs.shape[-1], agent.act_dim, agent.world_model.num_elites, obs.device,
            generator))

        def objective_and_gradients(compiled: bool):
            def objective(agent, obs, action, noise):  # one seed's (Agent.per_seed)
                return extended_improvement(
                    agent.actor, agent.critic, agent.world_model, obs, action, agent.temperature.alpha, settings,
                    agent.h_step.held_threshold, noise, compact=compact, compiled=compiled,
                )

            result = agent.per_seed("actor", objective, obs, action, noise)
            agent.compute_gradients("actor", result.loss)  # inside: a compiled step's backward may fail too
            return result

        result = agent.plan.run_compiled("the imagined step", objective_and_gradients)
        if settings.threshold == "anchored":
            self.held_threshold.copy_(result.diagnostics["u_threshold"])  # on the device: no sync
        grad_norm = agent.apply_gradients("actor", result.loss, clip=self.head_grad_clip, norm=True)
        # scatter_add rather than bincount, which synchronises with the host on CUDA to size its output
        self.horizon_counts.scatter_add_(-1, result.horizon, torch.ones_like(result.horizon))
        metrics = {f"train/{name}": value for name, value in result.diagnostics.items()}
        metrics.update({
            "train/actor_loss": result.loss.detach(),
            "train/entropy": -result.pi0_log_prob.mean(-1),
            "train/head_grad_norm": grad_norm,
        })
        return metrics, result.pi0_log_prob

    @torch.no_grad()
    def calibrate(self, pair_u: dict[str, torch.Tensor], position: Optional[int] = None) -> None:
        """After a model fit, the "fresh" or "holdout" rule's u_T: the ``threshold_quantile``
        quantile of u over that kind of the fit's real pairs (``pair_u``: kind -> u, as the model
        phase measured them in full fp32), held until the next fit. In a group, seed
        ``position``'s. Other rules, or no pairs of that kind (the first fit has no fresh ones):
        the held u_T stays as it was."""
        u = pair_u.get(self.settings.threshold) if self.settings.threshold in CALIBRATED_RULES else None
        if u is None or u.numel() == 0:
            return
        threshold = quantiles(u.float(), self.settings.threshold_quantile)[0]
        (self.held_threshold if position is None else self.held_threshold[position]).copy_(threshold)

    def end_window(self, env_steps: int, metrics: dict[str, float], trainer: Optional[Any]) -> None:
        """Adds the window's horizon histogram to ``horizon_histogram.json`` ({env step: rows per
        horizon 0..H}; ``trainer``'s loggers, none outside a Trainer), and warns when every
        imagined row keeps stopping at its first step: MPDP has then become SAC."""
        counts = self.horizon_counts.tolist()  # a group: one list per seed, each to its seed's run
        self.horizon_counts.zero_()
        grouped = self.horizon_counts.dim() > 1
        if sum(map(sum, counts) if grouped else counts) and trainer is not None:
            self.horizon_history[env_steps] = counts
            history = {str(k): v for k, v in self.horizon_history.items()}
            if grouped:
                history = [{k: v[i] for k, v in history.items()} for i in range(len(counts))]
            log_json_artifact(trainer, history, "horizon_histogram.json", per_seed=grouped)
        stopped = metrics.get("train/stopped_at_first_step")
        if stopped is not None and all(v == 1.0 for v in (stopped if isinstance(stopped, list) else [stopped])):
            self._sac_windows += 1
            if self._sac_windows == 3:
                rank_zero_warn(
                    "every imagined rollout has stopped at its first step for 3 log windows: the horizon is 0 "
                    "and MPDP is training as SAC (check --model.threshold and --model.threshold_quantile)"
                )
        else:
            self._sac_windows = 0

    def counters(self) -> dict[str, Any]:
        return {"horizon_history": {int(k): v for k, v in self.horizon_history.items()}}

    def load_counters(self, counters: dict[str, Any]) -> None:
        self.horizon_history = {int(k): list(v) for k, v in counters.get("horizon_history", {}).items()}
