"""Frame sources: GenICam camera, replay of recorded frames, synthetic strip.

``make_source(cfg, camera_id)`` builds the source named by ``cfg.type``; heavy imports
(harvesters) happen only for the source that needs them.
"""

from __future__ import annotations

from pathlib import Path

from inspector.sources.base import Source
from inspector.sources.genicam import GenicamConfig
from inspector.sources.replay import ReplayConfig
from inspector.sources.synthetic import SyntheticConfig

SourceConfig = GenicamConfig | ReplayConfig | SyntheticConfig


def make_source(cfg: SourceConfig, camera_id: str, base_dir: Path | None = None,
                config_file: str = "<memory>") -> Source:
    """Build (not open) the source for ``cfg``. Relative paths resolve against ``base_dir``;
    ``config_file`` is named when a camera refuses a configured value."""
    if isinstance(cfg, SyntheticConfig):
        from inspector.sources.synthetic import SyntheticSource
        return SyntheticSource(cfg, camera_id)
    if isinstance(cfg, ReplayConfig):
        from inspector.sources.replay import ReplaySource
        return ReplaySource(cfg, camera_id, base_dir=base_dir)
    if isinstance(cfg, GenicamConfig):
        from inspector.sources.genicam import GenicamSource
        return GenicamSource(cfg, camera_id, base_dir=base_dir, config_file=config_file)
    raise TypeError(f"unknown source config {type(cfg).__name__}")


__all__ = ["Source", "SourceConfig", "make_source", "GenicamConfig", "ReplayConfig", "SyntheticConfig"]
