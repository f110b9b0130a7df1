"""Whole-frame evaluation of an ARCD model the way the runtime will run it.

Frames are cut into model-size tiles that overlap by ``overlap`` pixels, the last tile aligned to
the frame edge; when the tile outputs are put back, each pixel comes from one tile, with the
overlap split at its middle, by the runtime's own ``inspector.models.tiling`` functions, so the
IoU reported here is the IoU the line will see. Class masks come from
``inspector.postprocess.threshold_probabilities`` with the bundle's thresholds, again exactly as
at runtime. IoU per class is accumulated over all frames (one confusion matrix), background
included.

A model trained on square-padded images (``data.square_pad``) is run as its bundle's
``input.fit: square_pad`` runs it (``predict_frame(..., fit="square_pad")``): the whole native
frame, in the model's channels, zero-padded to a square and resized to the tile, one input, each
output plane resized back and cropped to the frame, by the runtime's own
``inspector.models.tiling.SquareFit``.

Example::

    >>> tile_starts(1600, 256, 32)
    [0, 224, 448, 672, 896, 1120, 1344]
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal, Sequence

import numpy as np
import torch

from inspector.models.base import model_channels
from inspector.models.tiling import SquareFit
from inspector.models.tiling import axis_keep as tile_keep
from inspector.models.tiling import axis_starts as tile_starts
from inspector.postprocess import threshold_probabilities

from export.arcd.data import LabeledFrame, to_float01, to_tensor
from export.arcd.torch_model import ARCDInference

log = logging.getLogger(__name__)

__all__ = [
    "tile_starts",
    "tile_keep",
    "tile_frame",
    "predict_frame",
    "confusion",
    "iou_per_class",
    "choose_thresholds",
    "FrameEval",
    "evaluate",
    "region_confusion",
    "region_scores",
    "choose_region_threshold",
]


def tile_frame(image01: np.ndarray, tile: tuple[int, int], overlap: int
               ) -> tuple[np.ndarray, list[tuple[int, int]], tuple[int, int]]:
    """HxWxC float image -> (N x C x th x tw tiles, their (y, x) corners, padded frame size).

    Frames smaller than a tile are reflect-padded, as the runtime does.
    """
    th, tw = tile
    h, w = image01.shape[:2]
    H, W = max(h, th), max(w, tw)
    if (H, W) != (h, w):
        image01 = np.pad(image01, ((0, H - h), (0, W - w), (0, 0)), mode="reflect")
    corners = [(y, x) for y in tile_starts(H, th, overlap) for x in tile_starts(W, tw, overlap)]
    tiles = np.stack([image01[y:y + th, x:x + tw].transpose(2, 0, 1) for y, x in corners])
    return np.ascontiguousarray(tiles, dtype=np.float32), corners, (H, W)


@torch.no_grad()
def _predict_square(model: ARCDInference, image: np.ndarray, tile: tuple[int, int], channels: int,
                    mean: Sequence[float], std: Sequence[float], output: int,
                    pad_align: Literal["top", "center"]) -> np.ndarray:
    """:func:`predict_frame` for ``fit="square_pad"``: the runtime's steps on one native frame
    (``ModelAdapter._fill_square`` and ``stitch``), through the same :class:`SquareFit`, so the
    pixels fed and the bilinear resizes back are the bundle's own."""
    th, tw = tile
    if th != tw:
        raise ValueError(f"fit square_pad needs a square tile, got {list(tile)}")
    # the runtime's conversion, not to_float01: its float luma differs from the rounded one by
    # up to a grey level, and the square pad resizes the uint8 pixels, so the order matters
    img = model_channels(image, channels)
    h, w = img.shape[:2]
    g = SquareFit.build(h, w, th, tw, pad_align)
    # the canvas starts as zeros: pad_resize writes only the frame's part, the pad stays zero
    canvas = np.zeros((g.side, g.side, img.shape[2]), img.dtype)
    square_in = g.pad_resize(img, canvas, np.empty((th, tw, img.shape[2]), img.dtype))
    dev = next(model.parameters()).device
    x = to_tensor(to_float01(square_in, channels), mean, std)[None].to(dev)
    planes = model(x)[output][0].float().cpu().numpy()
    out = np.empty((planes.shape[0], h, w), np.float32)
    scratch = np.empty((g.side, g.side), np.float32)
    for c, plane in enumerate(planes):
        # contiguous float32 as the engine hands it out (a channels_last tensor's planes are strided)
        g.unfit(np.ascontiguousarray(plane, np.float32), scratch, out[c])
    return out


@torch.no_grad()
def predict_frame(model: ARCDInference, image: np.ndarray, tile: tuple[int, int], overlap: int,
                  channels: int, mean: Sequence[float], std: Sequence[float],
                  batch: int = 0, output: int = 1, fit: Literal["tile", "square_pad"] = "tile",
                  pad_align: Literal["top", "center"] = "top") -> np.ndarray:
    """Class probabilities (K x H x W float32) of a uint8 frame, tiled and stitched; ``output``
    2 gives the region head's probability (1 x H x W) instead.

    ``fit`` and ``pad_align`` are the bundle's ``input.fit`` / ``input.pad_align``: with
    ``square_pad`` the frame is not tiled (``overlap`` and ``batch`` are unused) but squared
    whole as the runtime does (:func:`_predict_square`)."""
    if fit == "square_pad":
        return _predict_square(model, image, tile, channels, mean, std, output, pad_align)
    img01 = to_float01(image, channels)
    h, w = img01.shape[:2]
    tiles, corners, (H, W) = tile_frame(img01, tile, overlap)
    dev = next(model.parameters()).device
    x = torch.stack([to_tensor(t.transpose(1, 2, 0), mean, std) for t in tiles]).to(dev)
    step = batch or len(x)
    probs = torch.cat([model(x[s:s + step])[output] for s in range(0, len(x), step)]).cpu().numpy()
    th, tw = tile
    ys = sorted({c[0] for c in corners})
    xs = sorted({c[1] for c in corners})
    keep_y = dict(zip(ys, tile_keep(ys, th, H)))
    keep_x = dict(zip(xs, tile_keep(xs, tw, W)))
    out = np.empty((probs.shape[1], H, W), np.float32)
    for p, (y, x) in zip(probs, corners):
        (y0, y1), (x0, x1) = keep_y[y], keep_x[x]
        out[:, y0:y1, x0:x1] = p[:, y0 - y:y1 - y, x0 - x:x1 - x]
    return out[:, :h, :w]


def confusion(pred: np.ndarray, truth: np.ndarray, k: int, valid: np.ndarray | None = None
              ) -> np.ndarray:
    """K x K confusion matrix (rows = truth, columns = prediction)."""
    t = truth.astype(np.int64).ravel()
    p = pred.astype(np.int64).ravel()
    if valid is not None:
        sel = valid.ravel()
        t, p = t[sel], p[sel]
    return np.bincount(t * k + p, minlength=k * k).reshape(k, k)


def iou_per_class(cm: np.ndarray) -> list[float | None]:
    """IoU_c = TP / (TP + FP + FN); None for a class absent from truth and prediction."""
    tp = np.diag(cm).astype(np.float64)
    denom = cm.sum(0) + cm.sum(1) - tp
    return [float(tp[c] / denom[c]) if denom[c] > 0 else None for c in range(len(tp))]


def _mean_defect(ious: list[float | None]) -> float:
    vals = [v for v in ious[1:] if v is not None]
    return float(np.mean(vals)) if vals else float("nan")


def _label(probs: np.ndarray, thresholds: np.ndarray, open_kernel: int, close_kernel: int) -> np.ndarray:
    return threshold_probabilities(probs, thresholds, open_kernel, close_kernel)


def choose_thresholds(probs: list[np.ndarray], truths: list[np.ndarray], candidates: Sequence[float],
                      per_class: bool = True, open_kernel: int = 0, close_kernel: int = 0,
                      valids: Sequence[np.ndarray | None] | None = None
                      ) -> tuple[float, list[float], float]:
    """Thresholds that maximise mean defect IoU on calibration frames (``valids``: each frame's
    region of real image content, None = all of it; the square pad's zeros are not scored).

    First one threshold for all classes, then (``per_class``) one coordinate-ascent pass that
    tunes each class's threshold with the others fixed. Returns (global, per-class list, score).
    """
    k = probs[0].shape[0]

    def score(thr: np.ndarray) -> float:
        cm = sum(confusion(_label(p, thr, open_kernel, close_kernel), t, k, v)
                 for p, t, v in zip(probs, truths, valids or [None] * len(truths)))
        return _mean_defect(iou_per_class(cm))

    best_g, best_s = float(candidates[0]), -1.0
    for c in candidates:
        s = score(np.full(k - 1, c, np.float32))
        if s > best_s:
            best_g, best_s = float(c), s
    thr = np.full(k - 1, best_g, np.float32)
    if per_class:
        for cls in range(k - 1):
            for c in candidates:
                trial = thr.copy()
                trial[cls] = c
                s = score(trial)
                if s > best_s + 1e-6:
                    best_s, thr = s, trial
    return round(best_g, 4), [round(float(v), 4) for v in thr], best_s


@dataclass
class FrameEval:
    """Per-class IoU over a set of frames, with the thresholds used."""

    iou: dict[str, float | None]
    iou_argmax: dict[str, float | None]
    mean_defect_iou: float
    mean_defect_iou_argmax: float
    pixel_accuracy: float
    thresholds: dict[str, float]
    frames: int

    def as_dict(self) -> dict:
        return {"iou": self.iou, "mean_defect_iou": self.mean_defect_iou,
                "iou_argmax": self.iou_argmax, "mean_defect_iou_argmax": self.mean_defect_iou_argmax,
                "pixel_accuracy": self.pixel_accuracy, "thresholds": self.thresholds,
                "frames": self.frames}


def evaluate(probs: list[np.ndarray], frames: list[LabeledFrame], class_names: Sequence[str],
             thresholds: Sequence[float], open_kernel: int = 0, close_kernel: int = 0) -> FrameEval:
    """IoU per class of thresholded (runtime rule) and argmax predictions against frame truth."""
    k = len(class_names)
    thr = np.asarray(thresholds, np.float32)
    cm = np.zeros((k, k), np.int64)
    cm_arg = np.zeros((k, k), np.int64)
    for p, f in zip(probs, frames):
        if f.truth is None:
            raise ValueError("evaluation frames need truth masks")
        cm += confusion(_label(p, thr, open_kernel, close_kernel), f.truth, k, f.valid)
        cm_arg += confusion(p.argmax(0), f.truth, k, f.valid)
    ious, ious_arg = iou_per_class(cm), iou_per_class(cm_arg)
    return FrameEval(
        iou={n: v for n, v in zip(class_names, ious)},
        iou_argmax={n: v for n, v in zip(class_names, ious_arg)},
        mean_defect_iou=_mean_defect(ious),
        mean_defect_iou_argmax=_mean_defect(ious_arg),
        pixel_accuracy=float(np.trace(cm) / max(1, cm.sum())),
        thresholds={n: float(t) for n, t in zip(class_names[1:], thr)},
        frames=len(frames),
    )


def region_confusion(region: list[np.ndarray], truths: list[np.ndarray], threshold: float
                     ) -> np.ndarray:
    """2 x 2 confusion (rows truth, columns prediction; 0 not region, 1 region) of thresholded
    region probabilities (H x W each) against 0/1 region masks; 255 in a mask is not scored."""
    cm = np.zeros((2, 2), np.int64)
    for p, t in zip(region, truths):
        cm += confusion((p >= threshold).astype(np.uint8), t, 2, t != 255)
    return cm


def region_scores(cm: np.ndarray) -> dict[str, float | None]:
    """The thesis's Table 3.3 figures from a 2 x 2 region confusion: MPA (mean of the two
    classes' pixel accuracy), MIoU over {not region, region}, the region's IoU."""
    ious = iou_per_class(cm)
    rows = cm.sum(1)
    acc = [float(cm[c, c] / rows[c]) for c in range(2) if rows[c] > 0]
    known = [v for v in ious if v is not None]
    return {"mpa": float(np.mean(acc)) if acc else None,
            "miou": float(np.mean(known)) if known else None,
            "iou": ious[1]}


def choose_region_threshold(region: list[np.ndarray], truths: list[np.ndarray],
                            candidates: Sequence[float]) -> tuple[float, float]:
    """The candidate threshold with the best region MIoU (over {not region, region}) on
    calibration frames (ties: the first). MIoU, not the region's IoU: on frames without any
    region the IoU of every threshold that predicts some is 0 and of one that predicts none is
    undefined, so ranking by it would pick the threshold with the most false region."""
    best, best_miou = float(candidates[0]), -1.0
    for c in candidates:
        miou = region_scores(region_confusion(region, truths, c))["miou"]
        if miou is not None and miou > best_miou + 1e-9:
            best, best_miou = float(c), miou
    return round(best, 4), best_miou
