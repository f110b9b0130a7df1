"""Pixel metrics of a defect mask against ground truth, as accumulators over a data set.

Each metric is an accumulator with ``update(sample, frame)`` and ``result() -> dict``; the
evaluation runs every accumulator registered for the bundle's kind and merges their dicts into
one JSON object (keys must not collide). New kinds add accumulators without touching the loop
(e.g. per-class IoU for class-probability models).

* :class:`DefectPixelMetrics` — the CLGAN paper's P, R, F1, IoU, ACC (Eqs. 11-15), computed per
  defective image and averaged over images (the spec's aggregation, §3.2), plus the pooled-pixel
  variant and the variant that includes defect-free images.
* :class:`PixelAUROC` — area under the ROC of the per-pixel score, exact (rank statistic with
  ties counted half), without sklearn.
* :class:`FalseAlarm` — on defect-free images: the share of images with any defect pixel, and
  defect pixels per megapixel.
* :class:`DynamicInferenceStats` — for models with several engine rounds per frame (fuzzymask):
  which branch the tiles took and what a frame cost in engine calls, overall and per category.
* :class:`RegionMetrics` — ARCD's machine-region head scored as one task (thesis Table 3.3):
  MPA and MIoU over {not region, region}, the region's IoU and the pixel AUROC of p(region).

Example::

    >>> import numpy as np
    >>> c = Counts.of(np.array([[1, 1], [0, 0]], bool), np.array([[1, 0], [1, 0]], bool))
    >>> (c.tp, c.fp, c.fn, c.tn), round(scores(c)["f1"], 3)
    ((1, 1, 1, 1), 0.5)
    >>> auroc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1], bool))
    0.75
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import numpy as np

__all__ = ["Counts", "scores", "auroc", "FrameResult", "Metric", "DefectPixelMetrics", "PixelAUROC",
           "FalseAlarm", "SCORE_KEYS", "confusion_matrix", "class_scores", "ClassConfusion",
           "DynamicInferenceStats", "RegionMetrics"]

SCORE_KEYS = ("precision", "recall", "f1", "iou", "acc")


@dataclass
class Counts:
    """Pixel confusion counts of a binary prediction against binary truth."""

    tp: int = 0
    fp: int = 0
    fn: int = 0
    tn: int = 0

    @classmethod
    def of(cls, pred: np.ndarray, truth: np.ndarray) -> "Counts":
        pred = np.asarray(pred, bool)
        truth = np.asarray(truth, bool)
        if pred.shape != truth.shape:
            raise ValueError(f"prediction {pred.shape} and truth {truth.shape} differ in shape")
        tp = int(np.count_nonzero(pred & truth))
        npred, ntrue = int(np.count_nonzero(pred)), int(np.count_nonzero(truth))
        fp, fn = npred - tp, ntrue - tp
        return cls(tp, fp, fn, pred.size - tp - fp - fn)

    def __iadd__(self, o: "Counts") -> "Counts":
        self.tp += o.tp
        self.fp += o.fp
        self.fn += o.fn
        self.tn += o.tn
        return self

    @property
    def total(self) -> int:
        return self.tp + self.fp + self.fn + self.tn


def _div(a: float, b: float) -> float:
    # An empty denominator scores 0 (nothing predicted: precision 0), the convention the paper's
    # per-image averages imply for images where the method finds nothing.
    return a / b if b > 0 else 0.0


def scores(c: Counts) -> dict[str, float]:
    """P = TP/(TP+FP), R = TP/(TP+FN), F1 = 2PR/(P+R), IoU = TP/(TP+FP+FN), ACC = (TP+TN)/all."""
    p, r = _div(c.tp, c.tp + c.fp), _div(c.tp, c.tp + c.fn)
    return {"precision": p, "recall": r, "f1": _div(2 * p * r, p + r),
            "iou": _div(c.tp, c.tp + c.fp + c.fn), "acc": _div(c.tp + c.tn, c.total)}


def auroc(score: np.ndarray, label: np.ndarray) -> float | None:
    """Exact ROC AUC = P(score of a positive > score of a negative) + 0.5 P(equal).

    Sorts the negatives once (in place) and counts, for each positive, the negatives below and
    equal to it (two binary searches, a chunk of positives at a time), so memory stays at one
    float32 copy of the scores. None when one of the two classes is absent.
    """
    s = np.asarray(score, np.float32).ravel()
    y = np.asarray(label, bool).ravel()
    if s.shape != y.shape:
        raise ValueError(f"scores {s.shape} and labels {y.shape} differ in size")
    return _auroc_split(s[y], s[~y])


#: positives per binary-search chunk in :func:`_auroc_split`: two int64 arrays of this length
_SEARCH_CHUNK = 1 << 16


def _auroc_split(pos: np.ndarray, neg: np.ndarray) -> float | None:
    """:func:`auroc` of the positives' and the negatives' scores; sorts ``neg`` in place.

    The counts are summed as integers, exact for any size (the same value as a float64 sum of
    the per-positive counts wherever that one is exact, i.e. below 2**53 pairs)."""
    if pos.size == 0 or neg.size == 0:
        return None
    neg.sort()
    below = ties = 0
    for i in range(0, pos.size, _SEARCH_CHUNK):
        chunk = pos[i:i + _SEARCH_CHUNK]
        lo = np.searchsorted(neg, chunk, side="left")
        hi = np.searchsorted(neg, chunk, side="right")
        below += int(lo.sum())
        ties += int((hi - lo).sum())
    return float((below + 0.5 * ties) / (pos.size * float(neg.size)))


def _pooled_auroc(scores: list[np.ndarray], labels: Callable[[int], np.ndarray],
                  positives: int) -> float | None:
    """:func:`auroc` of the 1-D float32 ``scores`` pieces pooled, ``labels(i)`` the bool labels
    of piece i and ``positives`` their total count. No concatenation: the positives and the
    negatives are copied piece by piece into one preallocated array each, and the negatives
    sorted in place, so the pieces plus one float32 copy of their scores is the peak."""
    total = sum(s.size for s in scores)
    if positives == 0 or positives == total:
        return None
    pos = np.empty(positives, np.float32)
    neg = np.empty(total - positives, np.float32)
    ip = ineg = 0
    for i, s in enumerate(scores):
        y = labels(i)
        if y.shape != s.shape:
            raise ValueError(f"scores {s.shape} and labels {y.shape} differ in size")
        n = int(np.count_nonzero(y))
        np.compress(y, s, out=pos[ip:ip + n])
        np.compress(~y, s, out=neg[ineg:ineg + s.size - n])
        ip, ineg = ip + n, ineg + s.size - n
    return _auroc_split(pos, neg)


@dataclass
class FrameResult:
    """What the runtime produced for one evaluated image."""

    label: np.ndarray  # uint8 HxW class-index mask from the post-processing (0 = background)
    score_map: np.ndarray  # float32 HxW, the published per-pixel score
    probs: np.ndarray | None = None  # KxHxW for class-probability kinds
    residual: np.ndarray | None = None
    defects: list[dict] = field(default_factory=list)
    #: the adapter's per-frame figures (fuzzymask: engine rounds, converged tiles; see ModelOutput)
    stats: dict[str, float] = field(default_factory=dict)
    #: float32 HxW p(region) of a bundle with a region head (``outputs.region``), else None
    region: np.ndarray | None = None


class Metric(Protocol):
    def update(self, truth: np.ndarray, frame: FrameResult, name: str = "") -> None: ...

    def result(self) -> dict[str, Any]: ...


class DefectPixelMetrics:
    """P, R, F1, IoU, ACC of the binary defect mask (any class > 0 against truth > 0).

    Top-level keys: the per-image averages over defective images (the paper's figures; null
    when the data has no defective image). ``pooled``: from counts summed over defective images.
    ``pooled_with_normals``: summed over every image. ``per_image``: each defective image's
    scores, for finding the worst ones.
    """

    def __init__(self) -> None:
        self.per_image: list[dict[str, Any]] = []
        self.pooled = Counts()
        self.pooled_all = Counts()

    def update(self, truth: np.ndarray, frame: FrameResult, name: str = "") -> None:
        c = Counts.of(frame.label > 0, truth > 0)
        self.pooled_all += c
        if c.tp + c.fn > 0:  # a defective image
            self.pooled += c
            self.per_image.append({"image": name, **scores(c)})

    def result(self) -> dict[str, Any]:
        n = len(self.per_image)
        out: dict[str, Any] = {k: (float(np.mean([r[k] for r in self.per_image])) if n else None)
                               for k in SCORE_KEYS}
        out["defective_images"] = n
        out["pooled"] = scores(self.pooled) if n else None
        out["pooled_with_normals"] = scores(self.pooled_all) if self.pooled_all.total else None
        return out


class PixelAUROC:
    """Pixel AUROC of the score map over all evaluated pixels (defective and normal images).

    ``stride`` > 1 keeps every stride-th pixel of each image (row-major), bounding memory on very
    large evaluations; 1 (default) is exact.
    """

    def __init__(self, stride: int = 1) -> None:
        self.stride = max(1, int(stride))
        self._scores: list[np.ndarray] = []
        self._labels: list[np.ndarray] = []

    def update(self, truth: np.ndarray, frame: FrameResult, name: str = "") -> None:
        self._scores.append(np.asarray(frame.score_map, np.float32).ravel()[::self.stride].copy())
        self._labels.append((truth > 0).ravel()[::self.stride].copy())

    def result(self) -> dict[str, Any]:
        if not self._scores:
            return {"pixel_auroc": None}
        positives = sum(int(np.count_nonzero(y)) for y in self._labels)
        return {"pixel_auroc": _pooled_auroc(self._scores, self._labels.__getitem__, positives)}


class PerClassAUROC:
    """One-vs-rest pixel AUROC of each class's probability (``probs[c]`` against ``truth == c``),
    the thesis's per-class AUC columns (spec 004 §4.6), for class-probability kinds. Key
    ``per_class_auroc``: one value per class index (background included; None where the class is
    absent from the truth or covers every pixel). ``stride`` as :class:`PixelAUROC`.

    Memory: the K float32 probabilities and the uint8 truth of every kept pixel (4K + 1 bytes),
    and in :meth:`result` one more float32 per pixel for the class being scored (its positives
    and negatives, gathered from the frames into preallocated arrays and sorted in place)."""

    def __init__(self, stride: int = 1) -> None:
        self.stride = max(1, int(stride))
        self._probs: list[np.ndarray] = []
        self._truth: list[np.ndarray] = []

    def update(self, truth: np.ndarray, frame: FrameResult, name: str = "") -> None:
        if frame.probs is None:
            return
        k = frame.probs.shape[0]
        self._probs.append(np.asarray(frame.probs, np.float32).reshape(k, -1)[:, ::self.stride].copy())
        self._truth.append(np.asarray(truth).ravel()[::self.stride].astype(np.uint8))

    def result(self) -> dict[str, Any]:
        if not self._probs:
            return {"per_class_auroc": None}
        k = max(p.shape[0] for p in self._probs)
        if any(p.shape[0] != k for p in self._probs):
            raise ValueError("per-class AUROC: frames with different probability channel counts")
        # pixels of each class, from one pass over the truth (classes >= k count as negatives)
        counts = sum(np.bincount(t, minlength=k)[:k] for t in self._truth)
        out = []
        for c in range(k):
            out.append(_pooled_auroc([p[c] for p in self._probs],
                                     lambda i, c=c: self._truth[i] == c, int(counts[c])))
        return {"per_class_auroc": out}


class FalseAlarm:
    """On defect-free images: the share of images with at least one defect pixel
    (``false_alarm_rate``), defect pixels per megapixel (``false_alarm_px_per_mpx``), and the
    share with at least one *reported* defect (``false_alarm_rate_reported``: after the
    post-processing's ``min_area_px`` filter, i.e. what a PLC alarm rule would see)."""

    def __init__(self) -> None:
        self.images = 0
        self.alarmed = 0
        self.reported = 0
        self.pixels = 0
        self.flagged = 0

    def update(self, truth: np.ndarray, frame: FrameResult, name: str = "") -> None:
        if truth.any():
            return
        n = int(np.count_nonzero(frame.label))
        self.images += 1
        self.alarmed += n > 0
        self.reported += len(frame.defects) > 0
        self.pixels += int(frame.label.size)
        self.flagged += n

    def result(self) -> dict[str, Any]:
        if not self.images:
            return {"false_alarm_rate": None, "false_alarm_px_per_mpx": None,
                    "false_alarm_rate_reported": None, "normal_images": 0}
        return {"false_alarm_rate": self.alarmed / self.images,
                "false_alarm_px_per_mpx": self.flagged / self.pixels * 1e6,
                "false_alarm_rate_reported": self.reported / self.images,
                "normal_images": self.images}


def confusion_matrix(pred: np.ndarray, truth: np.ndarray, k: int) -> np.ndarray:
    """K x K pixel counts p_ij: rows true class i, columns predicted class j."""
    t = np.asarray(truth, np.int64).ravel()
    p = np.asarray(pred, np.int64).ravel()
    if t.shape != p.shape:
        raise ValueError(f"prediction {np.shape(pred)} and truth {np.shape(truth)} differ in shape")
    if t.size and max(int(t.max()), int(p.max())) >= k:
        raise ValueError(f"class index {max(int(t.max()), int(p.max()))} but only {k} classes")
    return np.bincount(t * k + p, minlength=k * k).reshape(k, k)


def class_scores(cm: np.ndarray) -> dict[str, Any]:
    """Multi-class scores of a confusion matrix (seed 004 spec §4, background = class 0).

    ``miou``: mean over all k+1 classes of p_ii / (sum_j p_ij + sum_j p_ji - p_ii), the standard
    form (the thesis prints the denominator without ``- p_ii``, a typo the spec corrects);
    ``miou_defects``: the same over classes 1..k; ``mpa``: mean of p_ii / sum_j p_ij (per-class
    recall). A class that is neither true nor predicted anywhere has no IoU (null) and is left
    out of the means, as is a class without true pixels from ``mpa``.
    """
    cm = np.asarray(cm, np.float64)
    tp = np.diag(cm)
    rows, cols = cm.sum(1), cm.sum(0)
    union = rows + cols - tp
    iou = [float(tp[c] / union[c]) if union[c] > 0 else None for c in range(len(tp))]
    pa = [float(tp[c] / rows[c]) if rows[c] > 0 else None for c in range(len(tp))]

    def mean(vals: list[float | None]) -> float | None:
        v = [x for x in vals if x is not None]
        return float(np.mean(v)) if v else None

    return {"miou": mean(iou), "miou_defects": mean(iou[1:]), "mpa": mean(pa),
            "per_class_iou": iou, "per_class_pa": pa}


class ClassConfusion:
    """One K x K confusion matrix of the class-index label over every evaluated image, and the
    thesis's MIoU / MPA from it (:func:`class_scores`). K grows to the largest class seen (or the
    probability channels of the frame), so the accumulator needs no class list up front."""

    def __init__(self, num_classes: int = 2) -> None:
        self.cm = np.zeros((num_classes, num_classes), np.int64)

    def update(self, truth: np.ndarray, frame: FrameResult, name: str = "") -> None:
        k = max(self.cm.shape[0], int(truth.max()) + 1 if truth.size else 0,
                int(frame.label.max()) + 1 if frame.label.size else 0,
                frame.probs.shape[0] if frame.probs is not None else 0)
        if k > self.cm.shape[0]:
            grown = np.zeros((k, k), np.int64)
            n = self.cm.shape[0]
            grown[:n, :n] = self.cm
            self.cm = grown
        self.cm += confusion_matrix(frame.label, truth, k)

    def result(self) -> dict[str, Any]:
        return {**class_scores(self.cm), "confusion": self.cm.tolist()}


class DynamicInferenceStats:
    """Branch statistics of dynamic inference (spec 001 §5: "the fraction of test images that took
    each branch"), from the adapter's per-frame ``stats``.

    A frame is tiled, and each tile takes its own branch; an image counts as *converged* when all
    its tiles converged, as *repair* when none did, else as *mixed*. Key ``dynamic_inference``:
    ``images``, ``converged_tile_fraction`` (pooled over tiles), ``image_branch`` (fractions of
    images per branch), ``engine_calls_per_frame`` (mean and max of the engine rounds),
    ``tile_passes_per_tile`` (model applications per tile: the cost in units of one plain
    reconstruction pass, before batching), ``repaired_tile_fraction``, ``masked_cells_per_frame``
    and the same figures per category (the folder of the image, the part of its name before '/').
    """

    def __init__(self) -> None:
        self._rows: dict[str, list[dict[str, float]]] = {}

    def update(self, truth: np.ndarray, frame: FrameResult, name: str = "") -> None:
        if not frame.stats or "tiles" not in frame.stats:
            return
        cat = name.split("/", 1)[0] if "/" in name else ""
        self._rows.setdefault(cat, []).append(dict(frame.stats))

    @staticmethod
    def _summary(rows: list[dict[str, float]]) -> dict[str, Any]:
        tiles = sum(r["tiles"] for r in rows)
        conv = sum(r["converged_tiles"] for r in rows)
        branch = {"converged": 0, "repair": 0, "mixed": 0}
        for r in rows:
            key = ("converged" if r["converged_tiles"] == r["tiles"] else
                   "repair" if r["converged_tiles"] == 0 else "mixed")
            branch[key] += 1
        calls = np.array([r["engine_calls"] for r in rows], np.float64)
        return {
            "images": len(rows),
            "converged_tile_fraction": round(conv / tiles, 4) if tiles else None,
            "image_branch": {k: round(v / len(rows), 4) for k, v in branch.items()},
            "engine_calls_per_frame": {"mean": round(float(calls.mean()), 3), "max": int(calls.max())},
            "tile_passes_per_tile": round(sum(r["tile_passes"] for r in rows) / tiles, 3) if tiles else None,
            "repaired_tile_fraction": round(sum(r.get("repaired_tiles", 0) for r in rows) / tiles, 4)
            if tiles else None,
            "masked_cells_per_frame": round(float(np.mean([r.get("masked_cells", 0) for r in rows])), 3),
        }

    def result(self) -> dict[str, Any]:
        rows = [r for v in self._rows.values() for r in v]
        if not rows:
            return {"dynamic_inference": None}
        out = self._summary(rows)
        if len(self._rows) > 1 or "" not in self._rows:
            out["per_category"] = {c: self._summary(v) for c, v in sorted(self._rows.items())}
        return {"dynamic_inference": out}


class RegionMetrics:
    """ARCD's machine-region map scored as one task, in the thesis's Table 3.3 form (spec 004
    §4.3): a pixel is predicted region where p(region) >= ``threshold`` (the bundle's
    ``region.threshold``); from the 2 x 2 pixel confusion over every image, ``mpa`` and ``miou``
    over the two classes {not region, region} (:func:`class_scores`, the corrected MIoU of the
    defect figures), ``iou`` of the region class, and ``auroc``, the pixel AUROC of p(region)
    against the region label (None where a class is absent).

    Memory as :class:`PixelAUROC`: the kept float32 probability and bool label of every
    ``stride``-th pixel of each image (1 = exact AUROC); the confusion counts use every pixel.
    """

    def __init__(self, name: str, threshold: float, stride: int = 1) -> None:
        self.name = name
        self.threshold = float(threshold)
        self.stride = max(1, int(stride))
        self.counts = Counts()
        self.images = 0
        self._scores: list[np.ndarray] = []
        self._labels: list[np.ndarray] = []

    def update(self, truth: np.ndarray, region: np.ndarray) -> None:
        """``truth``: HxW region label (nonzero = region); ``region``: HxW p(region)."""
        t = np.asarray(truth) > 0
        if np.shape(region) != t.shape:
            raise ValueError(f"region map {np.shape(region)} and region label {t.shape} differ in shape")
        # binary counts (bool ops) rather than confusion_matrix's int64 copies of both maps
        self.counts += Counts.of(np.asarray(region) >= self.threshold, t)
        self._scores.append(np.asarray(region, np.float32).ravel()[::self.stride].copy())
        self._labels.append(t.ravel()[::self.stride].copy())
        self.images += 1

    def confusion(self) -> np.ndarray:
        """2 x 2 pixel counts, rows truth (0 not region, 1 region), columns prediction."""
        c = self.counts
        return np.array([[c.tn, c.fp], [c.fn, c.tp]], np.int64)

    def result(self) -> dict[str, Any]:
        sc = class_scores(self.confusion())
        positives = sum(int(np.count_nonzero(y)) for y in self._labels)
        auc = _pooled_auroc(self._scores, self._labels.__getitem__, positives) if self._scores else None
        return {"name": self.name, "threshold": self.threshold, "mpa": sc["mpa"], "miou": sc["miou"],
                "iou": sc["per_class_iou"][1], "auroc": auc, "images": self.images}
