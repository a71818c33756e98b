"""N seeds of one agent in one module: every parameter and buffer with a leading seed axis.

On a GPU one seed's update is a few thousand small kernels that leave the device mostly idle;
with the seeds' states stacked, each kernel does every seed's work (PureJaxRL's and Rejax's way,
in JAX). The agent's update is written once, for one seed: each computation that reads the nets
goes through ``Agent.per_seed``, which here runs it under ``torch.func.vmap`` over the stacked
state (``SeedAxis.map``). What stays outside needs no change, because it is elementwise per
seed: Adam on stacked parameters, the Polyak average, and a backward of the summed per-seed
losses (no parameter is shared, so each seed's gradient is its own loss's).

What has per-seed shapes or host decisions (the world model's fits, MBPO's branched rollouts,
COPlanner's plans) runs one seed after another on that seed's slices instead, its generator as
the default one (``SeedAxis.each``), so code written for one seed runs unchanged.

Nothing is pooled across seeds: each has its own initialisation (built under its own seed, as a
run alone would be), its own random stream (``SeedStreams``: a generator per seed holding what a
run alone would hold; ``Agent.draw`` names it in every draw), its own temperature and its own NaN
record.
On the CPU a seed in a group gets bit-identical losses and weights to the same seed alone when
its rows are a multiple of 32 (tests/test_seed_group.py, docs/seed-groups.md): the batched MLP
block uses ``bmm`` + bias, whose vmapped form is the same kernel, rather than ``baddbmm``/``addmm``,
whose batching rules take another path for a 1-wide output. One kernel stays inexact: the CPU's
fused Adam rounds a parameter's vector chunks and scalar tail differently, so a seed whose share
of a stacked parameter is not a whole number of vectors (MPDP's 3-head bias on inverted_pendulum)
drifts from itself alone in the last bit.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
from torch import nn
from torch.func import functional_call, stack_module_state, vmap
from torch.utils._pytree import tree_map


class SeedStreams:
    """Each seed's random stream: a generator per seed on the device the draws are made on,
    holding what the default generator of a run of that seed alone would hold, so seed s sees
    exactly the numbers it would see alone, in the same order (JAX's explicit keys, in torch's
    terms: every draw names its generator).

    Args:
        seeds: the group's seeds.
        cpu_states: each seed's ``torch.get_rng_state()`` where the group takes over (after its
            agent was built under its seed): the CPU streams go on from there.
        device: where the draws are made. On CUDA each seed's generator starts as
            ``torch.cuda.manual_seed(seed)`` leaves the device's (the nets are built on the CPU,
            so a run alone has drawn nothing on the device before its first update).
    """

    def __init__(self, seeds: Sequence[int], cpu_states: Sequence[torch.Tensor],
                 device: torch.device = torch.device("cpu")) -> None:
        self.device = torch.device(device)
        self.generators = []
        for seed, state in zip(seeds, cpu_states):
            generator = torch.Generator(self.device)
            if self.device.type == "cpu":
                generator.set_state(state)
            else:
                generator.manual_seed(seed)
            self.generators.append(generator)

    def __len__(self) -> int:
        return len(self.generators)

    def draw(self, sample: Callable[[torch.Generator], Any]) -> Any:
        """``sample(generator)`` (a tensor, or a tuple of them) once per seed with that seed's
        generator, stacked on a leading seed axis."""
        return _stacked([sample(generator) for generator in self.generators])

    @contextlib.contextmanager
    def as_default(self, position: int) -> Iterator[None]:
        """Seed ``position``'s stream as the device's default generator for the duration (then
        back in the seed's generator, the default's own state restored): code written for one seed,
        which draws from the default generator (a policy's sample, the ensemble's elite and noise,
        a planner's), draws there exactly what it draws in that seed's run alone."""
        generator = self.generators[position]
        if self.device.type == "cuda":
            index = self.device.index if self.device.index is not None else torch.cuda.current_device()
            get, put = (lambda: torch.cuda.get_rng_state(index)), (lambda state: torch.cuda.set_rng_state(state, index))
        else:
            get, put = torch.get_rng_state, torch.set_rng_state
        saved = get()
        put(generator.get_state())
        try:
            yield
        finally:
            generator.set_state(get())
            put(saved)

    def state_dict(self) -> dict[str, Any]:
        return {"states": [generator.get_state() for generator in self.generators]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for generator, saved in zip(self.generators, state["states"]):
            generator.set_state(saved)


class _SeedCall(nn.Module):
    """``fn(agent, *args)`` as a module call, so that ``functional_call`` can substitute one
    seed's slice of the stacked state for the agent's own (the agent has no ``forward`` of its
    own for this)."""

    def __init__(self, agent: nn.Module) -> None:
        super().__init__()
        self.agent = agent

    def forward(self, fn: Callable[..., Any], *args: Any) -> Any:
        return fn(self.agent, *args)


class SeedAxis:
    """The group's view of the seed axis: how many seeds, their streams, and ``map``."""

    def __init__(self, seeds: Sequence[int], streams: SeedStreams, solo_world_model: Optional[nn.Module] = None) -> None:
        self.seeds = tuple(seeds)
        self.streams = streams
        # one seed's world model, into which each seed's slice is loaded to fit it
        # (parts/model_phase.py: the fits decide on the host, per seed); not part of the state
        self.solo_world_model = solo_world_model

    def __len__(self) -> int:
        return len(self.seeds)

    def map(self, agent: nn.Module, fn: Callable[..., Any], args: Sequence[Any], trainable: Sequence[torch.Tensor],
            batched: bool = True) -> Any:
        """``fn(agent, *args)`` for every seed; each of ``args`` (a tensor, or None) has a leading
        seed axis, and so has every tensor that ``fn`` returns. Parameters outside ``trainable``
        enter detached: gradients flow through them, never into them (``frozen`` then has nothing
        to freeze, which it could not do to a slice).

        ``batched``: all seeds at once, vmapped; else one seed after another, each on its own
        slices, as it would run alone. The CPU's vectorised elementwise kernels (exp, tanh) round
        an element by its offset in the tensor (the vector loop or its scalar tail), so a seed whose
        share of a stacked tensor is not a whole number of vector chunks (a few rows, as in acting)
        can differ in the last bit from the seed alone; one by one never does."""
        call = _SeedCall(agent)
        state = _stacked_state(agent, trainable)

        def one_seed(seed_state: dict[str, torch.Tensor], *seed_args: Any) -> Any:
            return functional_call(call, seed_state, (fn, *seed_args), strict=True)

        if not batched:
            return _stacked([
                one_seed({name: value[s] for name, value in state.items()}, *(_seed_slice(a, s) for a in args))
                for s in range(len(self))
            ])
        in_dims = (0, *(None if arg is None else 0 for arg in args))  # None (no draw) goes in as it is
        return vmap(one_seed, in_dims=in_dims)(state, *args)

    def each(self, agent: nn.Module, fn: Callable[..., Any], *args: Any, skip: Sequence[int] = ()) -> list[Any]:
        """``fn(agent, *args)`` run for one seed after another as that seed's run alone runs it:
        on its slices of the stacked state (detached: for acting, rollouts and planning, which
        train nothing), on its slice of each of ``args`` (a leading seed axis), and with its random
        stream as the default generator (``SeedStreams.as_default``), so ``fn`` draws as it does
        alone. Unlike ``map``, the results are not stacked: a list with one per seed (None for a
        position in ``skip``), whose shapes may differ (a model rollout's rows that reached a
        terminal stop, a different number in each seed)."""
        call = _SeedCall(agent)
        state = _stacked_state(agent, ())
        results: list[Any] = []
        for position in range(len(self)):
            if position in skip:
                results.append(None)
                continue
            seed_state = {name: value[position] for name, value in state.items()}
            with self.streams.as_default(position):
                results.append(functional_call(call, seed_state, (fn, *(_seed_slice(a, position) for a in args)), strict=True))
        return results

    def clip_grad_norm_(self, params: Sequence[torch.Tensor], clip: Optional[float]) -> torch.Tensor:
        """Each seed's gradient norm over ``params`` [seeds], and with ``clip`` each seed's
        gradients scaled to at most that norm: torch's ``get_total_norm`` and
        ``clip_grads_with_norm_`` per seed (the same arithmetic, so the same bits)."""
        grads = [p.grad for p in params if p.grad is not None]
        # foreach=False: _foreach_norm has no batching rule (on the CPU, alone takes the same path)
        total = vmap(lambda *seed_grads: torch.nn.utils.get_total_norm(seed_grads, foreach=False))(*grads)
        if clip is not None:
            scale = torch.clamp(clip / (total + 1e-6), max=1.0)
            for grad in grads:
                grad.mul_(scale.view(-1, *([1] * (grad.dim() - 1))))
        return total


def stack_agents(agents: Sequence[nn.Module], seeds: Sequence[int], rng_states: Sequence[torch.Tensor]) -> nn.Module:
    """One agent holding ``agents``' states (same class and settings, each built under its seed,
    all on one device) stacked on a leading seed axis, with ``seed_axis`` set. ``rng_states``: each
    seed's CPU generator state once its agent was built, where its random stream continues."""
    if not len(agents) == len(seeds) == len(rng_states) or not agents:
        raise ValueError(f"need one agent and one generator state per seed, got {len(agents)} agents, "
                         f"{len(seeds)} seeds and {len(rng_states)} states")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must differ, got {list(seeds)}")
    group = copy.deepcopy(agents[0])
    params, buffers = stack_module_state(list(agents))
    for name, value in params.items():
        _set(group, name, nn.Parameter(value.detach().clone(), requires_grad=value.requires_grad))
    for name, value in buffers.items():
        _set(group, name, value.clone())
    solo = getattr(agents[0], "world_model", None)
    group.seed_axis = SeedAxis(seeds, SeedStreams(seeds, rng_states, group.device),
                               copy.deepcopy(solo) if solo is not None else None)
    group._plan = None  # resolved again, for a group (rows masked, nothing compiled)
    group.captured_update = None  # a graph captured for agents[0] is not the group's
    return group


def build_group(agent: nn.Module, seeds: Sequence[int]) -> nn.Module:
    """``agent``'s class and settings as a group of ``seeds`` (``--seeds``): each seed's agent built
    right after ``torch.manual_seed(seed)``, as a run of that seed alone builds it after
    ``seed_everything``, so that every seed starts from its own run's weights and random stream."""
    settings = {key: value for key, value in agent.hparams.items() if not key.startswith("_")}
    agents, states = [], []
    for seed in seeds:
        torch.manual_seed(seed)
        agents.append(type(agent)(**settings))
        states.append(torch.get_rng_state())
    group = stack_agents(agents, seeds, states)
    group.hparams.update(agent.hparams)  # what LightningCLI recorded beside them (the class path)
    return group


def _seed_slice(arg: Any, position: int) -> Any:
    """Seed ``position``'s slice of an argument with a leading seed axis: a tensor, or a tuple or
    named tuple of them (as vmap takes them); None as it is."""
    return tree_map(lambda value: value[position] if isinstance(value, torch.Tensor) else value, arg)


def _stacked_state(agent: nn.Module, trainable: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
    """The agent's stacked parameters and buffers by ``functional_call`` name; parameters outside
    ``trainable`` detached."""
    trainable_ids = {id(p) for p in trainable}
    state = {f"agent.{name}": (p if id(p) in trainable_ids else p.detach()) for name, p in agent.named_parameters()}
    state.update({f"agent.{name}": b for name, b in agent.named_buffers()})
    return state


def _stacked(items: Sequence[Any]) -> Any:
    """Per-seed results (tensors, or tuples, named tuples and dicts of them) stacked on a leading
    seed axis, as vmap returns them."""
    return tree_map(lambda *parts: torch.stack(parts), items[0], *items[1:])


def _set(root: nn.Module, name: str, value: torch.Tensor) -> None:
    *path, leaf = name.split(".")
    module = root.get_submodule(".".join(path)) if path else root
    if isinstance(value, nn.Parameter):
        module._parameters[leaf] = value
    else:
        module._buffers[leaf] = value
