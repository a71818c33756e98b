"""Cost of one update, phase by phase, against the device's FLOP rate, and the run time it implies.

    python -m mpdp_lightning.benchmarks.update [--device cpu] [--configs sac,mpdp-quick,mpdp-paper]
        [--fit-rows 10000,50000,200000] [--out bench.json]      (make bench ARGS="...")

For each configuration (SAC; MPDP at the quick preset's shapes on inverted_pendulum; MPDP at the
paper's shapes on walker2d), on the current device and in one process, so that the ratios are
side by side:
- each phase of one update (critic, policy improvement, temperature: loss, backward and Adam
  step, as the module runs them), the improvement in every way it can run: eager or compiled,
  masked or compacted rows (the same loss and gradients, tested);
- the whole update (the three phases in a row, rows masked on CUDA and compacted on the CPU, as
  the module runs them), eager and compiled, and on CUDA also replayed from a CUDA graph
  (training/cuda_graph.py, the module's default there);
- one model fit's epoch at each of ``--fit-rows`` buffer rows (timed over ``--fit-steps``
  minibatches and scaled to the epoch; the per-epoch holdout pass is left out);
- kernels per call of each (benchmarks/kernels.py: on CUDA the GPU's; on the CPU the ATen ops and
  Inductor kernels a GPU would launch), what a launch-bound GPU update's time follows;
- FLOPs of each (torch.utils.flop_counter: the matmuls, forward and backward) and the achieved
  GFLOP/s, next to a batched matmul of the ensemble's hidden layer measured in the same run:
  the rate this device reaches at these shapes, the floor to compare with;
- the env steps per hour these imply for walker2d at the paper preset (20 updates per env step,
  a fit every 250 env steps of ``--fit-epochs`` epochs on the buffer so far), for the
  first ``--run-steps`` env steps.
The world model is first fitted for a few epochs on the task's transitions under random actions,
so that u, and the rows the adaptive horizon stops, look like a run's, not like untrained nets'.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from tensordict import TensorDict

from mpdp_lightning.benchmarks.common import random_transitions, timed
from mpdp_lightning.benchmarks.kernels import count_kernels
from mpdp_lightning.objectives.h_step_improvement import ImaginationNoise, ImprovementSettings, extended_improvement
from mpdp_lightning.models.policy import SquashedGaussianHeads, Temperature, TwinQ
from mpdp_lightning.objectives.sac_losses import actor_loss, critic_loss, temperature_loss
from mpdp_lightning.envs.tasks import get_task, task_spaces
from mpdp_lightning.models.world_model import GaussianEnsemble, compiled_nll_loss, fit_ensemble, nll_loss
from mpdp_lightning.training.cuda_graph import CapturedUpdate

ADAM = {"fused": True}


@dataclass(frozen=True)
class Shapes:
    """One benchmarked configuration: the sizes of a preset on a task."""

    name: str
    task: str
    batch: int
    horizon: int  # 0: SAC
    ensemble: int
    elites: int
    model_hidden: int
    model_layers: int
    updates_per_env_step: int
    hidden: int = 256
    layers: int = 2
    auto_alpha: bool = True  # a temperature step in each update (the paper preset's alpha is fixed)


CONFIGS = {
    "sac": Shapes("sac", "walker2d", 256, 0, 0, 0, 0, 0, 1),
    "mpdp-quick": Shapes("mpdp-quick", "inverted_pendulum", 128, 10, 5, 3, 128, 3, 1),
    "mpdp-paper": Shapes("mpdp-paper", "walker2d", 256, 25, 7, 5, 200, 4, 20, auto_alpha=False),
}


def flops_of(fn: Callable[[], object]) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def matmul_reference(shapes: Shapes, device: torch.device, repeats: int) -> dict[str, float]:
    """GFLOP/s of the heaviest matmul of the configuration, alone: the ensemble's hidden layer
    [K, B, h] x [K, h, h] (SAC: the critics' [2, B, 256] x [2, 256, 256])."""
    members, width = (shapes.ensemble, shapes.model_hidden) if shapes.horizon else (2, shapes.hidden)
    a = torch.randn(members, shapes.batch, width, device=device)
    b = torch.randn(members, width, width, device=device)
    inner = 50
    ms = timed(lambda: [torch.bmm(a, b) for _ in range(inner)], repeats, device) / inner
    flops = 2 * members * shapes.batch * width * width
    return {"ms": ms, "gflop": flops / 1e9, "gflops_per_s": flops / ms / 1e6}


class UpdateBench:
    """The nets, optimizers and a batch of one configuration, and its phases as callables."""

    def __init__(self, shapes: Shapes, device: torch.device, seed: int = 0) -> None:
        torch.manual_seed(seed)
        self.shapes, self.device = shapes, device
        spaces = task_spaces(shapes.task)
        obs_dim, act_dim = spaces.obs_dim, spaces.act_dim
        heads = max(shapes.horizon, 1)
        self.actor = SquashedGaussianHeads(obs_dim, act_dim, spaces.action_low, spaces.action_high, heads,
                                           shapes.hidden, shapes.layers).to(device)
        self.critic = TwinQ(obs_dim, act_dim, shapes.hidden, shapes.layers).to(device)
        self.critic_target = TwinQ(obs_dim, act_dim, shapes.hidden, shapes.layers).to(device).requires_grad_(False)
        self.temperature = Temperature(0.2, learnable=True).to(device)
        adam = {**ADAM, "capturable": device.type == "cuda"}  # as the module's with a CUDA graph
        self.actor_opt = torch.optim.Adam(self.actor.parameters(), lr=3e-4, **adam)
        self.critic_opt = torch.optim.Adam(self.critic.parameters(), lr=3e-4, **adam)
        self.alpha_opt = torch.optim.Adam([self.temperature.log_alpha], lr=3e-4, **adam)
        inputs, targets = random_transitions(shapes.task, max(2000, shapes.batch))
        inputs, targets = inputs.to(device), targets.to(device)
        obs, action = inputs[:, :obs_dim], inputs[:, obs_dim:]
        rows = torch.randperm(inputs.shape[0], device=device)[: shapes.batch]
        self.batch = TensorDict(
            obs=obs[rows],
            action=action[rows],
            reward=targets[rows, -1],
            next_obs=obs[rows] + targets[rows, :obs_dim],
            terminated=torch.zeros(shapes.batch, dtype=torch.bool, device=device),
            batch_size=[shapes.batch],
        )
        self.target_entropy = -float(act_dim)
        self.model: Optional[GaussianEnsemble] = None
        self.first_horizon: Optional[float] = None  # mean horizon of the first improvement since restore
        if shapes.horizon:
            self.model = GaussianEnsemble(obs_dim, act_dim, shapes.ensemble, shapes.elites, shapes.model_hidden,
                                          shapes.model_layers, termination_fn=get_task(shapes.task).termination_fn).to(device)
            self.model_opt = torch.optim.Adam(self.model.parameters(), lr=1e-3, **ADAM)
            fit_ensemble(self.model, inputs, targets, self._model_step, max_epochs=10)
            self.settings = ImprovementSettings(horizon=shapes.horizon)
            self.noise = ImaginationNoise.draw(shapes.horizon, self.batch["obs"], act_dim, shapes.elites)

    def snapshot(self) -> dict:
        return copy.deepcopy({"actor": self.actor.state_dict(), "actor_opt": self.actor_opt.state_dict()})

    def restore(self, snapshot: dict) -> None:
        self.actor.load_state_dict(snapshot["actor"])
        self.actor_opt.load_state_dict(snapshot["actor_opt"])
        self.first_horizon = None

    def _model_step(self, loss: torch.Tensor) -> None:
        self.model_opt.zero_grad(set_to_none=True)
        loss.backward()
        self.model_opt.step()

    def critic_phase(self) -> None:
        loss, _ = critic_loss(self.critic, self.critic_target, self.actor, self.batch, 0.99, self.temperature.alpha)
        self.critic_opt.zero_grad(set_to_none=True)
        loss.backward()
        self.critic_opt.step()
        with torch.no_grad():
            torch._foreach_lerp_(list(self.critic_target.parameters()), list(self.critic.parameters()), 0.005)

    def policy_phase(self, compact: bool = False, compiled: bool = False) -> torch.Tensor:
        """The policy improvement with its backward and Adam step; returns pi_0's log-probs."""
        if self.model is None:
            loss, info = actor_loss(self.actor, self.critic, self.batch["obs"], self.temperature.alpha)
            log_prob = info["log_prob"]
        else:
            result = extended_improvement(self.actor, self.critic, self.model, self.batch["obs"], self.batch["action"],
                                          self.temperature.alpha, self.settings, noise=self.noise, compact=compact,
                                          compiled=compiled)
            loss, log_prob = result.loss, result.pi0_log_prob
            if self.first_horizon is None:
                self.first_horizon = float(result.diagnostics["horizon_mean"])
        self.actor_opt.zero_grad(set_to_none=True)
        loss.backward()
        self.actor_opt.step()
        return log_prob

    def temperature_phase(self, log_prob: torch.Tensor) -> None:
        loss = temperature_loss(self.temperature.log_alpha, log_prob, self.target_entropy)
        self.alpha_opt.zero_grad(set_to_none=True)
        loss.backward()
        self.alpha_opt.step()

    def whole_update(self, compiled: bool = False) -> Callable[[TensorDict], dict[str, torch.Tensor]]:
        """One update as the module runs it, as a function of the batch (what a CUDA graph captures)."""
        compact = self.device.type == "cpu"

        def update(batch: TensorDict) -> dict[str, torch.Tensor]:
            self.batch = batch
            self.critic_phase()
            log_prob = self.policy_phase(compact, compiled)
            if self.shapes.auto_alpha:
                self.temperature_phase(log_prob)
            return {"log_prob": log_prob.detach().mean()}

        return update


def improvement_modes(compile_modes: bool) -> list[tuple[str, bool, bool]]:
    """(label, compact, compiled): masked and compacted rows, eager and (if asked) compiled."""
    modes = [("eager masked", False, False), ("eager compacted", True, False)]
    if compile_modes:
        modes += [("compiled masked", False, True), ("compiled compacted", True, True)]
    return modes


def bench_config(shapes: Shapes, device: torch.device, repeats: int, compile_modes: bool) -> dict:
    bench = UpdateBench(shapes, device)
    out: dict = {"config": shapes.__dict__, "phases": {}, "matmul": matmul_reference(shapes, device, repeats)}
    log_prob = bench.policy_phase()

    def record(name: str, fn: Callable[[], object], eager: Optional[Callable[[], object]] = None, warmup: int = 2) -> dict:
        """``eager``: the same computation uncompiled, whose FLOPs are counted (a compiled call
        runs fused kernels the counter does not see)."""
        start = time.perf_counter()
        fn()  # the first call: a cold compile where there is one
        first_s = time.perf_counter() - start
        for _ in range(warmup):
            fn()
        ms = timed(fn, repeats, device)
        flops = flops_of(eager or fn)
        kernels = count_kernels(fn, device)  # recompiled to see Inductor's kernels on the CPU: warm-up calls
        entry = {"ms": ms, "first_call_s": first_s, "gflop": flops / 1e9, "gflops_per_s": flops / ms / 1e6,
                 "kernels": kernels.total, "kernels_generated": kernels.generated}
        out["phases"][name] = entry
        return entry

    record("critic", bench.critic_phase)
    record("temperature", lambda: bench.temperature_phase(log_prob))
    start = bench.snapshot()
    if shapes.horizon == 0:
        record("improvement", bench.policy_phase)
    else:
        for label, compact, compiled in improvement_modes(compile_modes):
            bench.restore(start)  # every mode from the same weights: the same rows stop
            entry = record(f"improvement, {label}", lambda c=compact, k=compiled: bench.policy_phase(c, k),
                           lambda c=compact: bench.policy_phase(c, False))
            entry["mean_horizon"] = bench.first_horizon
    batch = bench.batch
    for label, compiled, graph in update_modes(device, compile_modes and shapes.horizon > 0):
        bench.restore(start)
        update = bench.whole_update(compiled)
        run = CapturedUpdate(update) if graph else update
        # warm-up: the graph's eager calls and its capture (a compiled step's cold compile first)
        record(f"update, {label}", lambda: run(batch), lambda: bench.whole_update(False)(batch), warmup=4)
    return out


def update_modes(device: torch.device, compiled: bool) -> list[tuple[str, bool, bool]]:
    """(label, compiled, CUDA graph) of the whole update on ``device``."""
    modes = [("eager", False, False)] + ([("compiled", True, False)] if compiled else [])
    if device.type == "cuda":
        modes += [("CUDA graph", False, True)] + ([("compiled, CUDA graph", True, True)] if compiled else [])
    return modes


def bench_fit(shapes: Shapes, device: torch.device, rows: list[int], steps: int, compiled: bool = False) -> dict[int, dict]:
    """ms per epoch of the model fit at each buffer size, timed over ``steps`` minibatches, and
    the kernels of one minibatch step; ``compiled``: also with the minibatch loss compiled (as
    the module runs it on CUDA, ``compiled_nll_loss``)."""
    spaces = task_spaces(shapes.task)
    in_dim, out_dim = spaces.obs_dim + spaces.act_dim, spaces.obs_dim + 1
    model = GaussianEnsemble(spaces.obs_dim, spaces.act_dim, shapes.ensemble, shapes.elites, shapes.model_hidden,
                             shapes.model_layers).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, **ADAM)
    result = {}
    for n in rows:
        inputs, targets = torch.randn(n, in_dim, device=device), torch.randn(n, out_dim, device=device)
        n_holdout = min(int(0.2 * n), 5000)
        n_train = n - n_holdout
        minibatches = math.ceil(n_train / 256)
        boot = torch.randint(n_train, (shapes.ensemble, steps * 256), device=device)

        def some_steps(loss_fn: Callable = nll_loss, count: int = steps) -> None:
            for i in range(count):
                idx = boot[:, i * 256 : (i + 1) * 256]
                loss, _ = loss_fn(model, inputs[idx], targets[idx])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()

        some_steps()
        step_ms = timed(some_steps, 3, device) / steps
        flops = flops_of(lambda: nll_loss(model, inputs[boot[:, :256]], targets[boot[:, :256]])[0].backward())
        result[n] = {"minibatch_ms": step_ms, "epoch_ms": step_ms * minibatches, "minibatches": minibatches,
                     "epoch_gflop": flops * minibatches / 1e9, "gflops_per_s": flops / step_ms / 1e6,
                     "minibatch_kernels": count_kernels(lambda: some_steps(count=1), device).total}
        if compiled:
            some_steps(compiled_nll_loss())
            compiled_ms = timed(lambda: some_steps(compiled_nll_loss()), 3, device) / steps
            result[n].update(minibatch_ms_compiled=compiled_ms, epoch_ms_compiled=compiled_ms * minibatches,
                             minibatch_kernels_compiled=count_kernels(lambda: some_steps(compiled_nll_loss(), 1), device).total)
    return result


def walker2d_projection(update_ms: float, fit: dict[int, dict], run_steps: int, epochs: int,
                        updates_per_env_step: int = 20, train_every: int = 250) -> dict[str, float]:
    """Env steps per hour over the first ``run_steps`` env steps: ``updates_per_env_step``
    updates of ``update_ms`` each per env step, and a fit of ``epochs`` epochs every
    ``train_every`` env steps on the buffer so far (epoch time interpolated linearly in rows)."""
    rows = sorted(fit)
    per_row = np.polyfit(rows, [fit[n]["epoch_ms"] for n in rows], 1) if len(rows) > 1 else [fit[rows[0]]["epoch_ms"] / rows[0], 0.0]
    def one_fit_ms(rows: int) -> float:
        return epochs * max(float(np.polyval(per_row, rows)), 0.0)

    fit_ms = sum(one_fit_ms(n) for n in range(train_every, run_steps + 1, train_every))
    update_total_ms = run_steps * updates_per_env_step * update_ms
    total_h = (fit_ms + update_total_ms) / 3.6e6
    between_fits_ms = train_every * updates_per_env_step * update_ms
    return {
        "env_steps_per_hour": run_steps / total_h,
        "hours": total_h,
        "fit_share": fit_ms / (fit_ms + update_total_ms),
        # the fit's share of the time between two fits, once the buffer holds 50k and 200k rows
        "fit_share_at_50k": one_fit_ms(50_000) / (one_fit_ms(50_000) + between_fits_ms),
        "fit_share_at_200k": one_fit_ms(200_000) / (one_fit_ms(200_000) + between_fits_ms),
    }


def format_report(report: dict) -> str:
    lines = [f"device: {report['device']}; torch {report['torch']}; {report['threads']} threads", ""]
    for result in report["configs"]:
        shapes, mm = result["config"], result["matmul"]
        lines.append(f"## {shapes['name']} ({shapes['task']}, batch {shapes['batch']}"
                     + (f", H {shapes['horizon']}, K {shapes['ensemble']} of {shapes['model_layers']} x {shapes['model_hidden']})"
                        if shapes["horizon"] else ")"))
        lines.append(f"reference matmul: {mm['gflops_per_s']:.1f} GFLOP/s")
        lines.append("| phase | ms | kernels | GFLOP | GFLOP/s | of matmul | first call s | mean horizon |")
        lines.append("| --- | --- | --- | --- | --- | --- | --- | --- |")
        for name, e in result["phases"].items():
            horizon = f"{e['mean_horizon']:.2f}" if "mean_horizon" in e else ""
            lines.append(f"| {name} | {e['ms']:.2f} | {e['kernels']} | {e['gflop']:.3f} | {e['gflops_per_s']:.1f} | "
                         f"{e['gflops_per_s'] / mm['gflops_per_s']:.0%} | {e['first_call_s']:.1f} | {horizon} |")
        for prefix, reference in (("improvement, ", "eager masked"), ("update, ", "eager")):
            base = result["phases"].get(prefix + reference)
            if base:
                for name, e in result["phases"].items():
                    if name.startswith(prefix) and e is not base:
                        lines.append(f"- {name}: {base['ms'] / e['ms']:.2f}x the speed of {prefix}{reference}")
        lines.append("")
    if report.get("fit"):
        lines.append("## model fit, one epoch (paper ensemble)")
        lines.append("| buffer rows | minibatches | ms per minibatch | s per epoch | GFLOP per epoch | GFLOP/s | kernels per minibatch |")
        lines.append("| --- | --- | --- | --- | --- | --- | --- |")
        for n, e in report["fit"].items():
            compiled = (f"; compiled {e['minibatch_ms_compiled']:.2f} ms, {e['minibatch_kernels_compiled']} kernels"
                        if "minibatch_ms_compiled" in e else "")
            lines.append(f"| {n} | {e['minibatches']} | {e['minibatch_ms']:.2f} | {e['epoch_ms'] / 1e3:.2f} | "
                         f"{e['epoch_gflop']:.0f} | {e['gflops_per_s']:.1f} | {e['minibatch_kernels']}{compiled} |")
        lines.append("")
    for name, p in report.get("projection", {}).items():
        lines.append(f"- walker2d, paper preset, {name}: {p['env_steps_per_hour']:.0f} env steps/h "
                     f"({p['hours']:.1f} h for {report['run_steps']} env steps; model fits {p['fit_share']:.0%} of it, "
                     f"{p['fit_share_at_50k']:.0%} at 50k and {p['fit_share_at_200k']:.0%} at 200k env steps; "
                     f"{report['fit_epochs']} epochs per fit)")
    return "\n".join(lines)


def fail(message: str) -> None:
    """Bad input: one line on stderr, before any work."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def main(argv: Optional[list[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--configs", default="sac,mpdp-quick,mpdp-paper", help=f"comma-separated, from {', '.join(CONFIGS)}")
    parser.add_argument("--repeats", type=int, default=10, help="timed calls per phase (median reported)")
    parser.add_argument("--no-compile", action="store_true", help="eager modes only (no cold compile)")
    parser.add_argument("--fit-rows", default="10000,50000,200000", help="buffer sizes of the model-fit epochs; empty: none")
    parser.add_argument("--fit-steps", type=int, default=20, help="minibatches timed per buffer size")
    parser.add_argument("--fit-epochs", type=int, default=16,
                        help="epochs per fit in the projection (16: the median of the quick-preset fits on hopper, "
                             "many of them stopped by its cap of 20; the paper preset allows 200, so its fits can run "
                             "longer)")
    parser.add_argument("--run-steps", type=int, default=200_000, help="env steps of the walker2d projection")
    parser.add_argument("--out", default=None, help="also write the report as JSON here")
    args = parser.parse_args(argv)
    configs = [c for c in args.configs.split(",") if c]
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown:
        fail(f"unknown config {', '.join(unknown)}; known: {', '.join(CONFIGS)}")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        fail("--device cuda, but torch sees no GPU")
    fit_rows = [int(n) for n in args.fit_rows.split(",") if n]

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    report: dict = {"device": name, "torch": torch.__version__, "threads": torch.get_num_threads(), "configs": [],
                    "fit_epochs": args.fit_epochs, "run_steps": args.run_steps}
    for config in configs:
        report["configs"].append(bench_config(CONFIGS[config], device, args.repeats, not args.no_compile))
        print(format_report({**report, "configs": report["configs"][-1:]}).split("\n", 2)[2], flush=True)
    paper = next((r for r in report["configs"] if r["config"]["name"] == "mpdp-paper"), None)
    if fit_rows:
        report["fit"] = bench_fit(CONFIGS["mpdp-paper"], device, fit_rows, args.fit_steps, compiled=not args.no_compile)
        if paper is not None:
            others = paper["phases"]["critic"]["ms"]  # the paper preset's alpha is fixed: no temperature step
            # a compiled update goes with compiled fit minibatches, as in a run (--model.compile covers both)
            compiled_fit = {n: {**e, "epoch_ms": e.get("epoch_ms_compiled", e["epoch_ms"])} for n, e in report["fit"].items()}
            report["projection"] = {
                name: walker2d_projection(e["ms"] + (others if name.startswith("improvement, ") else 0.0),
                                          compiled_fit if "compiled" in name else report["fit"], args.run_steps,
                                          args.fit_epochs)
                for name, e in paper["phases"].items() if name.startswith(("improvement, ", "update, "))
            }
    text = format_report(report)
    print("\n" + text)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
    return report


if __name__ == "__main__":
    main()
