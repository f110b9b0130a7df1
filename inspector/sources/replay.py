"""Replay of recorded frames: a folder of images or a video file, at a set frame rate."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class ReplayConfig(BaseModel):
    """Settings of a replay source (``source.type: replay``)."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["replay"] = "replay"
    path: str = Field(..., description="folder of images or a video file; relative to the config file")
    pattern: str = Field("*", description="glob for image files inside a folder")
    fps: float = Field(10.0, ge=0, description="0 = as fast as the pipeline takes them")
    loop: bool = False
    color: Literal["gray", "rgb"] = "gray"
    mm_per_px_across: float | None = Field(None, gt=0)
    mm_per_px_along: float | None = Field(None, gt=0)
    frames: int | None = Field(None, ge=1, description="stop after this many frames; None = all")
