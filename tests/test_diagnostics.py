"""The diagnostics table from trial records: per arm and env-step window, mean over the window,
then mean ± std over seeds; bad input is one line before any work."""

import pytest

from mpdp_lightning.experiments.diagnostics import diagnostics_table, main
from mpdp_lightning.experiments.records import SCHEMA, write_record


def _record(seed, rule, horizon):
    return {
        "schema": SCHEMA, "sweep": "s", "trial": f"mpdp-s{seed}-{rule}", "task": "hopper", "algo": "MPDP",
        "status": "FINISHED", "seed": seed, "preset": "quick",
        "run": {"run_id": f"r{seed}{rule}", "start_time": 1, "run_name": f"hopper-mpdp-s{seed}-{rule}"},
        "config": {"model.init_args.threshold": rule, "seed_everything": str(seed), "model.init_args.horizon": "25"},
        "curves": {"train/horizon_mean": horizon, "eval/return": [[10_000, 100.0 + seed]]},
    }


def test_each_arm_gets_its_window_means_over_seeds():
    records = [
        _record(0, "fresh", [[6000, 10.0], [9000, 12.0], [15000, 20.0]]),
        _record(1, "fresh", [[7000, 14.0], [12000, 16.0]]),
        _record(0, "quantile", [[6000, 8.0], [20000, 6.0]]),
    ]
    table = diagnostics_table(records, [5000, 10000, 20000], ["train/horizon_mean", "eval/return"]).splitlines()
    assert table[0] == "| metric | arm | seeds | 5-10k | 10-20k |"
    # fresh: seed 0's windows 11 and 20, seed 1's 14 and 16; the arm's mean ± std over the two seeds
    assert "| train/horizon_mean | MPDP threshold=fresh | 0,1 | 12.50 ± 2.12 | 18.00 ± 2.83 |" in table
    assert "| train/horizon_mean | MPDP threshold=quantile | 0 | 8.00 | 6.00 |" in table
    assert "| eval/return | MPDP threshold=fresh | 0,1 | 100.50 ± 0.71 |  |" in table  # no point after 10k


@pytest.mark.parametrize("args, message", [
    (["--windows", "10000,5000"], "--windows: at least two increasing env steps"),
    (["--metric", "train/nothing"], "--metric: records keep no curve train/nothing"),
    (["--sweep", "other"], "no records of sweep 'other'"),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, args, message):
    write_record(_record(0, "fresh", [[6000, 10.0]]), tmp_path / "s" / "a.json")
    out = tmp_path / "table.md"
    with pytest.raises(SystemExit) as exit_:
        main(["--records", str(tmp_path), *args, "--out", str(out)])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0]
    assert not out.exists()


def test_the_table_is_printed_and_written(tmp_path, capsys):
    write_record(_record(0, "fresh", [[6000, 10.0]]), tmp_path / "s" / "a.json")
    out = tmp_path / "table.md"
    main(["--records", str(tmp_path), "--sweep", "s", "--windows", "5000,10000", "--metric", "train/horizon_mean",
          "--out", str(out)])
    printed = capsys.readouterr().out
    assert "| train/horizon_mean | MPDP | 0 | 10.00 |" in printed and out.read_text() == printed
