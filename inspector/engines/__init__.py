"""Inference engines behind one interface (:class:`inspector.engines.base.Engine`).

``make_engine(cfg, graph)`` builds the engine named by ``cfg.type``; TensorRT and pycuda are
imported only when a config asks for them.
"""

from __future__ import annotations

from pathlib import Path

from inspector.engines.base import Engine, TensorSpec
from inspector.engines.onnxruntime import OnnxRuntimeConfig
from inspector.engines.tensorrt import TensorRTConfig  # the config only: no tensorrt/pycuda import

EngineConfig = OnnxRuntimeConfig | TensorRTConfig


def make_engine(cfg: EngineConfig, graph: str | Path, config_file: str | None = None) -> Engine:
    """``config_file``: the camera config ``cfg`` (its ``model.engine``) comes from; errors about
    the engine section name it and the key."""
    if isinstance(cfg, OnnxRuntimeConfig):
        from inspector.engines.onnxruntime import OnnxRuntimeEngine
        return OnnxRuntimeEngine(graph, cfg, config_file)
    if isinstance(cfg, TensorRTConfig):
        from inspector.engines.tensorrt import open_tensorrt
        return open_tensorrt(graph, cfg, config_file)
    raise TypeError(f"unknown engine config {type(cfg).__name__}")


__all__ = ["Engine", "EngineConfig", "TensorSpec", "make_engine", "OnnxRuntimeConfig", "TensorRTConfig"]
