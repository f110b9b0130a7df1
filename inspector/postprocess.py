"""From a model's output maps to a defect mask and a defect list.

Three recipes, chosen by the bundle's ``postprocess.type``:

* ``dual_threshold`` for residual models (CLGAN, fuzzy-mask inpainter): the CLGAN paper's
  sequential per-image thresholds (``../shared/seeds/002_spec.md`` §2): each channel at
  mean + k1·std of the image itself, the binary channels merged with grey weights
  0.299/0.587/0.114, that image at mean + k2·std, then a closing with a square element.
* ``probability`` for models that output class probabilities (ARCD): a threshold per class, with
  optional opening and closing.
* ``score_threshold`` for models whose score map is already an absolute anomaly score (the
  fuzzy-mask inpainter's dynamic-inference map, ``../shared/seeds/001_spec.md`` §4.6): a pixel
  is a defect where its score reaches ``score_threshold``; then the optional opening and closing.
  The value is chosen on defect-free frames for a target false-alarm rate
  (``inspector calibrate thresholds``).

Then connected components turn the mask into defects (class, score, bbox, area, centroid).

``min_residual`` (dual-threshold recipe, default 0 = off) adds an absolute floor: a component the
recipe found is kept only where its highest score (grey-level residual) reaches the floor. The
recipe alone is self-referential: it thresholds each image at its own mean + k·std, so it marks
the upper tail of every image, a defect-free one included, and cannot hold a false-alarm rate.
The floor, chosen on the line's own normal frames (``inspector calibrate thresholds``), decides
*whether* an image has a defect; the recipe still decides its shape (hysteresis: the floor is the
high threshold, the per-image statistics the low one).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import cv2
import numpy as np
from pydantic import BaseModel, ConfigDict, Field

GREY_WEIGHTS_RGB = (0.299, 0.587, 0.114)


class PostprocessConfig(BaseModel):
    """Post-processing parameters; the bundle's section, optionally overridden per camera."""

    # nan or inf in any value (k1: .nan thresholds nothing, score_threshold: .inf finds nothing)
    # is refused with "Input should be a finite number", naming the key
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    type: Literal["probability", "dual_threshold", "score_threshold"] = "probability"
    # probability recipe (open_kernel, close_kernel also serve score_threshold)
    threshold: float = Field(0.5, gt=0, le=1, description="default probability threshold per class")
    class_thresholds: dict[str, float] = Field(default_factory=dict)
    open_kernel: int = Field(0, ge=0, description="opening kernel size (0 = off)")
    close_kernel: int = Field(0, ge=0, description="closing kernel size (0 = off)")
    # dual-threshold recipe (paper values)
    k1: float = Field(3.0, ge=0, description="first (per-channel) threshold: mean + k1*std")
    k2: float = Field(1.0, ge=0, description="second (grey) threshold: mean + k2*std")
    kernel_size: int = Field(3, ge=0, description="closing kernel of the dual-threshold recipe")
    min_residual: float = Field(0.0, ge=0, description="dual-threshold recipe: keep a component only "
                                "if its highest score reaches this absolute floor (0 = off)")
    # score-threshold recipe (any sign: the fuzzymask score of a converged tile can be negative)
    score_threshold: float = Field(0.0, description="score_threshold recipe: a pixel whose score "
                                   "reaches this value is a defect pixel")
    # connected components
    min_area_px: int = Field(0, ge=0, description="drop components smaller than this (0 = keep all)")
    connectivity: Literal[4, 8] = 8
    max_defects: int = Field(256, ge=1, description="most defects listed per frame (largest first)")


#: the keys each recipe reads, besides type, min_area_px, connectivity and max_defects
RECIPE_KEYS: dict[str, tuple[str, ...]] = {
    "probability": ("threshold", "class_thresholds", "open_kernel", "close_kernel"),
    "dual_threshold": ("k1", "k2", "kernel_size", "min_residual"),
    "score_threshold": ("score_threshold", "open_kernel", "close_kernel"),
}
COMMON_KEYS = ("type", "min_area_px", "connectivity", "max_defects")
#: the model output each recipe reads (every kind produces a score map)
RECIPE_NEEDS: dict[str, str | None] = {"probability": "probs", "dual_threshold": "residual",
                                       "score_threshold": None}


def recipe_misfit(recipe: str, outputs: frozenset[str]) -> str | None:
    """Why a ``recipe`` cannot run on a model kind producing ``outputs`` (None: it can)."""
    need = RECIPE_NEEDS[recipe]
    if need is None or need in outputs:
        return None
    what = {"probs": "class probabilities", "residual": "a residual"}
    has = " and ".join(what[o] for o in sorted(outputs)) or "only a score map"
    return f"{recipe} needs a model that outputs {what[need]}; this one outputs {has}"


def keys_unused_by(recipe: str, keys) -> list[str]:
    """Which of ``keys`` a ``recipe`` post-processing never reads."""
    return [k for k in keys if k not in COMMON_KEYS and k not in RECIPE_KEYS[recipe]]


def shadowed_threshold(pp: PostprocessConfig, overrides, class_names: list[str]) -> str | None:
    """Why an override of ``threshold`` would change nothing (None: it is read).

    ``threshold`` is only the default of the classes ``class_thresholds`` leaves out; a trained
    ARCD bundle sets a threshold for every class, so an engineer raising ``threshold`` to stop
    false alarms would see nothing happen."""
    if pp.type != "probability" or "threshold" not in overrides:
        return None
    defects = list(class_names[1:])
    if not defects or any(c not in pp.class_thresholds for c in defects):
        return None
    have = ", ".join(f"{c}: {pp.class_thresholds[c]:g}" for c in defects)
    want = ", ".join(f"{c}: {pp.threshold:g}" for c in defects)
    return (f"never read: class_thresholds sets every class's threshold ({{{have}}}); threshold is "
            f"only the default of classes it leaves out. Set class_thresholds instead, e.g. "
            f"{{{want}}}")


def _square(size: int) -> np.ndarray:
    return np.ones((size, size), np.uint8)


def dual_threshold(residual: np.ndarray, k1: float = 3.0, k2: float = 1.0,
                   kernel_size: int = 3) -> np.ndarray:
    """The CLGAN dual-threshold segmentation of a residual image.

    ``residual`` is HxW (one channel) or HxWx3 in RGB order, any numeric dtype. Returns a uint8
    HxW mask of 0/1. Statistics are the population mean/std of this image alone; a channel (or
    the grey vote image) with zero std yields no detections rather than a whole-image flag.

    >>> r = np.zeros((8, 8), np.float32); r[2:4, 2:4] = 5.0
    >>> int(dual_threshold(r, kernel_size=0).sum())
    4
    """
    r = np.asarray(residual, dtype=np.float32)
    if r.ndim == 2:
        r = r[:, :, None]
    if r.ndim != 3 or r.shape[2] not in (1, 3):
        raise ValueError(f"residual must be HxW or HxWx3, got shape {residual.shape}")
    h, w, c = r.shape
    flat = r.reshape(-1, c)
    mu = flat.mean(axis=0)
    sd = flat.std(axis=0)  # population std (ddof = 0), as the spec fixes
    first = (r >= (mu + k1 * sd)) & (sd > 0)  # HxWxC bool; constant channels fire nowhere
    if c == 3:
        grey = (first[:, :, 0] * np.float32(GREY_WEIGHTS_RGB[0])
                + first[:, :, 1] * np.float32(GREY_WEIGHTS_RGB[1])
                + first[:, :, 2] * np.float32(GREY_WEIGHTS_RGB[2]))
    else:
        grey = first[:, :, 0].astype(np.float32)
    gm, gs = float(grey.mean()), float(grey.std())
    if gs > 0:
        mask = (grey >= gm + k2 * gs).astype(np.uint8)
    else:
        mask = np.zeros((h, w), np.uint8)
    if kernel_size > 1:
        # OpenCV's default border handling keeps foreground that touches the image edge.
        mask = cv2.morphologyEx(mask, cv2.MORPH_CLOSE, _square(kernel_size))
    return mask


def keep_components_reaching(mask: np.ndarray, score_map: np.ndarray, floor: float,
                              connectivity: int = 8) -> np.ndarray:
    """``mask`` (uint8 0/1, HxW) without the connected components whose highest ``score_map``
    value is below ``floor``; kept components are kept whole.

    >>> m = np.zeros((6, 6), np.uint8); m[0:2, 0:2] = 1; m[4:6, 4:6] = 1
    >>> s = np.zeros((6, 6), np.float32); s[0, 0] = 9.0; s[5, 5] = 2.0
    >>> int(keep_components_reaching(m, s, 5.0).sum())
    4
    """
    seeds = (mask > 0) & (score_map >= np.float32(floor))
    if not seeds.any():
        return np.zeros_like(mask)
    n, cc = cv2.connectedComponents(mask, connectivity=connectivity)
    keep = np.zeros(n, np.uint8)
    keep[cc[seeds]] = 1
    keep[0] = 0
    return keep[cc]


def threshold_score(score_map: np.ndarray, threshold: float, open_kernel: int = 0,
                    close_kernel: int = 0) -> np.ndarray:
    """Binary mask (uint8 HxW of 0/1) of the pixels whose score reaches ``threshold``, then an
    opening and a closing with square elements (each when its size is > 1), in the order the
    probability recipe uses.

    >>> s = np.zeros((6, 6), np.float32); s[1:3, 1:3] = 0.8; s[5, 5] = -1.0
    >>> int(threshold_score(s, 0.5).sum()), int(threshold_score(s, -2.0).sum())
    (4, 36)
    """
    if score_map.ndim != 2:
        raise ValueError(f"score map must be HxW, got shape {score_map.shape}")
    mask = (score_map >= np.float32(threshold)).view(np.uint8)
    if open_kernel > 1:
        mask = cv2.morphologyEx(mask, cv2.MORPH_OPEN, _square(open_kernel))
    if close_kernel > 1:
        mask = cv2.morphologyEx(mask, cv2.MORPH_CLOSE, _square(close_kernel))
    return mask


def threshold_probabilities(probs: np.ndarray, thresholds: np.ndarray, open_kernel: int = 0,
                            close_kernel: int = 0, score_map: np.ndarray | None = None) -> np.ndarray:
    """Class-index mask from softmax probabilities.

    ``probs`` is CxHxW with class 0 the background; ``thresholds`` has C-1 entries, one per defect
    class. A pixel takes the most probable defect class among those above their threshold, else 0.
    Opening then closing (when > 1) apply to each class's binary mask. ``score_map``, when
    given, must be 1 - probs[0] (the adapter has it already).
    """
    if probs.ndim != 3 or probs.shape[0] < 2:
        raise ValueError(f"probabilities must be CxHxW with C >= 2, got {probs.shape}")
    k, h, w = probs.shape
    thr = np.asarray(thresholds, np.float32)
    # Any defect class above its threshold implies 1 - p(background) >= the lowest threshold, so
    # the full per-class comparison is only needed at those (usually few) candidate pixels.
    if score_map is None:
        score_map = 1.0 - probs[0]
    is_cand = score_map >= thr.min()
    cand = np.flatnonzero(is_cand.reshape(-1))
    label = np.zeros((h, w), np.uint8)
    if cand.size > h * w // 4:
        # a map that is mostly candidates (a blinded camera, a model out of its depth): gathering
        # them costs more than comparing every pixel, and such frames must not fall behind. The
        # candidate test stays, so a pixel's label never depends on the rest of the frame.
        best = np.full((h, w), -1.0, np.float32)
        for c in range(1, k):  # strict '>': a tie keeps the lower class, as argmax would
            take = is_cand & (probs[c] >= thr[c - 1]) & (probs[c] > best)
            np.copyto(label, np.uint8(c), where=take)
            np.copyto(best, probs[c], where=take)
    elif cand.size:
        # one class at a time over the candidates: a 1-D take per class is about 2.5x faster
        # than gathering a (K-1) x N block and arg-maxing it (real NEU frames, 16-54k candidates)
        flat = probs.reshape(k, -1)
        best_c = np.full(cand.size, -1.0, np.float32)
        label_c = np.zeros(cand.size, np.uint8)
        for c in range(1, k):  # strict '>': a tie keeps the lower class, as argmax would
            p = flat[c].take(cand)
            take = (p >= thr[c - 1]) & (p > best_c)
            label_c[take] = c
            np.copyto(best_c, p, where=take)
        label.reshape(-1)[cand] = label_c
    if open_kernel > 1 or close_kernel > 1:
        out = np.zeros_like(label)
        for cls in range(1, probs.shape[0]):
            m = (label == cls).astype(np.uint8)
            if not m.any():
                continue
            if open_kernel > 1:
                m = cv2.morphologyEx(m, cv2.MORPH_OPEN, _square(open_kernel))
            if close_kernel > 1:
                m = cv2.morphologyEx(m, cv2.MORPH_CLOSE, _square(close_kernel))
            out[(m > 0) & (out == 0)] = cls
        label = out
    return label


@dataclass
class Geometry:
    """Pixel size on the strip, for areas in mm² and positions along the strip.

    ``mm_per_encoder_count`` (with the frame metadata key ``encoder_key``) places a frame on the
    strip from an encoder count instead of from its frame number.
    """

    mm_per_px_across: float | None = None
    mm_per_px_along: float | None = None
    mm_per_encoder_count: float | None = None
    encoder_key: str = "encoder_count"

    @classmethod
    def of(cls, cfg: object) -> "Geometry":
        """From a ``geometry`` config section (any object with these attribute names)."""
        return cls(getattr(cfg, "mm_per_px_across", None), getattr(cfg, "mm_per_px_along", None),
                   getattr(cfg, "mm_per_encoder_count", None),
                   getattr(cfg, "encoder_key", "encoder_count"))

    def for_frame(self, meta: dict) -> "Geometry":
        """The pixel size a frame is measured with: the source's (``mm_per_px_*`` in its
        metadata: a source that knows its own, or the source section's) over this one's."""
        return Geometry(meta.get("mm_per_px_across", self.mm_per_px_across),
                        meta.get("mm_per_px_along", self.mm_per_px_along),
                        self.mm_per_encoder_count, self.encoder_key)

    def overridden_by(self, meta: dict) -> list[str]:
        """One line per ``geometry`` value the frame's source replaces with another (areas in
        mm² and positions then follow the source's): a config that sets both used to have its
        own silently ignored."""
        out = []
        for key in ("mm_per_px_across", "mm_per_px_along"):
            mine, theirs = getattr(self, key), meta.get(key)
            if mine is not None and theirs is not None and abs(float(theirs) - mine) > 1e-9 * mine:
                out.append(f"geometry.{key}: {mine:g} in the config, but the source gives "
                           f"{float(theirs):.6g} with its frames, which is used (areas in mm², "
                           f"positions and the alarm rules' min_area_mm2 / per_m follow it)")
        return out

    def frame_pos_mm(self, frame_id: int, rows: int, meta: dict, source_pos_mm: float) -> float:
        """Position of a frame's first row along the strip, mm.

        An encoder count in the metadata wins (it follows speed changes and slip-free stops);
        a source that knows its pixel size (``mm_per_px_along`` in the metadata) has placed the
        frame itself; otherwise frames are taken as contiguous: frame number x rows x pixel size,
        where the frame number is ``meta["strip_frame_index"]`` when the source gives one (a
        GenICam camera's own frame count, which also counts the frames it dropped before the
        source fetched them: our frame id does not, and would place every later frame short).
        """
        count = meta.get(self.encoder_key) if self.mm_per_encoder_count else None
        if count is not None:
            return float(count) * self.mm_per_encoder_count
        if meta.get("mm_per_px_along") or not self.mm_per_px_along:
            return source_pos_mm
        return meta.get("strip_frame_index", frame_id) * rows * self.mm_per_px_along


def components(label: np.ndarray, score_map: np.ndarray, class_names: list[str],
               min_area_px: int = 0, connectivity: int = 8, max_defects: int = 256,
               geometry: Geometry | None = None, strip_pos_mm: float = 0.0
               ) -> tuple[list[dict], int]:
    """Connected components of a class-index mask as defect records.

    Returns (defects sorted by area, largest first, at most ``max_defects``; number found before
    the cap). A component's class is its most frequent label, its score the highest
    ``score_map`` value inside it.
    """
    # Most frames of a strip have no defect: skip the labelling then, and otherwise label only
    # the bounding box of the marked pixels.
    rows = np.flatnonzero(label.any(axis=1))
    if rows.size == 0:
        return [], 0
    cols = np.flatnonzero(label.any(axis=0))
    oy, ox = int(rows[0]), int(cols[0])
    label = label[oy:int(rows[-1]) + 1, ox:int(cols[-1]) + 1]
    score_map = score_map[oy:oy + label.shape[0], ox:ox + label.shape[1]]
    # Labels only, with the statistics taken over the marked pixels here: OpenCV's own
    # statistics pass visits every pixel of the box and cost ~2 ms of the ~2.5 ms a 256x1600
    # frame with 60 defects took; the same figures (label order included) come out.
    marked = label > 0
    n, cc = cv2.connectedComponents(marked.view(np.uint8), connectivity=connectivity)
    idx = np.flatnonzero(marked.ravel())
    comp = cc.ravel()[idx]
    area = np.bincount(comp, minlength=n)
    kept = np.flatnonzero(area[1:] >= max(min_area_px, 1)) + 1
    total = int(kept.size)
    # largest first, ties in label order; a noisy map has tens of thousands of components
    order = kept[np.argsort(-area[kept], kind="stable")][:max_defects]
    if order.size == 0:
        return [], total
    h, w = label.shape
    ys, xs = np.divmod(idx, w)
    k = int(label.max()) + 1
    # a component's class is its most frequent label (ties: the lower class)
    cls_of = np.bincount(comp * k + label[marked], minlength=n * k).reshape(n, k).argmax(axis=1)
    x0 = np.full(n, w, np.intp)
    y0 = np.full(n, h, np.intp)
    x1 = np.zeros(n, np.intp)
    y1 = np.zeros(n, np.intp)
    top = np.full(n, -np.inf, np.float32)
    np.minimum.at(x0, comp, xs)
    np.minimum.at(y0, comp, ys)
    np.maximum.at(x1, comp, xs)
    np.maximum.at(y1, comp, ys)
    np.maximum.at(top, comp, score_map[marked])  # row-major, as idx
    a = area[order]
    cx = np.bincount(comp, weights=xs, minlength=n)[order] / a + ox
    cy = np.bincount(comp, weights=ys, minlength=n)[order] / a + oy
    geo = geometry or Geometry()
    along, across = geo.mm_per_px_along, geo.mm_per_px_across
    defects = []
    # plain Python numbers from here (tolist): Python's round, as the records always used
    for area_px, cls, score, bx0, by0, bx1, by1, x, y in zip(
            a.tolist(), cls_of[order].tolist(), top[order].tolist(), x0[order].tolist(),
            y0[order].tolist(), x1[order].tolist(), y1[order].tolist(), cx.tolist(), cy.tolist()):
        defects.append({
            "class": class_names[cls] if cls < len(class_names) else str(cls),
            "class_id": cls,
            "score": round(score, 4),
            "bbox": [bx0 + ox, by0 + oy, bx1 - bx0 + 1, by1 - by0 + 1],
            "area_px": area_px,
            "centroid": [round(x, 1), round(y, 1)],
            "area_mm2": round(area_px * across * along, 2) if across and along else None,
            "strip_pos_mm": round(strip_pos_mm + y * along, 1) if along else None,
        })
    return defects, total


class Postprocessor:
    """Applies one :class:`PostprocessConfig` to model outputs of a bundle with ``class_names``."""

    def __init__(self, cfg: PostprocessConfig, class_names: list[str]):
        self.cfg = cfg
        self.class_names = list(class_names)
        unknown = sorted(set(cfg.class_thresholds) - set(self.class_names[1:]))
        if unknown:
            raise ValueError(f"class_thresholds names unknown class(es) {unknown}; "
                             f"classes are {self.class_names[1:]}")
        self.thresholds = np.array([cfg.class_thresholds.get(c, cfg.threshold)
                                    for c in self.class_names[1:]], np.float32)

    def mask(self, probs: np.ndarray | None, residual: np.ndarray | None,
             score_map: np.ndarray | None = None) -> np.ndarray:
        """Class-index mask (uint8 HxW) from whichever map the model kind produced."""
        c = self.cfg
        if c.type == "probability":
            if probs is None:
                raise ValueError("postprocess.type probability needs a model that outputs probabilities")
            return threshold_probabilities(probs, self.thresholds, c.open_kernel, c.close_kernel,
                                           score_map)
        if c.type == "score_threshold":
            if score_map is None:
                raise ValueError("postprocess.type score_threshold needs a model that outputs a score map")
            return threshold_score(score_map, c.score_threshold, c.open_kernel, c.close_kernel)
        if residual is None:
            raise ValueError("postprocess.type dual_threshold needs a model that outputs a residual")
        mask = dual_threshold(residual, c.k1, c.k2, c.kernel_size)
        if c.min_residual > 0:
            if score_map is None:  # the adapters' score: the residual, grey-weighted if RGB
                score_map = residual if residual.ndim == 2 else residual @ np.float32(GREY_WEIGHTS_RGB)
            mask = keep_components_reaching(mask, score_map, c.min_residual, c.connectivity)
        return mask

    def defects(self, label: np.ndarray, score_map: np.ndarray, geometry: Geometry | None = None,
                strip_pos_mm: float = 0.0) -> tuple[list[dict], int]:
        return components(label, score_map, self.class_names, self.cfg.min_area_px, self.cfg.connectivity,
                          self.cfg.max_defects, geometry, strip_pos_mm)
