"""Errors that the command line reports as one line, without a traceback."""

import re


class MPDPError(Exception):
    """Bad input or a run that cannot go on; the CLI prints ``error: <message>`` and exits 2."""


class NonFiniteLossError(MPDPError):
    """A loss became NaN or inf; the run stops and keeps its last good checkpoint."""


class CheckpointError(MPDPError):
    """A checkpoint that is missing, unreadable or not from this kind of run."""


class UnknownTaskError(MPDPError, ValueError):
    """A task name that is not in the registry."""


class RunInterrupted(BaseException):
    """Ctrl-C stopped the run (after saving at an update boundary, or at once on a second Ctrl-C).

    A BaseException, like KeyboardInterrupt, so that no ``except Exception`` swallows it; the CLI
    marks the MLflow run KILLED, prints what was saved and exits 128 + the signal number.
    """

    def __init__(self, signum: int, saved: bool) -> None:
        super().__init__(f"interrupted by signal {signum}")
        self.signum, self.saved = signum, saved


_NONE_ALTERNATIVE = re.compile(r" - Expected a <class 'NoneType'>.*$")
_TYPE_NAME = re.compile(r"<class '(?:[\w.]+\.)?(\w+)'>")


def describe_parser_error(message: str) -> str:
    """jsonargparse's message, key and expected type first: ``model.gamma: expected
    NonNegativeFloat, got 'abc' (...)`` instead of ~200 characters of Union subtypes first."""
    text = " ".join(str(message).split())
    keys = re.findall(r'Parser key "([^"]+)":', text)
    owner = re.search(r"Problem with given class_path '([^']+)': ", text)
    rest = text[owner.end():] if owner else text
    last_key = list(re.finditer(r'Parser key "[^"]+": ', rest))
    reason = rest[last_key[-1].end():] if last_key else rest
    reason = _NONE_ALTERNATIVE.sub("", reason).strip(" -")
    given = re.search(r"Given value: (.*)$", text)
    if found := re.match(r"Not of type (\w+): (.*)", reason):
        reason = f"expected {found[1]} ({found[2]})"
    elif found := re.search(r"Does not validate against any of the Union subtypes Subtypes: \[(.*?)\] Errors: (.*)", reason):
        types = _TYPE_NAME.sub(r"\1", found[1]).replace("NoneType", "null").replace("typing.", "")
        errors = [e.strip() for e in re.split(r"(?:^| )- ", found[2]) if e.strip() and not e.startswith("Expected a")]
        # a class's own check (e.g. "unknown activation") says more than the list of types
        reason = errors[0] if errors else f"expected one of [{types}]" + (f", got {given[1]}" if given else "")
    elif found := re.search(r"Option '([^']+)' is not accepted", reason):
        reason = f"unknown option '{found[1]}'" + (f" of {owner[1]}" if owner else "")
    elif owner and re.search(r"has no attribute|No module named|not accessible", reason):
        reason = f"cannot import the class '{owner[1]}' ({reason})"
    key = ".".join(keys[:1] + (keys[1:] if owner else [])) if keys else ""
    described = f"{key}: {reason}" if key else reason
    return described if len(described) < 400 else described[:397] + "..."
