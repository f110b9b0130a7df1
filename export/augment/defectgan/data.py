"""Defect-GAN's training crops, all from the labelled subset ARCD sees at the same label rate.

Defect crops: a ``window`` x ``window`` window centred on a pixel of a class drawn uniformly
(so rare classes are seen as often as common ones), labelled multi-hot with every class that
covers at least ``min_class_px`` pixels of the window. Normal crops: defect-free windows of the
same images (:func:`inspector.evaluation.datasets.defect_free_windows`), because NEU-Seg has no
defect-free image. Windows are resized to the model's ``size`` when it differs (same scale at
sampling time, where the synthetic defect is pasted back at ``window`` pixels).

Batch ``s`` is a pure function of (seed, s), so a resumed run sees the data an uninterrupted
one would.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from inspector.evaluation.datasets import Dataset, defect_free_windows

from export.augment.dataset import labelled_subset

log = logging.getLogger(__name__)

__all__ = ["LabelledImages", "load_subset", "CropSampler", "DataError", "to_tensor_range",
           "from_tensor_range"]


class DataError(ValueError):
    """The subset gives no training crops under the config's ``key`` (dotted): the trainer names
    the config file and the key (a ValueError for the other callers)."""

    def __init__(self, key: str, problem: str):
        self.key = key
        super().__init__(problem)


def to_tensor_range(img: np.ndarray) -> np.ndarray:
    """uint8 HxW -> float32 in [-1, 1]."""
    return img.astype(np.float32) / 127.5 - 1.0


def from_tensor_range(x: np.ndarray) -> np.ndarray:
    """float in [-1, 1] -> uint8 (rounded, clipped)."""
    return np.clip(np.rint((x + 1.0) * 127.5), 0, 255).astype(np.uint8)


def grey(img: np.ndarray) -> np.ndarray:
    """NEU JPEGs can be 3-channel with grey content: the model works on one channel."""
    return img if img.ndim == 2 else cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)


@dataclass
class LabelledImages:
    """The subset in memory: grey images, class-index masks, names."""

    dataset: Dataset
    images: list[np.ndarray]
    masks: list[np.ndarray]
    names: list[str]
    n_classes: int  # defect classes (mask indices 1..n_classes)

    def describe(self) -> str:
        return (f"{len(self.images)} labelled NEU-Seg images ({self.dataset.split}) from "
                f"{self.dataset.root}")


def load_subset(root: str | Path, fraction: float, seed: int,
                splits: tuple[str, ...] = ("train", "test")) -> LabelledImages:
    """Load :func:`export.augment.dataset.labelled_subset` into memory (grey)."""
    ds = labelled_subset(root, fraction, seed, splits)
    images, masks, names = [], [], []
    for s in ds:
        images.append(grey(s.image))
        masks.append(s.mask.astype(np.uint8))
        names.append(s.name)
    return LabelledImages(ds, images, masks, names, len(ds.classes) - 1)


class CropSampler:
    """Deterministic batches of (normal crops, defect crops, defect labels) for one step."""

    def __init__(self, data: LabelledImages, window: int, size: int, seed: int,
                 min_class_px: int = 24, normal_stride: int = 8, flip: bool = True):
        self.data, self.window, self.size, self.seed = data, window, size, seed
        self.min_class_px, self.flip = min_class_px, flip
        self.n_classes = data.n_classes
        # every defect-free window of every image: (image index, y, x)
        normals = []
        for i, m in enumerate(data.masks):
            w = defect_free_windows(m, window, normal_stride)
            normals.append(np.concatenate([np.full((len(w), 1), i, np.int64), w], axis=1))
        self.normals = np.concatenate(normals) if normals else np.zeros((0, 3), np.int64)
        if len(self.normals) == 0:
            raise DataError("data.window", f"no defect-free {window}x{window} window in the "
                            f"{len(data.images)} images: lower data.window")
        # per class, the images showing it (a class absent from the subset is never drawn)
        self.by_class = {c: [i for i, m in enumerate(data.masks) if (m == c + 1).sum() >= min_class_px]
                         for c in range(self.n_classes)}
        self.classes_present = [c for c, v in self.by_class.items() if v]
        if not self.classes_present:
            raise DataError("data.min_class_px", f"no defect of at least {min_class_px} px in the "
                            f"{len(data.images)} images")

    def describe(self) -> str:
        per = ", ".join(f"class {c + 1}: {len(v)} images" for c, v in self.by_class.items())
        return (f"{len(self.normals)} defect-free {self.window}px windows; defect crops by class ({per}); "
                f"model size {self.size}")

    def _fit(self, crop: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        if self.window != self.size:
            crop = cv2.resize(crop, (self.size, self.size), interpolation=cv2.INTER_AREA)
        if self.flip:
            if rng.random() < 0.5:
                crop = crop[:, ::-1]
            if rng.random() < 0.5:
                crop = crop[::-1, :]
        return np.ascontiguousarray(crop)

    def normal(self, rng: np.random.Generator) -> np.ndarray:
        i, y, x = self.normals[rng.integers(len(self.normals))]
        return self._fit(self.data.images[i][y:y + self.window, x:x + self.window], rng)

    def defect(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        c = self.classes_present[rng.integers(len(self.classes_present))]
        i = self.by_class[c][rng.integers(len(self.by_class[c]))]
        img, mask = self.data.images[i], self.data.masks[i]
        ys, xs = np.nonzero(mask == c + 1)
        k = rng.integers(len(ys))
        h, w = mask.shape
        y0 = int(np.clip(ys[k] - self.window // 2, 0, max(0, h - self.window)))
        x0 = int(np.clip(xs[k] - self.window // 2, 0, max(0, w - self.window)))
        win = mask[y0:y0 + self.window, x0:x0 + self.window]
        label = np.array([(win == j + 1).sum() >= self.min_class_px for j in range(self.n_classes)],
                         np.float32)
        label[c] = 1.0  # the drawn class is in the window by construction
        return self._fit(img[y0:y0 + self.window, x0:x0 + self.window], rng), label

    def batch(self, step: int, batch_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(normals (B,1,S,S), defects (B,1,S,S) in [-1, 1], labels (B,C)) for ``step``."""
        rng = np.random.default_rng([self.seed, 31, step])
        n = np.stack([self.normal(rng) for _ in range(batch_size)])
        d, lab = zip(*(self.defect(rng) for _ in range(batch_size)))
        return (to_tensor_range(n)[:, None], to_tensor_range(np.stack(d))[:, None],
                np.stack(lab))

    def target_labels(self, step: int, batch_size: int) -> np.ndarray:
        """Defacement targets drawn from the empirical label distribution of real defect crops
        (spec §4 default): the labels of fresh defect draws."""
        rng = np.random.default_rng([self.seed, 53, step])
        return np.stack([self.defect(rng)[1] for _ in range(batch_size)])
