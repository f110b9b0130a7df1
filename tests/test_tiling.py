import numpy as np
import pytest

from inspector.models.tiling import TileGrid


@pytest.mark.parametrize("h,w,t,ov", [(256, 1600, 256, 32), (300, 700, 128, 16), (128, 128, 128, 32),
                                      (100, 90, 128, 8), (257, 513, 256, 0)])
def test_every_pixel_kept_by_exactly_one_tile(h, w, t, ov):
    g = TileGrid.build(max(h, t), max(w, t), t, t, ov)
    cover = np.zeros((g.height, g.width), np.int32)
    for _, y, x, (ky0, ky1), (kx0, kx1) in g.tiles():
        assert y <= ky0 < ky1 <= y + t and x <= kx0 < kx1 <= x + t
        cover[ky0:ky1, kx0:kx1] += 1
    assert (cover == 1).all()


def test_demo_frame_takes_seven_tiles():
    g = TileGrid.build(256, 1600, 256, 256, 32)
    assert g.count == 7
    # neighbours overlap by at least the requested amount
    assert all(b - a <= 256 - 32 for a, b in zip(g.xs, g.xs[1:]))
