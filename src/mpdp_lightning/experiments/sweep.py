"""Sweeps on Ray Tune: every combination of task, algorithm, seed and override values is one
trial that runs the very same LightningCLI training as ``make train``, into one MLflow experiment.

    python -m mpdp_lightning.experiments.sweep conf/sweep/ip-sac-vs-mpdp.yaml [--dry-run] [--max-concurrent N]
        [--results benchmarks/results] [-- extra CLI args]

(``make sweep SWEEP=conf/sweep/<name>.yaml``). A trial is a subprocess ``python -m mpdp_lightning
fit ...`` started by a Ray Tune function trainable, not the CLI called in the Ray worker: the CLI
installs signal handlers (Ctrl-C, SIGTERM save a checkpoint) that only work in a main thread, and
a process of its own isolates torch's threads and MLflow's global state. Each trial logs its own
MLflow run (tags task, algo, seed, sweep, trial) with our MLFlowLogger, so none of Ray's MLflow
integration is involved (it ignores the tracking URI inside trials and makes trials share runs).

Resumable without Ray's experiment state: a trial's folder ``<storage>/<trial>/`` holds its
checkpoint, its log and, once it has finished, ``done.json``. Running the sweep again skips the
finished trials and resumes the others from their ``last.ckpt`` (same MLflow run), so a sweep cut
off after an hour loses at most ``checkpoint_every`` env steps per running trial. When the Ray
worker of a trial dies (Ctrl-C to the sweep, a lost node), the trial's process receives SIGTERM
(Linux's parent-death signal), saves at its next update boundary and exits; it writes to its log
file itself, runs in a session of its own (Ray SIGKILLs a worker's process group as it stops) and
Ray is told not to kill workers' children, so nothing cuts that save short. After the trials, the seed table and the figures are written and logged to MLflow.

Before anything is created (MLflow store, folders, Ray), every trial's command line goes through
``make train``'s parser and the checks it makes before training, so a mistyped sweep file is one
``error:`` line. A finished trial writes its record, ``benchmarks/results/<sweep>/<trial>.json``
(``records``), meant for git: a trial with a record counts as finished on any machine.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from mpdp_lightning.errors import MPDPError
from mpdp_lightning.envs.tasks import TASKS

PROGRESS = re.compile(r"env steps (\d+)/(\d+) .*· eval return (\S+) · ([\d.]+) env steps/s")
SWEEP_KEYS = {"name", "tasks", "algos", "seeds", "grid", "grid_algos", "preset", "args", "cpus_per_trial", "gpus_per_trial",
              "threshold", "group_by", "seeds_per_process"}
PRESETS = ("auto", "quick", "paper")  # and any other conf/preset/<algo>/<name>.yaml of the sweep's algos


@dataclass(frozen=True)
class Trial:
    """One run of the sweep: a task, an algorithm, a seed and the override values."""

    task: str
    algo: str
    seed: int
    overrides: tuple[tuple[str, Any], ...] = ()

    @property
    def key(self) -> str:
        """A folder and run name that says what the trial is: ``inverted_pendulum-mpdp-s3-beta=0.5``."""
        return self.key_for(str(self.seed))

    def key_for(self, seed: str) -> str:
        """The key with ``seed`` in the seed's place: ``0+1+2`` names a group's folder, ``{seed}``
        the run name each seed of a group fills in (the CLI's ``--seeds``)."""
        parts = [self.task, self.algo] + [f"{name.rsplit('.', 1)[-1]}={value}" for name, value in self.overrides]
        clean = [re.sub(r"[^\w.=+-]", "_", part) for part in parts]
        return "-".join([*clean[:2], f"s{seed}", *clean[2:]])


@dataclass(frozen=True)
class Process:
    """One training process of a sweep: one trial, or (``seeds_per_process`` above 1) one arm's
    trials of several seeds trained as a group (``--seeds``), each seed still its own MLflow run,
    record and finished trial."""

    members: tuple[Trial, ...]

    @property
    def grouped(self) -> bool:
        return len(self.members) > 1

    @property
    def key(self) -> str:
        """Its folder's name: the trial's key, or a group's with its seeds, ``hopper-sac-s0+1+2``."""
        first = self.members[0]
        return first.key if not self.grouped else first.key_for("+".join(str(t.seed) for t in self.members))


@dataclass
class Sweep:
    """A sweep file (conf/sweep/*.yaml): every combination of tasks x algos x seeds x grid is a trial.

    Args:
        name: the sweep's name: its MLflow experiment, its folder and the ``sweep`` tag of its runs.
        tasks: task names (conf/task/<task>.yaml).
        algos: algorithm configs (conf/algo/<algo>.yaml).
        seeds: one trial per seed (``--seed_everything``).
        grid: override -> list of values, e.g. ``model.beta: [0, 0.5]``; every combination is a trial.
        grid_algos: the algos the grid varies (e.g. [mpdp] for an MPDP-only switch); the others run
            once per seed with their own config. None: every algo.
        preset: the algorithms' preset (conf/preset/<algo>/), as ``make train`` (auto: paper where
            torch sees a GPU, quick otherwise); algorithms without presets (SAC) run as configured.
        args: command-line arguments added to every trial.
        cpus_per_trial: CPU cores of each trial; its torch and OpenMP threads are set to match.
        gpus_per_trial: GPUs of each trial where Ray sees GPUs (a fraction shares one); None: 0.25 on
            a GPU machine, 0 otherwise.
        threshold: eval return of the comparison's "first env step at threshold" columns.
        group_by: params that split the comparison beside task and algo (the grid's by default).
        seeds_per_process: train up to this many seeds of an arm in one process, as a group
            (``--seeds``: one update for all of them, worth it on a GPU, not on a 2-core CPU:
            docs/seed-groups.md); each seed is still its own trial, MLflow run and record. 1: a
            process per seed.
    """

    name: str
    tasks: list[str]
    algos: list[str]
    seeds: list[int]
    grid: dict[str, list[Any]] = field(default_factory=dict)
    grid_algos: Optional[list[str]] = None
    preset: str = "auto"
    args: list[str] = field(default_factory=list)
    cpus_per_trial: int = 1
    gpus_per_trial: Optional[float] = None
    threshold: Optional[float] = None
    group_by: Optional[list[str]] = None
    seeds_per_process: int = 1

    @classmethod
    def load(cls, path: str | Path, conf_dir: Path) -> "Sweep":
        """Read and check a sweep file (one-line errors naming the problem)."""
        path = Path(path)
        if not path.is_file():
            raise MPDPError(f"sweep file {path} does not exist; the project's sweeps: {', '.join(sorted(p.name for p in (conf_dir / 'sweep').glob('*.yaml')))}")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as error:
            raise MPDPError(f"sweep file {path} is not valid YAML: {' '.join(str(error).split())}") from None
        if not isinstance(data, dict):
            raise MPDPError(f"sweep file {path} must be a mapping of {', '.join(sorted(SWEEP_KEYS))}")
        unknown = set(data) - SWEEP_KEYS
        if unknown:
            raise MPDPError(f"sweep file {path}: unknown key(s) {', '.join(sorted(unknown))}; known: {', '.join(sorted(SWEEP_KEYS))}")
        missing = {"name", "tasks", "algos", "seeds"} - set(data)
        if missing:
            raise MPDPError(f"sweep file {path}: missing {', '.join(sorted(missing))}")
        sweep = cls(**data)
        sweep.check(path, conf_dir)
        return sweep

    def check(self, path: Path, conf_dir: Path) -> None:
        def fail(message: str) -> None:
            raise MPDPError(f"sweep file {path}: {message}")

        if not re.fullmatch(r"[\w.-]+", str(self.name)):
            fail(f"name {self.name!r} must be letters, digits, '.', '_' or '-'")
        for label, values in (("tasks", self.tasks), ("algos", self.algos), ("seeds", self.seeds)):
            if not isinstance(values, list) or not values:
                fail(f"{label} must be a non-empty list")
        for task in self.tasks:
            if task not in TASKS or not (conf_dir / "task" / f"{task}.yaml").is_file():
                fail(f"unknown task {task!r}; known tasks: {', '.join(TASKS)}")
        for algo in self.algos:
            if not (conf_dir / "algo" / f"{algo}.yaml").is_file():
                fail(f"unknown algo {algo!r}; known algos: {', '.join(sorted(p.stem for p in (conf_dir / 'algo').glob('*.yaml')))}")
        if not all(isinstance(seed, int) and seed >= 0 for seed in self.seeds) or len(set(self.seeds)) != len(self.seeds):
            fail(f"seeds must be distinct non-negative integers, got {self.seeds}")
        if not isinstance(self.grid, dict) or not all(isinstance(v, list) and v for v in self.grid.values()):
            fail("grid must map each override (e.g. model.beta) to a non-empty list of values")
        if self.grid_algos is not None and (not isinstance(self.grid_algos, list) or not set(self.grid_algos) <= set(self.algos)):
            fail(f"grid_algos must be a list of the sweep's algos ({', '.join(self.algos)}), got {self.grid_algos}")
        named = sorted({p.stem for algo in self.algos for p in (conf_dir / "preset" / algo).glob("*.yaml")})
        if self.preset not in PRESETS and self.preset not in named:
            fail(f"unknown preset {self.preset!r}; known presets: {', '.join(dict.fromkeys([*PRESETS, *named]))}")
        if self.preset != "auto":
            for algo in self.algos:  # an algorithm with presets must have this one: none would be silently skipped
                folder = conf_dir / "preset" / algo
                if folder.is_dir() and not (folder / f"{self.preset}.yaml").is_file():
                    fail(f"algo {algo} has no preset {self.preset!r} (conf/preset/{algo}/: "
                         f"{', '.join(sorted(p.stem for p in folder.glob('*.yaml')))})")
        if not isinstance(self.args, list):
            fail("args must be a list of command-line arguments")
        if not (isinstance(self.cpus_per_trial, int) and self.cpus_per_trial >= 1):
            fail(f"cpus_per_trial must be a positive integer, got {self.cpus_per_trial}")
        if not (isinstance(self.seeds_per_process, int) and not isinstance(self.seeds_per_process, bool)
                and self.seeds_per_process >= 1):
            fail(f"seeds_per_process must be a positive integer, got {self.seeds_per_process!r}")
        if self.gpus_per_trial is not None and not 0 <= self.gpus_per_trial:
            fail(f"gpus_per_trial must be 0 or more, got {self.gpus_per_trial}")

    def trials(self) -> list[Trial]:
        """Seed-major: every arm's first seed runs before any arm's second, so a sweep cut short
        (or still running) compares all arms on the seeds it has."""
        names = list(self.grid)
        combos = list(itertools.product(*self.grid.values())) if names else [()]
        varied = self.algos if self.grid_algos is None else self.grid_algos
        return [
            Trial(task, algo, seed, tuple(zip(names, values)) if algo in varied else ())
            for seed in self.seeds
            for task, algo in itertools.product(self.tasks, self.algos)
            for values in (combos if algo in varied else [()])
        ]

    def processes(self, trials: list[Trial]) -> list[Process]:
        """``trials`` as processes: each arm's (task, algo, overrides) seeds in groups of up to
        ``seeds_per_process``, in the order of their first trial."""
        arms: dict[tuple, list[Trial]] = {}
        for trial in trials:
            arms.setdefault((trial.task, trial.algo, trial.overrides), []).append(trial)
        size = self.seeds_per_process
        groups = [tuple(members[i:i + size]) for members in arms.values() for i in range(0, len(members), size)]
        order = {trial: i for i, trial in enumerate(trials)}
        return [Process(members) for members in sorted(groups, key=lambda members: order[members[0]])]

    def resolved_preset(self) -> str:
        if self.preset != "auto":
            return self.preset
        import torch

        return "paper" if torch.cuda.is_available() else "quick"


@dataclass(frozen=True)
class Place:
    """Where a sweep writes: its trials' folders, its MLflow store, and the project's configs."""

    conf_dir: Path
    storage: Path  # <storage>/<trial key>/{last.ckpt,trial.log,done.json}
    tracking_uri: str
    records: Path  # <records>/<trial key>.json, e.g. benchmarks/results/<sweep>/ (kept in git)

    def trial_dir(self, trial: Trial | Process) -> Path:
        return self.storage / trial.key

    def checkpoint(self, trial: Trial | Process) -> Path:
        return self.trial_dir(trial) / "last.ckpt"

    def done(self, trial: Trial | Process) -> Path:
        return self.trial_dir(trial) / "done.json"

    def record(self, trial: Trial) -> Path:
        return self.records / f"{trial.key}.json"


def trial_argv(sweep: Sweep, process: Trial | Process, place: Place, extra: list[str], preset: str) -> list[str]:
    """The ``mpdp fit`` arguments of a trial or a process: the same config files as ``make train``;
    a group's with ``--seeds`` and a run name and ``trial`` tag each seed fills in."""
    process = process if isinstance(process, Process) else Process((process,))
    trial = process.members[0]
    if process.grouped:
        seeding = ["--seeds", ",".join(str(t.seed) for t in process.members)]
        name = trial.key_for("{seed}")
    else:
        seeding, name = ["--seed_everything", str(trial.seed)], trial.key
    conf = place.conf_dir
    argv = ["fit", "--config", str(conf / "base.yaml"), "--config", str(conf / "algo" / f"{trial.algo}.yaml"),
            "--config", str(conf / "task" / f"{trial.task}.yaml")]
    preset_file = conf / "preset" / trial.algo / f"{preset}.yaml"
    if preset_file.is_file():  # as make train: the algorithm's preset, where it has one
        argv += ["--config", str(preset_file)]
    argv += [
        *seeding,
        "--trainer.logger.init_args.experiment_name", sweep.name,
        "--trainer.logger.init_args.tracking_uri", place.tracking_uri,
        "--trainer.logger.init_args.run_name", name,
        "--trainer.logger.init_args.tags", json.dumps({"sweep": sweep.name, "trial": name}),
        "--checkpoint.dirpath", str(place.trial_dir(process)),
    ]
    for name, value in trial.overrides:
        argv += [f"--{name}", json.dumps(value) if not isinstance(value, str) else value]
    argv += [str(a) for a in sweep.args] + extra
    if place.checkpoint(process).is_file():
        argv += ["--ckpt_path", str(place.checkpoint(process))]
    return argv


def pending_processes(sweep: Sweep, pending: list[Trial]) -> list[Process]:
    """The processes that train the ``pending`` trials, grouped as the sweep groups seeds (in the
    sweep's trial order, so that a run and its check, or a rerun, group them alike)."""
    waiting = set(pending)
    return sweep.processes([trial for trial in sweep.trials() if trial in waiting])


def check_trials(sweep: Sweep, place: Place, extra: list[str], sweep_file: str | Path) -> None:
    """Every unfinished trial's command line through ``make train``'s parser and the checks it
    makes before training (``MPDPCLI`` up to and including building the model, data and callbacks,
    whose own checks see values such as gamma > 1), without the MLflow logger (it creates its store)
    or the trainer (its accelerator is the trial's machine's, not necessarily this one's), so
    nothing is written. Trials whose commands differ only in seed, run name and folder are checked
    once. Raises MPDPError ``sweep file <file>: trial <key>: <what is wrong>``."""
    preset = sweep.resolved_preset()
    state = plan(sweep, place)
    pending = state["resume"] + state["start"]
    if not pending:
        return
    checker = _trial_checker()
    per_trial = {"--seed_everything", "--seeds", "--trainer.logger.init_args.run_name", "--trainer.logger.init_args.tags",
                 "--checkpoint.dirpath"}
    checked = set()
    for trial in pending_processes(sweep, pending):
        argv = trial_argv(sweep, trial, place, extra, preset)
        shape = tuple("" if i and argv[i - 1] in per_trial else arg for i, arg in enumerate(argv))
        if shape in checked:
            continue
        try:
            checker.check(argv)
        except MPDPError as error:
            raise MPDPError(f"sweep file {sweep_file}: trial {trial.key}: {error}") from None
        checked.add(shape)


def _trial_checker():
    """``MPDPCLI`` (the parser built once, as ``cli.main`` builds it), whose ``check(argv)`` parses
    a command line and runs the CLI's checks before training; imported here, as it takes seconds."""
    import warnings

    import lightning.pytorch as pl
    from jsonargparse import ArgumentError, Namespace

    from mpdp_lightning.cli import MPDPCLI, quiet_libraries
    from mpdp_lightning.errors import describe_parser_error
    from mpdp_lightning.algorithms.execution import check_precision
    from mpdp_lightning.training.data import ReplayDataModule

    class TrialChecker(MPDPCLI):
        building = True  # LightningCLI's __init__ parses and instantiates: only its parser is wanted

        def parse_arguments(self, parser: Any, args: Any) -> None:
            if self.building:
                self.config = Namespace(subcommand="fit")
            else:
                super().parse_arguments(parser, args)

        def _parse_ckpt_path(self) -> None:
            if not self.building:
                super()._parse_ckpt_path()

        def _set_seed(self) -> None:
            pass

        def before_instantiate_classes(self) -> None:
            if not self.building:
                super().before_instantiate_classes()

        def instantiate_classes(self) -> None:
            pass

        def _run_subcommand(self, subcommand: Optional[str]) -> None:
            pass

        def check(self, argv: list[str]) -> None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self.parse_arguments(self.parser, argv)
                self._parse_ckpt_path()
                self.before_instantiate_classes()
                check_precision(self.config["fit"].trainer.precision)  # what the run's plan would refuse
                self.config["fit"].trainer.logger = False  # building an MLflow logger creates its store
                try:
                    self.parser.instantiate_classes(self.config)
                except (ArgumentError, ValueError, TypeError) as error:
                    raise MPDPError(describe_parser_error(str(error))) from None

    quiet_libraries()
    checker = TrialChecker(pl.LightningModule, ReplayDataModule, argv=[], subclass_mode_model=True,
                           save_config_callback=None, auto_configure_optimizers=False, seed_everything_default=0,
                           parser_kwargs={"parser_mode": "omegaconf+", "exit_on_error": False})
    checker.building = False
    return checker


def _die_with_parent() -> None:
    """In the trial's process: SIGTERM when the Ray worker that started it dies (Linux), so an
    interrupted sweep leaves each trial saved at an update boundary, not orphaned."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG


def run_trial(config: dict[str, Any], specs: dict[str, dict[str, Any]]) -> None:
    """Ray Tune function trainable: one training subprocess; reports its progress lines to Tune.
    ``config["trial"]`` is the trial's key (what Tune's table shows), ``specs`` its command and folder."""
    from ray import tune

    config = specs[config["trial"]]
    argv, folder, threads = config["argv"], Path(config["folder"]), str(config["threads"])
    folder.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads, MLFLOW_DISABLE_TELEMETRY="true")
    start, log_path = time.time(), folder / "trial.log"
    # The process writes to the log file itself, not through a pipe to this worker: if the worker
    # dies, the trial still has somewhere to print while it saves its checkpoint.
    with open(log_path, "a") as log:
        log.write(f"$ {shlex.join([sys.executable, '-m', 'mpdp_lightning', *argv])}\n")
        log.flush()
        offset = log.tell()
        # A session of its own: as Ray stops, it SIGKILLs each worker's whole process group, which
        # would take the trial down before it saves; the parent-death SIGTERM reaches it anyway.
        process = subprocess.Popen(
            [sys.executable, "-m", "mpdp_lightning", *argv], cwd=config["cwd"], env=env, text=True,
            stdout=log, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent,
            start_new_session=sys.platform.startswith("linux"),
        )
    with open(log_path) as reader:  # follow the log: its progress lines become Tune's results
        reader.seek(offset)
        while True:
            line = reader.readline()
            if not line:
                if process.poll() is not None:
                    break
                time.sleep(0.5)
                continue
            found = PROGRESS.search(line)
            if found:
                # a group's line gives one return per seed (123.4/98.7): Tune's table shows their mean
                returns = [float(value) for value in found[3].split("/")] if found[3] != "-" else []
                eval_return = sum(returns) / len(returns) if returns else None
                tune.report({"env_steps": int(found[1]), "eval_return": eval_return, "env_steps_per_second": float(found[4])})
    code = process.wait()
    if code != 0:
        raise RuntimeError(f"trial {folder.name} exited with {code}; its log: {folder / 'trial.log'}")
    seconds = time.time() - start
    record = config["record"]
    for key, member_folder, record_path in config["members"]:  # a group: each seed its own finished trial
        Path(member_folder).mkdir(parents=True, exist_ok=True)
        (Path(member_folder) / "done.json").write_text(json.dumps({"seconds": seconds, "finished_at": time.time()}))
        try:
            from mpdp_lightning.experiments.records import write_trial_record

            write_trial_record(record["tracking_uri"], record["sweep"], record["sweep"], key, record_path,
                               seconds, int(threads))
        except Exception as error:  # the trial has finished all the same; the driver writes the record after
            with open(log_path, "a") as log:
                log.write(f"no record of {key} written yet: {' '.join(str(error).split())}\n")
    tune.report({"done": True})


def ensure_experiment(tracking_uri: str, name: str) -> str:
    """Create the sweep's MLflow experiment once, before the trials (two trials creating it at
    the same moment would race); a SQLite store's artifacts go beside its database."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    location = None
    if tracking_uri.startswith("sqlite:///"):
        location = (Path(tracking_uri[len("sqlite:///"):]).parent / "mlruns").absolute().as_uri()
    return client.create_experiment(name, artifact_location=location)


def check_record_preset(trial: Trial, place: Place, preset: str) -> None:
    """A record counts for its trial only if it ran the preset this sweep runs here (``auto`` is
    paper on a GPU machine and quick elsewhere: a GPU's record must not pass for a CPU's trial)."""
    path = place.record(trial)
    try:
        recorded = json.loads(path.read_text()).get("preset")
    except (OSError, ValueError, AttributeError):
        raise MPDPError(f"record {path} is not a readable trial record") from None
    recorded = None if recorded in (None, "", "None") else recorded  # records of earlier versions kept "None"
    expected = preset if (place.conf_dir / "preset" / trial.algo / f"{preset}.yaml").is_file() else None
    if recorded != expected:
        raise MPDPError(f"record {path} ran preset {recorded}, where this sweep runs {trial.algo} with preset "
                        f"{expected} on this machine: set the sweep's preset, or give --results another folder")


def plan(sweep: Sweep, place: Place) -> dict[str, list[Trial]]:
    """The trials by what is left of them: finished (its ``done.json`` here, or its record, from
    any machine), to resume (a checkpoint) or to start."""
    state: dict[str, list[Trial]] = {"finished": [], "resume": [], "start": []}
    preset = sweep.resolved_preset()
    unfinished = [trial for trial in sweep.trials() if not (place.done(trial).is_file() or place.record(trial).is_file())]
    saved = {trial for process in sweep.processes(unfinished) if place.checkpoint(process).is_file()
             for trial in process.members}
    for trial in sweep.trials():
        if place.record(trial).is_file():
            check_record_preset(trial, place, preset)
        if place.done(trial).is_file() or place.record(trial).is_file():
            state["finished"].append(trial)
        elif trial in saved:
            state["resume"].append(trial)
        else:
            state["start"].append(trial)
    return state


def run(sweep: Sweep, place: Place, extra: list[str], cwd: Path, dry_run: bool = False,
        max_concurrent: Optional[int] = None) -> int:
    """Run the sweep's unfinished trials on Ray Tune, at most ``max_concurrent`` at a time (default:
    as many as the CPUs hold); the number of trials that did not finish."""
    preset = sweep.resolved_preset()
    state = plan(sweep, place)
    pending = state["resume"] + state["start"]
    from_records = sum(not place.done(trial).is_file() for trial in state["finished"])
    print(
        f"sweep {sweep.name}: {len(sweep.trials())} trials: {len(state['finished'])} finished "
        f"({from_records} of them from records in {place.records}), "
        f"{len(state['resume'])} to resume, {len(state['start'])} to start · MLflow experiment '{sweep.name}' "
        f"in {place.tracking_uri} · trials in {place.storage}",
        flush=True,
    )
    processes = pending_processes(sweep, pending)
    if dry_run:
        for process in processes:
            print(shlex.join([sys.executable, "-m", "mpdp_lightning", *trial_argv(sweep, process, place, extra, preset)]))
        return 0
    if not pending:
        return 0
    import ray
    from ray import tune

    ensure_experiment(place.tracking_uri, sweep.name)
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=False)  # an existing cluster
    else:
        # Ray kills a worker's child processes when the worker exits; a trial's process must
        # instead get its SIGTERM (parent-death signal) and save its checkpoint first.
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False,
                 _system_config={"kill_child_processes_on_worker_exit": False})
    gpus = sweep.gpus_per_trial
    if gpus is None:
        gpus = 0.25 if ray.cluster_resources().get("GPU", 0) else 0
    specs = {
        process.key: {"argv": trial_argv(sweep, process, place, extra, preset), "folder": str(place.trial_dir(process)),
                      "threads": sweep.cpus_per_trial, "cwd": str(cwd),
                      "members": [[t.key, str(place.trial_dir(t)), str(place.record(t))] for t in process.members],
                      "record": {"tracking_uri": place.tracking_uri, "sweep": sweep.name}}
        for process in processes
    }
    concurrent = max(1, int(ray.cluster_resources().get("CPU", 1) // sweep.cpus_per_trial))
    if max_concurrent is not None:
        concurrent = min(concurrent, max_concurrent)
    print(f"Ray: {ray.cluster_resources().get('CPU', 0):g} CPUs, {ray.cluster_resources().get('GPU', 0):g} GPUs; "
          f"{sweep.cpus_per_trial} CPU and {gpus:g} GPU per trial (up to {concurrent} at a time)", flush=True)
    tuner = tune.Tuner(
        tune.with_resources(tune.with_parameters(run_trial, specs=specs), {"cpu": sweep.cpus_per_trial, "gpu": gpus}),
        param_space={"trial": tune.grid_search(list(specs))},
        tune_config=tune.TuneConfig(max_concurrent_trials=concurrent, trial_name_creator=lambda t: t.config["trial"],
                                    trial_dirname_creator=lambda t: t.config["trial"]),
        run_config=tune.RunConfig(name="tune", storage_path=str((place.storage / "ray").absolute()), verbose=1),
    )
    try:
        tuner.fit()  # trials that fail are reported below, from their done.json
    finally:
        ray.shutdown()
    unfinished = [trial for trial in pending if not place.done(trial).is_file()]
    for trial in unfinished:
        process = next(p for p in processes if trial in p.members)  # a group's log is in its folder
        print(f"not finished: {trial.key} (log: {place.trial_dir(process) / 'trial.log'})", flush=True)
    if unfinished:
        print("run the same command again to resume them from their last checkpoints", flush=True)
    return len(unfinished)


def record_finished_trials(sweep: Sweep, place: Place) -> None:
    """The record of each trial finished here without one (its trial could not write it, or it
    finished before sweeps wrote records), from its MLflow run."""
    from mpdp_lightning.experiments.records import write_trial_record

    for trial in sweep.trials():
        done, record = place.done(trial), place.record(trial)
        if done.is_file() and not record.is_file():
            try:
                seconds = json.loads(done.read_text())["seconds"]
                write_trial_record(place.tracking_uri, sweep.name, sweep.name, trial.key, record, seconds)
                print(f"recorded {trial.key} in {record}", flush=True)
            except Exception as error:  # noqa: BLE001 (the trial stays finished; the record can be rewritten later)
                print(f"no record of {trial.key}: {' '.join(str(error).split())} (python -m "
                      f"mpdp_lightning.experiments.records writes it from MLflow)", flush=True)


def _positive_int(text: str) -> int:
    value = int(text) if text.strip().isdigit() else 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m mpdp_lightning.experiments.sweep", description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep", help="a sweep file, e.g. conf/sweep/ip-sac-vs-mpdp.yaml")
    parser.add_argument("--tracking-uri", default=None,
                        help="MLflow store of the trials (default: the project's sqlite:///mlflow.db; a shared "
                             "server for a multi-node cluster)")
    parser.add_argument("--storage", default=None,
                        help="folder of the trials' checkpoints and logs (default runs/sweeps/<name>; shared "
                             "storage on a multi-node cluster)")
    parser.add_argument("--results", default="benchmarks/results", metavar="DIR",
                        help="each finished trial's record goes to DIR/<name>/<trial>.json (kept in git: a trial "
                             "with a record counts as finished on any machine)")
    parser.add_argument("--conf", default="conf", help="the project's config folder")
    parser.add_argument("--dry-run", action="store_true", help="print what would run (each trial's command) and stop")
    parser.add_argument("--max-concurrent", type=_positive_int, default=None, metavar="N",
                        help="run at most N trials at a time (default: as many as the CPUs hold), e.g. 1 to leave "
                             "cores free for other work")
    parser.add_argument("--no-compare", action="store_true", help="skip the seed table and figures at the end")
    parser.add_argument("extra", nargs="*", help="after --: arguments added to every trial's command line")
    args = parser.parse_args(argv)
    try:
        conf_dir = Path(args.conf).absolute()
        sweep = Sweep.load(args.sweep, conf_dir)
        storage = Path(args.storage or Path("runs") / "sweeps" / sweep.name).absolute()
        tracking_uri = args.tracking_uri or f"sqlite:///{Path('mlflow.db').absolute()}"
        if tracking_uri.startswith("sqlite:///") and not Path(tracking_uri[len("sqlite:///"):]).is_absolute():
            # the trials and Ray's workers (which write the records) run in other folders
            tracking_uri = f"sqlite:///{Path(tracking_uri[len('sqlite:///'):]).absolute()}"
        from mpdp_lightning.preflight import check_tracking_uri, check_writable_folder

        check_writable_folder(storage, "the sweep's folder")
        check_tracking_uri(tracking_uri)
        place = Place(conf_dir, storage, tracking_uri, (Path(args.results) / sweep.name).absolute())
        check_writable_folder(place.records, "the records folder")
        check_trials(sweep, place, list(args.extra), args.sweep)
        unfinished = run(sweep, place, list(args.extra), Path.cwd(), dry_run=args.dry_run,
                         max_concurrent=args.max_concurrent)
        if not args.dry_run:
            record_finished_trials(sweep, place)
        if not args.dry_run and not args.no_compare:
            compare_sweep(sweep, place)
    except MPDPError as error:
        print(f"error: {' '.join(str(error).split())}", file=sys.stderr)
        sys.exit(2)
    if unfinished:
        sys.exit(1)


def compare_sweep(sweep: Sweep, place: Place) -> None:
    """The seed table and the paper-style figures of the sweep, written to ``<storage>/comparison``
    and logged to the sweep's summary run in MLflow (the UI shows them there)."""
    from mpdp_lightning.experiments.compare import write_comparison
    from mpdp_lightning.experiments.summary_run import log_to_mlflow

    out = place.storage / "comparison"
    records = [place.records] if place.records.is_dir() else []  # trials finished on other machines
    try:
        paths = write_comparison(place.tracking_uri, sweep.name, out, sweep=sweep.name, threshold=sweep.threshold,
                                 group_by=sweep.group_by or (), records=records)
    except ValueError as error:  # no trial has logged an evaluation yet
        print(f"no comparison yet: {error}", flush=True)
        return
    ensure_experiment(place.tracking_uri, sweep.name)  # a clone whose trials all come from records has none
    run_id = log_to_mlflow(paths, place.tracking_uri, sweep.name, sweep.name)
    table = out / "seed_table.md"
    if table.is_file():
        print(table.read_text(), flush=True)
    print(f"comparison: {len(paths)} files in {out}, logged to MLflow run {run_id} ({sweep.name}-summary)", flush=True)


if __name__ == "__main__":
    main()
