"""Cost of the world-model phase on this machine.

    python -m mpdp_lightning.benchmarks.world_model [--transitions 10000] [--device cpu]

Reports (1) ms per training epoch of the default ensemble (K 7, 4 x 200 SiLU) on
``--transitions`` real hopper transitions (random actions; 20 % held out, minibatches of 256
per member), and (2) ms per forward + backward of all K members on a batch of 256, for the
batched block against a Python loop over K separate ``nn.Sequential`` members, and their ratio.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from mpdp_lightning.benchmarks.common import random_transitions, timed
from mpdp_lightning.envs.tasks import get_task
from mpdp_lightning.models.world_model import GaussianEnsemble, nll_loss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--transitions", type=int, default=10_000)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--epochs", type=int, default=5, help="epochs timed (median reported)")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)

    inputs, targets = random_transitions("hopper", args.transitions)
    inputs, targets = inputs.to(device), targets.to(device)
    model = GaussianEnsemble(11, 3, 7, 5, get_task("hopper").model_hidden, 4).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    n_train = args.transitions - min(int(0.2 * args.transitions), 5000)
    model.input_norm.fit(inputs[:n_train])
    if model.normalize_targets:  # raw targets by default, as MBPO
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
