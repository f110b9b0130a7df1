"""The one interface every inference engine implements (ONNX Runtime, TensorRT)."""

from __future__ import annotations

import abc
from dataclasses import dataclass

import numpy as np


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

    @abc.abstractmethod
    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def close(self) -> None:  # noqa: B027 - optional hook
        pass
