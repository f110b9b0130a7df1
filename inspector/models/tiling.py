"""Cutting wide frames into model-size tiles and stitching the outputs back, or (bundles with
``input.fit: square_pad``) fitting the whole frame into one padded, resized square.

Tiles overlap by at least ``overlap`` pixels; the last tile on each axis is aligned to the frame
edge. When stitching, each output pixel comes from exactly one tile: the overlap between two
neighbours is split at its middle, so tile borders (where a convolution saw padding) are dropped
and nothing is averaged or allocated beyond the output map.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import cv2
import numpy as np


def axis_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Tile start offsets along one axis (a single tile when the axis is not longer than it)."""
    if length <= tile:
        return [0]
    stride = max(1, tile - overlap)
    starts = list(range(0, length - tile, stride))
    starts.append(length - tile)
    return starts


def axis_keep(starts: list[int], tile: int, length: int) -> list[tuple[int, int]]:
    """For each tile, the [begin, end) frame range whose output it provides."""
    keep = []
    n = len(starts)
    for i, s in enumerate(starts):
        lo = 0 if i == 0 else (starts[i - 1] + tile + s) // 2
        hi = min(length, s + tile) if i == n - 1 else (s + tile + starts[i + 1]) // 2
        keep.append((lo, hi))
    return keep


@dataclass(frozen=True)
class TileGrid:
    """Where the tiles of one frame shape lie and which part of each is kept."""

    height: int
    width: int
    tile_h: int
    tile_w: int
    ys: tuple[int, ...]
    xs: tuple[int, ...]
    keep_y: tuple[tuple[int, int], ...]
    keep_x: tuple[tuple[int, int], ...]

    @classmethod
    def build(cls, height: int, width: int, tile_h: int, tile_w: int, overlap: int) -> "TileGrid":
        ys = axis_starts(height, tile_h, overlap)
        xs = axis_starts(width, tile_w, overlap)
        return cls(height, width, tile_h, tile_w, tuple(ys), tuple(xs),
                   tuple(axis_keep(ys, tile_h, height)), tuple(axis_keep(xs, tile_w, width)))

    @property
    def count(self) -> int:
        return len(self.ys) * len(self.xs)

    def tiles(self):
        """Yield (index, y, x, (ky0, ky1), (kx0, kx1)) in batch order."""
        i = 0
        for y, ky in zip(self.ys, self.keep_y):
            for x, kx in zip(self.xs, self.keep_x):
                yield i, y, x, ky, kx
                i += 1


@dataclass(frozen=True)
class SquareFit:
    """Where one frame shape lies in the square a ``fit: square_pad`` bundle feeds whole.

    The thesis's squaring (spec §2.2): the HxW frame is zero-padded to a ``side`` x ``side``
    square, ``side = max(H, W)``, with the frame at (``top``, ``left``) — (0, 0) for ``top``
    alignment, ((S-H)//2, (S-W)//2) for ``center`` (the odd pixel goes to the bottom/right) —
    and the square is resized to the model's tile. ``height``/``width`` are the frame's, so the
    maps an adapter fills from it are already in frame coordinates. One batch item per frame.
    """

    height: int
    width: int
    tile_h: int
    tile_w: int
    side: int
    top: int
    left: int

    @classmethod
    def build(cls, height: int, width: int, tile_h: int, tile_w: int,
              align: Literal["top", "center"]) -> "SquareFit":
        side = max(height, width)
        top = 0 if align == "top" else (side - height) // 2
        left = 0 if align == "top" else (side - width) // 2
        return cls(height, width, tile_h, tile_w, side, top, left)

    @property
    def count(self) -> int:
        return 1

    def pad_resize(self, img: np.ndarray, canvas: np.ndarray, dst: np.ndarray) -> np.ndarray:
        """``img`` (HxWxC) into the square ``canvas`` (side x side x C, zero outside the frame,
        kept that way by writing only the frame's part), resized into ``dst`` (th x tw x C).

        The same pixels as ``export.arcd.simulation.square_pad_resize`` (what training feeds),
        without allocating: cv2 writes into ``dst`` when its shape and dtype fit."""
        canvas[self.top:self.top + self.height, self.left:self.left + self.width] = img
        return cv2.resize(canvas, (self.tile_w, self.tile_h), dst=dst, interpolation=cv2.INTER_LINEAR)

    def unfit(self, plane: np.ndarray, square: np.ndarray, out: np.ndarray) -> None:
        """One th x tw output plane back to frame coordinates: resized (bilinear) into the
        ``square`` scratch (side x side float32), its frame part copied into ``out`` (HxW)."""
        cv2.resize(plane, (self.side, self.side), dst=square, interpolation=cv2.INTER_LINEAR)
        out[...] = square[self.top:self.top + self.height, self.left:self.left + self.width]


#: how one frame shape meets the model input: tiles (``fit: tile``) or one padded square
FrameFit = TileGrid | SquareFit
