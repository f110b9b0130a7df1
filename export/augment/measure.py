"""Diversity of generated images in a fixed feature space (issue #9's stand-in for LPIPS).

No pretrained network can be downloaded here, so the feature space is hand-made and fixed: each
image, grey, resized to 64x64 and normalised to zero mean and unit variance (so brightness and
contrast alone do not count as diversity), is described by

* its 16x16 thumbnail (layout of dark and bright regions), and
* a histogram of gradient orientations (8 bins, magnitude-weighted) in each cell of a 4x4 grid
  (texture direction: scratches, rolling marks),

each part scaled to unit length. Diversity is the mean pairwise Euclidean distance between the
descriptors of up to ``max_images`` images (0 for identical images, larger for more varied
ones). The same number on real images of the same data set is the yardstick: a generator whose
output is far less diverse than the real images has collapsed onto a few modes.

Mask alignment (the other measure of the issue) needs no code of its own: it is ``inspector
evaluate`` of a frozen detector bundle on the generated folder (``--format neu-seg --split
all``), whose per-class IoU compares the detector's masks with the conditioning masks.
"""

from __future__ import annotations

from typing import Iterable

import cv2
import numpy as np

__all__ = ["descriptor", "diversity"]


def descriptor(image: np.ndarray) -> np.ndarray:
    """The fixed feature vector of one image (HxW or HxWx3 uint8); see the module doc."""
    g = image if image.ndim == 2 else cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    g = cv2.resize(g.astype(np.float32), (64, 64), interpolation=cv2.INTER_AREA)
    g = (g - g.mean()) / (g.std() + 1e-6)
    thumb = cv2.resize(g, (16, 16), interpolation=cv2.INTER_AREA).ravel()
    gx = cv2.Sobel(g, cv2.CV_32F, 1, 0, ksize=3)
    gy = cv2.Sobel(g, cv2.CV_32F, 0, 1, ksize=3)
    mag = np.hypot(gx, gy)
    ang = np.mod(np.arctan2(gy, gx), np.pi)  # orientation, not direction
    bins = np.minimum((ang / np.pi * 8).astype(int), 7)
    hog = np.zeros((4, 4, 8), np.float32)
    for cy in range(4):
        for cx in range(4):
            sl = (slice(cy * 16, cy * 16 + 16), slice(cx * 16, cx * 16 + 16))
            hog[cy, cx] = np.bincount(bins[sl].ravel(), weights=mag[sl].ravel(), minlength=8)
    hog = hog.ravel()
    thumb /= np.linalg.norm(thumb) + 1e-6
    hog /= np.linalg.norm(hog) + 1e-6
    return np.concatenate([thumb, hog]).astype(np.float64)


def diversity(images: Iterable[np.ndarray], max_images: int = 300) -> float:
    """Mean pairwise distance of the images' descriptors (at most ``max_images``, in order).

    >>> flat = [np.full((32, 32), 100, np.uint8)] * 3
    >>> diversity(flat)
    0.0
    >>> rng = np.random.default_rng(0)
    >>> diversity([rng.integers(0, 255, (32, 32)).astype(np.uint8) for _ in range(3)]) > 0.5
    True
    """
    feats = []
    for img in images:
        feats.append(descriptor(img))
        if len(feats) >= max_images:
            break
    if len(feats) < 2:
        raise ValueError(f"diversity needs at least 2 images, got {len(feats)}")
    f = np.stack(feats)
    sq = (f * f).sum(1)
    d2 = np.maximum(sq[:, None] + sq[None, :] - 2 * f @ f.T, 0.0)
    n = len(f)
    return float(np.sqrt(d2)[np.triu_indices(n, 1)].mean())
