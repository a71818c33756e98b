"""Command line: ``mpdp fit --config conf/base.yaml --config conf/algo/mpdp.yaml --config
conf/task/hopper.yaml [--config conf/preset/quick.yaml] --model.gamma 0.98`` (``make train``
composes exactly this, adding MPDP's preset).

A LightningCLI in omegaconf+ mode: later ``--config`` files override earlier ones, every field
can be overridden on the command line, and ``${...}`` interpolations see those overrides. The
top-level ``--task`` is linked into the module; the env-step callbacks are their own groups
(``--env_interaction.total_env_steps``, ``--evaluation.eval_every``,
``--checkpoint.checkpoint_every``). Bad input ends with one ``error:`` line before any work.
"""

from __future__ import annotations

import os
import sys
import warnings
from typing import Any, Optional

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import lightning.pytorch as pl  # noqa: E402
from jsonargparse import ArgumentError, set_parsing_settings  # noqa: E402
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI  # noqa: E402

from mpdp_lightning.callbacks import EnvInteraction, EnvStepCheckpoint, EnvStepProgressBar, Evaluation  # noqa: E402
from mpdp_lightning.checkpoint_io import read_checkpoint_header  # noqa: E402
from mpdp_lightning.data import ReplayDataModule  # noqa: E402
from mpdp_lightning.errors import MPDPError  # noqa: E402
from mpdp_lightning.tasks import TASKS, get_task  # noqa: E402
from mpdp_lightning.tracking import log_run_config  # noqa: E402

# Lightning 2.6 calls a torch pytree API that torch 2.13 deprecates: noise, not the user's problem.
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")

# Without this, relative interpolations resolve against the wrong node in omegaconf+ mode.
set_parsing_settings(omegaconf_absolute_to_relative_paths=True)


class MPDPCLI(LightningCLI):
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument("--task", type=str, required=True, help="task name: " + ", ".join(TASKS))
        parser.link_arguments("task", "model.init_args.task")
        parser.add_lightning_class_args(EnvInteraction, "env_interaction")
        parser.add_lightning_class_args(Evaluation, "evaluation")
        parser.add_lightning_class_args(EnvStepCheckpoint, "checkpoint")
        parser.add_lightning_class_args(EnvStepProgressBar, "progress_bar")

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand]
        if not config.trainer.enable_progress_bar:
            # Lightning refuses a progress-bar callback when the bar is off; switch ours off instead.
            config.trainer.enable_progress_bar = True
            config.progress_bar.enabled = False
        # Checks that span several fields, made here because instantiating the MLflow logger
        # already creates its store: bad input must leave nothing behind.
        get_task(config.task)  # one-line error listing the known tasks
        interaction = config.env_interaction
        if interaction.warmup_steps >= interaction.total_env_steps:
            raise MPDPError(
                f"env_interaction.warmup_steps ({interaction.warmup_steps}) must be below "
                f"env_interaction.total_env_steps ({interaction.total_env_steps})"
            )

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
        total = config.env_interaction.total_env_steps
        if header.env_steps >= total:
            raise MPDPError(
                f"checkpoint {ckpt_path} is already at {header.env_steps} env steps; raise "
                f"--env_interaction.total_env_steps above that to train further"
            )
        model_args = {k: v for k, v in header.hyper_parameters.items() if k != "task" and not k.startswith("_")}
        try:
            model = {"class_path": config.model.class_path, "init_args": model_args}
            self.config = self.parser.parse_object({self.config.subcommand: {"model": model}}, self.config)
        except (ArgumentError, ValueError, TypeError) as error:
            raise MPDPError(f"the hyperparameters of checkpoint {ckpt_path} do not fit this model: {_one_line(error)}") from None
        config = self.config[self.config.subcommand]
        logger = config.trainer.get("logger")
        if header.mlflow_run_id and logger and "MLFlowLogger" in str(logger.get("class_path", "")):
            logger.init_args.run_id = header.mlflow_run_id  # continue the same MLflow run

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        try:
            super().parse_arguments(parser, args)
        except (ArgumentError, ValueError, TypeError) as error:
            raise MPDPError(_one_line(error)) from None

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except (ArgumentError, ValueError, TypeError) as error:
            raise MPDPError(_one_line(error)) from None

    def before_fit(self) -> None:
        config = self.config["fit"]
        log_run_config(self.trainer, self._parser("fit"), config, resumed=bool(config.get("ckpt_path")))


def main(args: Optional[list[str]] = None) -> None:
    try:
        MPDPCLI(
            pl.LightningModule,
            ReplayDataModule,
            subclass_mode_model=True,
            save_config_callback=None,  # fails under MLflow; tracking.log_run_config logs the config
            auto_configure_optimizers=False,
            seed_everything_default=0,
            parser_kwargs={"parser_mode": "omegaconf+", "exit_on_error": False},
            args=args,
        )
    except MPDPError as error:
        _fail(_one_line(error))


def _one_line(error: BaseException) -> str:
    # jsonargparse spreads one problem over several lines; keep it to one
    text = " ".join(str(error).split())
    return text if len(text) < 400 else text[:397] + "..."


def _fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)
