"""COPlanner's uncertainty-aware policy-guided MPC (UP-MPC; Wang et al., ICLR 2024) on the
project's world model.

For each start state the policy proposes ``candidates`` first actions; each candidate is rolled
``horizon`` steps through the ensemble, later actions again sampled from the policy on the
predicted states, each row's next state and reward from one random elite's sample (as
``GaussianEnsemble.step``). A candidate scores

    R + rate * U,   R = sum_i discount^i r_i,   U = sum_i discount^i u_i,

where u_i is the ensemble's disagreement at step i: the standard deviation across all K members'
sampled predictions (change in observation and reward, in raw units), meaned over the output
dimensions, as COPlanner's code measures it. ``rate`` is -alpha_c for conservative planning (MBPO's
model rollouts avoid what the model does not know) and +alpha_o for optimistic planning (real
actions seek it). The best candidate's first action is returned.

One decision of ours: a row adds nothing after a predicted terminal. COPlanner's code keeps
scoring past it, so a candidate that falls would still collect imagined reward after the fall.

Every candidate of every start state steps in one forward per planning step (rows laid out
candidate-major: row n * B + b is candidate n of start state b); start states go in chunks of at
most ``max_rows`` rows, which bounds memory on 100k start states.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from mpdp_lightning.models.world_model import GaussianEnsemble

# policy(obs [M, obs_dim], planning step) -> a sampled action [M, act_dim] in the env's units
PlanningPolicy = Callable[[torch.Tensor, int], torch.Tensor]


@dataclass
class Plan:
    """The chosen first actions and what the choice saw, per start state."""

    action: torch.Tensor  # [B, act_dim], the best candidate's first action
    chosen_uncertainty: torch.Tensor  # [B], U of the chosen candidate
    candidate_uncertainty: torch.Tensor  # [B], U averaged over the candidates
    chosen_return: torch.Tensor  # [B], R of the chosen candidate


def ensemble_disagreement(samples: torch.Tensor) -> torch.Tensor:
    """COPlanner's uncertainty: [K, M, D] member samples -> [M], the std over members (population,
    as NumPy's default in its MuJoCo code) meaned over output dimensions."""
    return samples.std(dim=0, correction=0).mean(dim=-1)


@dataclass(frozen=True)
class UPMPC:
    """UP-MPC with a fixed scoring ``rate`` (negative: conservative, positive: optimistic).

    Args:
        candidates: N, first actions drawn from the policy per start state (COPlanner's 5).
        horizon: H_p, model steps each candidate is rolled (COPlanner's MuJoCo command: 5).
        discount: weight of step i's reward and uncertainty is discount^i (COPlanner's 0.97).
        rate: the weight of U in the score: -alpha_c (conservative) or +alpha_o (optimistic).
        max_rows: candidate rows stepped at once; more start states are planned in chunks.
    """

    candidates: int = 5
    horizon: int = 5
    discount: float = 0.97
    rate: float = 0.0
    max_rows: int = 8192

    def __post_init__(self) -> None:
        if self.candidates < 1 or self.horizon < 1:
            raise ValueError(f"need at least 1 candidate and a horizon of 1, got {self.candidates}, {self.horizon}")
        if not 0.0 <= self.discount <= 1.0:
            raise ValueError(f"discount must be in [0, 1], got {self.discount}")
        if self.max_rows < self.candidates:
            raise ValueError(f"max_rows ({self.max_rows}) must hold the candidates of one state ({self.candidates})")

    @torch.no_grad()
    def plan(self, model: GaussianEnsemble, policy: PlanningPolicy, obs: torch.Tensor) -> Plan:
        """The first action of the best-scoring candidate for each of ``obs`` [B, obs_dim]."""
        per_chunk = max(self.max_rows // self.candidates, 1)
        plans = [self._plan_chunk(model, policy, chunk) for chunk in obs.split(per_chunk)]
        if len(plans) == 1:
            return plans[0]
        return Plan(*(torch.cat([getattr(p, name) for p in plans]) for name in
                      ("action", "chosen_uncertainty", "candidate_uncertainty", "chosen_return")))

    def _plan_chunk(self, model: GaussianEnsemble, policy: PlanningPolicy, obs: torch.Tensor) -> Plan:
        n, b = self.candidates, obs.shape[0]
        state = obs.repeat(n, 1)  # [N * B, obs_dim], candidate-major
        first = action = policy(state, 0)
        total_return = torch.zeros(n * b, device=obs.device)
        total_uncertainty = torch.zeros(n * b, device=obs.device)
        alive = torch.ones(n * b, dtype=torch.bool, device=obs.device)
        for i in range(self.horizon):
            samples = model.member_samples(state, action)  # [K, N * B, obs_dim + 1], raw units
            weight = alive.float() * self.discount**i
            total_uncertainty += weight * ensemble_disagreement(samples)
            pick = model.elites[torch.randint(model.num_elites, (n * b,), device=obs.device)]
            chosen = samples[pick, torch.arange(n * b, device=obs.device)]
            next_state = state + chosen[:, : model.obs_dim]
            total_return += weight * chosen[:, model.obs_dim]
            alive &= ~model.is_terminal(state, action, next_state)
            if i + 1 < self.horizon:
                state, action = next_state, policy(next_state, i + 1)
        score = (total_return + self.rate * total_uncertainty).view(n, b)
        best = score.argmax(dim=0)  # [B]
        columns = torch.arange(b, device=obs.device)
        return Plan(
            action=first.view(n, b, -1)[best, columns],
            chosen_uncertainty=total_uncertainty.view(n, b)[best, columns],
            candidate_uncertainty=total_uncertainty.view(n, b).mean(dim=0),
            chosen_return=total_return.view(n, b)[best, columns],
        )

