"""What the modules keep from the command line are plain Python numbers: torch 2.11's compiler
refuses jsonargparse's int and float subclasses (PositiveInt, NonNegativeFloat, ...) in compiled
code, which crashed MPDP's first compiled update on a GPU, and torch 2.13's accepts them, so only
this test sees them on the CPU machines."""

import dataclasses
from collections.abc import Mapping

import lightning.pytorch as pl
import pytest
import torch

from helpers import ROOT, fit_args
from mpdp_lightning.cli import CLI_OPTIONS, MPDPCLI
from mpdp_lightning.training.data import ReplayDataModule


class _Built(Exception):
    def __init__(self, cli: MPDPCLI) -> None:
        self.cli = cli


class _BuildOnly(MPDPCLI):
    """``make train``'s CLI, stopped where the training would start: everything built."""

    def before_fit(self) -> None:
        raise _Built(self)


def build(args: list[str]) -> MPDPCLI:
    with pytest.raises(_Built) as built:
        _BuildOnly(pl.LightningModule, ReplayDataModule, argv=args, **CLI_OPTIONS)
    return built.value.cli


def number_subclasses(root: object, where: str) -> list[str]:
    """Paths of every int or float of a subclass (not bool) reachable from ``root`` through our
    own objects, modules, hyperparameters, dataclasses and containers."""
    found, seen = [], set()

    def walk(value: object, path: str) -> None:
        if id(value) in seen or isinstance(value, (torch.Tensor, str, bytes, type(None), pl.Trainer)):
            return
        seen.add(id(value))
        if isinstance(value, (int, float)):
            if type(value) not in (int, float, bool):
                found.append(f"{path}: {type(value).__module__}.{type(value).__name__}")
            return
        if isinstance(value, Mapping):
            for key, item in value.items():
                walk(item, f"{path}[{key!r}]")
        elif isinstance(value, (list, tuple, set)):
            for i, item in enumerate(value):
                walk(item, f"{path}[{i}]")
        elif isinstance(value, torch.nn.Module) or dataclasses.is_dataclass(value) or (
            type(value).__module__.startswith("mpdp_lightning") and hasattr(value, "__dict__")
        ):
            for name, item in vars(value).items():
                if name in ("_parameters", "_buffers", "_trainer", "trainer"):
                    continue
                walk(item, f"{path}.{name}")

    walk(root, where)
    return found


# algo -> the config files ``make train`` adds (its presets; COPlanner's as a user switches it on)
BUILDS = {
    "sac": [],
    "mbpo quick": ["conf/preset/mbpo/quick.yaml"],
    "mbpo paper": ["conf/preset/mbpo/paper.yaml"],
    "mbpo coplanner": ["conf/preset/mbpo/coplanner.yaml"],
    "mpdp quick + coplanner": ["conf/preset/mpdp/quick.yaml", "--coplanner.enabled", "true"],
    "mpdp paper": ["conf/preset/mpdp/paper.yaml"],
}


@pytest.mark.parametrize("build_name", list(BUILDS))
def test_modules_keep_no_jsonargparse_number_types(in_tmp, build_name):
    algo = build_name.split()[0]
    extra = []
    for item in BUILDS[build_name]:
        extra += ["--config", str(ROOT / item)] if item.endswith(".yaml") else [item]
    # the real config files at their own sizes: only the run's length and logging are test-sized
    args = fit_args("hopper", 10_000, algo=algo)  # above every preset's warm-up; nothing runs
    args = args[: args.index("--data.batch_size")] + args[args.index("--trainer.enable_progress_bar"):]
    cli = build(args + extra)
    assert type(cli.model).__name__.lower() == algo
    found = number_subclasses(cli.model, "model") + number_subclasses(cli.datamodule, "data")
    for callback in cli.trainer.callbacks:
        found += number_subclasses(callback, type(callback).__name__)
    assert not found, "jsonargparse number types reached the modules:\n" + "\n".join(found)


def test_the_walk_finds_a_number_subclass():
    from jsonargparse.typing import PositiveInt

    module = torch.nn.Linear(2, 2)
    module.members = PositiveInt(3)
    assert number_subclasses(module, "m") == ["m.members: jsonargparse.typing.PositiveInt"]
