"""Errors that name what was wrong, where, and what was expected."""

from __future__ import annotations


class InspectorError(Exception):
    """Base of every error the runtime raises on purpose."""


class ConfigError(InspectorError):
    """A configuration file is missing, unreadable or invalid.

    The message always names the file and, where known, the dotted key.
    """

    def __init__(self, file: str, key: str | None, problem: str):
        self.file = file
        self.key = key
        self.problem = problem
        where = f"{file}: {key}" if key else file
        super().__init__(f"{where}: {problem}")


class BundleError(InspectorError):
    """A model bundle is missing, corrupt or inconsistent (names the file)."""


class SourceError(InspectorError):
    """A frame source cannot be opened or has stopped delivering (camera gone, bad .cti, ...)."""


class SourceConfigError(SourceError, ConfigError):
    """The camera refuses a value the config asks for (a width out of its range, a pixel format
    it lacks): bad input, exit 2, naming the file and key, since no restart can make the camera
    take it. Still a SourceError, so a reopen after a reconnect treats it as a failed open."""

    def __init__(self, file: str, key: str | None, problem: str):
        ConfigError.__init__(self, file, key, problem)


class FrameError(InspectorError):
    """One frame cannot be processed (wrong shape or dtype); the pipeline drops it and goes on."""


class EngineError(InspectorError):
    """The inference engine failed to load or to run."""


class MissingPackageError(EngineError):
    """An engine's optional package (an extra: TensorRT, pycuda) is not installed. Bad input for
    this machine, exit 2: a restart cannot install it (a daemon exiting 1 was restarted every
    5 s for ever)."""


class CheckpointError(InspectorError, ValueError):
    """A training checkpoint is missing, unreadable (truncated, corrupt, not a torch file) or of
    another network; the message names the file. A ValueError too, so the training commands'
    handlers of bad input report it as one line."""


def yaml_problem(e: Exception) -> str:
    """A PyYAML error in one line, ``not valid YAML at line N, column M: <problem>`` (PyYAML's own
    text spans several lines with the offending line and a caret)."""
    mark = getattr(e, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
    return f"not valid YAML{where}: {getattr(e, 'problem', None) or e}"


def validator_message(msg: str) -> str:
    """A pydantic error message without the ``Value error, `` prefix it puts before the text of
    a validator's ValueError."""
    return msg[len("Value error, "):] if msg.startswith("Value error, ") else msg


def first_line(e: BaseException) -> str:
    """The first line of an error's message, or its type's name when the message is empty: for
    one-line logs and status texts (``str(e).splitlines()[0]`` fails on an empty message)."""
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0]


class BindError(OSError):
    """The publisher could not bind ``publish.endpoint`` (address in use, no such interface);
    ``strerror`` is the message, ``errno`` ZeroMQ's."""

    def __str__(self) -> str:
        return str(self.strerror)
