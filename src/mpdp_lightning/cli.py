"""Command line: ``mpdp fit --config conf/base.yaml --config conf/algo/mpdp.yaml --config
conf/task/hopper.yaml [--config conf/preset/mpdp/quick.yaml] --model.gamma 0.98`` (``make train``
composes exactly this, adding the algorithm's preset).

A LightningCLI in omegaconf+ mode: later ``--config`` files override earlier ones, every field
can be overridden on the command line, and ``${...}`` interpolations see those overrides. The
top-level ``--task`` is linked into the module; the env-step callbacks are their own groups
(``--env_interaction.total_env_steps``, ``--evaluation.eval_every``,
``--checkpoint.checkpoint_every``, ``--progress_bar.*``, ``--video.video_every``), and so is
COPlanner's plug-in (``--coplanner.enabled true``).

What a user sees: one line naming the run, a progress bar (plain lines when output is not a
terminal), and a summary at the end or at an interruption. Bad input ends with one ``error:``
line and exit code 2 before any work: everything is checked and instantiated before the MLflow
logger, whose construction already creates the store. Ctrl-C and SIGTERM save, mark the MLflow
run KILLED and exit 130 and 143, as shells do.
"""

from __future__ import annotations

import copy
import logging
import os
import sys
import warnings
from importlib import import_module
from pathlib import Path
from typing import Any, Optional, Union

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import lightning.pytorch as pl  # noqa: E402
from jsonargparse import ArgumentError, Namespace, set_parsing_settings  # noqa: E402
from lightning.fabric.utilities.exceptions import MisconfigurationException  # noqa: E402
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI  # noqa: E402
from lightning.pytorch.utilities.exceptions import SIGTERMException  # noqa: E402

from mpdp_lightning.algorithms.model_based import ModelBasedAgent  # noqa: E402
from mpdp_lightning.algorithms.seed_group import build_group  # noqa: E402
from mpdp_lightning.planners.coplanner import COPlanner  # noqa: E402
from mpdp_lightning.training.callbacks import (  # noqa: E402
    EnvInteraction, EnvStepCheckpoint, EnvStepProgressBar, Evaluation, EvaluationVideo,
)
from mpdp_lightning.training.callbacks.checkpointing import LAST, default_checkpoint_dir  # noqa: E402
from mpdp_lightning.training.callbacks.env_interaction import resolved_warmup  # noqa: E402
from mpdp_lightning.training.callbacks.progress import find_callback  # noqa: E402
from mpdp_lightning.training.checkpoint_io import read_checkpoint_header  # noqa: E402
from mpdp_lightning.training.data import ReplayDataModule  # noqa: E402
from mpdp_lightning.errors import MPDPError, RunInterrupted, describe_parser_error  # noqa: E402
from mpdp_lightning.preflight import check_tracking_uri, check_writable_folder  # noqa: E402
from mpdp_lightning.console import Outcome, RunClock, mlflow_loggers, start_line, summary  # noqa: E402
from mpdp_lightning.envs.tasks import TASKS, get_task  # noqa: E402
from mpdp_lightning.training.seed_runs import mark_seed_logger, parse_seeds  # noqa: E402
from mpdp_lightning.training.tracking import log_run_config  # noqa: E402

# Lightning 2.6 calls a torch pytree API that torch 2.13 deprecates: noise, not the user's problem.
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")

# Without this, relative interpolations resolve against the wrong node in omegaconf+ mode.
set_parsing_settings(omegaconf_absolute_to_relative_paths=True)

# INFO chatter at start (a litlogger advert, "GPU available", "Seed set to", the TorchRL storage,
# MLflow's table creation): the run's own start line says what matters. Warnings still show.
QUIET_LOGGERS = (
    "lightning.pytorch.utilities.rank_zero",
    "lightning.fabric.utilities.rank_zero",
    "lightning.fabric.utilities.seed",
    "torchrl",
    "mlflow.store.db.utils",
    "alembic",
)


class _DropExperimentCreated(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "not found. Creating it." not in record.getMessage()


def quiet_libraries() -> None:
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    mlflow_logger_log = logging.getLogger("lightning.pytorch.loggers.mlflow")
    if not any(isinstance(f, _DropExperimentCreated) for f in mlflow_logger_log.filters):
        mlflow_logger_log.addFilter(_DropExperimentCreated())


class MPDPCLI(LightningCLI):
    def __init__(self, *args: Any, argv: Optional[list[str]] = None, **kwargs: Any) -> None:
        self.argv = list(sys.argv[1:] if argv is None else argv)  # for the resume command
        self.resumed_from: Optional[int] = None
        self.resumed_run_ids: Optional[list] = None  # a resumed group's MLflow run per seed
        super().__init__(*args, args=argv, **kwargs)

    def _add_instantiators(self) -> None:  # noqa: D401 (extends a private LightningCLI step)
        """Lightning's instantiators (model, data), then one for every other class, all handing
        the classes plain numbers (``PlainNumbers``)."""
        super()._add_instantiators()
        registry = self.parser._instantiators or {}
        for key, instantiator in list(registry.items()):
            registry[key] = PlainNumbers(instantiator)
        self.parser.add_instantiator(PlainNumbers(), object)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument("--task", type=str, required=True, help="task name: " + ", ".join(TASKS))
        parser.add_argument("--preset", type=Optional[str], default=None,
                            help="name of the preset the config files apply (set by conf/preset/*.yaml)")
        parser.link_arguments("task", "model.init_args.task")
        parser.add_lightning_class_args(EnvInteraction, "env_interaction")
        parser.add_lightning_class_args(Evaluation, "evaluation")
        parser.add_lightning_class_args(EnvStepCheckpoint, "checkpoint")
        parser.add_lightning_class_args(EnvStepProgressBar, "progress_bar")
        parser.add_lightning_class_args(EvaluationVideo, "video")
        parser.add_class_arguments(COPlanner, "coplanner")  # an option of MBPO and MPDP (use_coplanner)
        parser.add_argument("--seeds", type=Optional[Union[list[int], str]], default=None,
                            help="train these seeds in one process, e.g. 0,1,2 (a group: docs/seed-groups.md); "
                                 "each seed its own MLflow run; replaces seed_everything")

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        try:
            super().parse_arguments(parser, args)
        except (ArgumentError, ValueError, TypeError) as error:
            raise MPDPError(describe_parser_error(str(error))) from None

    def _parse_ckpt_path(self) -> None:  # noqa: D401 (overrides a private LightningCLI step)
        """Check ``--ckpt_path`` before any work (one-line errors) and resume the same MLflow run.

        Replaces LightningCLI's version, which loads the whole checkpoint (replay buffer
        included) to read its hyperparameters; this reads them memory-mapped. As in Lightning,
        the checkpoint's model hyperparameters win over the config, so the nets match the weights.
        """
        config = self.config[self.config.subcommand] if self.config.get("subcommand") else self.config
        ckpt_path = config.get("ckpt_path")
        if not ckpt_path:
            return
        get_task(config.task)
        header = read_checkpoint_header(ckpt_path, expected_task=config.task)
        algo = config.model.class_path
        if header.class_path is not None and header.class_path != algo:
            raise MPDPError(
                f"checkpoint {ckpt_path} is a {header.class_path.rsplit('.', 1)[-1]} run, not {algo.rsplit('.', 1)[-1]}: "
                f"resume it with the config of its algorithm ({header.class_path})"
            )
        total = config.env_interaction.total_env_steps
        if header.env_steps >= total:
            raise MPDPError(
                f"checkpoint {ckpt_path} is already at {header.env_steps} env steps; raise "
                f"--env_interaction.total_env_steps above that to train further"
            )
        seeds = _seeds_of(config)
        if header.seeds != seeds:
            saved = "one seed" if header.seeds is None else "seeds " + ",".join(map(str, header.seeds))
            given = "no --seeds" if seeds is None else "--seeds " + ",".join(map(str, seeds))
            raise MPDPError(f"checkpoint {ckpt_path} holds {saved}, and the command gives {given}: resume it with the seeds it was trained with")
        self.resumed_run_ids = header.mlflow_run_ids
        model_args = {k: v for k, v in header.hyper_parameters.items() if k != "task" and not k.startswith("_")}
        try:
            model = {"class_path": algo, "init_args": model_args}
            self.config = self.parser.parse_object({self.config.subcommand: {"model": model}}, self.config)
        except (ArgumentError, ValueError, TypeError) as error:
            raise MPDPError(f"the hyperparameters of checkpoint {ckpt_path} do not fit this model: {describe_parser_error(str(error))}") from None
        config = self.config[self.config.subcommand]
        logger = config.trainer.get("logger")
        if header.mlflow_run_id and _is_class_spec(logger) and "MLFlowLogger" in str(logger.class_path):
            logger.init_args.run_id = header.mlflow_run_id  # continue the same MLflow run
        self.resumed_from = header.env_steps

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand]
        if config.trainer.enable_progress_bar is False:  # None (the default) means on
            # Lightning refuses a progress-bar callback when the bar is off; switch ours off instead.
            config.trainer.enable_progress_bar = True
            config.progress_bar.enabled = False
        get_task(config.task)  # one-line error listing the known tasks
        if config.coplanner.enabled:
            module, _, name = str(config.model.class_path).rpartition(".")
            if not issubclass(getattr(import_module(module), name), ModelBasedAgent):
                raise MPDPError(f"coplanner.enabled: COPlanner plans with a world model, which {name} has not; "
                                f"use an algorithm with one (mbpo, mpdp)")
        interaction = config.env_interaction
        module, _, name = str(config.model.class_path).rpartition(".")
        algorithm = getattr(import_module(module), name)
        seeds = _seeds_of(config)
        if seeds is not None:
            for option in ("env_interaction.seed", "evaluation.seed", "video.seed"):
                if config.get(option) is not None:
                    raise MPDPError(f"{option}: a group seeds each seed's environments from its seed; leave it unset with --seeds")
        if hasattr(algorithm, "default_warmup_steps_for"):  # an agent: its warm-up must end before the run
            try:
                resolved_warmup(interaction.warmup_steps, algorithm, config.task, interaction.total_env_steps)
            except ValueError as error:
                raise MPDPError(str(error)) from None

    def instantiate_classes(self) -> None:
        """Everything but the logger first (model, data, callbacks, trainer: their own checks, the
        accelerator's), then the folders and the tracking store; the logger last, since creating an
        MLflow logger already creates its store."""
        config = self.config[self.subcommand]
        logger_config = config.trainer.get("logger")
        deferred = _is_class_spec(logger_config) or isinstance(logger_config, list)
        if deferred:
            config.trainer.logger = False
        try:
            super().instantiate_classes()
        except MisconfigurationException as error:  # the Trainer's (e.g. an accelerator this machine lacks)
            raise MPDPError(f"trainer: {error}") from None
        except (ArgumentError, ValueError, TypeError) as error:
            raise MPDPError(describe_parser_error(str(error))) from None
        finally:
            if deferred:
                config.trainer.logger = logger_config
        seeds = _seeds_of(config)
        if seeds is not None:  # N seeds in one module: each agent built under its seed, as alone
            self.model = build_group(self.model, seeds)
        # how the update runs, resolved once (a contradiction is an error line before any work)
        self.model.execution_plan(self.trainer.strategy.root_device, self.trainer.precision)
        coplanner = self.config_init[self.subcommand].get("coplanner")
        if coplanner is not None and coplanner.enabled:  # checked above: the model has a world model
            self.model.use_coplanner(coplanner)
        checkpoint = find_callback(self.trainer, EnvStepCheckpoint)
        if checkpoint is not None:
            folder = checkpoint.dirpath or Path(self.trainer.default_root_dir) / "checkpoints"
            check_writable_folder(folder, "the checkpoint folder")
        if deferred:
            specs = logger_config if isinstance(logger_config, list) else [logger_config]
            for spec in specs:
                uri = spec.init_args.get("tracking_uri") if _is_class_spec(spec) else None
                if uri:
                    check_tracking_uri(uri)
            if seeds is None:
                self.trainer.loggers = [_instantiate(spec) for spec in specs]
            else:  # each seed its own run (tags seed and group: training/tracking.py)
                self.trainer.loggers = [
                    logger for position, seed in enumerate(seeds)
                    for logger in self._seed_loggers(specs, config, position, seed)
                ]
        elif seeds is not None and self.trainer.loggers:  # Lightning's default logger: one run for N seeds
            raise MPDPError("trainer.logger: a group of seeds logs each seed to its own run, which needs the logger "
                            "given as class_path and init_args (as conf/base.yaml's MLFlowLogger), or false")

    def _seed_loggers(self, specs: list, config: Any, position: int, seed: int) -> list:
        """The loggers of seed number ``position``: each spec with that seed's run name (``task-seed``
        for the default name, ``<name>-seed<seed>`` for one given, ``{seed}`` in a name or a tag
        filled in, as a sweep gives them) and, resumed, its run."""
        loggers = []
        for spec in specs:
            if _is_class_spec(spec) and "MLFlowLogger" in str(spec.class_path):
                spec = copy.deepcopy(spec)
                name = spec.init_args.get("run_name")
                default = f"{config.task}-{config.seed_everything}"
                if name is not None and "{seed}" in name:  # a sweep's: the seed's own trial key
                    spec.init_args.run_name = name.replace("{seed}", str(seed))
                else:
                    spec.init_args.run_name = f"{config.task}-{seed}" if name in (None, default) else f"{name}-seed{seed}"
                tags = spec.init_args.get("tags")
                if tags:
                    spec.init_args.tags = {k: str(v).replace("{seed}", str(seed)) for k, v in dict(tags).items()}
                spec.init_args.run_id = self.resumed_run_ids[position] if self.resumed_run_ids else None
            logger = _instantiate(spec)
            mark_seed_logger(logger, position)
            loggers.append(logger)
        return loggers

    def before_fit(self) -> None:
        config = self.config["fit"]
        # beside the config as given: how the update runs, and the values the algorithm chose for
        # the options left to it, so that the params say what the run used
        resolved = dict(self.model.plan.params())
        interaction = find_callback(self.trainer, EnvInteraction)
        if interaction is not None:
            interaction.resolve_defaults(self.model)
            resolved["resolved.env_interaction.warmup_steps"] = str(interaction.warmup_steps)
            resolved["resolved.env_interaction.updates_per_env_step"] = str(interaction.updates_per_env_step)
        log_run_config(self.trainer, self._parser("fit"), config, resumed=bool(config.get("ckpt_path")),
                       extra=resolved)
        checkpoint = find_callback(self.trainer, EnvStepCheckpoint)
        path = None
        if checkpoint is not None:
            path = (checkpoint.dirpath or default_checkpoint_dir(self.trainer)) / LAST
        print(start_line(self.trainer, config.as_dict(), path, self.resumed_from, self.model.plan), flush=True)

    def fit(self, model: pl.LightningModule, **kwargs: Any) -> None:
        """``trainer.fit`` that tells a finished run from an interrupted one: the summary, the MLflow
        status (KILLED for Ctrl-C and SIGTERM) and the exit code (130, 143)."""
        clock = RunClock(self.resumed_from or 0)
        try:
            self.trainer.fit(model, **kwargs)
            outcome = Outcome()
        except SIGTERMException:  # raised by Lightning at an update boundary; the checkpoint saved
            outcome = Outcome(signum=15, saved=True)
        except RunInterrupted as interruption:
            outcome = Outcome(signum=interruption.signum, saved=interruption.saved)
        except SystemExit as exit_:  # Lightning's answer to a KeyboardInterrupt outside our handler
            if not isinstance(exit_.__context__, KeyboardInterrupt):
                raise
            outcome = Outcome(signum=2, saved=False)
        if outcome.interrupted:
            for logger in mlflow_loggers(self.trainer):
                if logger._initialized:
                    logger.experiment.set_terminated(logger.run_id, "KILLED")
        print(summary(self.trainer, model, outcome, clock, self.argv), flush=True)
        if outcome.interrupted:
            raise SystemExit(outcome.exit_code)


class PlainNumbers:
    """A class instantiator that hands the class plain numbers: every int and float subclass in its
    arguments (jsonargparse's PositiveInt, NonNegativeFloat, ...: the types that checked the values)
    becomes the plain int or float. Every class the CLI builds goes through one (``MPDPCLI``), so
    this is the one place where the CLI's values enter the modules and callbacks: torch 2.11's
    compiler refuses int and float subclasses in compiled code, and a weights-only checkpoint load
    refuses classes it does not know in the saved hyperparameters.

    Args:
        instantiator: the one it wraps (Lightning's for the model and the data); None: the class.
    """

    def __init__(self, instantiator: Optional[Any] = None) -> None:
        self.instantiator = instantiator

    def __call__(self, class_type: type, *args: Any, applied_instantiation_links: Optional[dict] = None,
                 **kwargs: Any) -> Any:
        args, kwargs = _plain(list(args)), {key: _plain(value) for key, value in kwargs.items()}
        if self.instantiator is None:
            return class_type(*args, **kwargs)
        if applied_instantiation_links is None:
            return self.instantiator(class_type, *args, **kwargs)
        links = {key: _plain(value) for key, value in applied_instantiation_links.items()}
        return self.instantiator(class_type, *args, applied_instantiation_links=links, **kwargs)


def _plain(value: Any) -> Any:
    if isinstance(value, bool) or type(value) in (int, float):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, (list, tuple)):
        items = [_plain(v) for v in value]
        return value if all(a is b for a, b in zip(items, value)) else type(value)(items)
    if isinstance(value, dict):
        items = {k: _plain(v) for k, v in value.items()}
        return value if all(items[k] is v for k, v in value.items()) else type(value)(items)
    return value


def _seeds_of(config: Any) -> Optional[tuple[int, ...]]:
    """The config's ``--seeds`` as a tuple (None: one seed); a bad value is an error line."""
    try:
        return parse_seeds(config.get("seeds"))
    except ValueError as error:
        raise MPDPError(str(error)) from None


def _is_class_spec(value: Any) -> bool:
    return isinstance(value, (Namespace, dict)) and "class_path" in value


def _instantiate(spec: Any) -> Any:
    """A ``{class_path, init_args}`` spec -> the object (the deferred logger)."""
    if not _is_class_spec(spec):
        return spec
    module, _, name = spec["class_path"].rpartition(".")
    init_args = spec.get("init_args") or {}
    init_args = init_args.as_dict() if isinstance(init_args, Namespace) else dict(init_args)
    return getattr(import_module(module), name)(**init_args)


# How ``mpdp fit`` builds its LightningCLI (``MPDPCLI(pl.LightningModule, ReplayDataModule, **CLI_OPTIONS)``)
CLI_OPTIONS: dict[str, Any] = dict(
    subclass_mode_model=True,
    save_config_callback=None,  # fails under MLflow; tracking.log_run_config logs the config
    auto_configure_optimizers=False,
    seed_everything_default=0,
    parser_kwargs={"parser_mode": "omegaconf+", "exit_on_error": False},
)


def main(args: Optional[list[str]] = None) -> None:
    quiet_libraries()
    try:
        MPDPCLI(pl.LightningModule, ReplayDataModule, argv=args, **CLI_OPTIONS)
    except MPDPError as error:
        _fail(str(error))


def _fail(message: str) -> None:
    text = " ".join(message.split())  # one line, whatever the message
    print(f"error: {text if len(text) < 400 else text[:397] + '...'}", file=sys.stderr)
    sys.exit(2)
