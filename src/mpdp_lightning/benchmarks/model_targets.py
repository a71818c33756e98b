"""Raw against normalised world-model targets, fitted on the same real transitions.

    python -m mpdp_lightning.benchmarks.model_targets runs/checkpoints/<run>/last.ckpt [--seeds 3]
        [--size quick|paper] [--rows 10000]

MBPO's code normalises only the model's inputs; ours normalised the targets (delta obs, reward)
too until issue 19. This fits the ensemble both ways on the replay buffer of a checkpoint (the
newest ``--rows`` transitions; the rows after a 20 % holdout split train it), several seeds each,
and reports on the holdout, in raw units for both: the elites' MSE (all outputs, the next
observation's, the reward's), the Gaussian NLL, the OvR error u (mean and median, the quantity
MPDP stops its rollouts on and penalises), the epochs and the seconds of the fit.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from mpdp_lightning.envs.tasks import get_task, task_spaces
from mpdp_lightning.models.world_model import GaussianEnsemble, fit_ensemble

SIZES = {"quick": dict(ensemble_size=5, num_elites=3, hidden=128, layers=3, max_epochs=20),
         "paper": dict(ensemble_size=7, num_elites=5, hidden=None, layers=4, max_epochs=None)}


def replay_rows(checkpoint: str, rows: int) -> tuple[str, torch.Tensor, torch.Tensor]:
    """(task, inputs [N, obs+act], targets [N, obs+1]) of the newest ``rows`` stored transitions."""
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    task = state["hyper_parameters"]["task"]
    data = state["ReplayDataModule"]["data"]
    size = state["ReplayDataModule"]["size"]
    cursor = int(state["ReplayDataModule"]["writer"].get("_cursor", size)) % size if size else 0
    order = torch.cat([torch.arange(cursor, size), torch.arange(0, cursor)])[-rows:]  # oldest first
    obs, action, next_obs, reward = (data[k][order].float() for k in ("obs", "action", "next_obs", "reward"))
    inputs = torch.cat([obs, action], dim=-1)
    targets = torch.cat([next_obs - obs, reward.unsqueeze(-1)], dim=-1)
    return task, inputs, targets


def fit_once(task: str, inputs: torch.Tensor, targets: torch.Tensor, normalize: bool, seed: int, size: dict) -> dict:
    spaces = task_spaces(task)
    torch.manual_seed(seed)
    model = GaussianEnsemble(spaces.obs_dim, spaces.act_dim, size["ensemble_size"], size["num_elites"],
                             size["hidden"] or get_task(task).model_hidden, size["layers"],
                             termination_fn=get_task(task).termination_fn, normalize_targets=normalize).to(inputs.device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

    def step(loss: torch.Tensor) -> None:
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    generator = torch.Generator(inputs.device).manual_seed(seed)
    start = time.perf_counter()
    report = fit_ensemble(model, inputs, targets, step, max_epochs=size["max_epochs"], generator=generator)
    seconds = time.perf_counter() - start
    # the same holdout rows as the fit (the same generator draws the same split first)
    n = inputs.shape[0]
    hold = torch.randperm(n, device=inputs.device, generator=torch.Generator(inputs.device).manual_seed(seed))
    hold = hold[: min(int(n * 0.2), 5000)]
    with torch.no_grad():
        obs, action = inputs[hold].split([spaces.obs_dim, spaces.act_dim], dim=-1)
        mean, logvar = model(obs, action)
        raw_mean = model.target_norm.denormalize(mean[model.elites])
        raw_var = logvar[model.elites].exp() * model.target_norm.std.pow(2)
        error = (raw_mean - targets[hold]).pow(2)
        nll = 0.5 * (error / raw_var + raw_var.log()).mean().item()
        u = model.uncertainty(mean, logvar)
    return {"mse": error.mean().item(), "mse_obs": error[..., :-1].mean().item(), "mse_reward": error[..., -1].mean().item(),
            "nll": nll, "u_mean": u.mean().item(), "u_median": u.median().item(), "epochs": report.epochs, "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--rows", type=int, default=10_000)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--size", choices=sorted(SIZES), default="quick")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    try:
        task, inputs, targets = replay_rows(args.checkpoint, args.rows)
    except (OSError, KeyError, RuntimeError) as error:  # missing, unreadable, or not a run's checkpoint
        parser.exit(2, f"error: {args.checkpoint} is not a readable checkpoint with a replay buffer "
                       f"({type(error).__name__}: {' '.join(str(error).split())[:150]})\n")
    inputs, targets = inputs.to(args.device), targets.to(args.device)
    print(f"{task}: {inputs.shape[0]} transitions, {args.size} ensemble on {args.device}, seeds 0-{args.seeds - 1}, torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads; holdout metrics in raw units, mean ± std over seeds")
    columns = ("mse", "mse_obs", "mse_reward", "nll", "u_mean", "u_median", "epochs", "seconds")
    print("| targets | " + " | ".join(columns) + " |")
    print("| --- |" + " --- |" * len(columns))
    for normalize in (False, True):
        runs = [fit_once(task, inputs, targets, normalize, seed, SIZES[args.size]) for seed in range(args.seeds)]
        cells = []
        for column in columns:
            values = [run[column] for run in runs]
            spread = statistics.stdev(values) if len(values) > 1 else float("nan")
            cells.append(f"{statistics.mean(values):.4g} ± {spread:.2g}")
        print(f"| {'normalised' if normalize else 'raw (MBPO)'} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
