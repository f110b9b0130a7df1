"""A representative, diverse frame set for TensorRT INT8 calibration.

INT8 calibration measures the range of every activation on the frames it is given; frames that all
look alike give ranges that clip the dark coil end, the bright edge or the coarse-grain product
that the line also runs. The selection covers the pool's range of brightness and texture with few
frames: each frame gets a few cheap features (on a thumbnail at most 512 px wide):

* brightness: mean, spread (std), 2nd and 98th percentile;
* texture: mean gradient magnitude across and along the strip, and mean |Laplacian| (fine grain).

Features are standardised (median and inter-quartile range of the pool, robust to a few odd
frames), and frames are picked by k-center greedy: start at the frame nearest the pool's median
(the most typical one), then repeatedly take the frame farthest from everything picked so far. The
result covers the feature space: every pool frame is within the reported ``coverage_radius``
(standardised units) of a picked one. Deterministic: same pool, same selection.

The output folder holds only the selected frames (the INT8 calibrator reads every image in it,
``model.engine.calib_dir``) and ``selection.json`` (features of every pool frame, the picks in
order, pool vs selection ranges). Frames from a camera config are written after its flat-field
correction, if one is configured, since that is what the model sees.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import cv2
import numpy as np

from calibration.flat_field import grey
from calibration.frames import CalibrationInputError
from inspector.fileio import atomic_write_text

log = logging.getLogger(__name__)

__all__ = ["FEATURES", "frame_features", "k_center_greedy", "select_int8_set"]

FEATURES = ("mean", "std", "p2", "p98", "grad_across", "grad_along", "laplacian")
_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}


def frame_features(image: np.ndarray) -> np.ndarray:
    """The :data:`FEATURES` of one frame (float64)."""
    g = grey(image)
    h, w = g.shape
    f = max(1, int(np.ceil(w / 512)))
    if f > 1:
        g = cv2.resize(g, (max(1, w // f), max(1, h // f)), interpolation=cv2.INTER_AREA)
    p2, p98 = np.percentile(g, [2, 98])
    gx = cv2.Sobel(g, cv2.CV_32F, 1, 0, ksize=3)
    gy = cv2.Sobel(g, cv2.CV_32F, 0, 1, ksize=3)
    lap = cv2.Laplacian(g, cv2.CV_32F, ksize=1)
    return np.array([g.mean(), g.std(), p2, p98, np.abs(gx).mean(), np.abs(gy).mean(), np.abs(lap).mean()],
                    np.float64)


def standardise(feats: np.ndarray) -> np.ndarray:
    med = np.median(feats, axis=0)
    q1, q3 = np.percentile(feats, [25, 75], axis=0)
    scale = (q3 - q1) / 1.349  # IQR of a normal distribution -> its std
    fallback = feats.std(axis=0)
    scale = np.where(scale > 1e-9, scale, np.where(fallback > 1e-9, fallback, 1.0))
    return (feats - med) / scale


def k_center_greedy(z: np.ndarray, k: int) -> tuple[list[int], float]:
    """Indices of up to ``k`` distinct rows of ``z`` by k-center greedy from the row nearest the
    median, and the coverage radius (largest distance of any row to its nearest pick).

    Fewer than ``k`` when every row left equals a picked one (a pool of repeated frames, e.g. a
    stopped line): another copy adds nothing to the set, and no row is ever picked twice."""
    n = len(z)
    k = min(k, n)
    first = int(np.argmin(np.linalg.norm(z - np.median(z, axis=0), axis=1)))
    picks = [first]
    dist = np.linalg.norm(z - z[first], axis=1)
    while len(picks) < k:
        nxt = int(np.argmax(dist))  # ties: lowest index, so the result is deterministic
        if dist[nxt] <= 0:  # picked rows sit at 0 too: taking one now would repeat it
            break
        picks.append(nxt)
        dist = np.minimum(dist, np.linalg.norm(z - z[nxt], axis=1))
    return picks, float(dist.max())


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "frame"


def prepare_out(out: Path, overwrite: bool, clear: bool = True) -> None:
    """Check ``out`` can take the set; with ``clear``, remove the images already there."""
    if out.exists() and not out.is_dir():
        raise CalibrationInputError(f"--out {out}: exists and is not a folder")
    old = [p for p in out.rglob("*") if p.is_file() and p.suffix.lower() in _IMAGE_SUFFIXES] if out.is_dir() else []
    if old and not overwrite:
        raise CalibrationInputError(f"--out {out}: already holds {len(old)} image(s), which the INT8 "
                                    f"calibrator would read too; use an empty folder or --overwrite")
    if not clear:
        return
    for p in old:
        p.unlink()
    out.mkdir(parents=True, exist_ok=True)


def select_int8_set(pool: list[tuple[str, Callable[[], np.ndarray], Path | None]], count: int, out: Path,
                    source: str, overwrite: bool = False,
                    transform: Callable[[np.ndarray], np.ndarray] | None = None) -> dict[str, Any]:
    """Pick ``count`` frames from ``pool`` (name, loader, original file or None) into ``out``.

    A picked frame with an original file and no ``transform`` is copied byte for byte; others are
    written as PNG (after ``transform``, e.g. the camera's flat-field).
    """
    if count < 1:
        raise CalibrationInputError(f"--count: must be >= 1, got {count}")
    if not pool:
        raise CalibrationInputError(f"{source}: no frames to choose from")
    prepare_out(out, overwrite, clear=False)  # a refused --out before the pool is read
    feats = []
    for i, (name, load, _) in enumerate(pool):
        img = load()
        feats.append(frame_features(transform(img) if transform else img))
        if (i + 1) % 200 == 0:
            log.info("features of %d/%d frames", i + 1, len(pool))
    # only now: a pool frame that cannot be read must not cost the previous set
    prepare_out(out, overwrite)
    f = np.stack(feats)
    z = standardise(f)
    picks, radius = k_center_greedy(z, count)
    if count > len(pool):
        log.warning("--count %d is more than the %d frames available: all are taken", count, len(pool))
    if len(picks) < min(count, len(pool)):
        log.warning("%s: only %d distinct frames (by their features) among %d: the set holds %d, not "
                    "%d; the others repeat a frame already in it", source, len(picks), len(pool),
                    len(picks), count)
    written = []
    for rank, i in enumerate(picks):
        name, load, path = pool[i]
        stem = f"{rank:04d}_{_safe(Path(name).stem if path is None else path.stem)}"
        if path is not None and transform is None:
            dst = out / f"{stem}{path.suffix.lower()}"
            shutil.copyfile(path, dst)
        else:
            img = load()
            if transform:
                img = transform(img)
            dst = out / f"{stem}.png"
            bgr = img if img.ndim == 2 else cv2.cvtColor(img, cv2.COLOR_RGB2BGR)
            if not cv2.imwrite(str(dst), bgr):
                raise OSError(f"{dst}: could not write the frame")
        written.append({"rank": rank, "file": dst.name, "source": name,
                        "features": {k: round(float(v), 3) for k, v in zip(FEATURES, f[i])}})
    sel = f[picks]
    ranges = {k: {"pool": [round(float(f[:, j].min()), 3), round(float(np.median(f[:, j])), 3),
                           round(float(f[:, j].max()), 3)],
                  "selected": [round(float(sel[:, j].min()), 3), round(float(np.median(sel[:, j])), 3),
                               round(float(sel[:, j].max()), 3)]}
              for j, k in enumerate(FEATURES)}
    # share of each feature's pool range (2nd-98th percentile) that the selection spans
    cover = {}
    for j, k in enumerate(FEATURES):
        lo, hi = np.percentile(f[:, j], [2, 98])
        span = hi - lo
        cover[k] = round(float(min(1.0, (min(sel[:, j].max(), hi) - max(sel[:, j].min(), lo)) / span)), 3) \
            if span > 0 else 1.0
    report = {
        "source": source, "pool": len(pool), "count": len(picks),
        "method": "k-center greedy on standardised (median/IQR) frame features, from the most typical frame",
        "features": list(FEATURES), "coverage_radius": round(radius, 3),
        "range_covered": cover, "ranges": ranges, "selected": written,
        "flat_field": bool(transform),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    atomic_write_text(out / "selection.json", json.dumps(report, indent=2))
    return report
