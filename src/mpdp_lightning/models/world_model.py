"""The probabilistic ensemble world model (PETS/MBPO style) and its One-vs-Rest model error.

K Gaussian MLPs, all evaluated at once on the batched-MLP block, predict the change in
observation and the reward as a mean and a log-variance. As in MBPO's code (jannerm/mbpo bnn.py,
mbpo_pytorch, mbrl-lib), the inputs (obs, action) are normalised with statistics fitted to the
training rows and the targets (delta obs, reward) are not, by default: the loss, the early stop
and the elites then weigh the outputs in raw units, and the learned log-variance bounds act in
raw units (``normalize_targets`` standardises the targets too). Weights start from MBPO's
truncated normal, biases at zero; the log-variance is kept between learned soft bounds.
``fit_ensemble`` trains on the whole replay buffer with a holdout split, early stopping and elite
selection; the step function it is given performs the optimizer step (the agent's model phase,
algorithms/parts/model_phase.py, gives ``Agent.optimize``).

``step`` is what rollouts use: one forward of all K members gives the sample of one random elite
per row (reparameterised: gradients reach obs and action) and the One-vs-Rest error
u(s, a) = sum_i KL(p_i || p_-i) of Eq. 8, where p_-i moment-matches the other K-1 members.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from mpdp_lightning.models.nets import BatchedMLP
from mpdp_lightning.envs.tasks import TerminationFn

# MBPO's L2 weight decay per layer (input layer first, output layer last) for 4 hidden layers;
# other depths interpolate between the first and last value.
MBPO_DECAYS = (2.5e-5, 5e-5, 7.5e-5, 7.5e-5, 1e-4)
LOGVAR_BOUND_WEIGHT = 0.01  # MBPO's weight on the learned log-variance bounds


class Normalizer(nn.Module):
    """Per-dimension standardisation with statistics fitted to data (kept in the state dict)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))

    @torch.no_grad()
    def fit(self, data: torch.Tensor) -> None:
        self.mean.copy_(data.mean(dim=0))
        std = data.std(dim=0)
        self.std.copy_(torch.where(std < 1e-6, torch.ones_like(std), std))  # constant columns pass through

    @torch.no_grad()
    def reset(self) -> None:
        """The identity map: mean 0, std 1."""
        self.mean.zero_()
        self.std.fill_(1.0)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.std + self.mean


@dataclass
class ModelStep:
    """One imagined transition for a batch of rows."""

    next_obs: torch.Tensor  # [B, obs_dim]
    reward: torch.Tensor  # [B]
    done: torch.Tensor  # [B] bool, the task's termination function on the sampled next_obs
    u: torch.Tensor  # [B], One-vs-Rest model error at (obs, action)


class GaussianEnsemble(nn.Module):
    """K Gaussian MLPs over (delta obs, reward) given (obs, action).

    Args:
        obs_dim, act_dim: sizes of the task's observation and action.
        ensemble_size: K members.
        num_elites: members used for sampling, the best on holdout after each fit.
        hidden, layers, activation: every member's MLP.
        termination_fn: the task's ``done(obs, action, next_obs)``; None: imagined episodes never end.
        normalize_targets: standardise the targets (delta obs, reward) with statistics fitted to
            the training rows, as the inputs are; False (MBPO's): raw targets.
        u_covers_reward: u sums the KL over the reward output as well as the next-observation
            outputs; False: over the next observation only (a badly fitted reward, such as
            inverted_pendulum's step function, can otherwise dominate u; D3).

    The outputs, and u, are computed in fp32 whatever the trainer's precision: u compares
    variances that can be e^-10 apart from means that can be large.
    """

    def __init__(
        self,
        obs_dim: int,
        act_dim: int,
        ensemble_size: int = 7,
        num_elites: int = 5,
        hidden: int = 200,
        layers: int = 4,
        activation: str = "silu",
        termination_fn: Optional[TerminationFn] = None,
        u_covers_reward: bool = True,
        normalize_targets: bool = False,
    ) -> None:
        super().__init__()
        if not 0 < num_elites <= ensemble_size or ensemble_size < 2:
            raise ValueError(f"need 2 <= ensemble_size and 0 < num_elites <= ensemble_size, got {ensemble_size}, {num_elites}")
        self.obs_dim, self.act_dim = obs_dim, act_dim
        self.ensemble_size, self.num_elites = ensemble_size, num_elites
        self.out_dim = obs_dim + 1
        self.net = BatchedMLP(self.ensemble_size, obs_dim + act_dim, 2 * self.out_dim, hidden, layers, activation, init="mbpo")
        self.max_logvar = nn.Parameter(torch.full((self.out_dim,), 0.5))
        self.min_logvar = nn.Parameter(torch.full((self.out_dim,), -10.0))
        self.input_norm = Normalizer(obs_dim + act_dim)
        self.target_norm = Normalizer(self.out_dim)
        self.register_buffer("elites", torch.arange(num_elites))
        self.termination_fn = termination_fn
        self.u_covers_reward = u_covers_reward
        self.normalize_targets = normalize_targets

    # ---- prediction ------------------------------------------------------------------------
    def forward(self, obs: torch.Tensor, action: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and log-variance of every member, [K, B, obs_dim + 1], in target units (normalised
        with ``normalize_targets``, raw otherwise).

        obs and action are [B, .] (the same rows for every member) or [K, B, .] (one set each).
        Always fp32: autocast is switched off inside.
        """
        with torch.autocast(obs.device.type, enabled=False):
            x = self.input_norm.normalize(torch.cat([obs, action], dim=-1).float())
            mean, raw_logvar = self.net(x).chunk(2, dim=-1)
            # soft bounds: smooth clamps whose limits are learned (PETS appendix A.1)
            logvar = self.max_logvar - F.softplus(self.max_logvar - raw_logvar)
            logvar = self.min_logvar + F.softplus(logvar - self.min_logvar)
        return mean, logvar

    def uncertainty(self, mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
        """u over the outputs it covers (all, or the next observation's only), [K, B, D] -> [B]."""
        if not self.u_covers_reward:
            mean, logvar = mean[..., : self.obs_dim], logvar[..., : self.obs_dim]
        return ovr_uncertainty(mean, logvar)

    def predict_mean(self, obs: torch.Tensor, action: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The elites' average predicted next observation and reward (no sampling)."""
        mean, _ = self(obs, action)
        target = self.target_norm.denormalize(mean[self.elites].mean(dim=0))
        return obs + target[..., : self.obs_dim], target[..., self.obs_dim]

    def step(
        self,
        obs: torch.Tensor,
        action: torch.Tensor,
        generator: Optional[torch.Generator] = None,
        pick: Optional[torch.Tensor] = None,
        noise: Optional[torch.Tensor] = None,
    ) -> ModelStep:
        """Sample next obs and reward from one random elite per row (reparameterised), the
        terminal flag from the task's rule, and u(obs, action) over all K members: one forward.

        ``pick`` [B] (which elite, 0 .. num_elites - 1) and ``noise`` [B, obs_dim + 1] (standard
        normal) are the row's randomness, drawn here when None: given, the step is a
        deterministic function of them, whatever else shares the batch.
        """
        mean, logvar = self(obs, action)
        rows = torch.arange(obs.shape[0], device=obs.device)
        if pick is None:
            pick = torch.randint(self.num_elites, (obs.shape[0],), device=obs.device, generator=generator)
        member = self.elites[pick]
        if noise is None:
            noise = torch.randn(mean.shape[1:], device=obs.device, dtype=mean.dtype, generator=generator)
        sample = mean[member, rows] + noise * (0.5 * logvar[member, rows]).exp()
        target = self.target_norm.denormalize(sample)
        next_obs, reward = obs + target[:, : self.obs_dim], target[:, self.obs_dim]
        return ModelStep(next_obs, reward, self.is_terminal(obs, action, next_obs), self.uncertainty(mean, logvar))

    def is_terminal(self, obs: torch.Tensor, action: torch.Tensor, next_obs: torch.Tensor) -> torch.Tensor:
        """The task's termination rule on imagined transitions, [B] bool (never, without one)."""
        if self.termination_fn is None:
            return torch.zeros(next_obs.shape[:-1], dtype=torch.bool, device=next_obs.device)
        return self.termination_fn(obs, action, next_obs)

    def member_samples(self, obs: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        """One sample of every member's prediction (change in observation, reward) in raw units,
        [K, B, obs_dim + 1]: what COPlanner's disagreement is measured on."""
        mean, logvar = self(obs, action)
        return self.target_norm.denormalize(mean + torch.randn_like(mean) * (0.5 * logvar).exp())


def ovr_uncertainty(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """u = sum_i KL(N_i || N_-i) for diagonal Gaussians [K, B, D] -> [B] (paper Eq. 8), in fp32.

    N_-i moment-matches the other K-1 members: its mean m_i is the mean of their means, its
    variance the mean over j != i of var_j + (mu_j - m_i)^2. That spread is computed centred:
    with d_j = mu_j - (mean of all K), sum_{j != i} (mu_j - m_i)^2 = sum_j d_j^2 - K/(K-1) d_i^2,
    so a common offset of the means cancels before anything is squared. The one-pass form
    E[var + mu^2] - m^2 loses every digit once the means are large next to their spread, or
    the variances tiny (a collapsed aleatoric variance); under bf16 it is garbage. KL is
    invariant to per-dimension affine maps, so normalised target units give real units' value.
    """
    k = mean.shape[0]
    mean, logvar = mean.float(), logvar.float()
    var = logvar.exp()
    deviation = mean - mean.mean(dim=0, keepdim=True)
    sq = deviation.pow(2)
    spread = (sq.sum(dim=0, keepdim=True) - sq * (k / (k - 1))).clamp_min(0.0)
    other_var = (var.sum(dim=0, keepdim=True) - var).clamp_min(0.0)
    rest_var = ((other_var + spread) / (k - 1)).clamp_min(1e-12)
    # mu_i - m_i = d_i + d_i / (K - 1): the offset from the rest, also from centred values
    gap = deviation * (k / (k - 1))
    kl = 0.5 * (rest_var.log() - logvar + (var + gap.pow(2)) / rest_var - 1.0)
    return kl.sum(dim=-1).sum(dim=0)


# ---- training ---------------------------------------------------------------------------------
def layer_decays(layers: int) -> list[float]:
    """L2 decay of each of the ``layers + 1`` linear layers, MBPO's values for 4 hidden layers."""
    if layers + 1 == len(MBPO_DECAYS):
        return list(MBPO_DECAYS)
    first, last = MBPO_DECAYS[0], MBPO_DECAYS[-1]
    return [first + (last - first) * i / layers for i in range(layers + 1)]


def nll_loss(model: GaussianEnsemble, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Training loss for member-wise batches inputs [K, B, in], targets [K, B, out] (real units):
    Gaussian NLL (up to its constant) per member, summed over members, plus the log-variance
    bound penalty and per-layer L2 decay. Also returns the NLL per member."""
    obs, action = inputs.split([model.obs_dim, model.act_dim], dim=-1)
    mean, logvar = model(obs, action)
    y = model.target_norm.normalize(targets)
    nll = ((mean - y).pow(2) * (-logvar).exp() + logvar).mean(dim=(1, 2))
    bounds = LOGVAR_BOUND_WEIGHT * (model.max_logvar.sum() - model.min_logvar.sum())
    decay = sum(d * 0.5 * lin.weight.pow(2).sum() for d, lin in zip(layer_decays(len(model.net.linears) - 1), model.net.linears))
    return nll.sum() + bounds + decay, nll.detach()


@functools.cache
def compiled_nll_loss() -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    """``nll_loss`` under torch.compile, for minibatches of one size, built once per process: at
    the paper's ensemble a minibatch step (forward, backward, Adam) launches 31 kernels instead of
    127 (counted on the CPU, benchmarks/kernels.py)."""
    return torch.compile(nll_loss, dynamic=False, fullgraph=True)


@torch.no_grad()
def holdout_errors(model: GaussianEnsemble, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-member MSE and Gaussian NLL on a holdout set [N, .], in the model's target units (raw,
    as MBPO's, unless ``normalize_targets``)."""
    obs, action = inputs.split([model.obs_dim, model.act_dim], dim=-1)
    mean, logvar = model(obs, action)
    y = model.target_norm.normalize(targets)
    mse = (mean - y).pow(2).mean(dim=(1, 2))
    nll = 0.5 * ((mean - y).pow(2) * (-logvar).exp() + logvar + math.log(2 * math.pi)).mean(dim=(1, 2))
    return mse, nll


def member_bootstraps(rows: int, members: int, device: torch.device, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Each member's bootstrap of ``rows`` training rows (drawn with replacement), [members, rows]."""
    return torch.randint(rows, (members, rows), device=device, generator=generator)


@dataclass
class FitReport:
    epochs: int
    holdout_mse: float  # mean over the elites
    holdout_nll: float
    u_mean: float  # OvR model error on the holdout pairs
    mean_spread: float  # variance of the K members' means on the holdout pairs (target units)
    elites: list[int]
    # indices into the fit's rows: those held out (not trained on in this fit, though earlier fits
    # may have; the training rows when there were too few to hold any out) and those trained on,
    # in the fit's random order
    holdout_rows: Optional[torch.Tensor] = None
    train_rows: Optional[torch.Tensor] = None


def fit_ensemble(
    model: GaussianEnsemble,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    step: Callable[[torch.Tensor], None],
    batch_size: int = 256,
    holdout_ratio: float = 0.2,
    max_holdout: int = 5000,
    max_epochs: Optional[int] = None,
    patience: int = 5,
    min_improvement: float = 0.01,
    generator: Optional[torch.Generator] = None,
    compiled: bool = False,
) -> FitReport:
    """Fit ``model`` on all transitions (inputs [N, obs+act], targets [N, obs+1]) as MBPO does.

    A random holdout (``holdout_ratio``, at most ``max_holdout``) is set aside; normalisers are
    fitted on the rest. Each member draws its own bootstrap of the training rows once per fit
    (about 63 % distinct rows) and goes through it in a new order every epoch, as MBPO and PETS
    do: redrawn every epoch, after 5 epochs every member would have seen 99 % of the rows and the
    members, whose disagreement is u, would agree more than the data warrants.
    Each member keeps the weights of its best holdout MSE within this fit (the best starts at
    infinity); training stops once no member has improved by ``min_improvement`` (relative) for
    more than ``patience`` epochs, as MBPO's ``_epochs_since_update > 5`` (on CUDA read one epoch
    late, so that no epoch waits on the host); ``max_epochs`` caps it (None: no cap, as MBPO). The
    ``num_elites`` best members become the elites. ``step(loss)`` performs the backward pass and
    the optimizer step. ``compiled``: the minibatch loss (forward, NLL, penalties, and so its
    backward) through torch.compile (``compiled_nll_loss``; an epoch's last, smaller minibatch
    eagerly, so that no buffer size compiles anew).
    """
    full_loss = compiled_nll_loss() if compiled else nll_loss
    n = inputs.shape[0]
    device = inputs.device
    n_holdout = min(int(n * holdout_ratio), max_holdout) if n >= 5 else 0
    order = torch.randperm(n, device=device, generator=generator)
    hold, train = order[:n_holdout], order[n_holdout:]
    if n_holdout == 0:
        hold = train  # too few rows to hold any out: judge on the training rows
    train_in, train_out = inputs[train], targets[train]
    hold_in, hold_out = inputs[hold], targets[hold]
    model.input_norm.fit(train_in)
    if model.normalize_targets:
        model.target_norm.fit(train_out)
    else:
        model.target_norm.reset()  # raw targets (also after a checkpoint that had them normalised)

    k = model.ensemble_size
    best = torch.full((k,), float("inf"), device=device)
    best_state = {name: p.detach().clone() for name, p in model.net.named_parameters()}
    # Epochs since some member last improved, kept on the device. On CUDA the host reads it one
    # epoch late, from a copy started when that epoch ended, so the device always has the next
    # epoch queued and never waits for the host; the fit can then run one epoch past the stop
    # (its weights are kept only where they improve on the best, as any epoch's are).
    since_improvement = torch.zeros((), dtype=torch.long, device=device)
    pending: Optional[torch.cuda.Event] = None  # the copy into ``copied`` of the epoch before
    copied = torch.empty((), dtype=torch.long, pin_memory=device.type == "cuda")
    epoch = 0
    boot = member_bootstraps(train.numel(), k, device, generator)
    while max_epochs is None or epoch < max_epochs:
        boot = boot.gather(1, torch.rand(boot.shape, device=device, generator=generator).argsort(dim=1))  # new order
        for start in range(0, train.numel(), batch_size):
            idx = boot[:, start : start + batch_size]
            loss_fn = full_loss if idx.shape[1] == batch_size else nll_loss
            loss, _ = loss_fn(model, train_in[idx], train_out[idx])
            step(loss)
        epoch += 1
        mse, _ = holdout_errors(model, hold_in, hold_out)
        improved = mse < best * (1.0 - min_improvement)  # the first epoch improves on inf
        with torch.no_grad():
            best = torch.where(improved, mse, best)
            for name, p in model.net.named_parameters():
                keep = improved.view(-1, *([1] * (p.dim() - 1)))
                best_state[name].copy_(torch.where(keep, p.detach(), best_state[name]))
            since_improvement = torch.where(improved.any(), 0, since_improvement + 1)
        if device.type != "cuda":
            if int(since_improvement) > patience:  # free on the CPU
                break
            continue
        if pending is not None:
            pending.synchronize()  # the epoch before's copy: long finished, the device is busy with this one
            if int(copied) > patience:
                break
        copied.copy_(since_improvement, non_blocking=True)
        pending = torch.cuda.Event()
        pending.record(torch.cuda.current_stream(device))  # the stream the copy was queued on
    with torch.no_grad():
        for name, p in model.net.named_parameters():
            p.copy_(best_state[name])
        mse, nll = holdout_errors(model, hold_in, hold_out)
        model.elites.copy_(torch.argsort(mse)[: model.num_elites])
        obs, action = hold_in.split([model.obs_dim, model.act_dim], dim=-1)
        mean, logvar = model(obs, action)
        u = model.uncertainty(mean, logvar)
        spread = mean.var(dim=0).mean()  # the members' disagreement alone, without their variances
    elites = model.elites
    return FitReport(epoch, mse[elites].mean().item(), nll[elites].mean().item(), u.mean().item(), spread.item(),
                     elites.tolist(), hold, train)
