"""What the benchmarks share: a device-synchronised timer and real transitions to fit models on."""

from __future__ import annotations

import time
from typing import Callable

import numpy as np
import torch

from mpdp_lightning.envs.tasks import make_env


def timed(fn: Callable[[], object], repeats: int, device: torch.device) -> float:
    """Median wall time of ``fn`` in ms, the device synchronised around each call."""
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


def random_transitions(task: str, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(obs, action) inputs and (delta obs, reward) targets from ``n`` random-action env steps."""
    env = make_env(task, seed=seed)
    obs, _ = env.reset(seed=seed)
    inputs, targets = [], []
    for _ in range(n):
        action = env.action_space.sample()
        next_obs, reward, terminated, truncated, _ = env.step(action)
        inputs.append(np.concatenate([obs, action]))
        targets.append(np.concatenate([next_obs - obs, [reward]]))
        obs = env.reset()[0] if terminated or truncated else next_obs
    env.close()
    return torch.as_tensor(np.stack(inputs), dtype=torch.float32), torch.as_tensor(np.stack(targets), dtype=torch.float32)
