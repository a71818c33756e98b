"""The table over seeds: known values from a small synthetic MLflow store (tests/seed_store.py)."""

import math

import numpy as np
import pandas as pd
import pytest

from mpdp_lightning.experiments import seeds
from mpdp_lightning.experiments.compare import load_comparison, load_curves, load_runs, main


def _row(table: pd.DataFrame, algo: str, beta=None) -> pd.Series:
    match = table["algo"] == algo
    if beta is not None:
        match &= table["model.init_args.beta"] == beta
    assert match.sum() == 1
    return table[match].iloc[0]


def test_loaders_skip_the_summary_run_and_filter_by_sweep(store, s1):
    runs, curves = s1
    assert len(runs) == 6 and set(runs["algo"]) == {"SAC", "MPDP"}  # not s2's run, not the summary run
    assert len(load_runs(store, "mpdp")) == 7  # every training run, still no summary run
    assert "s1-summary" not in set(load_curves(store, "mpdp")["run_name"])
    # seed: the tag where there is one, else the param seed_everything
    assert sorted(runs["seed"]) == ["0", "0", "0", "1", "1", "2"]
    assert runs["model.init_args.beta"].dropna().tolist().count("0.2") == 2
    sac0 = curves["eval/return"].query("algo == 'SAC' and seed == '0'")
    assert sac0["value"].tolist() == [100.0, 500.0, 900.0, 1000.0]  # the resumed attempt's 900 at 3000


def test_seeds_of_one_setting_pool_and_beta_separates(s1):
    runs, curves = s1
    assert seeds.varying_params(runs) == ["model.init_args.beta"]  # not the seeds or run names
    # how each seed's update ran (another device's plan) and what the algorithm chose for an
    # option left to it are not settings: they split no group
    varied = runs.assign(**{"plan.cuda_graph": ["true", "false"] * 3,
                            "resolved.env_interaction.warmup_steps": ["1000", "5000", "1000", "1000", "5000", "1000"]})
    assert seeds.varying_params(varied) == ["model.init_args.beta"]
    table = seeds.seed_table(runs, curves["eval/return"], threshold=900)
    assert list(table.columns[:3]) == ["task", "algo", "model.init_args.beta"]
    assert table["algo"].tolist() == ["MPDP", "MPDP", "SAC"]
    assert table["model.init_args.beta"].fillna("-").tolist() == ["0.2", "0.5", "-"]  # SAC has no beta
    assert table["runs"].tolist() == [2, 1, 3]
    pooled = seeds.seed_table(runs, curves["eval/return"], auto_group=False)
    assert pooled["runs"].tolist() == [3, 3]  # MPDP, SAC: beta no longer separates
    named = seeds.seed_table(runs, curves["eval/return"], group_by=["beta"], auto_group=False)
    assert named["runs"].tolist() == [2, 1, 3]  # the short name of model.init_args.beta
    with pytest.raises(ValueError, match="no run has the param 'model.bta'"):
        seeds.seed_table(runs, curves["eval/return"], group_by=["model.bta"])


def test_means_stds_at_fractions_of_the_budget(s1):
    runs, curves = s1
    table = seeds.seed_table(runs, curves["eval/return"], threshold=900)
    sac = _row(table, "SAC")
    assert sac["seeds"] == "0 1 2" and sac["budget"] == 4000
    assert sac["return@25%"] == pytest.approx(100.0) and sac["return@25%_std"] == pytest.approx(100.0)
    assert sac["return@50%"] == pytest.approx(1550 / 3)
    assert sac["return@75%"] == pytest.approx(1900 / 3)
    assert sac["return@end"] == pytest.approx(750.0)
    assert sac["return@end_std"] == pytest.approx(math.sqrt((250**2 + 200**2 + 450**2) / 2))  # ddof=1
    # MPDP evaluated at 1500, 3000, 4000: the latest evaluation at or before each point, none before 1000
    low = _row(table, "MPDP", "0.2")
    assert math.isnan(low["return@25%"]) and low["return@25%_n"] == 0
    assert low["return@50%"] == pytest.approx(400.0) and low["return@50%_std"] == pytest.approx(100 * math.sqrt(2))
    assert low["return@75%"] == pytest.approx(775.0) and low["return@75%_n"] == 2
    # seed 1 stopped at 3000: no value at the end, so the end is seed 0's alone, std NaN
    assert low["return@end"] == pytest.approx(900.0) and low["return@end_n"] == 1
    assert math.isnan(low["return@end_std"])
    single = _row(table, "MPDP", "0.5")
    assert single["runs"] == 1 and single["return@end"] == pytest.approx(400.0)
    assert math.isnan(single["return@end_std"]) and math.isnan(single["auc_std"])


def test_area_under_the_curve_is_a_mean_return(s1):
    runs, curves = s1
    per_run = seeds.per_run(runs, curves["eval/return"])

    def auc(algo, seed, status):
        row = per_run[(per_run["algo"] == algo) & (per_run["seed"] == seed) & (per_run["status"] == status)]
        assert len(row) == 1
        return row["auc"].iloc[0]

    # trapezoid over env steps / the env steps spanned
    assert auc("SAC", "0", "FINISHED") == pytest.approx((300 + 700 + 950) / 3)
    assert auc("SAC", "1", "FINISHED") == pytest.approx(775.0)
    assert auc("SAC", "2", "FINISHED") == pytest.approx(150.0)
    assert math.isnan(auc("MPDP", "1", "KILLED"))  # did not reach the end of its budget
    table = seeds.seed_table(runs, curves["eval/return"])
    sac = _row(table, "SAC")
    assert sac["auc"] == pytest.approx((650 + 775 + 150) / 3) and sac["auc_n"] == 3
    assert _row(table, "MPDP", "0.2")["auc"] == pytest.approx((450 * 1500 + 750 * 1000) / 2500)


def test_first_step_at_the_threshold_and_whether_it_stays(s1):
    runs, curves = s1
    table = seeds.seed_table(runs, curves["eval/return"], threshold=900)
    sac = _row(table, "SAC")
    assert sac["first_step_per_seed"] == "0:3000 1:2000 2:never"
    assert sac["stays_per_seed"] == "0:yes 1:no 2:no"  # seed 1 fell to 800 at 3000
    assert sac["first_step_median"] == 3000 and sac["stays"] == 1
    low = _row(table, "MPDP", "0.2")
    assert low["first_step_per_seed"] == "0:4000 1:3000" and low["first_step_median"] == 3500
    assert low["stays"] == 2
    single = _row(table, "MPDP", "0.5")
    assert single["first_step_median"] == math.inf and single["stays"] == 0  # never: infinitely late


def test_the_step_from_which_a_run_stays_above_the_threshold(s1):
    runs, curves = s1
    sac = _row(seeds.seed_table(runs, curves["eval/return"], threshold=900), "SAC")
    # seed 0: 100 500 900 1000; seed 1 dips: 200 950 800 950; seed 2 never gets there
    assert sac["settled_per_seed"] == "0:3000 1:4000 2:never"
    assert sac["settled_median"] == 4000
    steps = np.array([1000.0, 2000.0, 3000.0])
    assert seeds.settled_from(steps, np.array([950.0, 990.0, 1000.0]), 900) == 1000.0
    assert math.isnan(seeds.settled_from(steps, np.array([950.0, 990.0, 800.0]), 900))


def test_readable_table(s1):
    runs, curves = s1
    shown = seeds.format_table(seeds.seed_table(runs, curves["eval/return"], threshold=900))
    assert list(shown.columns[:5]) == ["task", "algo", "beta", "runs", "seeds"]
    sac = shown[shown["algo"] == "SAC"].iloc[0]
    assert sac["beta"] == "-" and sac["return@end"] == "750.0 ± 390.5"
    assert sac["median first"] == "3000" and sac["stay"] == "1/3"
    low = shown[(shown["algo"] == "MPDP") & (shown["beta"] == "0.2")].iloc[0]
    assert low["return@25%"] == "-" and low["return@end"] == "900.0 ± nan (n=1)"
    assert shown[shown["beta"] == "0.5"].iloc[0]["median first"] == "never"
    markdown = seeds.to_markdown(shown)
    assert markdown.splitlines()[0].startswith("| task | algo | beta | runs | seeds |")
    assert len(markdown.splitlines()) == 2 + 3


def test_runs_of_several_sweeps_are_grouped_by_sweep(store):
    runs, curves = load_comparison(store, "mpdp")
    table = seeds.seed_table(runs, curves["eval/return"])
    assert "sweep" in table.columns
    assert table[table["sweep"] == "s2"]["runs"].tolist() == [1]


def test_command_prints_the_seed_table_and_writes_it(store, tmp_path, capsys):
    main(["--tracking-uri", store, "--sweep", "s1", "--threshold", "900", "--out", str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert "6 runs in 3 groups (task, algo, beta)" in out
    sac = next(line for line in out.splitlines() if " SAC " in line)
    assert "750.0 ± 390.5" in sac and "0:3000 1:2000 2:never" in sac and "1/3" in sac
    written = {path.name for path in (tmp_path / "out").iterdir()}
    assert {"seed_table.csv", "seed_table.md", "runs.csv", "hopper_curves.png",
            "hopper_final_return_vs_beta.png"} <= written
    csv = pd.read_csv(tmp_path / "out" / "seed_table.csv")
    assert csv["runs"].tolist() == [2, 1, 3]
    assert "| hopper | SAC | - | 3 | 0 1 2 |" in (tmp_path / "out" / "seed_table.md").read_text()


def test_command_errors(store, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--tracking-uri", store, "--group-by", "model.init_args.bta"])
    assert exit_.value.code == 2 and "no run has the param 'model.init_args.bta'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        main(["--tracking-uri", store, "--sweep", "nope"])
    assert exit_.value.code == 2 and "sweeps there: s1, s2" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        main(["--tracking-uri", store, "--log-to-mlflow"])
    assert exit_.value.code == 2 and "--log-to-mlflow needs --sweep" in capsys.readouterr().err
