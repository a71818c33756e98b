"""COPlanner (Wang et al., ICLR 2024) as a plug-in: ``--coplanner.enabled true`` on MBPO or MPDP.

COPlanner is a plug-in for Dyna-style model-based RL: one planner, UP-MPC
(``planners/up_mpc.py``), chooses actions with the ensemble's uncertainty twice over:

- conservatively in the model rollouts (score R - alpha_c U at every rollout step), so that the
  policy learns from imagined data the model is sure of: MBPO's branched rollouts;
- optimistically in the real environment (score R + alpha_o U) after the warm-up, once the model
  has been fitted, so that the agent collects the data the model lacks: MBPO and MPDP (whose
  imagination is its own H-step objective, not a rollout buffer).

Evaluation never plans: it always acts with pi_0's mode. It is an option of the model-based
algorithms (``ModelBasedAgent.use_coplanner``, which the CLI calls once, when it builds the run,
after checking the algorithm has a world model); the agent logs ``coplanner/explore_u_chosen``
and ``coplanner/explore_u_candidates`` (the discounted uncertainty U of the chosen action and the
candidates' mean) with the train metrics, and ``coplanner/rollout_u_*`` at each branching of model rollouts.
"""

from __future__ import annotations

from jsonargparse.typing import NonNegativeFloat, PositiveInt

from mpdp_lightning.planners.up_mpc import UPMPC


class COPlanner:
    """COPlanner's conservative rollouts and optimistic exploration (off unless ``enabled``).

    Args:
        enabled: plan with UP-MPC; False: the plain policy everywhere (the rest is ignored).
        candidates: N, first actions drawn from the policy per state (COPlanner's 5).
        horizon: H_p, model steps each candidate is rolled (COPlanner's MuJoCo command: 5).
        discount: weight discount^i of step i's reward and uncertainty (COPlanner's 0.97).
        conservative_rate: alpha_c, U's penalty when choosing model-rollout actions (COPlanner's
            MuJoCo command and DMC config: 2; its parser's default 0.05).
        optimistic_rate: alpha_o, U's bonus when choosing real actions (same sources: 1; 0.05).
        conservative_rollouts: plan MBPO's model rollouts (no effect on MPDP).
        optimistic_exploration: plan the training environment's actions.
        max_rows: candidate rows stepped at once; more start states are planned in chunks.
    """

    def __init__(
        self,
        enabled: bool = False,
        candidates: PositiveInt = 5,
        horizon: PositiveInt = 5,
        discount: NonNegativeFloat = 0.97,
        conservative_rate: NonNegativeFloat = 2.0,
        optimistic_rate: NonNegativeFloat = 1.0,
        conservative_rollouts: bool = True,
        optimistic_exploration: bool = True,
        max_rows: PositiveInt = 8192,
    ) -> None:
        if conservative_rate < 0 or optimistic_rate < 0:
            raise ValueError(f"the rates are weights of the uncertainty, 0 or more: got {conservative_rate}, {optimistic_rate}")
        self.enabled = enabled
        common = dict(candidates=candidates, horizon=horizon, discount=discount, max_rows=max_rows)
        # built (and checked) now, whether enabled or not: a bad value fails before any work
        self.conservative = UPMPC(rate=-conservative_rate, **common) if conservative_rollouts else None
        self.optimistic = UPMPC(rate=optimistic_rate, **common) if optimistic_exploration else None
