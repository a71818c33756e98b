"""Checks made before any work, so that bad input fails in a second with one line and writes
nothing: the folders a run will write to, and the MLflow store it will log to."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from urllib.parse import urlparse

from mpdp_lightning.errors import MPDPError

# A tracking server that does not answer within this many seconds is taken as absent (MLflow's
# own client would retry for minutes before failing with a traceback).
CONNECT_TIMEOUT_S = 5.0


def check_writable_folder(path: str | os.PathLike, what: str) -> None:
    """``path`` exists as a writable folder, or can be created: its nearest existing ancestor is a
    writable folder. Creates nothing."""
    wanted = Path(path).absolute()
    probe = wanted
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise MPDPError(f"{what} {path} cannot be created: {probe} is a file, not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        where = "is" if probe == wanted else f"would be created in {probe}, which is"
        raise MPDPError(f"{what} {path} {where} not writable")


def check_tracking_uri(uri: str, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """An http(s) tracking server must accept a connection within ``timeout`` seconds; a SQLite
    store's folder must exist and be writable."""
    parsed = urlparse(uri)
    if parsed.scheme in ("http", "https"):
        port = parsed.port or (443 if parsed.scheme == "https" else 80)
        try:
            socket.create_connection((parsed.hostname, port), timeout=timeout).close()
        except OSError as error:
            reason = error.strerror or type(error).__name__
            raise MPDPError(
                f"no MLflow tracking server answers at {uri} ({reason.lower()}); start one (mlflow server) or "
                "choose another --trainer.logger.init_args.tracking_uri"
            ) from None
    elif parsed.scheme == "sqlite":
        database = uri[len("sqlite:///"):] if uri.startswith("sqlite:///") else ""
        if database and database != ":memory:":
            folder = Path(database).parent
            if not folder.is_dir():
                raise MPDPError(f"the folder of the MLflow store {uri} does not exist: {folder}")
            if Path(database).exists():
                if not os.access(database, os.R_OK | os.W_OK):
                    raise MPDPError(f"the MLflow store {database} is not writable")
            else:
                check_writable_folder(folder, "the folder of the MLflow store")
