"""Bad input ends with one ``error:`` line and exit code 2 before any work, and leaves the folder
(and an earlier run's MLflow store and checkpoint in it) exactly as it was."""

import hashlib
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from helpers import ROOT, fit_args
from mpdp_lightning.cli import main

# A world model small enough for a bad-input MPDP command line to be cheap
TINY_MPDP = ("--model.ensemble_size", "3", "--model.num_elites", "2", "--model.model_hidden", "32",
             "--model.model_layers", "2", "--model.horizon", "3")

# case -> (extra arguments, algo, text the error line must contain)
BAD_INPUTS = {
    "unknown task": (["--task", "walker"], "sac", "unknown task 'walker'"),
    "zero batch size": (["--data.batch_size", "0"], "sac", "data.batch_size: expected PositiveInt"),
    "negative learning rate": (["--model.actor_lr", "-0.001"], "sac", "model.actor_lr: expected PositiveFloat"),
    "zero env-step budget": (["--env_interaction.total_env_steps", "0"], "sac", "total_env_steps"),
    "warm-up past the budget": (["--env_interaction.warmup_steps", "5000"], "sac", "warmup_steps"),
    "default warm-up past the budget": (["--env_interaction.warmup_steps", "null"], "sac",
                                        "warmup_steps (5000, the default of the algorithm)"),
    "MBPO's default warm-up past the budget": (["--task", "inverted_pendulum", "--env_interaction.warmup_steps", "null",
                                               "--env_interaction.total_env_steps", "400"], "mbpo",
                                              "warmup_steps (500, the default of the algorithm)"),
    "missing checkpoint": (["--ckpt_path", "nowhere/last.ckpt"], "sac", "does not exist"),
    "wrong type": (["--model.gamma", "abc"], "sac", "model.gamma: expected NonNegativeFloat"),
    "unknown option": (["--model.gama", "0.9"], "sac", "model: unknown option 'gama'"),
    "unknown algorithm": (["--model", "mpdp_lightning.nope.Algo"], "sac", "cannot import the class 'mpdp_lightning.nope.Algo'"),
    "gamma above 1": (["--model.gamma", "1.5"], "sac", "gamma=1.5"),
    "quantile above 1": (["--model.threshold_quantile", "1.5", *TINY_MPDP], "mpdp", "threshold_quantile"),
    "COPlanner without a world model": (["--coplanner.enabled", "true"], "sac", "COPlanner plans with a world model, which SAC has not"),
    "negative COPlanner rate": (["--coplanner.optimistic_rate", "-1", *TINY_MPDP], "mpdp", "coplanner.optimistic_rate"),
    "odd video width": (["--video.width", "63"], "sac", "width must be a positive even number"),
    "gpu on a machine without one": (["--trainer.accelerator", "gpu"], "sac", "trainer: No supported gpu backend found"),
    "CUDA graph on the CPU": (["--model.cuda_graph", "true"], "sac",
                              "model.cuda_graph: a CUDA graph needs a CUDA device, and this run's is cpu"),
    "checkpoint folder under a file": (["--checkpoint.dirpath", "a_file/checkpoints"], "sac", "a_file is a file, not a folder"),
    "tracking server that is not there": (["--trainer.logger.init_args.tracking_uri", "http://127.0.0.1:9"], "sac",
                                          "no MLflow tracking server answers at http://127.0.0.1:9"),
}


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory):
    """A folder holding a finished SAC run (its MLflow store and checkpoint): the state that bad
    input must leave untouched."""
    folder = tmp_path_factory.mktemp("finished")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    subprocess.run(
        [sys.executable, "-m", "mpdp_lightning", *fit_args("hopper", 200)[:-1], uri],
        cwd=folder, check=True, capture_output=True,
    )
    (folder / "a_file").write_text("a file, not a folder\n")
    return folder


def _snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(folder.rglob("*"))}


@pytest.fixture
def earlier_run(in_tmp, finished_run):
    shutil.copytree(finished_run, in_tmp, dirs_exist_ok=True)
    return in_tmp


def _one_error_line(capsys):
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1, f"expected one line, got: {err}"
    assert err[0].startswith("error: ")
    assert "Traceback" not in captured.out + captured.err
    return err[0]


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_line_before_any_work(earlier_run, capsys, case):
    extra, algo, expected = BAD_INPUTS[case]
    before = _snapshot(earlier_run)
    start = time.monotonic()
    with pytest.raises(SystemExit) as exit_info:
        main(fit_args("hopper", 300, *extra, algo=algo))
    assert exit_info.value.code == 2
    assert expected in _one_error_line(capsys)
    assert time.monotonic() - start < 10, "bad input must fail fast"
    assert _snapshot(earlier_run) == before, "bad input must leave the folder and the earlier run as they were"


def test_bad_input_in_an_empty_folder_creates_nothing(in_tmp, capsys):
    with pytest.raises(SystemExit):
        main(fit_args("hopper", 300, "--model.gamma", "1.5"))
    _one_error_line(capsys)
    assert list(in_tmp.iterdir()) == [], "no MLflow store, no runs/"


def test_checkpoint_of_another_algorithm_is_refused_and_its_run_left_alone(earlier_run, capsys):
    sac_checkpoint = next(earlier_run.glob("runs/checkpoints/*/last.ckpt"))
    before = _snapshot(earlier_run)
    with pytest.raises(SystemExit) as exit_info:
        main(fit_args("hopper", 600, "--ckpt_path", str(sac_checkpoint), *TINY_MPDP, algo="mpdp"))
    assert exit_info.value.code == 2
    assert "is a SAC run, not MPDP" in _one_error_line(capsys)
    assert _snapshot(earlier_run) == before


def test_corrupt_checkpoint_is_one_line(in_tmp, capsys):
    corrupt = in_tmp / "last.ckpt"
    torch.save({"state_dict": {}}, corrupt)
    corrupt.write_bytes(corrupt.read_bytes()[:40])  # a write cut short
    with pytest.raises(SystemExit):
        main(fit_args("hopper", 300, "--ckpt_path", str(corrupt)))
    assert "not readable" in _one_error_line(capsys)
    assert [p.name for p in in_tmp.iterdir()] == ["last.ckpt"]


def test_checkpoint_of_another_task_is_refused(in_tmp, capsys):
    foreign = in_tmp / "last.ckpt"
    torch.save({"counters": {"env_steps": 5, "updates": 0}, "hyper_parameters": {"task": "ant"}}, foreign)
    with pytest.raises(SystemExit):
        main(fit_args("hopper", 300, "--ckpt_path", str(foreign)))
    assert "for task 'ant', not 'hopper'" in _one_error_line(capsys)


@pytest.mark.parametrize("var,value,known", [("TASK", "walker", "walker2d"), ("ALGO", "ppo", "sac"),
                                             ("PRESET", "huge", "quick")])
def test_make_train_names_the_known_choices(var, value, known):
    algo = ["ALGO=mbpo"] if var == "PRESET" else []  # presets are per algorithm
    result = subprocess.run(["make", "-s", "-C", str(ROOT), "train", *algo, f"{var}={value}"], capture_output=True, text=True)
    assert result.returncode != 0
    line = result.stderr.strip().splitlines()[0]
    assert line.startswith(f"error: unknown {var.lower()} '{value}'") and known in line
