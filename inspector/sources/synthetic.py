"""A procedural moving steel strip with injected defects of known mask.

The strip runs downwards through the frame (rows = along the strip, columns = across it). Each
frame shows rolling grain (streaks along the rolling direction), an illumination fall-off across
the width, sensor noise, and, at a configured rate, defects of three classes whose class-index
mask is returned as ``Frame.truth``:

====  ===========  ==============================================================
id    class        look
====  ===========  ==============================================================
1     inclusion    dark, elongated, ragged streak along the rolling direction
2     patches      a larger region of changed brightness with an irregular edge
3     scratches    a thin straight line, bright or dark, at a shallow angle
====  ===========  ==============================================================

The class ids follow the NEU-Seg masks, so models trained here and on NEU-Seg share heads.

Example::

    from inspector.sources.synthetic import SyntheticConfig, SyntheticSource
    src = SyntheticSource(SyntheticConfig(width=640, height=128, fps=0), camera_id="sim")
    with src:
        frame = src.read()   # frame.image: 128x640 uint8, frame.truth: class ids
"""

from __future__ import annotations

import time
from typing import Literal

import cv2
import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from inspector.frame import Frame
from inspector.sources.base import Source

CLASS_NAMES = ("background", "inclusion", "patches", "scratches")


class SyntheticConfig(BaseModel):
    """Settings of the synthetic strip (``source.type: synthetic``)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # fps: .inf passed ge=0

    type: Literal["synthetic"] = "synthetic"
    width: int = Field(1600, ge=32, le=16384, description="pixels across the strip")
    height: int = Field(256, ge=32, le=16384, description="pixels along the strip per frame")
    fps: float = Field(20.0, ge=0, description="frame rate; 0 = as fast as the pipeline takes them")
    line_speed_m_min: float = Field(60.0, gt=0, description="strip speed, metres per minute")
    strip_width_mm: float = Field(1600.0, gt=0, description="strip width imaged across the frame")
    defect_rate: float = Field(0.5, ge=0, le=1, description="probability that a frame has defects")
    max_defects: int = Field(2, ge=1, le=16)
    classes: list[Literal["inclusion", "patches", "scratches"]] = Field(
        default_factory=lambda: ["inclusion", "patches", "scratches"]
    )
    contrast: float = Field(1.0, gt=0, le=4, description="scales how strongly defects stand out")
    channels: Literal[1, 3] = 1
    frames: int | None = Field(None, ge=1, description="stop after this many frames; None = endless")
    seed: int = 0


class StripRenderer:
    """Renders strip frames and defect masks; used by the source and by training datasets."""

    def __init__(self, width: int, height: int, seed: int = 0, contrast: float = 1.0,
                 classes: tuple[str, ...] = CLASS_NAMES[1:], max_defects: int = 2):
        self.width = width
        self.height = height
        self.contrast = contrast
        self.class_ids = [CLASS_NAMES.index(c) for c in classes]
        self.max_defects = max_defects
        rng = np.random.default_rng(seed)
        # Rolling grain: a per-column streak profile that persists along the strip.
        cols = rng.normal(0.0, 1.0, width).astype(np.float32)
        self._grain = (cv2.GaussianBlur(cols[None, :], (0, 0), 1.2)[0] * 9.0).astype(np.float32)
        x = np.linspace(-1.0, 1.0, width, dtype=np.float32)
        # Lighting falls off towards both edges of the strip (about 25 % at the edges).
        self._illum = (1.0 - 0.25 * x**2).astype(np.float32)
        # A bank of noise fields, elongated along the strip, reused with random offsets so that a
        # frame costs a few slices rather than fresh random fields.
        bank_h = height * 2
        self._bank = []
        for _ in range(4):
            n = rng.normal(0.0, 1.0, (bank_h, width)).astype(np.float32)
            n = cv2.GaussianBlur(n, (0, 0), sigmaX=0.8, sigmaY=6.0) * 6.0
            self._bank.append(n)
        self._fine = rng.normal(0.0, 2.5, (bank_h, width)).astype(np.float32)

    def background(self, rng: np.random.Generator) -> np.ndarray:
        """A defect-free frame as float32 grey levels (not yet clipped)."""
        h = self.height
        field = self._bank[int(rng.integers(len(self._bank)))]
        r0 = int(rng.integers(0, field.shape[0] - h))
        r1 = int(rng.integers(0, self._fine.shape[0] - h))
        level = 128.0 + float(rng.normal(0.0, 4.0))
        img = level + self._grain[None, :] + field[r0:r0 + h] + self._fine[r1:r1 + h]
        img *= self._illum[None, :]
        return img

    def defect(self, img: np.ndarray, truth: np.ndarray, cls: int, rng: np.random.Generator) -> None:
        """Paint one defect of class ``cls`` into ``img`` (float32) and ``truth`` in place."""
        h, w = img.shape
        m = np.zeros((h, w), np.uint8)
        c = self.contrast
        if cls == 1:  # inclusion: dark ragged streak along the strip
            length = int(rng.integers(h // 3, h))
            x0 = int(rng.integers(8, w - 8))
            y0 = int(rng.integers(0, h - length + 1))
            thick = int(rng.integers(3, 8))
            pts = []
            x = float(x0)
            for y in range(y0, y0 + length, 4):
                x += rng.normal(0.0, 0.8)
                pts.append((int(round(x)), y))
            cv2.polylines(m, [np.array(pts, np.int32)], False, 1, thickness=thick)
            blob = rng.random((h, w)).astype(np.float32)
            m &= (cv2.GaussianBlur(blob, (0, 0), 2.0) > 0.47).astype(np.uint8)
            if m.sum() < 20:
                cv2.polylines(m, [np.array(pts, np.int32)], False, 1, thickness=thick)
            delta = -c * float(rng.uniform(35, 60))
        elif cls == 2:  # patches: large irregular region of changed brightness
            rh = int(rng.integers(h // 4, h // 2 + 1))
            rw = int(rng.integers(max(16, w // 40), max(24, w // 10)))
            cy = int(rng.integers(rh // 2, h - rh // 2))
            cx = int(rng.integers(rw // 2, w - rw // 2))
            cv2.ellipse(m, (cx, cy), (rw // 2, rh // 2), float(rng.uniform(-20, 20)), 0, 360, 1, -1)
            noise = cv2.GaussianBlur(rng.random((h, w)).astype(np.float32), (0, 0), 6.0)
            edge = cv2.dilate(m, np.ones((9, 9), np.uint8)) - cv2.erode(m, np.ones((9, 9), np.uint8))
            m = np.where(edge > 0, (noise > 0.5).astype(np.uint8), m)
            m = cv2.morphologyEx(m, cv2.MORPH_OPEN, np.ones((3, 3), np.uint8))
            delta = c * float(rng.choice([-1.0, 1.0]) * rng.uniform(30, 45))
        else:  # scratches: thin straight line at a shallow angle to the rolling direction
            length = int(rng.integers(h // 2, int(h * 1.5)))
            angle = np.deg2rad(rng.uniform(-30, 30))
            cx, cy = float(rng.uniform(20, w - 20)), float(rng.uniform(0, h))
            dx, dy = np.sin(angle) * length / 2, np.cos(angle) * length / 2
            p0 = (int(cx - dx), int(cy - dy))
            p1 = (int(cx + dx), int(cy + dy))
            cv2.line(m, p0, p1, 1, thickness=int(rng.integers(2, 4)))
            delta = c * float(rng.choice([-1.0, 1.0]) * rng.uniform(45, 70))
        sel = m.astype(bool)
        if not sel.any():
            return
        # Soft edge so the defect is not a perfect step, but the label stays the painted region.
        soft = cv2.GaussianBlur(m.astype(np.float32), (0, 0), 0.8)
        img += delta * soft
        truth[sel] = cls

    def render(self, rng: np.random.Generator, defect_rate: float) -> tuple[np.ndarray, np.ndarray]:
        """One frame: (uint8 HxW image, uint8 HxW class-index truth)."""
        img = self.background(rng)
        truth = np.zeros(img.shape, np.uint8)
        if rng.random() < defect_rate:
            for _ in range(int(rng.integers(1, self.max_defects + 1))):
                self.defect(img, truth, int(rng.choice(self.class_ids)), rng)
        return np.clip(img, 0, 255).astype(np.uint8), truth


class SyntheticSource(Source):
    """Frames of the procedural strip at the configured rate (see module docs)."""

    def __init__(self, cfg: SyntheticConfig, camera_id: str):
        self.cfg = cfg
        self.camera_id = camera_id
        self._renderer: StripRenderer | None = None
        self._rng = np.random.default_rng(cfg.seed)
        self._next_id = 0
        self._t_next = 0.0
        speed_mm_s = cfg.line_speed_m_min * 1000.0 / 60.0
        self.mm_per_px_across = cfg.strip_width_mm / cfg.width
        # Along the strip one frame covers what passes in one frame period; free-running frames
        # are taken as square pixels.
        self.frame_length_mm = speed_mm_s / cfg.fps if cfg.fps > 0 else cfg.height * self.mm_per_px_across

    def open(self) -> None:
        self._renderer = StripRenderer(self.cfg.width, self.cfg.height, self.cfg.seed,
                                       self.cfg.contrast, tuple(self.cfg.classes), self.cfg.max_defects)
        self._t_next = time.monotonic()

    def describe(self) -> str:
        c = self.cfg
        return (f"synthetic strip {c.height}x{c.width} @ {c.fps:g} fps, "
                f"{c.line_speed_m_min:g} m/min, defect rate {c.defect_rate:g}")

    def read(self) -> Frame | None:
        if self._renderer is None:
            raise RuntimeError("SyntheticSource.read() before open()")
        if self.cfg.frames is not None and self._next_id >= self.cfg.frames:
            return None
        if self.cfg.fps > 0:
            # Pace like a camera: frame n is due at t0 + n/fps; if we are late we do not catch up
            # by bursting, we just deliver now.
            now = time.monotonic()
            if self._t_next > now:
                time.sleep(self._t_next - now)
            self._t_next = max(self._t_next, now) + 1.0 / self.cfg.fps
        img, truth = self._renderer.render(self._rng, self.cfg.defect_rate)
        if self.cfg.channels == 3:
            img = np.repeat(img[:, :, None], 3, axis=2)
        fid = self._next_id
        self._next_id += 1
        return Frame(camera_id=self.camera_id, frame_id=fid, t_capture_ns=time.time_ns(), image=img,
                     strip_pos_mm=fid * self.frame_length_mm, truth=truth,
                     meta={"mm_per_px_across": self.mm_per_px_across,
                           "mm_per_px_along": self.frame_length_mm / self.cfg.height})

    def close(self) -> None:
        self._renderer = None
