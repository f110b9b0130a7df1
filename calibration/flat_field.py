"""Flat-field maps from reference frames: ``corrected = (raw - offset) * gain``.

Two ways to get the maps:

* **dark + bright references**: ``offset`` = the mean dark frame (lens capped or lights off),
  ``gain`` = target / (mean bright frame - offset), the bright frames showing a uniform
  surface (a white target or a clean calibration sheet) under the line's lighting;
* **median of N normal frames**: with a moving strip every pixel sees many different places of
  the strip, so the per-pixel median over frames keeps the lighting and the sensor's response and
  drops the surface (a defect is in few frames). ``offset`` is the dark frame where given, else 0.
  Texture that stays in place along the strip (rolling grain: streaks in the rolling direction)
  survives the median, so the gain is smoothed across columns (``smooth_px``, default 2 % of
  the width) to keep lighting and lose the grain.

``profile="columns"`` averages over rows first and stores 1xW maps: the right model for a
line-scan camera, or an area camera whose lighting varies only across the strip; it also needs far
fewer reference frames. ``target`` (the grey level a uniform surface reads after correction)
defaults to the mean of the bright signal, so the corrected frames keep the overall brightness the
model was trained on. Gains are capped at ``max_gain``; pixels with (almost) no signal (dead
pixels, off-strip columns) get gain 1 and are counted in the file's metadata.

The runtime side (load, apply without per-frame allocation) is :class:`inspector.flatfield.FlatField`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Iterable, Literal

import cv2
import numpy as np

from inspector.flatfield import FlatField

from calibration.frames import CalibrationInputError

log = logging.getLogger(__name__)

__all__ = ["FlatFieldSettings", "grey", "stack_frames", "compute_flat_field", "column_spread", "flatness"]


@dataclass(frozen=True)
class FlatFieldSettings:
    profile: Literal["2d", "columns"] = "2d"
    smooth_px: float = 0.0
    target: float | None = None
    max_gain: float = 8.0
    min_signal: float = 2.0  # grey levels of (bright - dark) below which a pixel has no usable signal


def grey(image: np.ndarray) -> np.ndarray:
    """float32 HxW: the frame itself, or its BT.601 luma (the weights the adapters use)."""
    if image.ndim == 2:
        return image.astype(np.float32)
    return image[:, :, :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)


def stack_frames(frames: Iterable[tuple[str, np.ndarray]], what: str) -> tuple[np.ndarray, list[str]]:
    """N x H x W float32 of grey frames; all must have one shape (the file that differs is named)."""
    out: list[np.ndarray] = []
    names: list[str] = []
    for name, img in frames:
        g = grey(img)
        if out and g.shape != out[0].shape:
            raise CalibrationInputError(f"{what}: {name} is {g.shape[0]}x{g.shape[1]} (HxW) but "
                                        f"{names[0]} is {out[0].shape[0]}x{out[0].shape[1]}; flat-field "
                                        f"frames must share the camera's frame size")
        out.append(g)
        names.append(name)
    if not out:
        raise CalibrationInputError(f"{what}: no frames")
    return np.stack(out), names


def compute_flat_field(bright: np.ndarray, dark: np.ndarray | None, settings: FlatFieldSettings,
                       meta: dict | None = None) -> FlatField:
    """Maps from a bright image (mean of references, or median of normal frames) and an
    optional dark image, both float32 HxW."""
    s = settings
    if not (np.isfinite(s.max_gain) and s.max_gain > 1):  # nan crashed on the maps
        raise CalibrationInputError(f"--max-gain: must be a finite number > 1, got {s.max_gain}")
    if not (np.isfinite(s.smooth_px) and s.smooth_px >= 0):  # nan and -1 were taken as 0
        raise CalibrationInputError(f"--smooth-px: must be a finite number >= 0, got {s.smooth_px}")
    if s.smooth_px > bright.shape[1]:
        # a Gaussian wider than the frame is a flat mean; far wider crashed in OpenCV
        raise CalibrationInputError(f"--smooth-px: must be at most the frame width ({bright.shape[1]} px), "
                                    f"got {s.smooth_px:g}")
    offset = np.zeros_like(bright) if dark is None else dark.astype(np.float32)
    if offset.shape != bright.shape:
        raise CalibrationInputError(f"--dark: dark frames are {offset.shape[1]}x{offset.shape[0]}, bright "
                                    f"ones {bright.shape[1]}x{bright.shape[0]}")
    signal = bright.astype(np.float32) - offset
    if s.profile == "columns":
        signal = signal.mean(axis=0, keepdims=True)
        offset = offset.mean(axis=0, keepdims=True)
    if s.smooth_px > 0:
        if signal.shape[0] == 1:
            signal = cv2.GaussianBlur(signal, (0, 0), sigmaX=s.smooth_px, sigmaY=1e-3,
                                      borderType=cv2.BORDER_REFLECT)
        else:
            signal = cv2.GaussianBlur(signal, (0, 0), sigmaX=s.smooth_px, borderType=cv2.BORDER_REFLECT)
    ok = signal >= s.min_signal
    if not ok.any():
        raise CalibrationInputError(f"the bright frames carry no signal above the dark level "
                                    f"(max {float(signal.max()):.1f} grey levels): wrong frames or lights off?")
    target = float(s.target) if s.target is not None else float(signal[ok].mean())
    if not 0 < target <= 255:
        raise CalibrationInputError(f"--target-level: must be in (0, 255], got {target}")
    gain = np.ones_like(signal)
    gain[ok] = target / signal[ok]
    capped = int((gain > s.max_gain).sum())
    np.clip(gain, 0.0, s.max_gain, out=gain)
    info = {
        **(meta or {}), "profile": s.profile, "smooth_px": s.smooth_px, "target_level": round(target, 3),
        "max_gain": s.max_gain, "pixels_without_signal": int((~ok).sum()), "gains_capped": capped,
        "gain_range": [round(float(gain.min()), 4), round(float(gain.max()), 4)],
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    return FlatField(gain, offset, info)


def column_spread(image: np.ndarray) -> float:
    """(max - min) / mean of the column means, in %: how much brightness varies across the width."""
    cols = grey(image).mean(axis=0) if image.ndim >= 2 else image
    m = float(cols.mean())
    return float((cols.max() - cols.min()) / m * 100.0) if m > 0 else float("nan")


def flatness(ff: FlatField, frames: np.ndarray) -> dict[str, float]:
    """Column spread of the mean of ``frames`` (N x H x W) before and after correction, in %."""
    mean = frames.mean(axis=0)
    return {"column_spread_before_pct": round(column_spread(mean), 3),
            "column_spread_after_pct": round(column_spread(ff.apply_float(mean)), 3)}
