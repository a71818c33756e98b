"""What a part sees of the agent it belongs to (algorithms/agent.py's ``Agent`` has all of it): the
nets, the execution plan, its one way to step an optimizer, and the run's clock. Parts name this
rather than the agent's class, so that they depend on the agent's face, not on its module."""

from __future__ import annotations

from typing import Any, Callable, Optional, Protocol

import torch

from mpdp_lightning.algorithms.execution import ExecutionPlan


class AgentView(Protocol):
    actor: Any  # SquashedGaussianHeads: pi_0 .. pi_{H-1}
    critic: Any  # TwinQ
    temperature: Any  # Temperature
    world_model: Any  # GaussianEnsemble (the model-based agents)
    rollout_planner: Any  # COPlanner's conservative UP-MPC, or None
    act_dim: int
    seed_axis: Any  # SeedAxis of a group of seeds (algorithms/seed_group.py), or None
    plan: ExecutionPlan
    env_steps: int
    trainer: Any
    device: torch.device

    def per_seed(self, phase: str, fn: Callable[..., Any], *args: Any) -> Any: ...

    def standard_normal(self, *shape: int) -> torch.Tensor: ...

    def draw(self, sample: Callable[[Optional[torch.Generator]], Any]) -> Any: ...

    def optimize(self, phase: str, loss: torch.Tensor, record: bool = True) -> None: ...

    def compute_gradients(self, phase: str, loss: torch.Tensor) -> None: ...

    def apply_gradients(self, phase: str, loss: Optional[torch.Tensor] = None, clip: Optional[float] = None,
                        norm: bool = False) -> Optional[torch.Tensor]: ...

    def record_phase(self, phase: str, loss: torch.Tensor) -> None: ...

    def raise_if_not_finite(self, when: str = "", scan_parameters: bool = False) -> None: ...

    def planning_action(self, obs: torch.Tensor, step: int) -> torch.Tensor: ...
