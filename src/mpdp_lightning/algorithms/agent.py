"""The agent: the one LightningModule every algorithm is, assembled from parts.

It holds the nets (pi_0..pi_{H-1} as ``actor``, twin ``critic`` and its Polyak target, the
temperature, and for the model-based algorithms the ensemble ``world_model``) and the parts that
say what differs between SAC, MBPO and MPDP (algorithms/sac.py, mbpo.py, mpdp.py set them):

===================  =========================  ==============================================
part                 None (SAC)                 set
===================  =========================  ==============================================
``model_phase``      no world model             MBPO, MPDP: the ensemble fit when due
``rollouts``         real batches               MBPO: real + branched model rollouts
``h_step``           one-step improvement       MPDP: the H-step objective into every head
``explorer``         pi_0's sample              COPlanner: UP-MPC, optimistic, in the real env
``rollout_planner``  pi_0 in model rollouts     COPlanner: UP-MPC, conservative (MBPO)
===================  =========================  ==============================================

One update is ``training_step`` then ``update``, read top to bottom below. The environment is
the EnvInteraction callback's (it acts with ``act_on_host``); the clock is ``env_steps``
(advanced by that callback) and the update count ``updates``, both saved in the checkpoint.

How the update runs (captured as a CUDA graph or not, compiled parts or not, rows masked or
compacted, precision) is the execution plan (algorithms/execution.py), resolved when the run is
set up (again for another device or precision). The CUDA graph wraps ``update`` from outside; inside, every optimizer steps one way,
torch's own (``optimize``), whatever the device: Lightning's optimizer wrappers would run only
once, at capture, so ``trainer.global_step`` stays 0 and ``updates`` counts the updates.
"""

from __future__ import annotations

import copy
from typing import Any, Callable, Optional, Sequence, Union

import lightning.pytorch as pl
import numpy as np
import torch
from jsonargparse.typing import NonNegativeFloat, PositiveFloat, PositiveInt
from tensordict import TensorDictBase

import mpdp_lightning
from mpdp_lightning.algorithms.execution import ExecutionPlan, resolve_plan
from mpdp_lightning.algorithms.parts.model_rollouts import BranchedRollouts
from mpdp_lightning.algorithms.parts.improvement import HStepImprovement, one_step_improvement
from mpdp_lightning.algorithms.parts.model_phase import EnsembleFit
from mpdp_lightning.algorithms.seed_group import SeedAxis
from mpdp_lightning.envs.tasks import get_task, task_spaces
from mpdp_lightning.errors import CheckpointError, NonFiniteLossError
from mpdp_lightning.models.policy import SquashedGaussianHeads, Temperature, TwinQ
from mpdp_lightning.objectives.sac_losses import critic_loss, temperature_loss
from mpdp_lightning.planners.up_mpc import UPMPC
from mpdp_lightning.training.checkpoint_io import CHECKPOINT_FORMAT, upgrade_checkpoint
from mpdp_lightning.training.cuda_graph import CapturedUpdate, CaptureError
from mpdp_lightning.training.data import PendingBatch, drawn
from mpdp_lightning.training.finiteness import NonFiniteGuard, non_finite_parameters
from mpdp_lightning.training.metrics import MetricAccumulator, PhaseTimer
from mpdp_lightning.training.tracking import set_run_tag

# The fused Adam kernel (CPU and CUDA) updates all of an optimizer's tensors in one call.
ADAM = {"fused": True}

# The phases of one update, in the order they run: the NaN/inf guard names the first that broke.
PHASES = ("model", "critic", "actor", "temperature")


class Agent(pl.LightningModule):
    """The actor-critic every algorithm shares, and its parts (see the module's docstring).

    The defaults are the MPDP paper's (Table 2: lr 3e-4, fixed alpha 0.2); conf/algo/sac.yaml
    sets CleanRL's SAC instead (critic lr 1e-3, automatic alpha from 1.0).

    Args:
        task: task name from the registry (set by the top-level ``--task``).
        hidden: width of every hidden layer of the actor and the critics.
        layers: number of hidden layers of the actor and the critics.
        activation: hidden activation (relu, silu, tanh, elu).
        gamma: discount factor.
        tau: Polyak rate of the target critics (target <- (1 - tau) target + tau online).
        actor_lr: Adam learning rate of the actor.
        critic_lr: Adam learning rate of the critics.
        alpha: entropy temperature; the initial value when ``auto_alpha``.
        auto_alpha: tune alpha towards ``target_entropy`` (SAC v2) instead of keeping it fixed.
        alpha_lr: Adam learning rate of log(alpha) when ``auto_alpha``.
        target_entropy: entropy target for ``auto_alpha``; None means -(action dimensions).
        cuda_graph: capture the whole update (critic, policy improvement, temperature and their
            optimizer steps) once as a CUDA graph and replay it; None: wherever it can be (a
            CUDA device, MPDP's rows masked), and should the capture fail, warn and go on eagerly
            (True: stop).
        tf32: on CUDA, let float32 matmuls use TF32 tensor cores (``torch.set_float32_matmul_precision
            ("high")``, for the whole process): 1.17x on MPDP's captured update at the paper's
            shapes on an H200. MPDP's threshold and penalty scale, statistics of u on the real
            pairs, stay in full fp32 (objectives/h_step_improvement.py). None: on wherever the
            device is CUDA; no effect on the CPU.
    """

    def __init__(
        self,
        task: str,
        hidden: PositiveInt = 256,
        layers: PositiveInt = 2,
        activation: str = "relu",
        gamma: NonNegativeFloat = 0.99,
        tau: PositiveFloat = 0.005,
        actor_lr: PositiveFloat = 3e-4,
        critic_lr: PositiveFloat = 3e-4,
        alpha: PositiveFloat = 0.2,
        auto_alpha: bool = False,
        alpha_lr: PositiveFloat = 3e-4,
        target_entropy: Optional[float] = None,
        cuda_graph: Optional[bool] = None,
        tf32: Optional[bool] = None,
        _heads: int = 1,
    ) -> None:
        super().__init__()
        get_task(task)  # an unknown name fails here, before any net is built
        for name, value in dict(actor_lr=actor_lr, critic_lr=critic_lr, alpha=alpha, alpha_lr=alpha_lr).items():
            if not value > 0:
                raise ValueError(f"{name} must be positive, got {value}")
        if not 0.0 <= gamma <= 1.0 or not 0.0 < tau <= 1.0:
            raise ValueError(f"need 0 <= gamma <= 1 and 0 < tau <= 1, got gamma={gamma}, tau={tau}")
        self.save_hyperparameters(ignore=["_heads"], logger=False)
        self.automatic_optimization = False  # the update steps its optimizers itself (``optimize``)

        spaces = task_spaces(task)
        self.task = task
        self.obs_dim, self.act_dim = spaces.obs_dim, spaces.act_dim
        self.target_entropy = float(-spaces.act_dim if target_entropy is None else target_entropy)
        # pi_0 .. pi_{heads-1} (SAC and MBPO: pi_0 only); pi_0 acts
        self.actor = SquashedGaussianHeads(spaces.obs_dim, spaces.act_dim, spaces.action_low, spaces.action_high,
                                           _heads, hidden, layers, activation)
        self.critic = TwinQ(spaces.obs_dim, spaces.act_dim, hidden, layers, activation)
        self.critic_target = copy.deepcopy(self.critic).requires_grad_(False)
        self.temperature = Temperature(alpha, learnable=auto_alpha)
        self.world_model: Optional[torch.nn.Module] = None

        # the parts, None for SAC (the other algorithms set theirs in their constructors)
        self.model_phase: Optional[EnsembleFit] = None  # fits world_model when due
        self.rollouts: Optional[BranchedRollouts] = None  # MBPO's model rollouts in the batches
        self.h_step: Optional[HStepImprovement] = None  # MPDP's improvement through the model
        self.explorer: Optional[UPMPC] = None  # UP-MPC acting in the training environment
        self.rollout_planner: Optional[UPMPC] = None  # UP-MPC acting in MBPO's model rollouts

        # None alone; set by algorithms/seed_group.py when this module holds N seeds' states
        self.seed_axis: Optional[SeedAxis] = None
        self.stopped_seeds: set[int] = set()  # a group's seeds (positions) stopped by a NaN or inf

        self.env_steps = 0
        self.updates = 0
        self.warmup_steps = 0  # the run's warm-up, as EnvInteraction resolved it (resolve_defaults)
        self._plan: Optional[ExecutionPlan] = None  # execution_plan()'s, per device and precision
        self.captured_update: Optional[CapturedUpdate] = None
        self.train_metrics = MetricAccumulator()
        self.timer = PhaseTimer()
        self.guard = NonFiniteGuard(PHASES)

    # ---- one update ------------------------------------------------------------------------
    def training_step(self, batch: Union[PendingBatch, TensorDictBase], batch_idx: int) -> None:
        # the paper's order: this update's env step is already stored (EnvInteraction), the model
        # is fitted on it when due, then the batch is drawn
        if self.model_phase is not None and self.model_phase.due(self.env_steps):
            with self.timer.phase("model"):
                self.model_phase.fit_world_model(self)
                if self.h_step is not None:  # MPDP's out-of-sample threshold, from this fit's real pairs
                    for position, pair_u in self.model_phase.pair_u.items():
                        self.h_step.calibrate(pair_u, position)
                if self.rollouts is not None:  # MBPO: fresh rollouts from the new model
                    self.rollouts.branch(self)
        if self.rollouts is not None:  # MBPO: real_ratio real, the rest model transitions
            batch = self.rollouts.mixed_batch(self, batch)
        else:  # SAC, MPDP: real transitions (each seed its own in a group)
            batch = drawn(batch, self.draw)
        metrics = None
        if self.captured_update is not None:
            with self.timer.phase("update"), self.timer.paused():  # phases inside are not timed
                metrics = self.run_captured(batch)
        if metrics is None:  # eager, or the capture just failed (the plan withdrew it)
            metrics = self.update(batch)
        self.train_metrics.accumulate(metrics)  # copies them: a replay overwrites the graph's outputs
        self.timer.count_update()
        self.updates += 1

    def update(self, batch: TensorDictBase) -> dict[str, torch.Tensor]:
        """One update on ``batch``: the critic, the policy improvement, the temperature, each with
        its optimizer step. Device work only, returning detached scalar metrics: what a CUDA graph
        captures (training/cuda_graph.py)."""
        with self.timer.phase("critic"):
            metrics = self.critic_step(batch)
        with self.timer.phase("policy"):
            if self.h_step is not None:  # MPDP: the H-step objective through the world model
                policy_metrics, log_prob = self.h_step.improve(self, batch)
            else:  # SAC, MBPO: one step on the batch's states
                policy_metrics, log_prob = one_step_improvement(self, batch)
        with self.timer.phase("temperature"):
            metrics.update(self.temperature_step(log_prob))
        metrics.update(policy_metrics)
        self.guard.advance()
        return metrics

    def critic_step(self, batch: TensorDictBase) -> dict[str, torch.Tensor]:
        """Twin-Q soft Bellman step on the batch (targets with pi_0), then the Polyak update."""
        next_action_noise = self.standard_normal(batch.shape[-1], self.act_dim)

        def loss_of(agent: "Agent", batch: TensorDictBase, noise: torch.Tensor):
            return critic_loss(agent.critic, agent.critic_target, agent.actor, batch, agent.hparams.gamma,
                               agent.temperature.alpha, noise)

        loss, info = self.per_seed("critic", loss_of, batch, next_action_noise)
        self.optimize("critic", loss)
        with torch.no_grad():
            torch._foreach_lerp_(list(self.critic_target.parameters()), list(self.critic.parameters()), self.hparams.tau)
        return {"train/critic_loss": loss.detach(), "train/q_mean": info["q_mean"], "train/q_target": info["target_mean"]}

    def temperature_step(self, log_prob: torch.Tensor) -> dict[str, torch.Tensor]:
        """With ``auto_alpha``, one step of log(alpha) towards the target entropy."""
        metrics = {"train/alpha": self.temperature.alpha}
        if self.hparams.auto_alpha:
            loss = self.per_seed("temperature", lambda agent, log_prob: temperature_loss(
                agent.temperature.log_alpha, log_prob, agent.target_entropy), log_prob)
            self.optimize("temperature", loss)
            metrics["train/alpha_loss"] = loss.detach()
        return metrics

    def run_captured(self, batch: TensorDictBase) -> Optional[dict[str, torch.Tensor]]:
        """The update from its CUDA graph; None after a failed capture, which withdraws the graph
        (the plan says how) and leaves this update, and all later ones, to run eagerly."""
        try:
            return self.captured_update(batch)
        except CaptureError as error:
            self.plan.capture_failed(error, self.updates)
            self.captured_update = None
            return None

    # ---- one seed's computations, and the seed axis ---------------------------------------------
    def per_seed(self, phase: Optional[str], fn: Callable[..., Any], *args: Any, batched: bool = True) -> Any:
        """``fn(agent, *args)``, a computation of one seed's nets whose gradients go to ``phase``'s
        parameters alone (None: to none, e.g. acting): on this agent as it is, or, holding a group
        of seeds, for every seed (each of ``args`` and each result with a leading seed axis, None
        passed as it is): at once, vmapped over the stacked state, or with ``batched`` false one
        seed after another (``SeedAxis.map``, algorithms/seed_group.py)."""
        if self.seed_axis is None:
            return fn(self, *args)
        trainable = self.optimizer_groups()[phase][0] if phase is not None else ()
        return self.seed_axis.map(self, fn, args, trainable, batched)

    def draw(self, sample: Callable[[Optional[torch.Generator]], Any]) -> Any:
        """``sample(generator)``'s random draws (a tensor, or a tuple of them): alone with the
        default generator (None); in a group once per seed with that seed's own generator,
        stacked on a leading seed axis."""
        if self.seed_axis is None:
            return sample(None)
        if self.seed_axis.streams.device != self.device:
            raise RuntimeError(f"the group's generators are on {self.seed_axis.streams.device} and the agent on "
                               f"{self.device}: stack the agents on the device they train on")
        return self.seed_axis.streams.draw(sample)

    def seed_generators(self) -> tuple[torch.Generator, ...]:
        """A group's per-seed generators (which a CUDA graph must register); none alone."""
        return () if self.seed_axis is None else tuple(self.seed_axis.streams.generators)

    def standard_normal(self, *shape: int) -> torch.Tensor:
        """A standard normal draw of ``shape`` on the device (``draw``)."""
        return self.draw(lambda generator: torch.randn(shape, device=self.device, generator=generator))

    # ---- optimizer steps: one way, torch's own --------------------------------------------------
    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        groups = self.optimizer_groups()
        self._optimizer_index = {name: i for i, name in enumerate(groups)}
        # capturable: the step count stays on the device, so a CUDA graph can hold the steps
        capturable = self.captured_update is not None
        return [torch.optim.Adam(params, lr=lr, capturable=capturable, **ADAM) for params, lr in groups.values()]

    def optimizer_groups(self) -> dict[str, tuple[list[torch.nn.Parameter], float]]:
        """phase -> (parameters, learning rate), one Adam optimizer each, in the checkpoint's order."""
        hp = self.hparams
        groups = {"critic": (list(self.critic.parameters()), hp.critic_lr),
                  "actor": (list(self.actor.parameters()), hp.actor_lr)}
        if hp.auto_alpha:
            groups["temperature"] = ([self.temperature.log_alpha], hp.alpha_lr)
        if self.world_model is not None:
            groups["model"] = (list(self.world_model.parameters()), hp.model_lr)
        return groups

    def optimizer(self, phase: str) -> torch.optim.Optimizer:
        """The torch optimizer of ``phase`` (critic, actor, temperature, model)."""
        return self.optimizers(use_pl_optimizer=False)[self._optimizer_index[phase]]

    def optimize(self, phase: str, loss: torch.Tensor, record: bool = True) -> None:
        """One step of ``phase``'s optimizer on ``loss`` (``compute_gradients``, then
        ``apply_gradients``); ``record``: the guard checks the loss and the stepped parameters (not
        done per minibatch of a model fit, which is checked whole)."""
        self.compute_gradients(phase, loss)
        self.apply_gradients(phase, loss if record else None)

    def compute_gradients(self, phase: str, loss: torch.Tensor) -> None:
        """Gradients of ``loss`` into ``phase``'s parameters, cleared first (not named ``backward``:
        that is LightningModule's hook, which ``manual_backward`` calls)."""
        self.optimizer(phase).zero_grad(set_to_none=True)
        # a group's per-seed losses: no parameter is shared, so each seed's gradient is its own loss's
        (loss if loss.dim() == 0 else loss.sum()).backward()

    def apply_gradients(self, phase: str, loss: Optional[torch.Tensor] = None, clip: Optional[float] = None,
                        norm: bool = False) -> Optional[torch.Tensor]:
        """Step ``phase``'s optimizer on the gradients in place, their norm clipped to ``clip``
        first; with ``norm`` (or ``clip``), that norm, before clipping, is returned. With ``loss``,
        the guard checks it and the stepped parameters."""
        optimizer = self.optimizer(phase)
        total = None
        if clip is not None or norm:
            params = _parameters_of(optimizer)
            if self.seed_axis is not None:  # each seed's own norm and clip
                total = self.seed_axis.clip_grad_norm_(params, clip)
            else:
                total = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
                if clip is not None:
                    torch.nn.utils.clip_grads_with_norm_(params, clip, total)
        optimizer.step()
        if loss is not None:
            self.guard.record_finiteness(phase, loss, _parameters_of(optimizer))
        return total

    def record_phase(self, phase: str, loss: torch.Tensor) -> None:
        """Record whether ``phase``'s loss and its optimizer's parameters are finite."""
        self.guard.record_finiteness(phase, loss, _parameters_of(self.optimizer(phase)))

    # ---- the execution plan ------------------------------------------------------------------
    def execution_plan(self, device: torch.device, precision: str) -> ExecutionPlan:
        """How the update runs on ``device`` at ``precision`` (algorithms/execution.py), resolved
        once per device and precision (the CLI's call, for the run's first line and params, and
        setup's then agree; a module fitted again elsewhere gets that device's plan)."""
        if self._plan is None or (self._plan.device, self._plan.precision) != (device.type, str(precision)):
            hp = self.hparams
            self._plan = resolve_plan(
                device, precision, hp.get("cuda_graph"), hp.get("compile"), hp.get("tf32"),
                has_compiled_parts=self.world_model is not None, compact_rows=hp.get("compact_rows"),
                imagines=self.h_step is not None, grouped=self.seed_axis is not None,
            )
        return self._plan

    @property
    def plan(self) -> ExecutionPlan:
        """How the update runs: the trainer's device and precision once set up (or as the CLI
        resolved it); outside a Trainer, this module's device at 32-true."""
        return self._plan if self._plan is not None else self.execution_plan(self.device, "32-true")

    def setup(self, stage: str) -> None:
        device = self.trainer.strategy.root_device
        plan = self.execution_plan(device, self.trainer.precision)
        # a withdrawn choice (a failed capture or compile) becomes a tag: plan.<choice>_withdrawn
        plan.on_withdraw = lambda choice, why: set_run_tag(self.trainer, f"plan.{choice}_withdrawn", why)
        self.timer.use_cuda_events(device.type == "cuda")  # time/* on a GPU: the GPU's time
        if plan.tf32:
            torch.set_float32_matmul_precision("high")
        # a fresh capture each fit: a graph holds the optimizers it was captured with, and
        # configure_optimizers builds new ones (and another device's plan may have none)
        self.captured_update = CapturedUpdate(self.update, generators=self.seed_generators()) if plan.cuda_graph else None

    def on_fit_start(self) -> None:
        if self.rollouts is not None and self.rollouts.schedule_start is None:
            # MBPO's schedule: epoch 0 starts after the initial exploration, as in its code
            self.rollouts.schedule_start = self.warmup_steps

    def on_train_start(self) -> None:
        if self.seed_axis is not None:  # a resumed group: the seeds stopped before stay stopped
            from mpdp_lightning.training.seed_runs import stop_seed

            for position in sorted(self.stopped_seeds):
                stop_seed(self.trainer, self, position, None)
        if self.rollouts is not None and self.model_phase.trained_at is not None and not self.rollouts.replays:
            self.rollouts.branch(self)  # a resumed MBPO run: its model and buffer are restored, not its rollouts
        # A resumed run's optimizers come with the param groups of the device they were saved on
        # (capturable on a GPU with a graph); a capture needs the flag, an eager run goes without.
        capturable = self.captured_update is not None
        for optimizer in self.trainer.optimizers:
            for group in optimizer.param_groups:
                group["capturable"] = capturable
                if not capturable:
                    continue
                for p in group["params"]:  # a non-fused Adam's checkpoint keeps its step counts on the host
                    state = optimizer.state.get(p, {})
                    if "step" in state and state["step"].device != p.device:
                        state["step"] = state["step"].to(p.device, torch.float32)

    # ---- acting (the callbacks') -------------------------------------------------------------
    @torch.no_grad()
    def act(self, obs: torch.Tensor, deterministic: bool = False) -> torch.Tensor:
        """pi_0's action for a batch of observations [n, obs_dim], in the environment's units; in
        a group, each seed's for its own [seeds, n, obs_dim], with its own noise, one seed after
        another: a few rows each, exact to the seed alone on the CPU (``SeedAxis.map``), and cheap
        beside the updates between two env steps."""
        noise = None if deterministic else self.standard_normal(obs.shape[-2], self.act_dim)
        return self.per_seed(None, lambda agent, obs, noise: agent.actor.act(obs, deterministic, noise=noise),
                             obs, noise, batched=False)

    def explore(self, obs: torch.Tensor) -> torch.Tensor:
        """The training environment's action: pi_0's sample, or with an explorer (COPlanner) and a
        fitted model UP-MPC's optimistic choice, whose uncertainties go into the train metrics (in
        a group, each seed's plan, one seed after another: ``SeedAxis.each``)."""
        if self.explorer is None or self.model_phase is None or self.model_phase.trained_at is None:
            return self.act(obs)
        if self.seed_axis is None:
            plan = self.explorer.plan(self.world_model, self.planning_action, obs)
            chosen, candidates, action = plan.chosen_uncertainty.mean(), plan.candidate_uncertainty.mean(), plan.action
        else:  # each seed plans with its own model and heads, as alone (a stopped seed: zeros, unlogged)
            plans = self.seed_axis.each(self, lambda agent, obs: agent.explorer.plan(agent.world_model,
                                                                                   agent.planning_action, obs),
                                        obs, skip=sorted(self.stopped_seeds))
            zero = obs.new_zeros(())
            chosen = torch.stack([p.chosen_uncertainty.mean() if p else zero for p in plans])
            candidates = torch.stack([p.candidate_uncertainty.mean() if p else zero for p in plans])
            action = torch.stack([p.action if p else obs.new_zeros(obs.shape[-2], self.act_dim) for p in plans])
        self.train_metrics.accumulate({"coplanner/explore_u_chosen": chosen, "coplanner/explore_u_candidates": candidates})
        return action

    def planning_action(self, obs: torch.Tensor, step: int) -> torch.Tensor:
        """The policy a planner acts with at its step ``step``: head ``step`` (the last beyond H;
        SAC and MBPO: pi_0), each head being trained for its step of an imagined rollout."""
        return self.actor.act(obs, head=min(step, self.actor.heads - 1))

    def act_on_host(self, obs: np.ndarray, deterministic: bool = False, where: str = "", explore: bool = False,
                    finite: bool = True) -> np.ndarray:
        """pi_0's actions for a batch of host observations, as a host array: the one place every
        environment gets its actions from (envs/stepping.py). With ``finite`` a NaN or inf action
        stops the run, naming the phase that broke first (the check is free: the actions come to
        the host anyway).

        Args:
            where: when the action was asked for, e.g. "at env step 151", for the message.
            explore: the training environment's action (``explore``); evaluation never sets it.
        """
        obs = torch.as_tensor(obs, dtype=torch.float32, device=self.device)
        actions = (self.explore(obs) if explore else self.act(obs, deterministic)).cpu().numpy()
        if self.seed_axis is not None and finite:  # a group: a seed whose action broke stops alone
            bad = [i for i in range(len(actions)) if not np.isfinite(actions[i]).all() and i not in self.stopped_seeds]
            if bad:
                self._stop_broken_seeds(" ".join(filter(None, ("pi_0's action", where))), False, bad)
            for position in self.stopped_seeds:  # a stopped seed's environment gets no NaN
                actions[position] = 0.0
            return actions
        if finite and not np.isfinite(actions).all():
            shown = actions[0] if len(actions) == 1 else actions
            self.raise_if_not_finite(" ".join(filter(None, ("pi_0's action", where, f"was {shown.tolist()}"))))
        return actions

    # ---- the env-step callbacks' defaults (each algorithm its own) -----------------------------
    @classmethod
    def default_warmup_steps_for(cls, task: str) -> int:
        """Warm-up env steps when ``env_interaction.warmup_steps`` is not given: the task's (5000;
        inverted_pendulum 1000)."""
        return get_task(task).warmup_steps

    def default_updates_per_env_step(self) -> int:
        """Updates per env step when ``env_interaction.updates_per_env_step`` is not given."""
        return 1

    # ---- log points --------------------------------------------------------------------------
    def window_metrics(self) -> dict[str, float]:
        """Means of the train metrics and phase times since the last log point (one host sync)."""
        metrics = {**self.train_metrics.pop_means(), **self.timer.pop_means()}
        if self.h_step is not None:  # MPDP: the horizon histogram, and whether it became SAC
            self.h_step.end_window(self.env_steps, metrics, self._trainer)
        return metrics

    def raise_if_not_finite(self, when: str = "", scan_parameters: bool = False) -> None:
        """Stop with a message naming the phase that produced the run's first NaN or inf (host sync:
        call at log points, before checkpoints and on a non-finite action).

        Args:
            when: what found it, e.g. "pi_0's action at env step 151 was [nan]"; it leads the message.
            scan_parameters: when no phase recorded one, look for non-finite weights anyway (set
                only by something changed outside the phases); implied by ``when``.
        """
        if self.seed_axis is not None:
            self._stop_broken_seeds(when, scan_parameters)
            return
        first = self.guard.first()
        broken = non_finite_parameters(self) if first is None and (scan_parameters or when) else []
        if first is None and not broken and not when:
            return
        if first is not None:
            cause = f"the {first.phase} phase's {first.what} first, in update {first.update}"
        elif broken:
            cause = f"non-finite parameters in {', '.join(broken)} (changed outside the update phases)"
        else:
            cause = "no phase's loss or parameters are non-finite"
        lead = f"{when}: " if when else ""
        raise NonFiniteLossError(
            f"{lead}{cause}; the run stopped at env step {self.env_steps} and its last good checkpoint is kept"
        )

    def _stop_broken_seeds(self, when: str, scan_parameters: bool, positions: Sequence[int] = ()) -> None:
        """A group's ``raise_if_not_finite``: each seed that broke (its guard's record, or with
        ``scan_parameters`` a non-finite weight of its own, or one of ``positions``: its action was
        non-finite) is stopped while the others go on (training/seed_runs.py); once every seed has
        stopped, the run stops as a run of one seed does."""
        from mpdp_lightning.training.seed_runs import stop_seed

        message = None
        for position, seed in enumerate(self.seed_axis.seeds):
            if position in self.stopped_seeds:
                continue
            first = self.guard.first(seed=position)
            if first is not None:
                cause = f"the {first.phase} phase's {first.what} first, in update {first.update}"
            elif position in positions or (scan_parameters and not all(
                    torch.isfinite(p[position]).all() for p in self.parameters())):
                cause = "non-finite parameters" if position not in positions else "its action was non-finite"
            else:
                continue
            lead = f"{when}: " if when and position in positions else ""
            message = f"{lead}{cause}, at env step {self.env_steps}"
            stop_seed(self.trainer, self, position, message)
            message = f"seed {seed}: {message}"
        if len(self.stopped_seeds) == len(self.seed_axis) and message is not None:
            raise NonFiniteLossError(f"{message}, the last seed of the group; the run stopped and its last good "
                                     "checkpoint is kept")

    # ---- checkpoint ----------------------------------------------------------------------------
    def parts(self) -> list[Any]:
        """The parts with counters of their own in the checkpoint."""
        return [part for part in (self.model_phase, self.rollouts, self.h_step) if part is not None]

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["format"], checkpoint["mpdp_version"] = CHECKPOINT_FORMAT, mpdp_lightning.__version__
        counters = {"env_steps": self.env_steps, "updates": self.updates}
        for part in self.parts():
            counters.update(part.counters())
        checkpoint["counters"] = counters
        if self.seed_axis is not None:  # a group: its seeds and where each seed's random stream is
            checkpoint["seeds"] = list(self.seed_axis.seeds)
            checkpoint["seed_streams"] = self.seed_axis.streams.state_dict()
            checkpoint["stopped_seeds"] = sorted(self.stopped_seeds)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        upgrade_checkpoint(checkpoint)  # older layouts' keys, or one line naming what wrote it
        counters = checkpoint["counters"]
        self.env_steps = int(counters["env_steps"])
        self.updates = int(counters["updates"])
        for part in self.parts():
            part.load_counters(counters)
        self.guard.start_at(self.updates)
        saved_seeds = checkpoint.get("seeds")
        seeds = list(self.seed_axis.seeds) if self.seed_axis is not None else None
        if (saved_seeds is None) != (seeds is None) or (seeds is not None and list(saved_seeds) != seeds):
            raise CheckpointError(f"the checkpoint holds {_seeds_text(saved_seeds)} and this run trains {_seeds_text(seeds)}: "
                                  "resume it with the seeds it was trained with")
        if self.seed_axis is not None:
            self.seed_axis.streams.load_state_dict(checkpoint["seed_streams"])
            self.stopped_seeds = set(checkpoint.get("stopped_seeds", []))


def _seeds_text(seeds: Optional[Sequence[int]]) -> str:
    return "one seed" if seeds is None else "seeds " + ",".join(map(str, seeds))


def _parameters_of(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]
