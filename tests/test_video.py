"""Evaluation videos: short real runs that render headless (EGL) into the MLflow run, a resumed
run that does not repeat a video, and a run whose rendering fails with one warning and goes on."""

import ctypes.util
import gc
import sys
import warnings

import imageio.v3 as iio
import pytest
from gymnasium.envs.mujoco import mujoco_rendering
from mlflow.tracking import MlflowClient

from helpers import fit_args, tracking_uri
from mpdp_lightning.training.callbacks.video import EvaluationVideo, artifact_name
from mpdp_lightning.cli import main

WIDTH, HEIGHT, MAX_FRAMES = 64, 48, 10


def _video_args(**settings) -> list[str]:
    """The ``--video.*`` flags of a run that makes videos (``fit_args`` switches them off)."""
    return ["--video.enabled", "true", *[arg for key, value in settings.items() for arg in (f"--video.{key}", str(value))]]


def _only_run(client):
    runs = client.search_runs([client.get_experiment_by_name("mpdp").experiment_id])
    assert len(runs) == 1
    return runs[0]


def _history(client, run_id, metric):
    return {m.step: m.value for m in client.get_metric_history(run_id, metric)}


@pytest.mark.skipif(ctypes.util.find_library("EGL") is None,
                    reason="no libEGL for headless rendering (Debian: apt-get install libegl1 libopengl0 libgl1-mesa-dri)")
def test_videos_land_in_mlflow_at_their_env_steps_and_a_resumed_run_does_not_repeat_one(in_tmp, monkeypatch):
    monkeypatch.setenv("MUJOCO_GL", "egl")
    video = _video_args(video_every=200, width=WIDTH, height=HEIGHT, max_frames=MAX_FRAMES)
    main(fit_args("inverted_pendulum", 300, *video))  # at 200, and at the end (300)
    client = MlflowClient(tracking_uri())
    run_id = _only_run(client).info.run_id
    main(fit_args("inverted_pendulum", 400, *video, "--ckpt_path", str(in_tmp / "runs/checkpoints" / run_id / "last.ckpt")))

    run = _only_run(client)
    assert run.info.status == "FINISHED"
    assert [a.path for a in client.list_artifacts(run_id, "video")] == [artifact_name(s) for s in (200, 300, 400)]
    video_steps = sorted(m.step for m in client.get_metric_history(run_id, "time/video_seconds"))
    assert video_steps == [200, 300, 400]  # none again at 300 after resuming
    # The video replays the first evaluation episode (same seed, same deterministic policy):
    # the start state and one frame per env step (inverted_pendulum renders every step), cut at MAX_FRAMES.
    eval_length = _history(client, run_id, "eval/length")
    for step in (200, 300, 400):
        frames = iio.imread(client.download_artifacts(run_id, artifact_name(step), str(in_tmp)), plugin="FFMPEG", index=None)
        assert frames.shape == (min(int(eval_length[step]) + 1, MAX_FRAMES), HEIGHT, WIDTH, 3), step
        assert frames.std() > 1.0, f"the frames at {step} are blank"


def test_a_failing_renderer_warns_once_and_training_goes_on(in_tmp, monkeypatch):
    def no_gl(width, height):
        raise RuntimeError("no EGL display (simulated)")

    monkeypatch.setenv("MUJOCO_GL", "egl")
    monkeypatch.setitem(mujoco_rendering._ALL_RENDERERS, "egl", no_gl)
    unraisable = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        main(fit_args("inverted_pendulum", 300, *_video_args(video_every=100, width=WIDTH, height=HEIGHT)))
        gc.collect()

    messages = [str(w.message) for w in caught if "video" in str(w.message)]
    assert len(messages) == 1 and "no EGL display (simulated)" in messages[0], messages
    assert not unraisable  # gymnasium's half-made viewer adds no second message on stderr
    client = MlflowClient(tracking_uri())
    run = _only_run(client)
    assert run.info.status == "FINISHED"
    assert sorted(_history(client, run.info.run_id, "eval/return")) == [100, 200, 300]
    assert client.list_artifacts(run.info.run_id, "video") == []
    assert _history(client, run.info.run_id, "time/video_seconds") == {}


@pytest.mark.parametrize("bad", [{"width": 63}, {"height": 0}, {"max_frames": 0}, {"video_every": -1}, {"fps": 0}])
def test_bad_video_settings_are_refused(bad):
    with pytest.raises(ValueError):
        EvaluationVideo(**bad)
