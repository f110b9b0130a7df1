"""Cutting wide frames into model-size tiles and stitching the outputs back.

Tiles overlap by at least ``overlap`` pixels; the last tile on each axis is aligned to the frame
edge. When stitching, each output pixel comes from exactly one tile: the overlap between two
neighbours is split at its middle, so tile borders (where a convolution saw padding) are dropped
and nothing is averaged or allocated beyond the output map.
"""

from __future__ import annotations

from dataclasses import dataclass


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
