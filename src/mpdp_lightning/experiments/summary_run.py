"""A sweep's summary run in MLflow: one run per sweep, tagged ``sweep_summary=true`` and
``sweep=<name>``, whose artifacts are the comparison's table and figures, so the MLflow UI shows
them beside the sweep's training runs. It has no ``algo`` tag and no metrics, so ``compare``'s
loaders never take it for a training run."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Optional

from mlflow.entities import Run
from mlflow.tracking import MlflowClient

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".svg", ".pdf")


def summary_run_name(sweep: str) -> str:
    return f"{sweep}-summary"


def find_summary_run(client: MlflowClient, experiment_id: str, sweep: str, run_name: str) -> Optional[Run]:
    """The oldest run of the experiment tagged ``sweep_summary=true`` and ``sweep=<sweep>`` with
    that name, or None. (The name and sweep are compared here, not in the search filter, so that
    any characters in them are safe.)"""
    matches, token = [], None
    while True:
        page = client.search_runs([experiment_id], filter_string="tags.sweep_summary = 'true'", page_token=token)
        matches += [run for run in page if run.data.tags.get("sweep") == sweep and run.info.run_name == run_name]
        token = page.token
        if not token:
            break
    return min(matches, key=lambda run: run.info.start_time) if matches else None


def log_to_mlflow(
    paths: Iterable[str | os.PathLike],
    tracking_uri: str,
    experiment: str,
    sweep: str,
    run_name: Optional[str] = None,
) -> str:
    """Log ``paths`` as artifacts of the sweep's summary run (named ``run_name``, by default
    ``<sweep>-summary``) in ``experiment``: images under ``figures/``, other files (the tables) at
    the top. The run is created the first time, tagged ``sweep_summary=true`` and
    ``sweep=<sweep>``, and found again by those tags and its name on every later call, so a second
    call replaces its files instead of adding a run. Returns the run's id."""
    client = MlflowClient(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        raise ValueError(f"no experiment {experiment!r} in {tracking_uri}")
    name = run_name or summary_run_name(sweep)
    run = find_summary_run(client, found.experiment_id, sweep, name)
    if run is None:
        note = f"Comparison over seeds of the sweep {sweep!r}: table and figures (python -m mpdp_lightning.experiments.compare)."
        run = client.create_run(found.experiment_id, run_name=name,
                                tags={"sweep_summary": "true", "sweep": sweep, "mlflow.note.content": note})
    run_id = run.info.run_id
    for path in map(Path, paths):
        client.log_artifact(run_id, str(path), "figures" if path.suffix.lower() in IMAGE_SUFFIXES else None)
    client.set_terminated(run_id, "FINISHED")
    return run_id
