import os

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seeded_and_no_argv(monkeypatch):
    torch.manual_seed(0)
    monkeypatch.setattr("sys.argv", ["mpdp"])  # the CLI under test gets its args explicitly


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    """Run in an empty folder: the MLflow store, runs/ and checkpoints land there."""
    monkeypatch.chdir(tmp_path)
    return tmp_path
