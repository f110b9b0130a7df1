"""Inference engines behind one interface (:class:`inspector.engines.base.Engine`).

``make_engine(cfg, graph)`` builds the engine named by ``cfg.type``; TensorRT and pycuda are
imported only when a config asks for them.
"""

from __future__ import annotations

from pathlib import Path

from inspector.engines.base import Engine, TensorSpec
from inspector.engines.onnxruntime import OnnxRuntimeConfig

EngineConfig = OnnxRuntimeConfig


def make_engine(cfg: EngineConfig, graph: str | Path) -> Engine:
    if isinstance(cfg, OnnxRuntimeConfig):
        from inspector.engines.onnxruntime import OnnxRuntimeEngine
        return OnnxRuntimeEngine(graph, cfg)
    raise TypeError(f"unknown engine config {type(cfg).__name__}")


__all__ = ["Engine", "EngineConfig", "TensorSpec", "make_engine", "OnnxRuntimeConfig"]
