"""Bad input ends with one ``error:`` line before any work, and writes nothing."""

import subprocess

import pytest
import torch

from helpers import ROOT, fit_args
from mpdp_lightning.cli import main

BAD_INPUTS = {
    "unknown task": (["--task", "walker"], "unknown task 'walker'"),
    "zero batch size": (["--data.batch_size", "0"], "batch_size"),
    "negative learning rate": (["--model.actor_lr", "-0.001"], "actor_lr"),
    "zero env-step budget": (["--env_interaction.total_env_steps", "0"], "total_env_steps"),
    "warm-up past the budget": (["--env_interaction.warmup_steps", "5000"], "warmup_steps"),
    "missing checkpoint": (["--ckpt_path", "nowhere/last.ckpt"], "does not exist"),
}


def _one_error_line(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert err, "nothing was printed"
    assert err[-1].startswith("error: ")
    assert not any("Traceback" in line for line in err)
    return err[-1]


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_line_before_any_work(in_tmp, capsys, case):
    extra, expected = BAD_INPUTS[case]
    with pytest.raises(SystemExit) as exit_info:
        main(fit_args("hopper", 300, *extra))
    assert exit_info.value.code == 2
    assert expected in _one_error_line(capsys)
    assert list(in_tmp.iterdir()) == [], "bad input must leave nothing behind (no MLflow store, no runs/)"


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


@pytest.mark.parametrize("var,value", [("TASK", "walker"), ("ALGO", "ppo")])
def test_make_train_names_the_known_choices(var, value):
    result = subprocess.run(["make", "-s", "-C", str(ROOT), "train", f"{var}={value}"], capture_output=True, text=True)
    assert result.returncode != 0
    line = result.stderr.strip().splitlines()[0]
    assert line.startswith(f"error: unknown {var.lower()} '{value}'") and ("walker2d" in line or "sac" in line)
