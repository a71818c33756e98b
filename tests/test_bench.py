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


def test_model_targets_bench_fits_both_ways_on_a_checkpoints_buffer_and_reports_raw_units(tmp_path, capsys, monkeypatch):
    import torch

    from mpdp_lightning.benchmarks import model_targets

    # a checkpoint's replay buffer as the data module saves it (inverted_pendulum: obs 4, action 1),
    # written round the ring: the newest rows are read oldest first from the write cursor
    n = 300
    obs = torch.randn(n, 4)
    data = {"obs": obs, "action": torch.rand(n, 1) * 6 - 3, "next_obs": obs + 0.05 * torch.randn(n, 4),
            "reward": torch.ones(n), "terminated": torch.zeros(n, dtype=torch.bool)}
    path = tmp_path / "last.ckpt"
    torch.save({"hyper_parameters": {"task": "inverted_pendulum"},
                "ReplayDataModule": {"size": n, "data": data, "writer": {"_cursor": 100}}}, path)
    task, inputs, targets = model_targets.replay_rows(str(path), rows=250)
    assert task == "inverted_pendulum" and inputs.shape == (250, 5) and targets.shape == (250, 5)
    oldest_first = torch.cat([torch.arange(100, n), torch.arange(0, 100)])[-250:]  # the newest sits before the cursor
    torch.testing.assert_close(inputs[:, :4], obs[oldest_first])
    torch.testing.assert_close(targets[:, :4], (data["next_obs"] - obs)[oldest_first])
    small = dict(ensemble_size=3, num_elites=2, hidden=16, layers=1, max_epochs=3)
    raw = model_targets.fit_once(task, inputs, targets, normalize=False, seed=0, size=small)
    normalised = model_targets.fit_once(task, inputs, targets, normalize=True, seed=0, size=small)
    for report in (raw, normalised):
        assert report["epochs"] == 3 and report["u_mean"] >= 0
        # the reward is constant: its raw-unit error is the model's whole error there
        assert 0 < report["mse_reward"] and report["mse"] > 0
    monkeypatch.setattr(model_targets, "SIZES", {"quick": small})
    monkeypatch.setattr(sys, "argv", ["model_targets", str(path), "--rows", "250", "--seeds", "2"])
    model_targets.main()
    table = capsys.readouterr().out
    assert "| raw (MBPO) |" in table and "| normalised |" in table


def test_kernels_are_counted_as_a_gpu_would_launch_them():
    """Eager: one kernel per ATen op that does work (a view is none, however the CPU implements
    an op inside); compiled: Inductor's fused kernels plus the matmuls its code calls."""
    import torch

    from mpdp_lightning.benchmarks.kernels import count_kernels

    cpu = torch.device("cpu")
    x = torch.randn(16, 16)
    eager = count_kernels(lambda: (x @ x).relu().view(-1).mul(2.0).sum(), cpu)
    assert (eager.aten, eager.generated) == (4, 0)  # mm, relu, mul, sum; the view and the scalar's wrapping are free
    pointwise = torch.compile(lambda t: (t * 2).sin().cos() + 1, fullgraph=True)
    fused = count_kernels(lambda: pointwise(x), cpu)
    assert (fused.aten, fused.generated) == (0, 1)  # four pointwise ops, one fused kernel
    layer = torch.compile(lambda t: (t @ t).relu() * 3, fullgraph=True)
    mixed = count_kernels(lambda: layer(x), cpu)
    assert (mixed.aten, mixed.generated) == (1, 1)  # the matmul as an extern call, the epilogue fused


def test_compiling_the_masked_imagination_cuts_its_kernels_by_more_than_half():
    """What ``make bench`` reports as kernels per call, at the quick preset's shapes: the masked
    loop compiled (each step and its bookkeeping fused) against eager, the same improvement."""
    import torch

    from mpdp_lightning.benchmarks.kernels import count_kernels
    from mpdp_lightning.benchmarks.update import CONFIGS, UpdateBench

    cpu = torch.device("cpu")
    bench = UpdateBench(CONFIGS["mpdp-quick"], cpu)
    eager = count_kernels(lambda: bench.policy_phase(compact=False, compiled=False), cpu)
    compiled = count_kernels(lambda: bench.policy_phase(compact=False, compiled=True), cpu)
    assert eager.generated == 0 and compiled.generated > 0
    assert compiled.total < eager.total / 2


def test_seed_group_bench_reports_each_group_size_against_one_seed(tmp_path, capsys):
    from mpdp_lightning.benchmarks import seed_group

    out = tmp_path / "seeds.json"
    seed_group.main(["--task", "inverted_pendulum", "--seeds", "1,2", "--batch", "8", "--repeats", "1", "--out", str(out)])
    report = json.loads(out.read_text())
    assert list(report["groups"]) == ["1", "2"]
    one, two = report["groups"]["1"], report["groups"]["2"]
    assert abs(two["gflop"] - 2 * one["gflop"]) < 1e-9 * max(one["gflop"], 1)  # two seeds' matmuls, counted once each
    for group in (one, two):
        assert group["group_ms"] > 0 and group["alone_ms"] > 0
    assert "seeds | group ms | one seed ms" in capsys.readouterr().out


def test_seed_group_bench_refuses_a_bad_size_in_one_line():
    result = subprocess.run([sys.executable, "-m", "mpdp_lightning.benchmarks.seed_group", "--seeds", "1,x"],
                            capture_output=True, text=True)
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        "error: --seeds must be comma-separated integers, got '1,x'"]
