"""GenICam cameras through harvesters and any GenTL producer (.cti)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class GenicamConfig(BaseModel):
    """Settings of a GenICam camera (``source.type: genicam``)."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["genicam"] = "genicam"
    cti: str = Field(..., description="path to the GenTL producer (.cti); relative to the config file")
    serial: str | None = Field(None, description="pick the device by serial number")
    device_id: str | None = Field(None, description="pick the device by GenTL id")
    index: int | None = Field(None, ge=0, description="pick the device by position in the list")
    pixel_format: str = Field("Mono8", description="GenICam PixelFormat, e.g. Mono8, RGBa8")
    width: int | None = Field(None, ge=1)
    height: int | None = Field(None, ge=1)
    offset_x: int = Field(0, ge=0)
    offset_y: int = Field(0, ge=0)
    fps: float | None = Field(None, gt=0, description="AcquisitionFrameRate; None = camera default")
    fetch_timeout_s: float = Field(2.0, gt=0)
    mm_per_px_across: float | None = Field(None, gt=0)
    mm_per_px_along: float | None = Field(None, gt=0)
    frames: int | None = Field(None, ge=1, description="stop after this many frames; None = endless")
