"""Interval estimates over seeds the way rliable (Agarwal et al., 2021) makes them: the interquartile
mean (IQM) and the probability that one arm beats another, each with a 95 % stratified-bootstrap
confidence interval, computed by rliable (``rliable.library.get_interval_estimates``).

- IQM: ``rliable.metrics.aggregate_iqm``, scipy's ``trim_mean`` with 25 % cut at each end. It drops
  ``int(n / 4)`` runs at each end: none of 1-3 runs (the IQM is then the mean), one at each end
  of 4-7, so one lucky or failed seed of 4 or 5 does not move it.
- Probability of improvement: ``rliable.metrics.probability_of_improvement``, P(X > Y) of a run of
  X and a run of Y drawn at random, ties counting half (the Mann-Whitney U over n_x * n_y).
- CI: the percentile bootstrap over runs (the "stratified" bootstrap resamples runs within each
  column of the score matrix, runs x columns, so columns never mix).

NaN values (runs that did not get that far) are left out. One run gives the value and a NaN
interval: resampling one run would give a zero-width interval that claims a certainty one seed
cannot give. ``rliable`` is imported inside the functions: training does not need it.
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterator

import numpy as np

REPS = 2000  # bootstrap resamples; the tests use fewer
SEED = 0  # the bootstrap's seed, so that a table or figure comes out the same each time
CONFIDENCE = 0.95
IQM_CUT = 0.25  # the proportion rliable.metrics.aggregate_iqm cuts at each end


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """numpy's global RNG seeded with ``seed`` and restored afterwards: rliable's stratified
    bootstraps draw their indices from ``np.random`` itself, not from their ``random_state``."""
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        yield
    finally:
        np.random.set_state(state)


def iqm_per_column(scores: np.ndarray) -> np.ndarray:
    """``rliable.metrics.aggregate_iqm`` of each column of ``scores`` (runs x columns) in one call,
    the same ``trim_mean``, so that a bootstrap over a curve's steps takes one call per resample."""
    from scipy.stats import trim_mean

    return np.atleast_1d(trim_mean(scores, proportiontocut=IQM_CUT, axis=0))


def iqm_interval(scores: np.ndarray, reps: int = REPS, seed: int = SEED) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The IQM of each column of ``scores`` (runs x columns, NaN where a run has no value) over
    its runs, and the lower and upper edges of its 95 % stratified-bootstrap CI. A column's CI is
    NaN where fewer than two runs have a value; everything is NaN where none has.

    Columns with the same runs are bootstrapped together (one rliable call), so a curve whose
    runs all cover its steps costs one bootstrap."""
    from rliable import library

    scores = np.asarray(scores, dtype=float)
    if scores.ndim == 1:
        scores = scores[:, None]
    point, low, high = (np.full(scores.shape[1], np.nan) for _ in range(3))
    present = ~np.isnan(scores)
    with seeded(seed):
        for mask in np.unique(present, axis=1).T:  # each set of runs that has values, in a fixed order
            columns = (present == mask[:, None]).all(axis=0)
            block = scores[np.ix_(mask, columns)]
            if block.shape[0] == 0:
                continue
            point[columns] = iqm_per_column(block)
            if block.shape[0] < 2:
                continue
            _, interval = library.get_interval_estimates({"iqm": block}, iqm_per_column, reps=reps,
                                                         confidence_interval_size=CONFIDENCE)
            low[columns], high[columns] = interval["iqm"]
    return point, low, high


def probability_of_improvement(x: np.ndarray, y: np.ndarray, reps: int = REPS,
                               seed: int = SEED) -> tuple[float, float, float]:
    """P(X > Y) of the runs ``x`` and ``y`` (one value per run; NaN left out) and its 95 %
    stratified-bootstrap CI, runs of each arm resampled on their own. NaN when an arm has no
    value; the CI is NaN when an arm has a single run."""
    from rliable import library, metrics

    x, y = (np.asarray(v, dtype=float) for v in (x, y))
    x, y = x[~np.isnan(x)][:, None], y[~np.isnan(y)][:, None]  # runs x 1 task
    if len(x) == 0 or len(y) == 0:
        return math.nan, math.nan, math.nan

    def improvement(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return np.array([metrics.probability_of_improvement(a, b)])

    if len(x) < 2 or len(y) < 2:
        return float(improvement(x, y)[0]), math.nan, math.nan
    with seeded(seed):
        point, interval = library.get_interval_estimates({"p": [x, y]}, improvement, reps=reps,
                                                         confidence_interval_size=CONFIDENCE)
    return float(point["p"][0]), float(interval["p"][0, 0]), float(interval["p"][1, 0])
