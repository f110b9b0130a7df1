"""The one interface every inference engine implements (ONNX Runtime, TensorRT)."""

from __future__ import annotations

import abc
from dataclasses import dataclass

import numpy as np

from inspector.errors import ConfigError, EngineError, MissingPackageError


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int | str | None, ...]  # symbolic or None for dynamic axes
    dtype: str  # numpy dtype name, e.g. "float32"


class Engine(abc.ABC):
    """Runs one graph. Inputs and outputs are addressed by tensor name.

    ``run`` takes host numpy arrays (NCHW float32 for the shipped models) and returns host numpy
    arrays. An engine may return views into buffers it owns: callers copy what they keep past
    the next ``run`` call.
    """

    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    #: what actually ran, for logs and the status line, e.g. "onnxruntime:CPUExecutionProvider"
    backend: str
    #: what ran other than the config asked (a provider skipped, a fallback taken), one line
    #: each, for ``inspector check``'s warning lines; the log has them too
    warnings: tuple[str, ...] = ()

    #: submissions ``run_async`` may have in flight at once; 0 = no asynchronous path (use ``run``)
    async_depth: int = 0

    @abc.abstractmethod
    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def run_async(self, feeds: dict[str, np.ndarray]) -> int:
        """Queue one batch and return a ticket at once (engines with ``async_depth`` > 0).

        The feeds are copied before this returns. Up to ``async_depth`` tickets may be pending;
        ``collect`` them oldest first, so the upload of the next batch overlaps the current one.
        """
        raise EngineError(f"{type(self).__name__} has no asynchronous path (async_depth is 0)")

    def collect(self, ticket: int) -> dict[str, np.ndarray]:
        """Wait for ``ticket``'s outputs; they are views valid until ``async_depth`` more submits."""
        raise EngineError(f"{type(self).__name__} has no asynchronous path (async_depth is 0)")

    def close(self) -> None:  # noqa: B027 - optional hook
        pass


class MissingPackageConfigError(MissingPackageError, ConfigError):
    """An engine a camera config asks for (``model.engine.type``) whose package is not installed:
    names the config file and key, and is exit 2 as either parent is."""

    def __init__(self, file: str, key: str | None, problem: str):
        ConfigError.__init__(self, file, key, problem)


def config_where(config_file: str | None, key: str) -> str:
    """``cam.yaml: model.engine.providers`` (the key alone where the file is not known), to start
    an error message about a config's engine section."""
    return f"{config_file}: {key}" if config_file else key
