"""Training data for the fuzzy-mask inpainter: native-scale random crops of defect-free images.

The data sources and their loading are CLGAN's (``export.clgan.data``: magnetic-tile ``MT_Free``,
NEU-Seg defect-free windows, plain folders; hash splits, training on ``split: train``). As there,
crops are cut at native pixel scale rather than resized (the spec's 256x256 resize is for MVTec
images): the runtime tiles native camera frames, so the network must learn the surface at the
scale it will see it on the line. Images smaller than a crop are reflect-padded, as the runtime
pads small frames.

Crop ``i`` comes from ``numpy.random.default_rng([seed, rank, i])`` and the fuzzy mask of step
``s`` from ``default_rng([seed, rank, s, MASK_STREAM])``, so every batch is a pure function of
(seed, rank, step): a resumed run sees what an uninterrupted one would, and DataLoader workers
need no shared state.

Example::

    >>> import numpy as np
    >>> from export.fuzzymask.masking import FuzzyMaskConfig
    >>> imgs = [NormalImage(np.full((40, 50, 1), 255, np.uint8), None, "a")]
    >>> crops = NormalCrops(imgs, crop=32, channels=1)
    >>> b = StepBatches(crops, batch_size=2, mask=FuzzyMaskConfig(cell=16), steps=10)
    >>> x, xt = b[3]
    >>> tuple(x.shape), float(x.max()), bool((xt < x).any())
    ((2, 1, 32, 32), 1.0, True)
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from torch.utils.data import Dataset

from export.clgan.data import (DataSource, NoNormalImages, NormalImage, TrainingDataError,
                               load_normal_images, pad_small, random_crop)
from export.fuzzymask.masking import FuzzyMaskConfig, fuzzy_mask

log = logging.getLogger(__name__)

__all__ = ["DataSource", "NormalImage", "load_normal_images", "NormalCrops", "StepBatches",
           "MASK_STREAM", "to_unit", "TrainingDataError", "NoNormalImages"]

#: extra seed word that separates the mask draws from the crop draws
MASK_STREAM = 0x6D61736B


def to_unit(img: np.ndarray) -> np.ndarray:
    """HxWxC uint8 -> CxHxW float32 pixel/255 in [0, 1] (the bundle's mean 0, std 1 input)."""
    return img.transpose(2, 0, 1).astype(np.float32) / np.float32(255.0)


class NormalCrops:
    """Random ``crop`` x ``crop`` windows of the training images, optionally flipped."""

    def __init__(self, images: list[NormalImage], crop: int, channels: int, seed: int = 0,
                 rank: int = 0, flip: bool = False, vflip: bool = False):
        if not images:
            raise ValueError("NormalCrops needs at least one image")
        self.crop, self.channels, self.seed, self.rank = crop, channels, seed, rank
        self.flip, self.vflip = flip, vflip
        self.images: list[NormalImage] = []
        for im in images:
            img = im.image if im.image.ndim == 3 else im.image[:, :, None]
            if img.shape[2] != channels:
                raise ValueError(f"{im.name}: {img.shape[2]} channel(s), the model has {channels}")
            self.images.append(NormalImage(pad_small(img, im.windows, crop), im.windows, im.name))

    def crop_at(self, i: int) -> np.ndarray:
        """Crop number ``i`` (C x crop x crop float32 in [0, 1])."""
        rng = np.random.default_rng([self.seed, self.rank, i])
        return to_unit(random_crop(self.images, self.crop, rng, self.flip, self.vflip))

    def stack(self, ids: range | list[int]) -> torch.Tensor:
        return torch.from_numpy(np.stack([self.crop_at(i) for i in ids]))


class StepBatches(Dataset):
    """Item ``s`` is training step ``s``'s pair (x, x~): ``batch_size`` crops and their fuzzy masks."""

    def __init__(self, crops: NormalCrops, batch_size: int, mask: FuzzyMaskConfig, steps: int):
        self.crops, self.batch_size, self.mask, self.steps = crops, batch_size, mask, steps

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        b = self.batch_size
        x = self.crops.stack(range(step * b, step * b + b))
        rng = np.random.default_rng([self.crops.seed, self.crops.rank, int(step), MASK_STREAM])
        x_tilde, _ = fuzzy_mask(x, self.mask, rng)
        return x, x_tilde


def worker_init(_: int) -> None:
    """DataLoader workers: one thread each (the batches are small; threads would only contend);
    stop signals are the main process's to handle (export.training.quiet_worker)."""
    from export.training import quiet_worker

    torch.set_num_threads(1)
    quiet_worker()
