"""make bench: the per-phase update cost report."""

import json
import subprocess
import sys

from mpdp_lightning.benchmarks.update import main, walker2d_projection


def test_bench_reports_every_phase_with_flops_and_the_fit_by_buffer_size(tmp_path, capsys):
    out = tmp_path / "bench.json"
    main(["--configs", "sac,mpdp-quick", "--no-compile", "--fit-rows", "1000,3000", "--fit-steps", "2",
          "--repeats", "1", "--out", str(out)])
    report = json.loads(out.read_text())
    sac, quick = report["configs"]
    assert set(sac["phases"]) == {"critic", "temperature", "improvement", "update, eager"}
    assert set(quick["phases"]) == {"critic", "temperature", "improvement, eager masked", "improvement, eager compacted",
                                    "update, eager"}
    for config in (sac, quick):
        assert config["matmul"]["gflops_per_s"] > 0
        for name, phase in config["phases"].items():
            assert phase["ms"] > 0 and (phase["gflop"] > 0 or name == "temperature"), name
    masked, compacted = quick["phases"]["improvement, eager masked"], quick["phases"]["improvement, eager compacted"]
    assert masked["mean_horizon"] == compacted["mean_horizon"] < 10  # the same rows stop in both
    assert compacted["gflop"] < masked["gflop"]  # stopped rows cost nothing
    # the whole update: the three phases' work, its improvement compacted as on the CPU (after
    # the timed updates the actor has moved, so its rows stop elsewhere than the phase's did)
    phases = quick["phases"]
    critic, update = phases["critic"]["gflop"], phases["update, eager"]["gflop"]
    assert critic < update < critic + masked["gflop"] + phases["temperature"]["gflop"]
    fit = report["fit"]
    assert fit["3000"]["minibatches"] > fit["1000"]["minibatches"] and fit["3000"]["epoch_gflop"] > fit["1000"]["epoch_gflop"]
    printed = capsys.readouterr().out
    assert "improvement, eager compacted: " in printed and "x the speed of improvement, eager masked" in printed


def test_projection_adds_the_fits_to_the_updates():
    fit = {10_000: {"epoch_ms": 1000.0}, 20_000: {"epoch_ms": 2000.0}}  # 0.1 ms per row and epoch
    p = walker2d_projection(update_ms=10.0, fit=fit, run_steps=1000, epochs=2, updates_per_env_step=20, train_every=250)
    update_ms = 1000 * 20 * 10.0
    fit_ms = sum(2 * 0.1 * n for n in (250, 500, 750, 1000))
    assert abs(p["hours"] - (update_ms + fit_ms) / 3.6e6) < 1e-9
    assert abs(p["fit_share"] - fit_ms / (update_ms + fit_ms)) < 1e-9
    one_fit_at_200k, between_fits = 2 * 0.1 * 200_000, 250 * 20 * 10.0
    assert abs(p["fit_share_at_200k"] - one_fit_at_200k / (one_fit_at_200k + between_fits)) < 1e-9


def test_unknown_config_is_one_line():
    result = subprocess.run([sys.executable, "-m", "mpdp_lightning.benchmarks.update", "--configs", "ppo"],
                            capture_output=True, text=True)
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        "error: unknown config ppo; known: sac, mpdp-quick, mpdp-paper"]
