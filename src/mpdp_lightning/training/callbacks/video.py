"""EvaluationVideo: one deterministic pi_0 episode rendered headless, as an mp4 in the MLflow run.

Rendering goes through gymnasium's MuJoCo renderer with ``MUJOCO_GL=egl`` (set here, with
``setdefault``, just before the first frame): EGL renders without a display, on a GPU's driver
or on Mesa's software renderer (llvmpipe) on a CPU-only machine. gymnasium reads ``MUJOCO_GL``
when it creates its renderer, so setting it after ``import mujoco`` works. It is deliberately not
set at import time: mujoco loads the backend named by ``MUJOCO_GL`` while it is imported, and
where that backend's libraries are missing the import itself fails, which would stop the
training, not just the videos. Where no backend works, one warning says so and the run goes on
without videos.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

import lightning.pytorch as pl
import numpy as np
from jsonargparse.typing import NonNegativeInt, PositiveInt
from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.utilities import rank_zero_warn

from mpdp_lightning.training.callbacks.evaluation import EVAL_SEED_OFFSET
from mpdp_lightning.training.callbacks.schedule import EnvStepRoutine
from mpdp_lightning.training.metrics import log_metrics
from mpdp_lightning.training.seed_runs import run_seeds, seed_modes, seed_position
from mpdp_lightning.envs.stepping import EnvStep, run_episodes
from mpdp_lightning.envs.tasks import make_env

ARTIFACT_DIR = "video"
REAL_TIME_FPS = 30  # frame_skip=None keeps about this many frames per second of simulated time


class _PolicyDiverged(Exception):
    """pi_0's action was NaN or inf: the video ends there."""


def artifact_name(env_steps: int) -> str:
    """The artifact path of the video made at ``env_steps`` (zero-padded so names sort by step)."""
    return f"{ARTIFACT_DIR}/env_step_{env_steps:07d}.mp4"


class EvaluationVideo(EnvStepRoutine):
    """At every multiple of ``video_every`` env steps and at the end of training, render one
    episode of pi_0's mode and log it to the MLflow run as ``video/env_step_<env steps>.mp4``,
    with its cost as ``time/video_seconds``.

    By default the episode starts from the seed of the first evaluation episode at that env step
    (Evaluation with its default seed), so the video shows what ``eval/return`` measured. Frames are taken at the reset and
    then every ``frame_skip`` env steps until the episode ends or ``max_frames`` are taken, and
    play in real time by default. If rendering fails (no OpenGL backend), one warning says why and
    the run goes on without videos.

    Args:
        video_every: env steps between videos; 0 makes one video, at the end of training.
        width: frame width in pixels (even).
        height: frame height in pixels (even).
        max_frames: at most this many frames per video; the episode is cut there.
        frame_skip: env steps per frame; None picks the one that gives about 30 frames per second
            of simulated time (4 for hopper and walker2d, 1 for inverted_pendulum).
        fps: frame rate of the mp4; None plays it in real time (the environment's rate over
            ``frame_skip``).
        shadows: MuJoCo's shadows and reflections; on a software renderer (no GPU) they make
            each frame several times dearer.
        seed: seed of the video episode at env step 0 (the env step is added); None derives it
            from the run's seed as Evaluation does by default.
        enabled: False makes no videos at all.
    """

    def __init__(
        self,
        video_every: NonNegativeInt = 10_000,
        width: PositiveInt = 160,
        height: PositiveInt = 120,
        max_frames: PositiveInt = 200,
        frame_skip: Optional[PositiveInt] = None,
        fps: Optional[PositiveInt] = None,
        shadows: bool = False,
        seed: Optional[NonNegativeInt] = None,
        enabled: bool = True,
    ) -> None:
        if video_every < 0:
            raise ValueError(f"video_every must be 0 (at the end only) or positive, got {video_every}")
        for name, value in (("width", width), ("height", height)):
            if value <= 0 or value % 2:
                raise ValueError(f"{name} must be a positive even number of pixels (H.264 needs it), got {value}")
        for name, value in (("max_frames", max_frames), ("frame_skip", frame_skip), ("fps", fps)):
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be positive, got {value}")
        self.video_every, self.width, self.height = video_every, width, height
        self.max_frames, self.frame_skip, self.fps = max_frames, frame_skip, fps
        self.shadows, self.seed, self.enabled = shadows, seed, enabled
        self.last_step = 0
        self._env: Any = None
        self._active = False  # enabled, on the main process, with an MLflow run, and no failure yet

    # ---- when ------------------------------------------------------------------------------------
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._active = self.enabled and trainer.is_global_zero
        if self._active and not self._mlflow_loggers(trainer):
            rank_zero_warn("evaluation videos are logged to MLflow, and this run has no MLFlowLogger: no videos")
            self._active = False

    @property
    def interval(self) -> int:
        return self.video_every

    def run(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Optional[str]:
        return self.record(trainer, pl_module)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._close_env()

    # ---- what ------------------------------------------------------------------------------------
    def record(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Optional[str]:
        """Render, encode and log the video of this env step; its artifact path, or None if none was made."""
        env_steps = pl_module.env_steps
        self.last_step = env_steps
        if not self._active:
            return None
        start = time.perf_counter()
        with _ignore_half_built_viewer(), tempfile.TemporaryDirectory(prefix="mpdp-video-") as folder:
            try:  # alone one video; in a group one per seed, each into its seed's run
                grouped = getattr(pl_module, "seed_axis", None) is not None
                for position, seed in enumerate(run_seeds(pl_module)):
                    if position in getattr(pl_module, "stopped_seeds", set()):
                        continue  # stopped by a NaN
                    path = Path(folder) / str(position) / Path(artifact_name(env_steps)).name
                    path.parent.mkdir()
                    self._write_episode(pl_module, path, seed, position if grouped else None)
                    for logger in self._mlflow_loggers(trainer):
                        if seed_position(logger) in (None, position):
                            logger.experiment.log_artifact(logger.run_id, str(path), ARTIFACT_DIR)
            except Exception as error:  # a video is never worth the run: say why once, then stop making them
                self._fail(" ".join(f"{type(error).__name__}: {error}".split())[:300])
                return None
        log_metrics(trainer, {"time/video_seconds": time.perf_counter() - start}, step=env_steps)
        return artifact_name(env_steps)

    def _write_episode(self, pl_module: pl.LightningModule, path: Path, run_seed: int,
                       position: Optional[int] = None) -> int:
        """Run one deterministic episode of pi_0 (of the seed at ``position`` in a group) into
        ``path``, streaming frames to ffmpeg; the frame count. ``run_seed``: the seed whose
        evaluation episode it shows."""
        import imageio.v2 as imageio  # imageio-ffmpeg brings its own ffmpeg binary

        env = self._render_env(pl_module.task)
        render_fps = float(env.metadata.get("render_fps") or REAL_TIME_FPS)
        skip = self.frame_skip or max(1, round(render_fps / REAL_TIME_FPS))
        fps = self.fps or render_fps / skip
        seed = (self.seed if self.seed is not None else run_seed + EVAL_SEED_OFFSET) + pl_module.env_steps
        writer = imageio.get_writer(
            path, format="FFMPEG", mode="I", fps=fps, codec="libx264", macro_block_size=2, ffmpeg_log_level="error"
        )
        frames = 0

        def frame() -> None:
            nonlocal frames
            writer.append_data(env.render())
            frames += 1

        def policy(obs: np.ndarray) -> np.ndarray:
            if position is None:
                actions = pl_module.act_on_host(obs, deterministic=True, finite=False)
            else:
                actions = seed_modes(pl_module, position, obs)
            if not np.isfinite(actions).all():  # a diverged policy: MuJoCo gets no NaN, the video ends
                raise _PolicyDiverged
            return actions

        def on_step(step: EnvStep) -> bool:
            nonlocal steps
            steps += 1
            if step.done or steps % skip == 0:  # the last frame shows how the episode ended
                frame()
            return frames < self.max_frames

        steps = 0
        try:
            if self.max_frames > 1:
                run_episodes([env], [seed], policy, on_step, after_reset=frame)
            else:
                env.reset(seed=seed)
                frame()  # the start state
        except _PolicyDiverged:
            pass
        finally:
            writer.close()
        return frames

    def _render_env(self, task: str) -> Any:
        """The rgb_array environment, made on the first video and kept for the run (one GL context)."""
        if self._env is None:
            import mujoco  # before MUJOCO_GL is set: its import must not load EGL (see the module's docstring)

            os.environ.setdefault("MUJOCO_GL", "egl")  # gymnasium reads it when it creates the renderer

            env = make_env(task, render_mode="rgb_array", width=self.width, height=self.height)
            try:
                env.reset(seed=0)
                env.render()  # creates the GL context and MuJoCo's render context: where a missing backend fails
                if not self.shadows:
                    flags = env.unwrapped.mujoco_renderer.viewer.scn.flags
                    flags[mujoco.mjtRndFlag.mjRND_SHADOW] = 0
                    flags[mujoco.mjtRndFlag.mjRND_REFLECTION] = 0
            except BaseException:
                _close_render_env(env)
                raise
            self._env = env
        return self._env

    def _close_env(self) -> None:
        if self._env is not None:
            _close_render_env(self._env)
            self._env = None

    def _fail(self, reason: str) -> None:
        self._active = False
        self._close_env()
        gl = os.environ.get("MUJOCO_GL")
        rank_zero_warn(
            f"evaluation videos are off for the rest of this run: rendering failed with MUJOCO_GL={gl} ({reason}); "
            "headless rendering needs EGL (Debian: apt-get install libegl1 libopengl0 libgl1-mesa-dri)"
        )

    @staticmethod
    def _mlflow_loggers(trainer: pl.Trainer) -> list[MLFlowLogger]:
        return [logger for logger in trainer.loggers if isinstance(logger, MLFlowLogger)]

    def state_dict(self) -> dict[str, Any]:
        return {"last_video_step": self.last_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.last_step = int(state_dict["last_video_step"])


def _close_render_env(env: Any) -> None:
    """Close a rendering environment, freeing MuJoCo's render context under its own GL context first.

    gymnasium's close frees only the GL context; MuJoCo's render context would be freed later, by
    the garbage collector, in whatever GL context is current then, deleting that context's
    framebuffers (the next renderer's frames come out black).
    """
    renderer = getattr(env.unwrapped, "mujoco_renderer", None)
    for viewer in getattr(renderer, "_viewers", {}).values():
        try:
            viewer.make_context_current()
            viewer.con.free()
        except Exception:  # a half-made viewer: nothing of it to free
            pass
    try:
        env.close()
    except Exception:
        pass


@contextmanager
def _ignore_half_built_viewer() -> Iterator[None]:
    """Drop the one error gymnasium's ``OffScreenViewer.__del__`` raises for a viewer whose GL context
    could not be made (``no attribute 'opengl_context'``): an echo of the failure already reported."""
    previous = sys.unraisablehook

    def hook(unraisable: Any) -> None:
        if not (isinstance(unraisable.exc_value, AttributeError) and "opengl_context" in str(unraisable.exc_value)):
            previous(unraisable)

    sys.unraisablehook = hook
    try:
        yield
    finally:
        sys.unraisablehook = previous
