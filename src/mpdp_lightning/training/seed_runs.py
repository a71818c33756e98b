"""A group of seeds in one run (``--seeds 0,1,2``): which seed each MLflow run, environment and
metric belongs to.

A group (algorithms/seed_group.py) trains N seeds in one process, but each seed is reported as a
run of its own would be: its own MLflow run (tags task, algo, seed, as alone, plus ``group``), its
own environments seeded with its seed, its own evaluation. Values measured per seed travel as
lists with one entry per seed (the group's order); ``for_logger`` gives each seed's MLflow run its
own entry, and values measured once for the whole group (wall time, phase times) go to every run.
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Optional, Sequence

from lightning.pytorch.loggers import Logger

SEED_POSITION = "_mpdp_seed_position"  # the attribute set on a seed's logger: its place in the group
STOPPED = "_mpdp_seed_stopped"  # set on a stopped seed's logger: it logs nothing more


def parse_seeds(value: Any) -> Optional[tuple[int, ...]]:
    """``--seeds``: ``"0,1,2"`` or a list of ints -> (0, 1, 2); None stays None (a run of one seed,
    ``seed_everything``). A ValueError names what is wrong."""
    if value is None:
        return None
    items = [item.strip() for item in value.split(",")] if isinstance(value, str) else list(value)
    try:
        seeds = tuple(int(item) for item in items if item != "")
    except (TypeError, ValueError):
        raise ValueError(f"seeds must be comma-separated non-negative integers such as 0,1,2, got {value!r}") from None
    if not seeds or any(seed < 0 for seed in seeds):
        raise ValueError(f"seeds must be comma-separated non-negative integers such as 0,1,2, got {value!r}")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must differ, got {','.join(map(str, seeds))}")
    return seeds


def global_seed() -> int:
    """The seed that LightningCLI's ``seed_everything`` chose (0 when none was set)."""
    return int(os.environ.get("PL_GLOBAL_SEED", 0))


def run_seeds(module: Any) -> tuple[int, ...]:
    """The seeds a module trains: a group's, or the run's own (``seed_everything``)."""
    axis = getattr(module, "seed_axis", None)
    return axis.seeds if axis is not None else (global_seed(),)


def mark_seed_logger(logger: Logger, position: int) -> None:
    """``logger`` reports seed number ``position`` of the group (its MLflow run is that seed's)."""
    setattr(logger, SEED_POSITION, position)


def seed_position(logger: Logger) -> Optional[int]:
    """The group position whose values ``logger`` reports, or None (a run of one seed)."""
    return getattr(logger, SEED_POSITION, None)


def for_logger(metrics: Mapping[str, Any], logger: Logger) -> dict[str, float]:
    """The values ``logger`` reports: per-seed lists give their entry for its seed (None entries,
    such as a seed that finished no episode in the window, are left out); scalars as they are."""
    position = seed_position(logger)
    if getattr(logger, STOPPED, False):
        return {}
    picked: dict[str, float] = {}
    for name, value in metrics.items():
        if isinstance(value, (list, tuple)):
            if position is None:
                raise ValueError(f"metric {name} has a value per seed, but the logger reports no seed of a group")
            value = value[position]
        if value is not None:
            picked[name] = value
    return picked


def seed_values(value: Any, seeds: int) -> Sequence[Any]:
    """A per-seed list as it is, a single value repeated for each of ``seeds``."""
    return list(value) if isinstance(value, (list, tuple)) else [value] * seeds


def seed_action(module: Any, position: int, obs: Any, where: str = "") -> Any:
    """Seed number ``position``'s evaluation actions (``seed_modes``: evaluation episodes run one
    seed at a time), checked: non-finite, the seed is stopped (``stop_seed``) and its episode ends
    on zero actions, which are logged nowhere."""
    import numpy as np

    actions = seed_modes(module, position, obs, where)
    if not np.isfinite(actions).all():  # this seed stops (the run, if it was the last); no NaN reaches the env
        module._stop_broken_seeds(" ".join(filter(None, ("pi_0's action", where))), False, [position])
        actions = np.zeros_like(actions)
    return actions


def seed_modes(module: Any, position: int, obs: Any, where: str = "") -> Any:
    """Seed number ``position``'s pi_0 modes for host observations [n, obs_dim], unchecked (a host
    array, non-finite as it came): every seed acts on the same observations (a mode draws no
    noise, so no seed's stream moves) and this seed's actions are kept."""
    import numpy as np

    stacked = np.repeat(np.asarray(obs)[None], len(module.seed_axis), axis=0)
    return module.act_on_host(stacked, deterministic=True, where=where, finite=False)[position]


def stop_seed(trainer: Any, module: Any, position: int, cause: Optional[str]) -> None:
    """Stop seed number ``position`` of a group, whose values went non-finite, while the others go
    on: it acts no more (its environment gets zero actions), is evaluated and logged no more, its
    MLflow run is marked FAILED with the cause as its ``stopped`` tag, and the last checkpoint
    written before (its last good one) is kept as ``last-good-seed<seed>.ckpt`` beside it. ``cause``
    None: a resumed group re-marks a seed stopped before (nothing is written again)."""
    import shutil
    import sys

    module.stopped_seeds.add(position)
    seed = module.seed_axis.seeds[position]
    kept = None
    if cause is not None:
        for callback in trainer.callbacks:
            path = getattr(callback, "path", None) if type(callback).__name__ == "EnvStepCheckpoint" else None
            if path is not None and path.is_file():
                kept = path.with_name(f"last-good-seed{seed}.ckpt")
                shutil.copy2(path, kept)
    for logger in trainer.loggers:
        if seed_position(logger) != position:
            continue
        setattr(logger, STOPPED, True)
        logger.finalize = lambda status="success": None  # its run stays FAILED when the group finishes
        if cause is not None and hasattr(logger, "run_id"):
            logger.experiment.set_tag(logger.run_id, "stopped", cause[:5000])
            logger.experiment.set_terminated(logger.run_id, "FAILED")
    if cause is not None:
        where = f"; its last good checkpoint: {kept}" if kept is not None else ""
        print(f"seed {seed} stopped: {cause}{where}; the other seeds go on", file=sys.stderr, flush=True)
