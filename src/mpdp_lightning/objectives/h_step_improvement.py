"""MPDP's extended policy improvement (the paper's Algorithm 1, with the project's decisions
D1-D7 of shared/reference/mpdp-paper.md), as a pure function of (nets, model, batch).

From the batch's real start states, head t samples a_t ~ pi_t(.|s_t) (reparameterised), the
frozen model gives s_{t+1}, r_t, the terminal flag and the One-vs-Rest error u_t = u(s_t, a_t),
and each row accumulates

    J = sum_t gamma^t (r_t - alpha log pi_t(a_t|s_t) - beta u_t / scale) + end term.

A row ends (D1):
- where u_t crosses the threshold (tested before the model step is used): it adds
  gamma^t [min_j Q_j(s_t, a_t) - alpha log pi_t(a_t|s_t)] instead of that step's reward, so a
  row stopped at its first step contributes exactly SAC's actor objective;
- at a predicted terminal s_{t+1}: that step's reward term and nothing after;
- after H steps: + gamma^H V(s_H), V(s) = min_j Q_j(s, a') - alpha log pi_0(a'|s), a' ~ pi_0
  with pi_0's weights detached: V is a fixed function of s_H, which the heads reach only
  through s_H (with live weights head 0 would also get a SAC gradient on imagined states).

The loss is -mean(J); one backward reaches every head that some row used. The model's and the
critics' weights are frozen (gradients flow through them to the actions, never into them).

Two ways to run the same objective (the same loss and gradients up to rounding, tested):
- masked: every row runs all H steps as one batch, with no host synchronisation to ask whether
  rows are still alive (what a CUDA graph needs); ended rows are masked with ``torch.where``,
  which passes them exactly zero gradient, and they keep their last state detached so that
  nothing they compute can reach the loss;
- compacted: after each step only the live rows go on (indexed out with ``nonzero``), so rows
  that have stopped cost nothing; finding them reads the device a few times per step, which is
  free on the CPU and a synchronisation on CUDA.
All randomness (each head's action noise, the model's elite and sample noise per row and step)
is drawn once up front (``ImaginationNoise``), so a row's rollout is the same in both, and the
same in eager and compiled runs. Only rounding differs (matmuls over other row counts, fused
kernels), so a row whose u lies within rounding of u_T could stop a step apart.
One step is what ``torch.compile`` compiles, whole (``fullgraph``): masked, ``masked_step`` (the
model step and every row's bookkeeping, fused into the same kernels); compacted, ``imagine_step``
with a dynamic row count. The same graphs serve every step and head (masked, three: the first
step's rows carry no gradient, and the second's stopped states none yet; compacted, two, and a
step with a single live row adds one), where an unrolled H-step graph's cold compile grows with H.
"""

from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass
from typing import Callable, Iterator, Literal, NamedTuple, Optional

import torch

from mpdp_lightning.models.nets import MemberWeights
from mpdp_lightning.models.policy import SquashedGaussianHeads, TwinQ, frozen
from mpdp_lightning.models.world_model import GaussianEnsemble

ThresholdRule = Literal["fresh", "holdout", "quantile", "absolute", "anchored"]
THRESHOLD_RULES = ("fresh", "holdout", "quantile", "absolute", "anchored")
CALIBRATED_RULES = ("fresh", "holdout")  # u_T from a kind of real pair at each model fit
HELD_RULES = (*CALIBRATED_RULES, "anchored")  # the rules whose u_T is held between updates (a buffer)
PenaltyScale = Literal["median", "none"]


@dataclass(frozen=True)
class ImprovementSettings:
    """How the H-step objective is built.

    horizon: H_max, the number of actor heads and the longest imagined rollout.
    gamma: discount.
    beta: weight of the OvR penalty -beta * u / scale in every step's reward.
    adaptive: stop rows where u crosses the threshold; False gives a fixed horizon (only
        predicted terminals end rows early).
    threshold: how u_T is calibrated (D3); imagined pairs are out of sample, so the first two
        rules compare them with real pairs the model had not been fitted on. "fresh": the
        ``threshold_quantile`` quantile of u over the transitions stored since the previous model
        fit, under the model before the fit (which had never seen them), set at each fit and
        held until the next. "holdout": the same over the fit's holdout rows (not trained on by
        this fit, though earlier fits, whose weights it starts from, mostly were). "quantile":
        the same over the batch's real (s, a) pairs, most of which the model was fitted on.
        "absolute": the paper's literal rule, stop where log u >= ``log_threshold``. "anchored":
        the quantile rule's u_T at the first update, then held (an absolute level: the horizon
        grows as the model becomes more reliable than it was at the start).
    threshold_quantile: q of the fresh, holdout, quantile and anchored rules.
    log_threshold: u_T of the absolute rule, in log space (the paper's -5).
    penalty_scale: "median" (D7): u is divided by its median over the batch's real pairs before
        beta applies, so beta means the same on every task; "none": raw u. Only the scale
        matters: where a row stops is not differentiable, so subtracting a per-step constant
        from u (say, making the penalty 0 on typical real pairs) changes J but not one gradient.
    """

    horizon: int = 25
    gamma: float = 0.99
    beta: float = 0.5
    adaptive: bool = True
    threshold: ThresholdRule = "fresh"
    threshold_quantile: float = 0.9
    log_threshold: float = -5.0
    penalty_scale: PenaltyScale = "median"

    def __post_init__(self) -> None:
        if self.horizon < 1:
            raise ValueError(f"horizon must be at least 1, got {self.horizon}")
        if self.beta < 0:
            raise ValueError(f"beta must be non-negative, got {self.beta}")
        if not 0.0 < self.threshold_quantile <= 1.0:
            raise ValueError(f"threshold_quantile must be in (0, 1], got {self.threshold_quantile}")
        if self.threshold not in THRESHOLD_RULES:
            raise ValueError(f"threshold must be one of {', '.join(map(repr, THRESHOLD_RULES))}, got {self.threshold!r}")
        if self.penalty_scale not in ("median", "none"):
            raise ValueError(f"penalty_scale must be 'median' or 'none', got {self.penalty_scale!r}")


class ImprovementResult(NamedTuple):  # a tuple: vmap (a group of seeds) returns it batched
    loss: torch.Tensor  # -mean J, to minimise
    horizon: torch.Tensor  # [B] model steps each row took (0: stopped by u at its first step)
    stop_reason: torch.Tensor  # [B] 0 threshold, 1 predicted terminal, 2 reached H
    pi0_log_prob: torch.Tensor  # [B] log pi_0(a_0|s_0) on the real start states (detached)
    diagnostics: dict[str, torch.Tensor]  # scalars, all detached


STOP_THRESHOLD, STOP_TERMINAL, STOP_HORIZON = 0, 1, 2


@contextlib.contextmanager
def full_fp32_matmuls() -> Iterator[None]:
    """float32 matmuls in full precision inside (cuBLAS reads the setting at each call, so a
    captured CUDA graph keeps each matmul's mode); as it was outside."""
    precision = torch.get_float32_matmul_precision()
    if precision == "highest":
        yield
        return
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(precision)


def quantiles(x: torch.Tensor, *qs: float) -> list[torch.Tensor]:
    """``torch.quantile(x, q)`` (linear interpolation, the same bits) for each q, from one sort;
    unlike ``torch.quantile`` it has a batching rule, so a group of seeds (vmap) computes each
    seed's in one kernel rather than one seed after another. Each q enters as a fill on x's device
    (a Python float: no host-to-device copy, which a CUDA graph could not hold), and the ranks
    stay on the device."""
    ordered = x.flatten().sort().values
    last = ordered.numel() - 1
    has_nan = x.isnan().any()
    out = []
    for q in qs:
        # as torch.quantile: a NaN anywhere gives NaN (the rank moves to the last, NaN, element)
        rank = torch.where(has_nan, float(last), x.new_full((), q) * last)
        below, above = rank.floor().long(), rank.ceil().long()
        # gathered, not indexed: a 0-dim index tensor would be read on the host
        at = lambda i: ordered.gather(0, i.reshape(1)).squeeze(0)  # noqa: E731
        out.append(torch.lerp(at(below), at(above), rank - below))
    return out


def masked_quantiles(x: torch.Tensor, mask: torch.Tensor, *qs: float) -> list[torch.Tensor]:
    """``quantiles`` of the entries of x where ``mask`` holds, without indexing them out (no host
    synchronisation, a fixed shape: capturable, and vmapped per seed); NaN where none holds."""
    if x.numel() == 0:  # a shape, known on the host
        return [x.new_full((), float("nan")) for _ in qs]
    values = torch.where(mask, x, float("inf")).flatten()
    ordered = values.sort().values
    count = mask.flatten().sum()
    last = (count - 1).clamp_min(0).to(x.dtype)
    out = []
    for q in qs:
        rank = last * q
        below, above = rank.floor().long(), rank.ceil().long()
        at = lambda i: ordered.gather(0, i.reshape(1)).squeeze(0)  # noqa: E731
        value = torch.lerp(at(below), at(above), rank - below)
        out.append(torch.where(count > 0, value, float("nan")))
    return out


def uncertainty_calibration(
    model: GaussianEnsemble,
    obs: torch.Tensor,
    action: torch.Tensor,
    settings: ImprovementSettings,
    held: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """u on the batch's real pairs, the stopping threshold and the penalty scale (no gradient),
    in full fp32 even where the run lets matmuls use TF32 (``--model.tf32``): these statistics
    decide where every row stops. ``held``: the u_T that the "fresh", "holdout" and "anchored"
    rules hold between updates; where it is None or NaN (no fit has set it yet, the anchor's first
    update) the batch's quantile stands in."""
    with torch.no_grad(), full_fp32_matmuls():
        u_real = model.uncertainty(*model(obs, action))
        if settings.threshold == "absolute":
            threshold = obs.new_full((), math.exp(settings.log_threshold))  # a fill: no host-to-device copy
        else:  # the batch's quantile, or the held u_T wherever one is held
            threshold = quantiles(u_real, settings.threshold_quantile)[0]
            if settings.threshold in HELD_RULES and held is not None:
                threshold = torch.where(held.isnan(), threshold, held)
        if settings.penalty_scale == "median":
            scale = u_real.median().clamp_min(1e-8)
        else:
            scale = obs.new_ones(())
    return u_real, threshold, scale


class ImaginationNoise(NamedTuple):
    """Every random draw of one improvement, per step and row: a row's rollout depends only on
    its own draws, whichever rows share its batch (a tuple: vmap takes it per seed)."""

    action: torch.Tensor  # [H, B, act_dim] standard normal of each head's action
    pick: torch.Tensor  # [H, B] which elite (0 .. num_elites - 1) samples the row's model step
    model: torch.Tensor  # [H, B, obs_dim + 1] standard normal of the model's sample
    final_action: torch.Tensor  # [B, act_dim] standard normal of pi_0's action in V(s_H)

    @classmethod
    def draw(cls, horizon: int, obs: torch.Tensor, act_dim: int, num_elites: int) -> "ImaginationNoise":
        """The draws for start states ``obs`` [B, obs_dim] (their shape and device)."""
        return cls.for_rows(horizon, obs.shape[-2], obs.shape[-1], act_dim, num_elites, obs.device)

    @classmethod
    def for_rows(cls, horizon: int, rows: int, obs_dim: int, act_dim: int, num_elites: int,
                 device: torch.device, generator: Optional[torch.Generator] = None) -> "ImaginationNoise":
        """The draws for ``rows`` start states, from ``generator`` (None: the default one)."""
        like = dict(device=device, dtype=torch.float32, generator=generator)
        return cls(
            torch.randn(horizon, rows, act_dim, **like),
            torch.randint(num_elites, (horizon, rows), device=device, generator=generator),
            torch.randn(horizon, rows, obs_dim + 1, **like),
            torch.randn(rows, act_dim, **like),
        )


def imagine_step(
    actor: SquashedGaussianHeads,
    model: GaussianEnsemble,
    state: torch.Tensor,
    head: MemberWeights,
    action_noise: torch.Tensor,
    pick: torch.Tensor,
    model_noise: torch.Tensor,
    alpha: torch.Tensor,
    penalty: torch.Tensor,
) -> tuple[torch.Tensor, ...]:
    """One imagined step of rows ``state`` [B, obs_dim] under the head whose weights are ``head``:
    (action, log pi(a|s), next state, reward - alpha log pi - penalty * u, u, predicted terminal).
    ``penalty`` is beta / scale. Pure (no in-place state), so torch.compile captures it whole."""
    action, log_prob = actor.sample(state, head, noise=action_noise)
    step = model.step(state, action, pick=pick, noise=model_noise)
    reward = step.reward - alpha * log_prob - penalty * step.u
    return action, log_prob, step.next_obs, reward, step.u, step.done


StepFn = Callable[..., tuple[torch.Tensor, ...]]


@functools.cache
def compiled_imagine_step() -> StepFn:
    """``imagine_step`` under torch.compile for a varying number of rows (the compacted loop),
    built once per process (Inductor also caches its kernels on disk between runs)."""
    return torch.compile(imagine_step, dynamic=True, fullgraph=True)


class MaskedRows(NamedTuple):
    """Every row's running state in the masked loop (all rows run all H steps)."""

    state: torch.Tensor  # [B, obs_dim] s_t; an ended row keeps its last state, detached
    alive: torch.Tensor  # [B] bool: still imagining
    stop_reason: torch.Tensor  # [B] STOP_* (STOP_HORIZON until a row stops otherwise)
    horizon: torch.Tensor  # [B] model steps taken
    objective: torch.Tensor  # [B] discounted rewards so far
    # where each row crossed the threshold, gathered so that the critic runs once for all
    # stopped rows after the loop instead of once per step
    stop_state: torch.Tensor  # [B, obs_dim] s_t
    stop_action: torch.Tensor  # [B, act_dim] a_t
    stop_discounted_log_prob: torch.Tensor  # [B] gamma^t log pi_t(a_t|s_t)
    stop_discount: torch.Tensor  # [B] gamma^t


def masked_step(
    actor: SquashedGaussianHeads,
    model: GaussianEnsemble,
    rows: MaskedRows,
    head: MemberWeights,
    action_noise: torch.Tensor,
    pick: torch.Tensor,
    model_noise: torch.Tensor,
    alpha: torch.Tensor,
    penalty: torch.Tensor,
    threshold: torch.Tensor,
    discount: torch.Tensor,
    adaptive: bool,
) -> tuple[MaskedRows, torch.Tensor, torch.Tensor]:
    """Step t of the masked loop: ``imagine_step`` and every row's bookkeeping (where it stops and
    why, its discounted reward), as one pure function, so that torch.compile fuses the bookkeeping
    into the step's own kernels (eager, about 15 small kernels a step forward and as many
    backward). ``discount`` is gamma^t as a tensor (one compiled graph for every t). Returns the
    rows after the step, and log pi_t(a_t|s_t) and u_t of every row."""
    action, log_prob, next_obs, reward, u, done = imagine_step(
        actor, model, rows.state, head, action_noise, pick, model_noise, alpha, penalty
    )
    alive = rows.alive
    unreliable = alive & (u >= threshold) if adaptive else torch.zeros_like(alive)
    # D1: a row stopped by u ends with the soft Q of its unreliable pair, no model step
    stop_state = torch.where(unreliable.unsqueeze(-1), rows.state, rows.stop_state)
    stop_action = torch.where(unreliable.unsqueeze(-1), action, rows.stop_action)
    stop_discounted_log_prob = torch.where(unreliable, discount * log_prob, rows.stop_discounted_log_prob)
    stop_discount = torch.where(unreliable, discount, rows.stop_discount)
    going = alive & ~unreliable
    objective = rows.objective + torch.where(going, discount * reward, 0.0)
    terminal = going & done
    stop_reason = torch.where(unreliable, STOP_THRESHOLD, torch.where(terminal, STOP_TERMINAL, rows.stop_reason))
    horizon = rows.horizon + going.long()
    alive = going & ~done
    # ended rows keep their last state, cut from the graph: they only run along masked
    state = torch.where(alive.unsqueeze(-1), next_obs, rows.state.detach())
    after = MaskedRows(state, alive, stop_reason, horizon, objective, stop_state, stop_action,
                       stop_discounted_log_prob, stop_discount)
    return after, log_prob, u


@functools.cache
def compiled_masked_step() -> Callable[..., tuple[MaskedRows, torch.Tensor, torch.Tensor]]:
    """``masked_step`` under torch.compile, built once per process."""
    return torch.compile(masked_step, dynamic=False, fullgraph=True)


def extended_improvement(
    actor: SquashedGaussianHeads,
    critic: TwinQ,
    model: GaussianEnsemble,
    obs: torch.Tensor,
    real_action: torch.Tensor,
    alpha: torch.Tensor,
    settings: ImprovementSettings,
    held_threshold: Optional[torch.Tensor] = None,
    noise: Optional[ImaginationNoise] = None,
    compact: bool = False,
    compiled: bool = False,
) -> ImprovementResult:
    """The H-step objective from real start states ``obs`` [B, obs_dim] (``real_action`` are the
    batch's own actions, used only to calibrate the threshold and the penalty scale).

    Args:
        held_threshold: the u_T held by the "fresh", "holdout" and "anchored" rules (NaN: this
            batch's quantile stands in); the threshold used is in ``diagnostics["u_threshold"]``.
        noise: the improvement's random draws; None: drawn here.
        compact: go on with the live rows only (see the module's docstring); False: masked.
        compiled: run each step through ``torch.compile`` (same loss and gradients).
    """
    if actor.heads < settings.horizon:
        raise ValueError(f"the actor has {actor.heads} heads, fewer than the horizon {settings.horizon}")
    u_real, threshold, scale = uncertainty_calibration(model, obs, real_action, settings, held_threshold)
    if noise is None:
        noise = ImaginationNoise.draw(settings.horizon, obs, actor.act_dim, model.num_elites)
    imagination = _Imagination(compiled, actor, critic, model, alpha, settings, threshold, settings.beta / scale, noise)
    with frozen(model), frozen(critic):
        objective, horizon, stop_reason, pi0_log_prob, first_u, imagined_u, imagined = (
            imagination.compacted(obs) if compact else imagination.masked(obs)
        )

    log_u_real = u_real.clamp_min(1e-12).log()
    q10, q50, q90 = quantiles(log_u_real, 0.1, 0.5, 0.9)
    # u where the rows' states are the model's own (steps 1 .. H-1, rows alive there): what the
    # threshold is tested on, beside u on real pairs
    i10, i50, i90 = (q.clamp_min(1e-12).log() for q in masked_quantiles(imagined_u.detach(), imagined, 0.1, 0.5, 0.9))
    horizon_f = horizon.float()
    diagnostics = {
        "J": objective.detach().mean(),
        "horizon_mean": horizon_f.mean(),
        "horizon_max": horizon_f.max(),
        "stop_threshold": (stop_reason == STOP_THRESHOLD).float().mean(),
        "stop_terminal": (stop_reason == STOP_TERMINAL).float().mean(),
        "stop_horizon": (stop_reason == STOP_HORIZON).float().mean(),
        "stopped_at_first_step": (horizon == 0).float().mean(),
        "u_mean": first_u.mean(),  # u of the first imagined pairs (pi_0 at real states)
        "u_real_mean": u_real.mean(),
        "u_threshold": threshold,
        "log_u_real_q10": q10,
        "log_u_real_q50": q50,
        "log_u_real_q90": q90,
        "log_u_threshold": threshold.clamp_min(1e-12).log(),
        "log_u_imagined_q10": i10,
        "log_u_imagined_q50": i50,
        "log_u_imagined_q90": i90,
    }
    return ImprovementResult(-objective.mean(), horizon, stop_reason, pi0_log_prob, diagnostics)


# J per row, horizon, stop reason, log pi_0 at the start states, u of the first step, and u at
# steps 1 .. H-1 with the mask of the rows alive there (masked: [H-1, B] each; compacted: the
# alive rows' u, all true)
Rollout = tuple[torch.Tensor, ...]


@dataclass
class _Imagination:
    """One improvement's rollouts from the batch's start states, run either way (masked or
    compacted); both return a ``Rollout``."""

    compiled: bool  # each step through torch.compile
    actor: SquashedGaussianHeads
    critic: TwinQ
    model: GaussianEnsemble
    alpha: torch.Tensor
    settings: ImprovementSettings
    threshold: torch.Tensor
    penalty: torch.Tensor  # beta / scale
    noise: ImaginationNoise

    def masked(self, obs: torch.Tensor) -> Rollout:
        """All rows through all H steps (``masked_step``)."""
        actor, critic, model, alpha, settings, noise = self.actor, self.critic, self.model, self.alpha, self.settings, self.noise
        step_fn = compiled_masked_step() if self.compiled else masked_step
        batch = obs.shape[0]
        heads = actor.head_weights()
        discounts = settings.gamma ** torch.arange(settings.horizon, device=obs.device, dtype=torch.float32)
        rows = MaskedRows(
            state=obs,
            alive=torch.ones(batch, dtype=torch.bool, device=obs.device),
            stop_reason=torch.full((batch,), STOP_HORIZON, dtype=torch.long, device=obs.device),
            horizon=torch.zeros(batch, dtype=torch.long, device=obs.device),
            objective=torch.zeros(batch, device=obs.device),
            stop_state=torch.zeros_like(obs),
            stop_action=obs.new_zeros(batch, actor.act_dim),
            stop_discounted_log_prob=torch.zeros(batch, device=obs.device),
            stop_discount=torch.zeros(batch, device=obs.device),
        )
        later_u, later_alive = [obs.new_zeros(batch)], [torch.zeros(batch, dtype=torch.bool, device=obs.device)]
        for t in range(settings.horizon):
            alive_before = rows.alive
            rows, log_prob, u = step_fn(
                actor, model, rows, heads[t], noise.action[t], noise.pick[t], noise.model[t], alpha, self.penalty,
                self.threshold, discounts[t], settings.adaptive,
            )
            if t == 0:
                pi0_log_prob, first_u = log_prob.detach(), u.detach()
            else:
                later_u.append(u.detach())
                later_alive.append(alive_before)
        zero = torch.zeros((), device=obs.device)
        stopped = rows.stop_reason == STOP_THRESHOLD
        stop_q = critic(rows.stop_state, rows.stop_action).min(dim=0).values
        objective = rows.objective + torch.where(
            stopped, rows.stop_discount * stop_q - alpha * rows.stop_discounted_log_prob, zero
        )
        objective = objective + torch.where(rows.alive, self.horizon_value(rows.state, noise.final_action), zero)
        return (objective, rows.horizon, rows.stop_reason, pi0_log_prob, first_u,
                torch.stack(later_u), torch.stack(later_alive))

    def compacted(self, obs: torch.Tensor) -> Rollout:
        """As ``masked``, but each step runs only the rows still alive (``rows`` holds their
        indices in the batch); each row's terms are added back at its index."""
        actor, critic, model, alpha = self.actor, self.critic, self.model, self.alpha
        settings, threshold, penalty, noise = self.settings, self.threshold, self.penalty, self.noise
        step_fn = compiled_imagine_step() if self.compiled else imagine_step
        batch = obs.shape[0]
        heads = actor.head_weights()
        rows = torch.arange(batch, device=obs.device)
        stop_reason = torch.full((batch,), STOP_HORIZON, dtype=torch.long, device=obs.device)
        horizon = torch.zeros(batch, dtype=torch.long, device=obs.device)
        terms: list[tuple[torch.Tensor, torch.Tensor]] = []  # (rows, discounted reward terms), in step order
        stops: list[tuple[torch.Tensor, ...]] = []  # (rows, s_t, a_t, gamma^t, log pi) where u crossed
        later_u = [obs.new_zeros(0)]  # u of the rows alive at steps 1 .. H-1
        state = obs
        for t in range(settings.horizon):
            if t > 0 and rows.numel() == 0:
                break
            action, log_prob, next_obs, reward, u, done = step_fn(
                actor, model, state, heads[t], noise.action[t, rows], noise.pick[t, rows], noise.model[t, rows],
                alpha, penalty,
            )
            if t == 0:
                pi0_log_prob, first_u = log_prob.detach(), u.detach()
            else:
                later_u.append(u.detach())
            discount = settings.gamma**t
            unreliable = u >= threshold if settings.adaptive else torch.zeros_like(done)
            going = ~unreliable
            crossed = unreliable.nonzero().squeeze(-1)
            stop_log_prob = log_prob[crossed]
            stops.append(
                (rows[crossed], state[crossed], action[crossed], torch.full_like(stop_log_prob, discount), stop_log_prob)
            )
            kept = going.nonzero().squeeze(-1)
            terms.append((rows[kept], discount * reward[kept]))
            stop_reason[rows[crossed]] = STOP_THRESHOLD
            stop_reason[rows[going & done]] = STOP_TERMINAL
            horizon[rows[kept]] += 1
            alive = (going & ~done).nonzero().squeeze(-1)
            rows, state = rows[alive], next_obs[alive]
        objective = torch.zeros(batch, device=obs.device)
        objective = objective.index_add(0, torch.cat([r for r, _ in terms]), torch.cat([v for _, v in terms]))
        stop_rows = torch.cat([s[0] for s in stops])
        if stop_rows.numel():
            stop_q = critic(torch.cat([s[1] for s in stops]), torch.cat([s[2] for s in stops])).min(dim=0).values
            discount = torch.cat([s[3] for s in stops])
            stop_log_prob = torch.cat([s[4] for s in stops])
            objective = objective.index_add(0, stop_rows, discount * stop_q - alpha * (discount * stop_log_prob))
        if rows.numel():
            value = self.horizon_value(state, noise.final_action[rows])
            objective = objective.index_add(0, rows, value)
        imagined_u = torch.cat(later_u)
        return (objective, horizon, stop_reason, pi0_log_prob, first_u, imagined_u,
                torch.ones_like(imagined_u, dtype=torch.bool))

    def horizon_value(self, state: torch.Tensor, final_noise: torch.Tensor) -> torch.Tensor:
        """gamma^H V(s_H), V(s) = min_j Q_j(s, a') - alpha log pi_0(a'|s), pi_0's weights detached."""
        final_action, final_log_prob = self.actor.sample(state, 0, detach_params=True, noise=final_noise)
        value = self.critic(state, final_action).min(dim=0).values - self.alpha * final_log_prob
        return self.settings.gamma**self.settings.horizon * value
