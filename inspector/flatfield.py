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
import logging
import zipfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from inspector.errors import FrameError

__all__ = ["FlatField", "FLAT_FIELD_FORMAT"]

log = logging.getLogger(__name__)

FLAT_FIELD_FORMAT = 1
_ZIP_MAGIC = b"PK\x03\x04"  # np.savez writes a zip archive
_NPY_MAGIC = b"\x93NUMPY"


def _numpy_problem(e: Exception) -> str:
    """numpy's reason in one line, without its advice to load pickles (``allow_pickle=True``
    would run code from the file): such a member is simply not one of ours."""
    text = str(e).strip() or type(e).__name__
    if "pickle" in text.lower():
        return "it holds pickled objects, which are never loaded"
    return text.splitlines()[0]


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
        if p.is_dir():
            raise ValueError(f"{p}: is a folder, expected a flat-field .npz file")
        if not p.is_file():
            raise ValueError(f"{p}: flat-field file not found")
        not_ours = f"{p}: not a flat-field .npz written by `inspector calibrate flat-field`"
        try:
            with open(p, "rb") as f:
                magic = f.read(len(_NPY_MAGIC))
        except OSError as e:
            raise ValueError(f"{p}: flat-field file not readable ({e})") from None
        if magic == _NPY_MAGIC:
            raise ValueError(f"{p}: a single .npy array, expected an .npz with gain and offset")
        if not magic.startswith(_ZIP_MAGIC):
            # np.load takes anything else for a pickle, and its error then advises loading it
            # with allow_pickle: running code from a file that is not ours at all
            raise ValueError(f"{not_ours} (not an .npz archive)")
        try:
            z = np.load(p, allow_pickle=False)
        except (OSError, EOFError, ValueError, zipfile.BadZipFile) as e:  # damaged or truncated
            raise ValueError(f"{not_ours} ({_numpy_problem(e)})") from None
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
            except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as e:
                # a damaged member, or an object (pickled) one
                raise ValueError(f"{not_ours} ({_numpy_problem(e)})") from None
        return cls(gain, offset, meta, str(p))

    def spread_warning(self) -> str | None:
        """One line when the maps' own figures (``meta``: the column brightness spread of the
        calibration frames before and after correction, as ``inspector calibrate flat-field``
        records them) say the correction makes that spread worse; None otherwise."""
        before = self.meta.get("column_spread_before_pct")
        after = self.meta.get("column_spread_after_pct")
        if before is None or after is None or not after > before:
            return None
        return (f"the correction increases the column brightness spread of its own frames "
                f"({before:.2f} % -> {after:.2f} %): were they frames of a uniform or moving "
                "surface? A test pattern, a standing strip or a mark at one place in every frame "
                "is learnt as lighting; check the plot before a camera config uses these maps")

    def save(self, path: str | Path) -> Path:
        """Write the ``.npz``; maps that make their frames less flat are written all the same,
        with a warning (:meth:`spread_warning`): whoever writes them is the one to tell."""
        warning = self.spread_warning()
        if warning:
            log.warning("flat-field maps: %s", warning)
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
