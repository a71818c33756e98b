"""Errors that the command line reports as one line, without a traceback."""


class MPDPError(Exception):
    """Bad input or a run that cannot go on; the CLI prints ``error: <message>`` and exits 2."""


class NonFiniteLossError(MPDPError):
    """A loss became NaN or inf; the run stops and keeps its last good checkpoint."""


class CheckpointError(MPDPError):
    """A checkpoint that is missing, unreadable or not from this kind of run."""


class UnknownTaskError(MPDPError, ValueError):
    """A task name that is not in the registry."""
