"""Flat-field correction of frames: ``corrected = (raw - offset) * gain``, per pixel.

Lighting falls off towards the strip edges and pixels differ in dark level and sensitivity; the
correction makes a uniform surface read uniform before the model sees it. The maps come from
``inspector calibrate flat-field`` (dark and bright reference frames, or the median of normal
frames) as an ``.npz`` file, and are applied on the adapter's input side when a camera config
names them (``preprocess.flat_field``), so the model and every residual computed against the
frame see the corrected image.

Maps are HxW (area cameras) or 1xW (one gain per column: line-scan cameras, or lighting that only
varies across the strip); a frame of another width or height is refused with the file named.
Colour frames get the same map on each channel.

File format (``np.savez``): ``gain`` and ``offset`` (float32, same shape), ``format`` (1), and
``meta`` (a JSON string: method, frames used, target level, creation time).

Example::

    ff = FlatField.load("line1-top-flat.npz")
    corrected = ff.apply(frame.image)   # uint8, same shape; the buffer is reused next call
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from inspector.errors import FrameError

__all__ = ["FlatField", "FLAT_FIELD_FORMAT"]

FLAT_FIELD_FORMAT = 1


class FlatField:
    """Gain and offset maps plus the preallocated buffers to apply them without allocating."""

    def __init__(self, gain: np.ndarray, offset: np.ndarray, meta: dict[str, Any] | None = None,
                 source: str = "<memory>"):
        gain = np.ascontiguousarray(gain, np.float32)
        offset = np.ascontiguousarray(offset, np.float32)
        if gain.ndim != 2 or gain.shape != offset.shape:
            raise ValueError(f"{source}: gain {gain.shape} and offset {offset.shape} must be two "
                             f"maps of one shape, HxW or 1xW")
        if not (np.isfinite(gain).all() and np.isfinite(offset).all()):
            raise ValueError(f"{source}: gain/offset maps hold NaN or infinite values")
        self.gain = gain
        self.offset = offset
        self.meta = dict(meta or {})
        self.source = source
        # one float32 work buffer and one uint8 result per frame shape: steady state allocates nothing
        self._bufs: dict[tuple[int, ...], tuple[np.ndarray, np.ndarray]] = {}

    @property
    def shape(self) -> tuple[int, int]:
        return self.gain.shape  # type: ignore[return-value]

    @classmethod
    def load(cls, path: str | Path) -> "FlatField":
        """Read an ``.npz`` written by :meth:`save`; ValueError names the file and what is wrong."""
        p = Path(path)
        if not p.is_file():
            raise ValueError(f"{p}: flat-field file not found")
        try:
            z = np.load(p, allow_pickle=False)
        except (OSError, EOFError, ValueError) as e:  # not a zip / npy, or truncated
            raise ValueError(f"{p}: not a readable flat-field .npz ({e})") from None
        if not hasattr(z, "files"):
            raise ValueError(f"{p}: a single .npy array, expected an .npz with gain and offset")
        with z:
            missing = sorted({"gain", "offset"} - set(z.files))
            if missing:
                raise ValueError(f"{p}: not a flat-field file: no {', '.join(missing)} array(s) "
                                 f"(has {sorted(z.files)})")
            fmt = int(z["format"]) if "format" in z.files else FLAT_FIELD_FORMAT
            if fmt != FLAT_FIELD_FORMAT:
                raise ValueError(f"{p}: flat-field format {fmt}, this version reads {FLAT_FIELD_FORMAT}")
            try:
                meta = json.loads(str(z["meta"])) if "meta" in z.files else {}
                gain, offset = z["gain"], z["offset"]
            except (OSError, ValueError) as e:  # a damaged member
                raise ValueError(f"{p}: not a readable flat-field .npz ({e})") from None
        return cls(gain, offset, meta, str(p))

    def save(self, path: str | Path) -> Path:
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        with open(p, "wb") as f:  # a file object: np.savez would otherwise append .npz to any name
            np.savez(f, gain=self.gain, offset=self.offset, format=np.int64(FLAT_FIELD_FORMAT),
                     meta=np.array(json.dumps(self.meta)))
        return p

    def _maps_for(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        h, w = image.shape[:2]
        mh, mw = self.gain.shape
        if mw != w or mh not in (1, h):
            # FrameError: the pipeline drops such a frame and goes on; at warm-up it stops the
            # start with this message (exit 2: the config names maps of another camera size)
            raise FrameError(f"{self.source}: flat-field maps are {mw}x{mh} (WxH) but the frame is "
                             f"{w}x{h}; compute them at the camera's frame size")
        if image.ndim == 3:
            return self.gain[:, :, None], self.offset[:, :, None]
        return self.gain, self.offset

    def apply(self, image: np.ndarray) -> np.ndarray:
        """The corrected frame (uint8, rounded and clipped to 0..255) in a reused buffer: valid
        until the next call with a frame of this shape."""
        gain, offset = self._maps_for(image)
        bufs = self._bufs.get(image.shape)
        if bufs is None:
            bufs = (np.empty(image.shape, np.float32), np.empty(image.shape, np.uint8))
            self._bufs[image.shape] = bufs
        work, out = bufs
        np.subtract(image, offset, out=work, dtype=np.float32)
        np.multiply(work, gain, out=work)
        work += np.float32(0.5)  # the cast below truncates: +0.5 rounds
        np.clip(work, 0.0, 255.0, out=work)
        np.copyto(out, work, casting="unsafe")
        return out

    def apply_float(self, image: np.ndarray) -> np.ndarray:
        """The corrected frame as float32 without rounding or clipping (for measuring flatness)."""
        gain, offset = self._maps_for(image)
        return (image.astype(np.float32) - offset) * gain
