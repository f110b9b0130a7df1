"""Training data for CLGAN: random crops of defect-free images, at native pixel scale.

The generator is fully convolutional and the runtime feeds it native-resolution tiles of the
camera frame, so training crops are cut at native scale (not resized, as the paper does for its
256x256 MVTec inputs): the network then sees surface texture at the size it will see it on the
line. Images smaller than a crop are reflect-padded, as the runtime pads small frames.

Sources (``DataSource.format``):

* ``magnetic-tile``: the defect-free ``MT_Free`` images of the chosen split;
* ``neu-seg``: crops whose mask is background everywhere (NEU-Seg has no defect-free image);
* ``folder``: every image under the root, all taken as normal (``categories`` on a folder
  source is an error naming ``data.sources.<i>.categories``).

Pair ``i`` (Real_A, Real_B) is drawn from ``numpy.random.default_rng([seed, rank, i])``, so any
pair can be regenerated on its own: a resumed run sees the data an uninterrupted one would have.

Example::

    >>> import numpy as np
    >>> imgs = [NormalImage(np.full((40, 50, 1), 128, np.uint8), None, "a")]
    >>> pairs = CropPairs(imgs, crop=32, channels=1, seed=0)
    >>> a, b = pairs.pair(0)
    >>> a.shape, float(a.min()), float(a.max())
    ((1, 32, 32), 0.003921627998352051, 0.003921627998352051)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from inspector.evaluation.datasets import SplitFractions, defect_free_windows, open_dataset

# ARCD's error for training data that cannot be used (an InspectorError and a ValueError with
# the dotted ``key`` to change): the trainers put it beside the config file, one line, exit 2
from export.arcd.data import TrainingDataError

log = logging.getLogger(__name__)

__all__ = ["DataSource", "NormalImage", "load_normal_images", "CropPairs", "to_model_range",
           "pad_small", "random_crop", "TrainingDataError", "NoNormalImages"]


class NoNormalImages(TrainingDataError):
    """The sources could all be read but hold no defect-free image (or, for NEU-Seg, no
    defect-free window of the crop's size): ``key`` is ``data.sources``."""


class DataSource(BaseModel):
    """One folder of training images; ``root`` is relative to the training config file."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    format: Literal["magnetic-tile", "neu-seg", "folder"]
    root: str
    split: Literal["train", "val", "test", "all"] = Field(
        "train", description="hash split of the stems (inspector.evaluation.datasets.split_of)")
    categories: list[str] | None = Field(
        None, description="magnetic-tile folders (default [MT_Free]); neu-seg subsets (default all); "
                          "not for folder sources (an error: they take every image under root)")
    stride: int = Field(8, ge=1, description="neu-seg: grid step of the defect-free crop search")


@dataclass
class NormalImage:
    """A defect-free training image; ``windows`` (K x 2 top-left corners) limits where crops may
    come from, None = anywhere."""

    image: np.ndarray  # HxW or HxWx3 uint8
    windows: np.ndarray | None
    name: str


def _to_channels(img: np.ndarray, channels: int) -> np.ndarray:
    if img.ndim == 2:
        img = img[:, :, None]
    if img.shape[2] == channels:
        return img
    if channels == 1:
        # BT.601 luma, the weights the runtime adapter uses for colour frames on grey models
        g = img[:, :, 0] * 0.299 + img[:, :, 1] * 0.587 + img[:, :, 2] * 0.114
        return np.clip(np.rint(g), 0, 255).astype(np.uint8)[:, :, None]
    return np.repeat(img[:, :, :1], channels, axis=2)  # grey data on an RGB model: replicate


def _open_source(src: DataSource, root: Path, key: str, fractions: SplitFractions):
    """``src``'s data set; a missing root or layout (``<key>.root``) or a category or subset the
    root lacks (``<key>.categories``) is a :class:`TrainingDataError` naming the folder."""
    if src.format == "folder" and src.categories:
        # a folder source takes every image under its root: a categories list it ignored would
        # train on images the user meant to leave out
        raise TrainingDataError(
            f"{list(src.categories)}: categories selects magnetic-tile folders or neu-seg subsets; "
            f"a folder source takes every image under its root ({root}): remove the key, or point "
            f"root at the subfolder to train on", f"{key}.categories")
    kw = {}
    if src.format == "magnetic-tile":
        kw["categories"] = src.categories or ["MT_Free"]
    elif src.format == "neu-seg" and src.categories:
        kw["subsets"] = src.categories
    try:
        return open_dataset(src.format, root, split=src.split, fractions=fractions, **kw)
    except TrainingDataError:
        raise
    except (OSError, ValueError) as e:
        # the readers name the folder: "no folder(s) [...]" / "no subset folder(s) [...]" is a
        # category the root lacks, anything else the root itself (missing, another layout)
        what = "categories" if src.categories and "folder(s)" in str(e) else "root"
        raise TrainingDataError(str(e), f"{key}.{what}") from e


def load_normal_images(sources: list[DataSource], base_dir: Path, channels: int, crop: int,
                       fractions: SplitFractions) -> tuple[list[NormalImage], list[str]]:
    """All defect-free training images of ``sources`` in memory (HxWxC uint8), and a description.

    Every image (and mask) is read here, once: training reads nothing else, so the trainers call
    this before they create the run folder. What cannot be used raises
    :class:`TrainingDataError` with the dotted key of its source, ``data.sources.<i>.root`` (a
    missing root, an unreadable image or mask, a mask of another size than its image) or
    ``data.sources.<i>.categories``, the message naming the file or folder;
    :class:`NoNormalImages` (key ``data.sources``) when none of the images is defect-free.
    """
    images: list[NormalImage] = []
    desc: list[str] = []
    for i, src in enumerate(sources):
        key = f"data.sources.{i}"
        root = Path(src.root)
        root = (root if root.is_absolute() else (base_dir / root)).resolve()
        ds = _open_source(src, root, key, fractions)
        n0, skipped = len(images), 0
        for j in range(len(ds)):
            try:
                s = ds.load(j)
            except ValueError as e:  # the reader's message names the file: unreadable, mis-sized mask
                raise TrainingDataError(str(e), f"{key}.root") from e
            except OSError as e:  # a file that vanished or a read error between listing and reading
                raise TrainingDataError(f"{ds.entries[j].image}: {e}", f"{key}.root") from e
            img = _to_channels(s.image, channels)
            if src.format == "neu-seg":
                win = defect_free_windows(s.mask, crop, src.stride)
                if len(win) == 0:
                    skipped += 1
                    continue
                images.append(NormalImage(img, win, s.name))
            else:
                if s.defective:
                    skipped += 1  # a mask on a "normal" image: never train on it
                    continue
                images.append(NormalImage(img, None, s.name))
        why = (f"without a defect-free {crop}px window" if src.format == "neu-seg"
               else "defect images (their masks mark defects)")
        desc.append(f"{src.format} {root} split={src.split}: {len(images) - n0} images"
                    + (f" ({skipped} {why} skipped)" if skipped else ""))
    if not images:
        raise NoNormalImages("no defect-free training images: " + "; ".join(desc),
                             "data.sources")
    return images, desc


def to_model_range(img: np.ndarray) -> np.ndarray:
    """HxWxC uint8 -> CxHxW float32 in [-1, 1] (the runtime's mean 0.5, std 0.5 on pixel/255)."""
    return (img.transpose(2, 0, 1).astype(np.float32) / 127.5) - 1.0


def pad_small(img: np.ndarray, windows: np.ndarray | None, crop: int) -> np.ndarray:
    """HxWxC ``img`` reflect-padded at the bottom and right to at least ``crop`` x ``crop`` when
    crops may come from anywhere (``windows`` None); done once per image, not at every draw."""
    h, w = img.shape[:2]
    if windows is not None or (h >= crop and w >= crop):
        return img
    return np.pad(img, ((0, max(0, crop - h)), (0, max(0, crop - w)), (0, 0)), mode="reflect")


def random_crop(images: list[NormalImage], crop: int, rng: np.random.Generator,
                flip: bool = False, vflip: bool = False) -> np.ndarray:
    """One ``crop`` x ``crop`` window (HxWxC uint8, contiguous) of a random image: at a random
    allowed corner, flipped left-right / up-down with p = 0.5 each when asked. The draws from
    ``rng`` are always in the same order, so a crop is a pure function of the generator's seed."""
    im = images[int(rng.integers(len(images)))]
    if im.windows is not None:
        y, x = (int(v) for v in im.windows[int(rng.integers(len(im.windows)))])
    else:
        h, w = im.image.shape[:2]
        y, x = int(rng.integers(h - crop + 1)), int(rng.integers(w - crop + 1))
    t = im.image[y:y + crop, x:x + crop]
    if flip and rng.random() < 0.5:
        t = t[:, ::-1]
    if vflip and rng.random() < 0.5:
        t = t[::-1]
    return np.ascontiguousarray(t)


class CropPairs:
    """(Real_A, Real_B) crop pairs for training step ``i``.

    ``real_b_mode='independent'`` (spec §1.1 DEFAULT) draws Real_B from another random image;
    ``'same_as_A'`` uses Real_A itself. ``flip`` (spec: optional for textures) mirrors left-right
    with p = 0.5, ``vflip`` up-down.
    """

    def __init__(self, images: list[NormalImage], crop: int, channels: int, seed: int = 0,
                 rank: int = 0, real_b_mode: Literal["independent", "same_as_A"] = "independent",
                 flip: bool = False, vflip: bool = False):
        if not images:
            raise ValueError("CropPairs needs at least one image")
        self.images, self.crop, self.channels = images, crop, channels
        self.seed, self.rank = seed, rank
        self.real_b_mode, self.flip, self.vflip = real_b_mode, flip, vflip
        for im in images:
            im.image = pad_small(im.image, im.windows, crop)

    def _crop(self, rng: np.random.Generator) -> np.ndarray:
        return to_model_range(random_crop(self.images, self.crop, rng, self.flip, self.vflip))

    def pair(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng([self.seed, self.rank, i])
        a = self._crop(rng)
        b = a.copy() if self.real_b_mode == "same_as_A" else self._crop(rng)
        return a, b

    def batch(self, step: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        pairs = [self.pair(step * batch_size + j) for j in range(batch_size)]
        a = torch.from_numpy(np.stack([p[0] for p in pairs]))
        b = torch.from_numpy(np.stack([p[1] for p in pairs]))
        return a, b
