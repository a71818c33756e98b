"""The training runs of an MLflow experiment and their metric histories, as the comparison
(``compare``) and the trial records (``records``) both read them."""

from __future__ import annotations

from typing import Iterable, Optional

from mlflow.entities import Metric, Run
from mlflow.tracking import MlflowClient

# The metrics of the figures: the return (Fig. 1), MPDP's mean horizon (Fig. 2), the model error (Fig. 3).
FIGURE_METRICS = ("eval/return", "train/horizon_mean", "model/error_l2")


def latest_attempt(points: Iterable[Metric]) -> list[Metric]:
    """One point per step of a metric history, the one the latest attempt logged, in step order.

    A resumed run continues the same MLflow run from its last checkpoint, so the env steps
    between that checkpoint and the interruption are logged twice: by the attempt that was
    interrupted and again by the resumed one, generally with other values (the episode under
    way starts afresh, so the data and the nets differ). The resumed attempt is the one the
    rest of the run builds on, so at each step keep the point with the largest ``timestamp``
    (ms); of points with equal timestamps, the one that comes later in ``points``. (That tie
    never separates two attempts, as a resumed one starts seconds after the interruption; and
    MLflow's SQLite store returns equal timestamps ordered by value, not by when they were logged.)
    """
    latest: dict[int, Metric] = {}
    for point in points:
        kept = latest.get(point.step)
        if kept is None or point.timestamp >= kept.timestamp:
            latest[point.step] = point
    return [latest[step] for step in sorted(latest)]


def training_runs(
    client: MlflowClient, experiment: str, filter_string: str = "", sweep: Optional[str] = None
) -> list[Run]:
    """The training runs of ``experiment``: runs with an ``algo`` tag (a sweep's summary run, which
    holds its figures, has none), of the sweep ``sweep`` when given, all pages of the search."""
    found = client.get_experiment_by_name(experiment)
    if found is None:
        raise ValueError(f"no experiment {experiment!r} in {client.tracking_uri}")
    runs, token = [], None
    while True:
        page = client.search_runs([found.experiment_id], filter_string=filter_string, page_token=token)
        runs += [
            run for run in page
            if run.data.tags.get("algo") and run.data.tags.get("sweep_summary") != "true"
            and (sweep is None or run.data.tags.get("sweep") == sweep)
        ]
        token = page.token
        if not token:
            return runs
