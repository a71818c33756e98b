"""What a user sees in a terminal: a quiet start with one line naming the run, a progress bar
rendered in place (env steps of the budget, eval return, env steps per second, time left), and a
summary at the end. Without a terminal: plain progress lines, no carriage returns."""

import fcntl
import os
import re
import select
import struct
import subprocess
import sys
import termios
import time

from helpers import fit_args
from mpdp_lightning.cli import main

NOISE = ("litlogger", "INFO", "Seed set to", "GPU available", "TPU available", "LazyTensorStorage", "Creating it")


def _controlling_terminal() -> None:
    os.setsid()  # a session of its own, whose controlling terminal is the pseudo-terminal (stdin)
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


def run_in_terminal(args, cwd, columns=120, lines=40, timeout=240, ctrl_c_when=None):
    """Run the CLI on a pseudo-terminal of the given size, as a user would; return its exit code and
    the bytes it drew. ``ctrl_c_when(screen)``: once true, type Ctrl-C (the terminal sends SIGINT)."""
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", lines, columns, 0, 0))
    env = dict(os.environ, OMP_NUM_THREADS="1", TERM="xterm")
    process = subprocess.Popen([sys.executable, "-m", "mpdp_lightning", *args], cwd=cwd, env=env,
                               stdin=slave, stdout=slave, stderr=slave, close_fds=True, preexec_fn=_controlling_terminal)
    os.close(slave)
    drawn, deadline = b"", time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 1.0)
        if ready:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # the child closed the terminal
                break
            if not chunk:
                break
            drawn += chunk
            if ctrl_c_when is not None and ctrl_c_when(drawn.decode(errors="replace")):
                os.write(master, b"\x03")
                ctrl_c_when = None
        elif process.poll() is not None:
            break
    os.close(master)
    return process.wait(timeout=30), drawn.decode(errors="replace")


def test_progress_bar_renders_in_a_terminal(in_tmp):
    args = fit_args("inverted_pendulum", 600, "--trainer.enable_progress_bar", "true",
                    "--progress_bar.refresh_every_env_steps", "100")
    code, screen = run_in_terminal(args, in_tmp)
    assert code == 0, screen
    lines = [line for line in screen.replace("\r\n", "\n").split("\n") if line.strip()]
    # a quiet start: the first line names the run, where it logs and where it checkpoints
    assert lines[0].startswith("SAC on inverted_pendulum, seed 0, cpu (eager, 32-true) · logs: MLflow run ")
    assert "checkpoints: runs/checkpoints/" in lines[0]
    assert not [line for line in lines if any(noise in line for noise in NOISE)]
    # the bar is redrawn in place (carriage returns), from the warm-up's end to the budget
    frames = [frame for frame in screen.split("\r") if frame.startswith("env steps:")]
    assert len(frames) >= 5, screen
    last = frames[-1]
    assert re.search(r"100%\|█+\| 600/600 \[\d\d:\d\d<\d\d:\d\d, +[\d.]+ env steps/s, eval return -?\d+\.\d\]", last), last
    assert any(re.search(r"\| [2-5]00/600 \[\d\d:\d\d<\d\d:\d\d, +[\d.]+ env steps/s", f) for f in frames), frames
    assert "run finished at 600 of 600 env steps" in screen


def test_plain_progress_lines_when_output_is_not_a_terminal(in_tmp, capsys):
    main(fit_args("inverted_pendulum", 500, "--trainer.enable_progress_bar", "true",
                  "--progress_bar.log_every_env_steps", "200"))
    out = capsys.readouterr().out
    assert "\r" not in out
    progress = [line for line in out.splitlines() if line.startswith("env steps ")]
    assert [line.split(" · ")[0] for line in progress] == ["env steps 200/500 (40%)", "env steps 400/500 (80%)"]
    assert all(re.fullmatch(r"env steps \d+/500 \(\d+%\) · eval return -?\d+\.\d · [\d.]+ env steps/s · ETA \S+", line)
               for line in progress), progress


def test_summary_at_the_end_names_the_results(in_tmp, capsys):
    main(fit_args("inverted_pendulum", 300))
    out = capsys.readouterr().out.splitlines()
    end = out[out.index(next(line for line in out if line.startswith("run finished"))):]
    assert re.fullmatch(r"run finished at 300 of 300 env steps · eval return last -?\d+\.\d, best -?\d+\.\d · \d+s wall, "
                        r"[\d.]+ env steps/s", end[0]), end[0]
    assert re.match(r"MLflow run [0-9a-f]{32} \(experiment 'mpdp', sqlite:///.*mlflow\.db\); open it with ", end[1])
    assert re.fullmatch(r"checkpoint: runs/checkpoints/[0-9a-f]{32}/last\.ckpt", end[2])


def test_ctrl_c_in_a_terminal_saves_says_how_to_resume_and_the_command_works(in_tmp):
    args = fit_args("inverted_pendulum", 1000, "--trainer.enable_progress_bar", "true",
                    "--progress_bar.refresh_every_env_steps", "50")
    code, screen = run_in_terminal(args, in_tmp, ctrl_c_when=lambda text: re.search(r"\| [3-9]\d\d/1000 \[", text))
    assert code == 130, screen
    found = re.search(r"run interrupted by Ctrl-C \(SIGINT\) at (\d+) of 1000 env steps", screen)
    assert found, screen
    stopped_at = int(found[1])
    assert f"at env step {stopped_at}\r\n" in screen and "saved: runs/checkpoints/" in screen
    assert re.search(r"MLflow run [0-9a-f]{32} .*marked KILLED", screen)
    resume = next(line for line in screen.replace("\r\n", "\n").split("\n") if line.startswith("resume: "))

    env = dict(os.environ, OMP_NUM_THREADS="1")
    resumed = subprocess.run(resume[len("resume: "):], shell=True, cwd=in_tmp, env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed at env step {stopped_at}" in resumed.stdout.splitlines()[0]
    assert "run finished at 1000 of 1000 env steps" in resumed.stdout
