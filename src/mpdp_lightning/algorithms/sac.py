"""SAC (v2: twin Q, Polyak targets, optional automatic temperature) as a LightningModule.

This is the model-free baseline and MPDP's policy-evaluation half. The module owns the nets,
their optimizers and the update phases (manual optimization); it has no environment code: the
EnvInteraction callback acts with ``act`` and fills the replay buffer, and every ``training_step``
is one update on a batch sampled from it.

The clock is ``env_steps`` (advanced by the EnvInteraction callback) and the update count is
``updates``; both are saved in the checkpoint.

One update (``update``) is device work only, so that on CUDA it is captured once as a CUDA graph
and replayed (``cuda_graph``, training/cuda_graph.py): its backward passes and optimizer steps
then go to torch directly rather than through Lightning's wrappers, which would run only once,
at capture. With 32-bit or bf16 precision those wrappers add hooks and step counting, not maths,
so ``trainer.global_step`` does not count captured steps (``updates`` does).
"""

from __future__ import annotations

import copy
from typing import Any, Optional, Union

import lightning.pytorch as pl
import numpy as np
import torch
from jsonargparse.typing import NonNegativeFloat, PositiveFloat, PositiveInt
from lightning.pytorch.utilities import rank_zero_warn
from tensordict import TensorDictBase

from mpdp_lightning.training.cuda_graph import CapturedUpdate, CaptureError
from mpdp_lightning.training.data import PendingBatch, drawn
from mpdp_lightning.errors import MPDPError, NonFiniteLossError
from mpdp_lightning.training.finiteness import NonFiniteGuard, non_finite_parameters
from mpdp_lightning.training.metrics import MetricAccumulator, PhaseTimer
from mpdp_lightning.models.policy import SquashedGaussianHeads, Temperature, TwinQ
from mpdp_lightning.objectives.sac_losses import actor_loss, critic_loss, temperature_loss
from mpdp_lightning.envs.tasks import get_task, task_spaces

# The fused Adam kernel (CPU and CUDA) updates all of an optimizer's tensors in one call.
ADAM = {"fused": True}

# Precisions whose Lightning plugin reads the device in every step (fp16 mixed precision's loss
# scaler skips the steps with inf gradients, decided on the host): not capturable.
HOST_STEPPED_PRECISIONS = ("16-mixed", "16")

# The phases of one update, in the order they run: the NaN/inf guard names the first that broke.
PHASES = ("model", "critic", "actor", "temperature")


class SAC(pl.LightningModule):
    """Soft Actor-Critic.

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
            CUDA device, a precision other than fp16, see ``cuda_graph_problem``), and should
            the capture fail, warn and go on eagerly (True: stop).
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
    ) -> None:
        super().__init__()
        get_task(task)  # an unknown name fails here, before any net is built
        for name, value in dict(actor_lr=actor_lr, critic_lr=critic_lr, alpha=alpha, alpha_lr=alpha_lr).items():
            if not value > 0:
                raise ValueError(f"{name} must be positive, got {value}")
        if not 0.0 <= gamma <= 1.0 or not 0.0 < tau <= 1.0:
            raise ValueError(f"need 0 <= gamma <= 1 and 0 < tau <= 1, got gamma={gamma}, tau={tau}")
        self.save_hyperparameters(logger=False)
        self.automatic_optimization = False

        spaces = task_spaces(task)
        self.task = task
        self.obs_dim, self.act_dim = spaces.obs_dim, spaces.act_dim
        self.target_entropy = float(-spaces.act_dim if target_entropy is None else target_entropy)
        self.actor = self.build_actor(heads=1)
        self.critic = TwinQ(spaces.obs_dim, spaces.act_dim, hidden, layers, activation)
        self.critic_target = copy.deepcopy(self.critic).requires_grad_(False)
        self.temperature = Temperature(alpha, learnable=auto_alpha)

        self.env_steps = 0
        self.updates = 0
        self.train_metrics = MetricAccumulator()
        self.timer = PhaseTimer()
        self.guard = NonFiniteGuard(PHASES)
        self.captured_update: Optional[CapturedUpdate] = None  # set in setup() where it applies
        self._direct_steps = False  # backward and optimizer steps bypass Lightning (graph capture)

    def build_actor(self, heads: int) -> SquashedGaussianHeads:
        """``heads`` squashed-Gaussian policies sized for the task (SAC: 1; MPDP: H)."""
        hp, spaces = self.hparams, task_spaces(self.task)
        return SquashedGaussianHeads(
            spaces.obs_dim, spaces.act_dim, spaces.action_low, spaces.action_high, heads, hp.hidden, hp.layers, hp.activation
        )

    # ---- acting (used by the callbacks) -------------------------------------------------
    def act(self, obs: torch.Tensor, deterministic: bool = False) -> torch.Tensor:
        """pi_0's action for a batch of observations, in the environment's units."""
        return self.actor.act(obs, deterministic)

    def explore(self, obs: torch.Tensor) -> torch.Tensor:
        """The action taken in the training environment: pi_0's sample (with COPlanner on a
        model-based algorithm, UP-MPC's optimistic choice; see ModelBasedSAC)."""
        return self.act(obs)

    @classmethod
    def default_warmup_steps_for(cls, task: str) -> int:
        """Warm-up env steps when ``env_interaction.warmup_steps`` is not given: the task's (5000;
        inverted_pendulum 1000)."""
        return get_task(task).warmup_steps

    def default_updates_per_env_step(self) -> int:
        """Updates per env step when ``env_interaction.updates_per_env_step`` is not given."""
        return 1

    def planning_action(self, obs: torch.Tensor, step: int) -> torch.Tensor:
        """The policy a planner acts with at planning step ``step``: pi_0's sample (MPDP: head
        ``step``, trained for that step of an imagined rollout)."""
        return self.actor.act(obs)

    def act_on_host(self, obs: np.ndarray, deterministic: bool = False, where: str = "", explore: bool = False) -> np.ndarray:
        """pi_0's actions for a batch of host observations, as a host array that is never NaN or
        inf: the one place every environment gets its actions from (training and evaluation).
        The check costs nothing, the actions come to the host anyway; a non-finite one stops the
        run, naming the phase that broke first.

        Args:
            where: when the action was asked for, e.g. "at env step 151", for the message.
            explore: the training environment's action (``explore``); evaluation never sets it.
        """
        obs = torch.as_tensor(obs, dtype=torch.float32, device=self.device)
        actions = (self.explore(obs) if explore else self.act(obs, deterministic)).cpu().numpy()
        if not np.isfinite(actions).all():
            shown = actions[0] if len(actions) == 1 else actions
            self.raise_if_not_finite(" ".join(filter(None, ("pi_0's action", where, f"was {shown.tolist()}"))))
        return actions

    # ---- the CUDA graph -----------------------------------------------------------------
    def cuda_graph_problem(self, device: torch.device, precision: str) -> Optional[str]:
        """Why the update cannot be captured as a CUDA graph on ``device`` at ``precision``, or None."""
        if device.type != "cuda":
            return f"a CUDA graph needs a CUDA device, and this run's is {device.type}"
        if str(precision) in HOST_STEPPED_PRECISIONS:
            return f"precision {precision} scales the loss and skips steps from the host; use 32-true or bf16-mixed"
        return None

    def setup(self, stage: str) -> None:
        device = self.trainer.strategy.root_device
        self.timer.use_cuda_events(device.type == "cuda")  # time/* on a GPU: the GPU's time
        if device.type == "cuda" and self.hparams.get("tf32") is not False:
            torch.set_float32_matmul_precision("high")
        wanted = self.hparams.get("cuda_graph")
        problem = self.cuda_graph_problem(device, self.trainer.precision)
        if wanted and problem:  # the CLI says so before any work; this is for direct Trainer use
            raise MPDPError(f"model.cuda_graph: {problem}")
        if (wanted is None and problem is None) or wanted:
            self.captured_update = CapturedUpdate(self.update)
            self._direct_steps = True  # warm-up calls too: the same code as the captured one

    def on_train_start(self) -> None:
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

    def stop_capturing(self, error: CaptureError) -> None:
        """Go on with eager updates (Lightning's steps again) after a failed capture, saying why."""
        self.captured_update = None
        self._direct_steps = False
        rank_zero_warn(f"the update could not be captured as a CUDA graph ({error}); updating eagerly from "
                       f"now on (--model.cuda_graph false skips the attempt, true makes it an error)")

    # ---- optimisation -------------------------------------------------------------------
    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        groups = self.optimizer_groups()
        self._optimizer_index = {name: i for i, name in enumerate(groups)}
        # capturable: the step count stays on the device, so a CUDA graph can hold the steps
        capturable = self.captured_update is not None
        return [torch.optim.Adam(params, lr=lr, capturable=capturable, **ADAM) for params, lr in groups.values()]

    def optimizer_groups(self) -> dict[str, tuple[list[torch.nn.Parameter], float]]:
        """name -> (parameters, learning rate), one Adam optimizer each; subclasses add theirs."""
        hp = self.hparams
        groups = {
            "critic": (list(self.critic.parameters()), hp.critic_lr),
            "actor": (list(self.actor.parameters()), hp.actor_lr),
        }
        if hp.auto_alpha:
            groups["temperature"] = ([self.temperature.log_alpha], hp.alpha_lr)
        return groups

    def optimizer(self, name: str) -> Any:
        """The (Lightning-wrapped) optimizer of phase ``name``."""
        return self.optimizers()[self._optimizer_index[name]]

    def _step(self, optimizer: Any, loss: torch.Tensor, phase: Optional[str] = None) -> None:
        """One optimizer step on ``loss``; with ``phase``, the guard checks its loss and parameters."""
        self.backward_into(optimizer, loss)
        self.step_optimizer(optimizer)
        if phase is not None:
            self.check_phase(phase, loss, optimizer)

    def backward_into(self, optimizer: Any, loss: torch.Tensor) -> None:
        """Gradients of ``loss`` into ``optimizer``'s parameters, cleared first (Lightning's
        ``manual_backward``, or torch's own inside a CUDA graph)."""
        optimizer.zero_grad(set_to_none=True)
        if self._direct_steps:
            loss.backward()
        else:
            self.manual_backward(loss)

    def clip_grad_norm(self, optimizer: Any, max_norm: float) -> None:
        if self._direct_steps:
            params = [p for group in optimizer.param_groups for p in group["params"]]
            torch.nn.utils.clip_grad_norm_(params, max_norm)
        else:
            self.clip_gradients(optimizer, gradient_clip_val=max_norm, gradient_clip_algorithm="norm")

    def step_optimizer(self, optimizer: Any) -> None:
        if self._direct_steps:
            getattr(optimizer, "optimizer", optimizer).step()  # under Lightning's wrapper
        else:
            optimizer.step()

    def check_phase(self, phase: str, loss: torch.Tensor, optimizer: Any) -> None:
        """Record whether ``phase``'s loss and the parameters ``optimizer`` just stepped are finite."""
        params = [p for group in optimizer.param_groups for p in group["params"]]
        self.guard.record(phase, loss, params)

    def update_critic(self, batch: TensorDictBase) -> dict[str, torch.Tensor]:
        critic_opt = self.optimizer("critic")
        loss, info = critic_loss(
            self.critic, self.critic_target, self.actor, batch, self.hparams.gamma, self.temperature.alpha
        )
        self._step(critic_opt, loss, "critic")
        with torch.no_grad():
            online, target = list(self.critic.parameters()), list(self.critic_target.parameters())
            torch._foreach_lerp_(target, online, self.hparams.tau)
        return {"train/critic_loss": loss.detach(), "train/q_mean": info["q_mean"], "train/q_target": info["target_mean"]}

    def improve_policy(self, batch: TensorDictBase) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """SAC's one-step policy improvement; returns metrics and pi_0's log-probs on real states
        (for the temperature). MPDP overrides this with the H-step improvement."""
        actor_opt = self.optimizer("actor")
        loss, info = actor_loss(self.actor, self.critic, batch["obs"], self.temperature.alpha)
        self._step(actor_opt, loss, "actor")
        return {"train/actor_loss": loss.detach(), "train/entropy": info["entropy"]}, info["log_prob"]

    def update_temperature(self, log_prob: torch.Tensor) -> dict[str, torch.Tensor]:
        metrics = {"train/alpha": self.temperature.alpha}
        if self.hparams.auto_alpha:
            loss = temperature_loss(self.temperature.log_alpha, log_prob, self.target_entropy)
            self._step(self.optimizer("temperature"), loss, "temperature")
            metrics["train/alpha_loss"] = loss.detach()
        return metrics

    def draw_batch(self, batch: Union[PendingBatch, TensorDictBase]) -> TensorDictBase:
        """The update's transitions (MBPO mixes in model rollouts here)."""
        return drawn(batch)

    def update(self, batch: TensorDictBase) -> dict[str, torch.Tensor]:
        """One update on ``batch``: critic, policy improvement, temperature, each with its
        optimizer step; device work only, returning detached scalar metrics (what a CUDA graph
        captures, see training/cuda_graph.py)."""
        with self.timer.phase("critic"):
            metrics = self.update_critic(batch)
        with self.timer.phase("policy"):
            policy_metrics, log_prob = self.improve_policy(batch)
        with self.timer.phase("temperature"):
            metrics.update(self.update_temperature(log_prob))
        metrics.update(policy_metrics)
        self.guard.advance()
        return metrics

    def training_step(self, batch: Union[PendingBatch, TensorDictBase], batch_idx: int) -> None:
        batch = self.draw_batch(batch)  # sampled now: after this update's env step and model fit
        metrics = None
        if self.captured_update is not None:
            try:
                with self.timer.phase("update"), self.timer.paused():  # phases inside are not timed
                    metrics = self.captured_update(batch)
            except CaptureError as error:
                if self.hparams.get("cuda_graph"):
                    raise
                self.stop_capturing(error)
        if metrics is None:
            metrics = self.update(batch)
        self.train_metrics.add(metrics)  # copies them: a replay overwrites the graph's outputs
        self.timer.count_update()
        self.updates += 1

    def window_metrics(self) -> dict[str, float]:
        """Means of the train metrics and phase times since the last log point (one host sync)."""
        return {**self.train_metrics.pop_means(), **self.timer.pop_means()}

    def raise_if_not_finite(self, when: str = "", scan_parameters: bool = False) -> None:
        """Stop with a message naming the phase that produced the run's first NaN or inf (host sync:
        call at log points, before checkpoints and on a non-finite action).

        Args:
            when: what found it, e.g. "pi_0's action at env step 151 was [nan]"; it leads the message.
            scan_parameters: when no phase recorded one, look for non-finite weights anyway (set
                only by something changed outside the phases); implied by ``when``.
        """
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

    # ---- checkpoint ---------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["counters"] = {"env_steps": self.env_steps, "updates": self.updates}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.env_steps = int(checkpoint["counters"]["env_steps"])
        self.updates = int(checkpoint["counters"]["updates"])
        self.guard.start_at(self.updates)
