"""Cost of the world-model phase on this machine.

    python -m mpdp_lightning.benchmarks.world_model [--transitions 10000] [--device cpu]

Reports (1) ms per training epoch of the default ensemble (K 7, 4 x 200 SiLU) on
``--transitions`` real hopper transitions (random actions; 20 % held out, minibatches of 256
per member), and (2) ms per forward + backward of all K members on a batch of 256, for the
batched block against a Python loop over K separate ``nn.Sequential`` members, and their ratio.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from torch import nn

from mpdp_lightning.tasks import get_task, make_env
from mpdp_lightning.world_model import GaussianEnsemble, nll_loss


def hopper_transitions(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    env = make_env("hopper", seed=seed)
    obs, _ = env.reset(seed=seed)
    inputs, targets = [], []
    for _ in range(n):
        action = env.action_space.sample()
        next_obs, reward, terminated, truncated, _ = env.step(action)
        inputs.append(np.concatenate([obs, action]))
        targets.append(np.concatenate([next_obs - obs, [reward]]))
        obs = env.reset()[0] if terminated or truncated else next_obs
    return torch.as_tensor(np.stack(inputs), dtype=torch.float32), torch.as_tensor(np.stack(targets), dtype=torch.float32)


def timed(fn, repeats: int, device: torch.device) -> float:
    """Median wall time of ``fn`` in ms (synchronising the device around each call)."""
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return float(np.median(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--transitions", type=int, default=10_000)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--epochs", type=int, default=5, help="epochs timed (median reported)")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)

    inputs, targets = hopper_transitions(args.transitions)
    inputs, targets = inputs.to(device), targets.to(device)
    model = GaussianEnsemble(11, 3, 7, 5, get_task("hopper").model_hidden, 4).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    n_train = args.transitions - min(int(0.2 * args.transitions), 5000)
    model.input_norm.fit(inputs[:n_train])
    model.target_norm.fit(targets[:n_train])

    def epoch() -> None:
        boot = torch.randint(n_train, (7, n_train), device=device)
        for start in range(0, n_train, 256):
            idx = boot[:, start : start + 256]
            loss, _ = nll_loss(model, inputs[idx], targets[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

    epoch()  # warm-up
    epoch_ms = timed(epoch, args.epochs, device)

    # forward + backward of all members on 256 rows: batched block vs a loop over members
    x = torch.randn(256, 14, device=device)
    y = torch.randn(256, 24, device=device)
    members = [
        nn.Sequential(*[m for i in range(4) for m in (nn.Linear(14 if i == 0 else 200, 200), nn.SiLU())], nn.Linear(200, 24)).to(device)
        for _ in range(7)
    ]

    def batched() -> None:
        out = model.net(x)
        (out - y).pow(2).mean().backward()

    def looped() -> None:
        loss = sum((member(x) - y).pow(2).mean() for member in members)
        loss.backward()

    for fn in (batched, looped):
        for _ in range(10):
            fn()
    batched_ms = timed(batched, 200, device)
    looped_ms = timed(looped, 200, device)

    print(f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"training epoch, K=7, 4x200, {n_train} training rows, batch 256/member: {epoch_ms:.1f} ms")
    print(f"forward+backward of 7 members on 256 rows: batched {batched_ms:.2f} ms, per-member loop {looped_ms:.2f} ms, "
          f"loop/batched = {looped_ms / batched_ms:.2f}x")


if __name__ == "__main__":
    main()
