"""MPDP: SAC's policy evaluation, a probabilistic ensemble world model, and the extended
policy improvement through it (Algorithm 2 of the paper).

The agent's parts (algorithms/agent.py): the model phase when due (every ``model_train_every``
env steps), real batches, the critic step on them (twin Q, targets with pi_0; D2), the H-step
improvement of all H actor heads in one backward (algorithms/parts/improvement.py over
objectives/h_step_improvement.py; D1, D3, D4, D6, D7), and the temperature when automatic, driven
by pi_0's entropy on the real start states (D5). Only pi_0 acts; evaluation and checkpoints expose it.
"""

from __future__ import annotations

from typing import Any, Optional

from jsonargparse.typing import NonNegativeFloat, PositiveFloat, PositiveInt

from mpdp_lightning.algorithms.model_based import ModelBasedAgent
from mpdp_lightning.algorithms.parts.improvement import HStepImprovement
from mpdp_lightning.objectives.h_step_improvement import ImprovementSettings, PenaltyScale, ThresholdRule


class MPDP(ModelBasedAgent):
    """Model-based Planning Distilled to Policy (see ModelBasedAgent and Agent for the other arguments).

    Args:
        horizon: H_max, the number of actor heads pi_0 .. pi_{H-1} and the longest imagined rollout.
        beta: weight of the One-vs-Rest penalty in every imagined step's reward.
        adaptive_horizon: stop imagined rows where u crosses the threshold; False: fixed horizon.
        threshold: how u_T is calibrated (D3), against u on real pairs the model had not been
            fitted on, as imagined pairs are not: "fresh" (a quantile of u over the transitions
            stored since the previous fit, under the model before the fit), "holdout" (over the
            fit's holdout rows); or against u on the batch's real pairs, mostly fitted on
            ("quantile"); "absolute" (log u >= log_threshold) or "anchored" (the quantile rule's
            u_T at the first update, then held: the horizon follows the model's absolute reliability).
        threshold_quantile: the quantile of the "fresh", "holdout", "quantile" and "anchored" rules.
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
        threshold: ThresholdRule = "fresh",
        threshold_quantile: PositiveFloat = 0.9,
        log_threshold: float = -5.0,
        penalty_scale: PenaltyScale = "median",
        head_grad_clip: Optional[PositiveFloat] = None,
        compact_rows: Optional[bool] = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(task, *args, _heads=horizon, **kwargs)  # pi_0 .. pi_{H-1}; pi_0 acts
        settings = ImprovementSettings(horizon, self.hparams.gamma, beta, adaptive_horizon, threshold,
                                       threshold_quantile, log_threshold, penalty_scale)
        self.h_step = HStepImprovement(settings, head_grad_clip)
