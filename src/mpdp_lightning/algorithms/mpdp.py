"""MPDP: SAC's policy evaluation, a probabilistic ensemble world model, and the extended
policy improvement through it (Algorithm 2 of the paper).

Per update: the model phase when due (every ``model_train_every`` env steps), the critic update
on real data (twin Q, targets with pi_0; D2), the H-step improvement of all actor heads in one
backward (objectives/h_step_improvement.py; D1, D3, D4, D7), and the temperature when automatic, driven by pi_0's
entropy on the real start states (D5). Only pi_0 acts; evaluation and checkpoints expose it.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from jsonargparse.typing import NonNegativeFloat, PositiveFloat, PositiveInt
from lightning.pytorch.utilities import rank_zero_warn
from tensordict import TensorDictBase

from mpdp_lightning.objectives.h_step_improvement import (
    ImprovementResult, ImprovementSettings, PenaltyScale, ThresholdRule, extended_improvement,
)
from mpdp_lightning.training.metrics import log_json_artifact
from mpdp_lightning.algorithms.model_based import ModelBasedSAC


class MPDP(ModelBasedSAC):
    """Model-based Planning Distilled to Policy (see ModelBasedSAC and SAC for the other arguments).

    Args:
        horizon: H_max, the number of actor heads pi_0 .. pi_{H-1} and the longest imagined rollout.
        beta: weight of the One-vs-Rest penalty in every imagined step's reward.
        adaptive_horizon: stop imagined rows where u crosses the threshold; False: fixed horizon.
        threshold: "quantile" (u_T from the batch's real pairs, D3), "absolute" (log u >= log_threshold)
            or "anchored" (the quantile rule's u_T at the first update, then held: the horizon
            follows the model's absolute reliability).
        threshold_quantile: the quantile of the "quantile" and "anchored" rules.
        log_threshold: u_T of the "absolute" rule, in log space (the paper's -5).
        penalty_scale: "median" (u relative to its median on the real pairs, D7) or "none" (raw u).
        head_grad_clip: clip the heads' gradient norm to this value (D6); None: no clipping.
        compact_rows: imagine only the rows still alive at each step, so rows that have stopped
            cost nothing (the same loss and gradients as masking them, up to rounding); finding
            them reads the device a few times per step, free on the CPU and a synchronisation
            on CUDA, and not capturable in a CUDA graph. None: on the CPU only.
    """

    def __init__(
        self,
        task: str,
        *args: Any,
        horizon: PositiveInt = 25,
        beta: NonNegativeFloat = 0.5,
        adaptive_horizon: bool = True,
        threshold: ThresholdRule = "quantile",
        threshold_quantile: PositiveFloat = 0.9,
        log_threshold: float = -5.0,
        penalty_scale: PenaltyScale = "median",
        head_grad_clip: Optional[PositiveFloat] = None,
        compact_rows: Optional[bool] = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(task, *args, **kwargs)
        hp = self.hparams
        self.improvement = ImprovementSettings(
            horizon, hp.gamma, beta, adaptive_horizon, threshold, threshold_quantile, log_threshold, penalty_scale,
        )
        self.actor = self.build_actor(heads=horizon)  # pi_0 .. pi_{H-1}; pi_0 acts
        # the "anchored" rule's u_T (NaN until the first update sets it), saved with the weights
        self.register_buffer("threshold_anchor", torch.tensor(float("nan")))
        # rows per horizon value (0 .. H) since the last log point (a buffer: it follows the
        # module's device), and the history of windows
        self.register_buffer("horizon_counts", torch.zeros(horizon + 1, dtype=torch.long), persistent=False)
        self.horizon_history: dict[int, list[int]] = {}
        self._sac_windows = 0  # consecutive log windows in which every row stopped at its first step

    def cuda_graph_problem(self, device: torch.device, precision: str) -> Optional[str]:
        problem = super().cuda_graph_problem(device, precision)
        if problem is None and self.hparams.compact_rows:
            problem = "model.compact_rows true counts the live rows on the host at every imagined step; leave it unset on CUDA"
        return problem

    def planning_action(self, obs: torch.Tensor, step: int) -> torch.Tensor:
        """Head ``step`` (the last head beyond H): each head is trained for its step of an imagined
        rollout from real states, which is what a planner's rollout is."""
        return self.actor.act(obs, head=min(step, self.actor.heads - 1))

    def compacts_rows(self, device: torch.device) -> bool:
        """Whether the imagination goes on with the live rows only on ``device`` (see compact_rows)."""
        compact = self.hparams.compact_rows
        return bool(compact) if compact is not None else device.type == "cpu"

    def improve_policy(self, batch: TensorDictBase) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Algorithm 1: one backward of the H-step objective into every head."""
        device = batch["obs"].device
        compact = self.compacts_rows(device)
        actor_optimizer = self.optimizer("actor")
        result = self.run_compiled(
            device, "the imagined step",
            lambda compiled: self.objective_and_gradients(batch, actor_optimizer, compact, compiled),
        )
        if self.improvement.threshold == "anchored":
            self.threshold_anchor.copy_(result.diagnostics["u_threshold"])  # on the device: no sync
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in self.actor.parameters() if p.grad is not None])
        if self.hparams.head_grad_clip is not None:
            self.clip_grad_norm(actor_optimizer, self.hparams.head_grad_clip)
        self.step_optimizer(actor_optimizer)
        self.check_phase("actor", result.loss, actor_optimizer)
        # scatter_add rather than bincount, which synchronises with the host on CUDA to size its output
        self.horizon_counts.scatter_add_(0, result.horizon, torch.ones_like(result.horizon))
        metrics = {f"train/{name}": value for name, value in result.diagnostics.items()}
        metrics.update(
            {
                "train/actor_loss": result.loss.detach(),
                "train/entropy": -result.pi0_log_prob.mean(),
                "train/head_grad_norm": grad_norm,
            }
        )
        return metrics, result.pi0_log_prob

    def objective_and_gradients(self, batch: TensorDictBase, actor_optimizer: Any, compact: bool,
                                compiled: bool) -> ImprovementResult:
        """The H-step objective on ``batch`` and its gradients in the heads (not yet stepped)."""
        result = extended_improvement(
            self.actor, self.critic, self.world_model, batch["obs"], batch["action"],
            self.temperature.alpha, self.improvement, self.threshold_anchor, compact=compact, compiled=compiled,
        )
        self.backward_into(actor_optimizer, result.loss)
        return result

    def window_metrics(self) -> dict[str, float]:
        """Adds the horizon histogram of the window to the run's ``horizon_histogram.json``
        artifact ({env step: rows per horizon 0..H}, the data of the paper's Fig. 2), and warns
        when every imagined row keeps stopping at its first step: MPDP has then become SAC."""
        metrics = super().window_metrics()
        counts = self.horizon_counts.tolist()
        self.horizon_counts.zero_()
        if sum(counts) and self.trainer is not None:
            self.horizon_history[self.env_steps] = counts
            log_json_artifact(self.trainer, {str(k): v for k, v in self.horizon_history.items()}, "horizon_histogram.json")
        if metrics.get("train/stopped_at_first_step") == 1.0:
            self._sac_windows += 1
            if self._sac_windows == 3:
                rank_zero_warn(
                    "every imagined rollout has stopped at its first step for 3 log windows: the horizon is 0 "
                    "and MPDP is training as SAC (check --model.threshold and --model.threshold_quantile)"
                )
        else:
            self._sac_windows = 0
        return metrics

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["horizon_history"] = {int(k): v for k, v in self.horizon_history.items()}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # checkpoints from before the anchored rule existed: no anchor set yet
        checkpoint["state_dict"].setdefault("threshold_anchor", torch.tensor(float("nan")))
        super().on_load_checkpoint(checkpoint)
        self.horizon_history = {int(k): list(v) for k, v in checkpoint.get("horizon_history", {}).items()}
