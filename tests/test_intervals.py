"""IQM and probability of improvement with bootstrap CIs (experiments/intervals.py, through rliable),
in the table over seeds and the report, on tiny data with values worked out by hand."""

import math

import numpy as np
import pandas as pd
import pytest
from rliable import metrics

from mpdp_lightning.experiments import intervals, seeds
from mpdp_lightning.experiments.compare import write_report

REPS = 300  # enough for the CIs' shape, few enough to be fast


def _final_returns(arms: dict[str, list[float]], budget: int = 1000) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Runs of task ``ip``, one per value, each evaluated once at the end of its budget, so that
    its return@end and AUC are that value."""
    runs, curves = [], []
    for algo, values in arms.items():
        for seed, value in enumerate(values):
            run_id = f"{algo}-{seed}"
            runs.append({"run_id": run_id, "run_name": run_id, "task": "ip", "algo": algo, "seed": str(seed),
                         "status": "FINISHED", "sweep": None, seeds.BUDGET_PARAM: str(budget)})
            curves.append({"run_id": run_id, "env_steps": budget, "value": value})
    return pd.DataFrame(runs), pd.DataFrame(curves)


def test_iqm_of_known_values():
    values = np.array([100.0, 3.0, 1.0, 6.0, 2.0, 5.0, 4.0, 7.0])
    iqm, _, _ = intervals.iqm_interval(values, reps=REPS)
    assert iqm[0] == pytest.approx((3 + 4 + 5 + 6) / 4)  # of 8 runs the lowest 2 and highest 2 are cut
    assert intervals.iqm_interval([1.0, 2.0, 30.0], reps=REPS)[0][0] == pytest.approx(11.0)  # 3 runs: none cut


def test_iqm_per_column_is_rliables_aggregate_iqm():
    scores = np.random.default_rng(0).normal(size=(7, 5))
    expected = [metrics.aggregate_iqm(scores[:, [column]]) for column in range(5)]
    assert intervals.iqm_per_column(scores) == pytest.approx(expected)


def test_the_ci_holds_the_iqm_and_narrows_when_seeds_agree():
    spread = np.array([100.0, 400.0, 500.0, 600.0, 900.0])
    agree = np.array([480.0, 490.0, 500.0, 510.0, 520.0])
    (iqm,), (low,), (high,) = intervals.iqm_interval(spread, reps=REPS)
    assert low <= iqm <= high and low >= spread.min() and high <= spread.max()
    (iqm_agree,), (low_agree,), (high_agree,) = intervals.iqm_interval(agree, reps=REPS)
    assert low_agree <= iqm_agree <= high_agree
    assert high_agree - low_agree < (high - low) / 5


def test_small_and_missing_samples():
    # NaN values (runs that did not get that far) are left out
    with_nan = intervals.iqm_interval([[1.0, math.nan], [2.0, 5.0], [3.0, math.nan], [math.nan, math.nan]], reps=REPS)
    assert with_nan[0].tolist() == [2.0, 5.0]
    assert not math.isnan(with_nan[1][0]) and math.isnan(with_nan[1][1])  # one run: the value, no CI
    assert all(math.isnan(v[0]) for v in intervals.iqm_interval([math.nan, math.nan], reps=REPS))
    p, low, high = intervals.probability_of_improvement([2.0], [1.0, 3.0], reps=REPS)
    assert p == 0.5 and math.isnan(low) and math.isnan(high)
    assert all(math.isnan(v) for v in intervals.probability_of_improvement([math.nan], [1.0, 3.0], reps=REPS))


def test_probability_of_improvement():
    assert intervals.probability_of_improvement([5.0, 6.0, 7.0], [1.0, 2.0, 3.0], reps=REPS) == (1.0, 1.0, 1.0)
    p, low, high = intervals.probability_of_improvement([1.0, 2.0, 3.0], [1.0, 2.0, 3.0], reps=REPS)
    assert p == 0.5 and low < 0.5 < high
    # of 3 x 3 pairs, a beats b in 5 and ties in 1
    a, b = [3.0, 5.0, 9.0], [1.0, 5.0, 6.0]
    p, low, high = intervals.probability_of_improvement(a, b, reps=REPS)
    assert p == pytest.approx(5.5 / 9) and low < p < high
    assert intervals.probability_of_improvement(b, a, reps=REPS)[0] == pytest.approx(3.5 / 9)


def test_the_reverse_order_is_one_minus_the_forward_on_any_resample():
    """What improvement_table relies on to derive P(Y > X) and its CI from P(X > Y)'s resamples."""
    rng = np.random.default_rng(0)
    for _ in range(20):
        x, y = rng.integers(0, 5, size=(rng.integers(1, 6), 1)), rng.integers(0, 5, size=(rng.integers(1, 6), 1))
        forward, backward = metrics.probability_of_improvement(x, y), metrics.probability_of_improvement(y, x)
        assert backward == pytest.approx(1 - forward)


def test_same_seed_same_numbers_and_the_global_rng_untouched():
    values = np.array([1.0, 4.0, 2.0, 8.0, 5.0])
    np.random.seed(123)
    before = np.random.get_state()[1].copy()
    first = intervals.iqm_interval(values, reps=REPS)
    assert np.array_equal(np.random.get_state()[1], before)
    assert np.array_equal(np.stack(first), np.stack(intervals.iqm_interval(values, reps=REPS)))
    assert not np.array_equal(np.stack(first), np.stack(intervals.iqm_interval(values, reps=REPS, seed=1)))
    pair = ([1.0, 4.0, 2.0], [3.0, 0.5, 2.5])
    assert intervals.probability_of_improvement(*pair, reps=REPS) == intervals.probability_of_improvement(*pair, reps=REPS)


def test_seed_table_adds_iqm_columns(s1):
    runs, curves = s1
    table = seeds.seed_table(runs, curves["eval/return"])  # 2000 resamples: the 2.5 % tail is ~50 of them
    sac = table[table["algo"] == "SAC"].iloc[0]
    assert sac["return@end"] == pytest.approx(750.0)  # the mean stays
    # SAC's final returns 1000, 950, 300: three runs, none cut, so the IQM is the mean and the
    # 95 % CI runs from the lowest to the highest (a resample of three equal runs is 1/27 > 2.5 %)
    assert sac["return@end_iqm"] == pytest.approx(750.0)
    assert (sac["return@end_iqm_low"], sac["return@end_iqm_high"]) == pytest.approx((300.0, 1000.0))
    low = table[(table["algo"] == "MPDP") & (table["model.init_args.beta"] == "0.2")].iloc[0]
    assert math.isnan(low["return@25%_iqm"])  # no run got there
    assert low["return@end_iqm"] == 900.0 and math.isnan(low["return@end_iqm_low"])  # one run got there
    assert low["return@50%_iqm"] == pytest.approx(400.0) and low["return@50%_iqm_low"] == pytest.approx(300.0)
    shown = seeds.format_table(table).set_index("algo")
    assert shown.loc["SAC", "IQM return@end"] == "750.0 [300.0, 1000.0]"
    assert shown.loc["SAC", "return@end"] == "750.0 ± 390.5"
    assert "900.0 [nan, nan] (n=1)" in shown["IQM return@end"].tolist()


def test_improvement_table_each_arm_over_each_other():
    runs, curves = _final_returns({"MPDP": [900.0, 950.0, 1000.0, 980.0], "MBPO": [100.0, 200.0, 300.0],
                                   "SAC": [150.0, 250.0, 920.0]})
    table = seeds.improvement_table(runs, curves, reps=REPS)
    assert list(table.columns) == seeds.IMPROVEMENT_COLUMNS
    at_end = table[table["measure"] == "return@end"].set_index(["arm", "other"])
    assert len(at_end) == 6  # 3 arms, each over each other
    assert tuple(at_end.loc[("MPDP", "MBPO"), ["p_improvement", "low", "high"]]) == (1.0, 1.0, 1.0)
    assert at_end.loc[("MBPO", "MPDP"), "p_improvement"] == 0.0
    assert at_end.loc[("SAC", "MBPO"), "p_improvement"] == pytest.approx(6 / 9)
    assert at_end.loc[("MPDP", "SAC"), "p_improvement"] == pytest.approx(11 / 12)
    assert at_end.loc[("MPDP", "SAC"), "arm_n"] == 4 and at_end.loc[("MPDP", "SAC"), "other_n"] == 3
    shown = seeds.format_improvement(table)
    comparisons = shown[shown["measure"] == "return@end"]["comparison"].tolist()
    assert comparisons == ["P(MPDP > MBPO)", "P(SAC > MBPO)", "P(MPDP > SAC)"]  # the likelier winner first
    assert table.equals(seeds.improvement_table(runs, curves, reps=REPS))  # the same bootstrap seed


def test_report_has_the_iqm_and_improvement_sections(s1, tmp_path):
    runs, curves = s1
    written = write_report(runs, curves, tmp_path, threshold=900)
    assert tmp_path / "improvement.csv" in written
    report = (tmp_path / "seed_table.md").read_text()
    assert "interquartile mean" in report and "IQM return@end" in report
    assert "750.0 [300.0, 1000.0]" in report
    assert "## Probability of improvement" in report
    # SAC's final 1000, 950, 300 against beta 0.5's single 400: 2 of 3 pairs, no CI of one run
    assert "| hopper | return@end | P(SAC > MPDP, beta=0.5) | 0.67 [nan, nan] | 3 vs 1 |" in report
    improvement = pd.read_csv(tmp_path / "improvement.csv")
    assert len(improvement) == 2 * 3 * 2  # 2 measures, 3 pairs of arms, both orders
