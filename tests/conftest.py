import os

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import pytest  # noqa: E402
import torch  # noqa: E402

import seed_store  # noqa: E402
from mpdp_lightning.experiments.compare import load_comparison  # noqa: E402


@pytest.fixture(autouse=True)
def _seeded_and_no_argv(monkeypatch):
    torch.manual_seed(0)
    monkeypatch.setattr("sys.argv", ["mpdp"])  # the CLI under test gets its args explicitly


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    """Run in an empty folder: the MLflow store, runs/ and checkpoints land there."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture(scope="session")
def store(tmp_path_factory):
    """tests/seed_store.py's synthetic MLflow store, built once per session (creating an MLflow
    database takes seconds), for the tests that only read it or add summary runs."""
    return seed_store.build(tmp_path_factory.mktemp("seed_store"))


@pytest.fixture(scope="session")
def s1(store):
    """(runs, curves) of the store's sweep s1."""
    return load_comparison(store, "mpdp", sweep="s1")
