"""Cost of N seeds' updates in one group against one seed's update, side by side in one process.

    python -m mpdp_lightning.benchmarks.seed_group [--algo sac|mpdp] [--device cpu] [--cuda-graph]
        [--seeds 1,2,4] [--task walker2d] [--batch 256] [--out seeds.json]   (make bench-seeds ARGS="...")

For each N: the group's update (algorithms/seed_group.py: every phase vmapped over the stacked
seeds, one Adam step per phase for all) and, interleaved with it, one seed's update alone (the
module's own ``update``), both on the same shapes: SAC as conf/algo/sac.yaml builds it (CleanRL's
sizes, auto temperature), or MPDP at the paper preset's shapes (H 25, 7 members of 4 x 200,
fixed alpha; its world model unfitted, which changes where rows stop, not what a masked row
costs: both run rows masked, as a group must). With ``--cuda-graph`` (CUDA only) both updates
are captured once and replayed (training/cuda_graph.py, the group's per-seed generators
registered with the capture), as the module runs them on a GPU by default. Reported: ms per update, the ratio of the group's time to one seed's (the cost of the group;
N would mean no gain over running the seeds one after the other), the seeds' env steps per
second of update time summed over the group relative to one seed's, FLOPs per update
(torch.utils.flop_counter: the matmuls, forward and backward) and GFLOP/s. On the CPU the update
is compute-bound, so the group costs about N; on a GPU, where one seed's update is launch-bound,
the same launches carry N seeds' work.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Callable, Optional

import numpy as np
import torch
from tensordict import TensorDict
from torch.utils.flop_counter import FlopCounterMode

from mpdp_lightning.algorithms.agent import Agent
from mpdp_lightning.algorithms.mpdp import MPDP
from mpdp_lightning.algorithms.sac import SAC
from mpdp_lightning.algorithms.seed_group import stack_agents
from mpdp_lightning.benchmarks.common import timed
from mpdp_lightning.envs.tasks import task_spaces
from mpdp_lightning.training.cuda_graph import CapturedUpdate


def ready(agent: Agent, graph: bool) -> Callable[[TensorDict], object]:
    """The agent's update as the module runs it (captured as a CUDA graph or eagerly), with its
    optimizers (capturable where captured)."""
    agent.captured_update = CapturedUpdate(agent.update, generators=agent.seed_generators()) if graph else None
    optimizers = agent.configure_optimizers()
    agent.optimizers = lambda use_pl_optimizer=True: optimizers
    return agent.captured_update if graph else agent.update


def build_agent(algo: str, task: str, seed: int, device: torch.device) -> tuple[Agent, torch.Tensor]:
    """The agent under ``seed`` (see the module's docstring), and the generator state after."""
    torch.manual_seed(seed)
    if algo == "sac":
        agent = SAC(task, critic_lr=1e-3, alpha=1.0, auto_alpha=True)
    else:
        agent = MPDP(task, horizon=25, ensemble_size=7, num_elites=5, model_layers=4, alpha=0.2, auto_alpha=False,
                     compact_rows=False)
    return agent.to(device), torch.get_rng_state()


def random_batch(task: str, batch: int, device: torch.device, seeds: int = 0) -> TensorDict:
    """A batch of ``batch`` random transitions ([seeds, batch] with a seed axis)."""
    spaces = task_spaces(task)
    shape = (seeds, batch) if seeds else (batch,)
    return TensorDict({
        "obs": torch.randn(*shape, spaces.obs_dim),
        "action": torch.rand(*shape, spaces.act_dim) * 2 - 1,
        "reward": torch.randn(*shape),
        "next_obs": torch.randn(*shape, spaces.obs_dim),
        "terminated": torch.rand(*shape) < 0.01,
    }, batch_size=shape).to(device)


def flops_of(fn) -> int:
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return counter.get_total_flops()


def bench(algo: str, task: str, seed_counts: list[int], batch: int, repeats: int, device: torch.device,
          graph: bool = False) -> dict:
    alone_update = ready(build_agent(algo, task, 0, device)[0], graph)
    alone_batch = random_batch(task, batch, device)
    out = {"algo": algo, "task": task, "batch": batch, "device": str(device), "cuda_graph": graph, "groups": {}}
    for n in seed_counts:
        built = [build_agent(algo, task, seed, device) for seed in range(n)]
        group = stack_agents([a for a, _ in built], list(range(n)), [s for _, s in built])
        group_update = ready(group, graph)
        group_batch = random_batch(task, batch, device, seeds=n)
        for _ in range(5):  # warm-up: allocations, Adam's state, a graph's eager calls and capture
            group_update(group_batch)
            alone_update(alone_batch)
        group_ms, alone_ms = [], []
        for _ in range(repeats):  # interleaved, so that load from elsewhere hits both alike
            group_ms.append(timed(lambda: group_update(group_batch), 1, device))
            alone_ms.append(timed(lambda: alone_update(alone_batch), 1, device))
        g, a = float(np.median(group_ms)), float(np.median(alone_ms))
        flops = flops_of(lambda: group.update(group_batch))  # eagerly: a replay's kernels are not seen
        out["groups"][n] = {
            "group_ms": g, "alone_ms": a, "time_ratio": g / a, "throughput_ratio": n * a / g,
            "gflop": flops / 1e9, "gflops_per_s": flops / g / 1e6,
        }
    return out


def format_report(report: dict) -> str:
    mode = "captured as a CUDA graph" if report["cuda_graph"] else "eager"
    lines = [f"{report['algo'].upper()} update on {report['task']}, batch {report['batch']} per seed, {report['device']}, {mode}:",
             "seeds | group ms | one seed ms | group / one | seeds' throughput / one's | GFLOP | GFLOP/s"]
    for n, r in report["groups"].items():
        lines.append(f"{n:>5} | {r['group_ms']:8.2f} | {r['alone_ms']:11.2f} | {r['time_ratio']:11.2f} | "
                     f"{r['throughput_ratio']:25.2f} | {r['gflop']:5.2f} | {r['gflops_per_s']:7.1f}")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--algo", choices=("sac", "mpdp"), default="sac")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--cuda-graph", action="store_true", help="capture both updates as CUDA graphs (CUDA only)")
    parser.add_argument("--task", default="walker2d")
    parser.add_argument("--seeds", default="1,2,4", help="comma-separated group sizes")
    parser.add_argument("--batch", type=int, default=256, help="transitions per seed per update")
    parser.add_argument("--repeats", type=int, default=20, help="timed updates per size (median reported)")
    parser.add_argument("--out", default=None, help="also write the report as JSON here")
    args = parser.parse_args(argv)
    try:
        seed_counts = [int(n) for n in args.seeds.split(",")]
    except ValueError:
        parser.exit(2, f"error: --seeds must be comma-separated integers, got {args.seeds!r}\n")
    if any(n < 1 for n in seed_counts) or args.batch < 1 or args.repeats < 1:
        parser.exit(2, "error: --seeds, --batch and --repeats must be positive\n")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.exit(2, "error: --device cuda, but torch sees no GPU\n")
    if args.cuda_graph and not args.device.startswith("cuda"):
        parser.exit(2, f"error: --cuda-graph captures CUDA work; the device is {args.device}\n")
    report = bench(args.algo, args.task, seed_counts, args.batch, args.repeats, torch.device(args.device), args.cuda_graph)
    print(format_report(report))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
