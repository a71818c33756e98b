"""A small MLflow store with known values for the tests of the aggregation over seeds and the
figures (importable as ``seed_store.*``).

Sweep ``s1``, task hopper, budget 4000 env steps:

- SAC, seeds 0-2 (tag ``seed``), evaluated at 1000, 2000, 3000, 4000:
  seed 0: 100 500 900 1000 (seed 0 was resumed: its interrupted attempt logged 100 at 3000 first)
  seed 1: 200 950 800 950
  seed 2:   0 100 200 300
- MPDP (seed only as the param ``seed_everything``), evaluated at 1500, 3000, 4000, with
  train/horizon_mean and model/error_l2:
  beta 0.2, seed 0: 300 600 900
  beta 0.2, seed 1: 500 950 (stopped at 3000, KILLED)
  beta 0.5, seed 0: 100 200 400

Besides: a SAC run of another sweep (``s2``) and the summary run of ``s1`` (no ``algo`` tag, no
metrics), which the loaders skip.
"""

from __future__ import annotations

from pathlib import Path

from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

T0 = 1_700_000_000_000
BUDGET = 4000
SAC = {0: [100.0, 500.0, 900.0, 1000.0], 1: [200.0, 950.0, 800.0, 950.0], 2: [0.0, 100.0, 200.0, 300.0]}
MPDP = {("0.2", 0): [300.0, 600.0, 900.0], ("0.2", 1): [500.0, 950.0], ("0.5", 0): [100.0, 200.0, 400.0]}
SAC_STEPS, MPDP_STEPS = [1000, 2000, 3000, 4000], [1500, 3000, 4000]


def _params(seed: int, **extra: str) -> list[Param]:
    values = {
        "task": "hopper",
        "seed_everything": str(seed),
        "env_interaction.total_env_steps": str(BUDGET),
        "model.init_args.gamma": "0.99",
        "trainer.logger.init_args.run_name": f"hopper-{seed}",
        **extra,
    }
    return [Param(key, value) for key, value in values.items()]


def _run(client: MlflowClient, experiment_id: str, name: str, tags: dict, params: list[Param],
         metrics: list[Metric], status: str = "FINISHED") -> str:
    run_id = client.create_run(experiment_id, run_name=name, tags=tags).info.run_id
    client.log_batch(run_id, metrics=metrics, params=params)
    client.set_terminated(run_id, status)
    return run_id


def build(folder: Path) -> str:
    """Create the store in ``folder`` and return its absolute tracking URI."""
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment_id = client.create_experiment("mpdp", artifact_location=(folder / "artifacts").as_uri())
    for seed, returns in SAC.items():
        metrics = [Metric("eval/return", value, T0 + 1000 * i, step) for i, (step, value) in
                   enumerate(zip(SAC_STEPS, returns))]
        if seed == 0:  # the interrupted attempt's value at 3000, logged earlier
            metrics.append(Metric("eval/return", 100.0, T0 - 60_000, 3000))
        tags = {"task": "hopper", "algo": "SAC", "seed": str(seed), "sweep": "s1"}
        _run(client, experiment_id, f"hopper-{seed}", tags, _params(seed), metrics)
    for (beta, seed), returns in MPDP.items():
        metrics = [Metric("eval/return", value, T0 + 1000 * i, step) for i, (step, value) in
                   enumerate(zip(MPDP_STEPS, returns))]
        for step in range(1000, 1000 * len(returns) + 1, 1000):
            metrics.append(Metric("train/horizon_mean", 2.0 + step / 1000 + seed, T0, step))
            metrics.append(Metric("model/error_l2", 0.1 / step * 1000, T0, step))
        tags = {"task": "hopper", "algo": "MPDP", "sweep": "s1", "preset": "quick"}
        status = "KILLED" if len(returns) < len(MPDP_STEPS) else "FINISHED"
        _run(client, experiment_id, f"hopper-{seed}", tags, _params(seed, **{"model.init_args.beta": beta}),
             metrics, status)
    _run(client, experiment_id, "hopper-7", {"task": "hopper", "algo": "SAC", "seed": "7", "sweep": "s2"},
         _params(7), [Metric("eval/return", 50.0, T0, step) for step in SAC_STEPS])
    summary = client.create_run(experiment_id, run_name="s1-summary", tags={"sweep_summary": "true", "sweep": "s1"})
    client.set_terminated(summary.info.run_id)
    return uri
