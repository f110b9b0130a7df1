"""Pixel size on the strip: the camera config's ``geometry`` section from what is known on site.

Across the strip (columns):

* a known strip width: ``mm_per_px_across = strip_width_mm / strip_width_px``; the width in
  pixels is given, or measured on a frame that shows both strip edges (:func:`strip_edges`:
  the strip against a darker or brighter background, edges to a tenth of a pixel);
* a target of known size: ``target_mm / target_px``, the target measured on a frame
  (:func:`target_size_px`: the largest blob that differs from its surroundings).

Along the strip (rows):

* line speed and line rate: ``mm_per_px_along = speed_mm_per_s / lines_per_s``, where an area
  camera's line rate is frame rate x frame height (contiguous frames);
* an encoder: ``mm_per_encoder_count`` goes into the config and each frame's
  ``meta["encoder_count"]`` places it on the strip; with the counts per frame the pixel size
  along follows as ``counts_per_frame x mm_per_count / frame_height``;
* a target of known height (area cameras), or square pixels (``along = across``).

The runtime then gives every defect ``area_mm2 = area_px x across x along`` and
``strip_pos_mm = frame position + centroid row x along``
(:class:`inspector.postprocess.Geometry`), which the PLC alarm rules (``min_area_mm2``,
``per_m``) read.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np
import yaml

from calibration.flat_field import grey
from calibration.frames import CalibrationInputError

__all__ = ["strip_edges", "target_size_px", "GeometryResult", "across_from_strip", "across_from_target",
           "along_from_speed", "along_from_encoder", "check_result", "snippet"]


def _otsu(values: np.ndarray) -> float:
    v = np.clip(values, 0, 255).astype(np.uint8).reshape(1, -1)
    t, _ = cv2.threshold(v, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    return float(t)


def strip_edges(image: np.ndarray) -> tuple[float, float]:
    """Left and right strip edge (columns, sub-pixel) on a frame that shows the strip between
    two background margins. The column-mean profile is split by Otsu into strip and background;
    the strip is the widest run on the side the frame centre is on; each edge is where the
    profile crosses the threshold (linear interpolation)."""
    prof = grey(image).mean(axis=0)
    t = _otsu(prof)
    hi, lo = prof[prof > t], prof[prof <= t]
    if len(hi) and len(lo):
        # halfway between the two levels: where a blurred step edge really is (Otsu's own
        # threshold can sit at the lower level of a clean two-level profile)
        t = (float(hi.mean()) + float(lo.mean())) / 2
    w = prof.size
    inside = prof > t if prof[w // 2] > t else prof <= t
    # widest run of `inside`
    d = np.diff(np.concatenate([[0], inside.astype(np.int8), [0]]))
    starts, ends = np.flatnonzero(d == 1), np.flatnonzero(d == -1)
    if not len(starts):
        raise CalibrationInputError("--image: no strip found (the column profile is flat)")
    i = int(np.argmax(ends - starts))
    a, b = int(starts[i]), int(ends[i])  # inside columns a .. b-1
    if a == 0 or b == w:
        raise CalibrationInputError("--image: the strip touches the frame border; a frame that shows "
                                    "both strip edges is needed (or give --strip-width-px)")

    def cross(i0: int, i1: int) -> float:  # threshold crossing between columns i0 and i1
        p0, p1 = float(prof[i0]), float(prof[i1])
        return i0 + (t - p0) / (p1 - p0) if p1 != p0 else (i0 + i1) / 2

    # the edge sits half a pixel outside the last inside column centre
    return cross(a - 1, a) + 0.5, cross(b - 1, b) + 0.5


def target_size_px(image: np.ndarray) -> tuple[float, float]:
    """(width, height) in pixels of the largest blob that is not background, axis-aligned to the
    frame after correcting a small rotation (minimum-area rectangle)."""
    g = grey(image)
    t = _otsu(g)
    best = None
    for mask in ((g > t), (g <= t)):
        m = mask.astype(np.uint8)
        n, cc, stats, _ = cv2.connectedComponentsWithStats(m, connectivity=8)
        h, w = m.shape
        for i in range(1, n):
            x, y, bw, bh, area = stats[i, :5]
            if x == 0 or y == 0 or x + bw == w or y + bh == h:
                continue  # touches the border: background, not the target
            if best is None or area > best[0]:
                best = (int(area), (cc == i))
    if best is None:
        raise CalibrationInputError("--image: no target found (a blob that does not touch the border)")
    ys, xs = np.nonzero(best[1])
    (cx, cy), (rw, rh), angle = cv2.minAreaRect(np.column_stack([xs, ys]).astype(np.float32))
    # pixel centres span one pixel less than the blob's extent
    rw, rh = rw + 1.0, rh + 1.0
    # OpenCV's angle convention varies by version: take the side nearer the x axis as the width
    theta = np.deg2rad(angle)
    if abs(np.cos(theta)) < abs(np.sin(theta)):
        rw, rh = rh, rw
    return float(rw), float(rh)


@dataclass
class GeometryResult:
    mm_per_px_across: float | None = None
    mm_per_px_along: float | None = None
    mm_per_encoder_count: float | None = None
    how: dict[str, str] = field(default_factory=dict)
    measured: dict[str, Any] = field(default_factory=dict)

    def section(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k in ("mm_per_px_across", "mm_per_px_along", "mm_per_encoder_count"):
            v = getattr(self, k)
            if v is not None:
                out[k] = float(f"{v:.6g}")
        return out


def _pos(name: str, v: float | None) -> float:
    if v is None or not (v > 0 and np.isfinite(v)):  # inf gave an mm per px of inf (`check` took it)
        raise CalibrationInputError(f"{name}: must be a finite number > 0, got {v}")
    return float(v)


def check_result(res: GeometryResult) -> None:
    """Each size found is a finite number > 0: inputs that are each in range can still divide to
    inf or 0 (``--strip-width-mm 1e308 --strip-width-px 1e-300``)."""
    for k, v in res.section().items():
        if not (np.isfinite(v) and v > 0):
            raise CalibrationInputError(f"{k} comes out as {v:g} ({res.how.get(k, 'from the values given')}): "
                                        f"the values given are out of any real range")


def across_from_strip(width_mm: float, width_px: float | None = None,
                      image: np.ndarray | None = None) -> tuple[float, dict]:
    _pos("--strip-width-mm", width_mm)
    info: dict[str, Any] = {}
    if width_px is None:
        if image is None:
            raise CalibrationInputError("--strip-width-mm needs --strip-width-px or --image")
        left, right = strip_edges(image)
        width_px = right - left
        info = {"strip_edges_px": [round(left, 2), round(right, 2)], "strip_width_px": round(width_px, 2)}
    return width_mm / _pos("--strip-width-px", width_px), info


def across_from_target(size_mm: tuple[float, float | None], size_px: float | None = None,
                       image: np.ndarray | None = None) -> tuple[float, float | None, dict]:
    """mm per px across (and along, when the target's height is known and measured)."""
    w_mm, h_mm = size_mm
    _pos("--target-mm", w_mm)
    if h_mm is not None:
        _pos("--target-mm", h_mm)  # a negative or inf height gave a negative or inf size along
    if size_px is not None:
        return w_mm / _pos("--target-px", size_px), None, {}
    if image is None:
        raise CalibrationInputError("--target-mm needs --target-px or --image")
    w_px, h_px = target_size_px(image)
    along = h_mm / h_px if h_mm else None
    return w_mm / w_px, along, {"target_px": [round(w_px, 2), round(h_px, 2)]}


def along_from_speed(speed_m_min: float, line_rate_hz: float | None = None, frame_rate: float | None = None,
                     frame_height: int | None = None) -> tuple[float, dict]:
    v = _pos("--line-speed-m-min", speed_m_min) * 1000.0 / 60.0  # mm/s
    if line_rate_hz is None:
        if frame_rate is None or frame_height is None:
            raise CalibrationInputError("--line-speed-m-min needs --line-rate or --frame-rate with "
                                        "--frame-height (or --image for the height)")
        line_rate_hz = _pos("--frame-rate", frame_rate) * _pos("--frame-height", frame_height)
    return v / _pos("--line-rate", line_rate_hz), {"speed_mm_s": round(v, 3), "line_rate_hz": line_rate_hz}


def along_from_encoder(mm_per_count: float, counts_per_frame: float | None,
                       frame_height: int | None) -> tuple[float | None, dict]:
    _pos("--encoder-mm-per-count", mm_per_count)
    if counts_per_frame is None:
        return None, {}
    if frame_height is None:
        raise CalibrationInputError("--counts-per-frame needs --frame-height (or --image)")
    mm = _pos("--counts-per-frame", counts_per_frame) * mm_per_count
    return mm / _pos("--frame-height", frame_height), {"mm_per_frame": round(mm, 4)}


def snippet(res: GeometryResult) -> str:
    """The camera config's ``geometry`` section as YAML, with how each value was found."""
    lines = [f"# {k}: {v}" for k, v in res.how.items()]
    return "\n".join(lines + [yaml.safe_dump({"geometry": res.section()}, sort_keys=False).rstrip()]) + "\n"
