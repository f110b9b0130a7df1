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
