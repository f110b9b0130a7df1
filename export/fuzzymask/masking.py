"""Random fuzzy masking (spec §2.3): the contrastive sample x~ of every clean training image x.

The image is cut into cells of ``cell`` x ``cell`` pixels (k = 16 by default; 8 and 32 are the
paper's other settings). For each batch the cells are shuffled and split into ``n_partitions``
disjoint groups that together cover the image (default: one group per image of the batch, so the
masks of one batch are complementary); image j is masked on group ``j % n_partitions``. Inside a
selected cell the original is kept with a centre-weighted Gaussian weight

    r(p) = w_max * exp(-|p - c|^2 / (2 sigma_w^2)),   c = cell centre,   sigma_w = k/4 by default

and the rest is filled with interference z (``gauss0``: N(0, sigma_z^2); ``uniform01``: U(0, 1);
``blurred_self``: the image blurred by a 7x7, sigma 3 Gaussian, an alternative reading of
"模糊" that is not in the paper): x~ = clamp(r x + (1 - r) z, 0, 1). Pixels outside the selected
cells are copied, bit for bit.

All randomness comes from the generator passed in (``numpy.random.Generator`` or
``torch.Generator``), so one seed gives one mask.

Example::

    >>> import numpy as np, torch
    >>> x = torch.full((2, 1, 32, 32), 0.5)
    >>> xt, cells = fuzzy_mask(x, FuzzyMaskConfig(cell=16), np.random.default_rng(0))
    >>> cells.shape, int(cells.sum()), bool((cells[0] & cells[1]).any())
    (torch.Size([2, 2, 2]), 4, False)
"""

from __future__ import annotations

import logging
import math
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

log = logging.getLogger(__name__)

__all__ = ["FuzzyMaskConfig", "complementary_partition", "cell_kernel", "cell_pixels", "retention_map",
           "gaussian_blur", "fuzzy_mask", "Rng"]

Rng = np.random.Generator | torch.Generator


class FuzzyMaskConfig(BaseModel):
    """Masking parameters; every value the paper leaves open is a spec [DEFAULT]."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    cell: int = Field(16, ge=2, description="k: cell side in pixels (paper 16; 8 and 32 tested)")
    n_partitions: int | None = Field(None, ge=1, description="cell groups per batch (None = batch size)")
    w_max: float = Field(0.5, ge=0, le=1, description="retention at the cell centre")
    sigma_w: float | None = Field(None, gt=0, description="retention profile sigma (None = cell/4)")
    fill: Literal["gauss0", "uniform01", "blurred_self"] = "gauss0"
    sigma_z: float = Field(0.1, ge=0, description="gauss0: noise standard deviation")

    def sigma(self) -> float:
        return self.sigma_w if self.sigma_w is not None else self.cell / 4.0


def _permutation(n: int, rng: Rng) -> np.ndarray:
    if isinstance(rng, torch.Generator):
        return torch.randperm(n, generator=rng).numpy()
    return rng.permutation(n)


def complementary_partition(n_cells: int, n_groups: int, rng: Rng) -> list[np.ndarray]:
    """A random partition of cell ids ``0..n_cells-1`` into ``n_groups`` disjoint groups whose
    sizes differ by at most one (spec §2.3(a): ``array_split(permutation, B)``)."""
    if n_groups < 1:
        raise ValueError(f"n_groups must be >= 1, got {n_groups}")
    return [np.sort(g) for g in np.array_split(_permutation(n_cells, rng), n_groups)]


def cell_kernel(cell: int, w_max: float, sigma_w: float) -> torch.Tensor:
    """The k x k retention weights of one selected cell; pixel centres sit at integer
    coordinates, so the cell centre is at ((k-1)/2, (k-1)/2)."""
    c = (cell - 1) / 2.0
    d = torch.arange(cell, dtype=torch.float64) - c
    d2 = d[:, None] ** 2 + d[None, :] ** 2
    return (w_max * torch.exp(-d2 / (2.0 * sigma_w ** 2))).float()


def _grid(h: int, w: int, cell: int) -> tuple[int, int]:
    # a frame side that is not a multiple of k ends in a partial cell, still a cell of its own
    return math.ceil(h / cell), math.ceil(w / cell)


def cell_pixels(cells: torch.Tensor, h: int, w: int, cell: int) -> torch.Tensor:
    """N x 1 x H x W bool: the pixels of the selected cells (``cells``: N x gh x gw bool)."""
    sel = cells.repeat_interleave(cell, dim=-2).repeat_interleave(cell, dim=-1)[..., :h, :w]
    return sel.unsqueeze(1)


def retention_map(cells: torch.Tensor, h: int, w: int, cell: int, w_max: float,
                  sigma_w: float) -> torch.Tensor:
    """N x 1 x H x W retention r: the cell kernel on selected cells (``cells``: N x gh x gw bool),
    1 elsewhere."""
    gh, gw = cells.shape[-2:]
    k = cell_kernel(cell, w_max, sigma_w).to(cells.device)
    tiled = k.repeat(gh, gw)[:h, :w]
    return torch.where(cell_pixels(cells, h, w, cell), tiled, torch.ones_like(tiled))


def gaussian_blur(x: torch.Tensor, ksize: int = 7, sigma: float = 3.0) -> torch.Tensor:
    """Depth-wise Gaussian blur with reflect padding (the ``blurred_self`` fill)."""
    r = torch.arange(ksize, dtype=torch.float64) - (ksize - 1) / 2.0
    g = torch.exp(-r ** 2 / (2 * sigma ** 2))
    g = (g / g.sum()).to(x.dtype).to(x.device)
    c = x.shape[1]
    p = ksize // 2
    y = F.pad(x, (p, p, 0, 0), mode="reflect")
    y = F.conv2d(y, g.view(1, 1, 1, ksize).expand(c, 1, 1, ksize), groups=c)
    y = F.pad(y, (0, 0, p, p), mode="reflect")
    return F.conv2d(y, g.view(1, 1, ksize, 1).expand(c, 1, ksize, 1), groups=c)


def _fill(x: torch.Tensor, cfg: FuzzyMaskConfig, rng: Rng) -> torch.Tensor:
    if cfg.fill == "blurred_self":
        return gaussian_blur(x)
    shape = tuple(x.shape)
    if isinstance(rng, torch.Generator):
        z = torch.randn(shape, generator=rng) if cfg.fill == "gauss0" else torch.rand(shape, generator=rng)
    elif cfg.fill == "gauss0":
        z = torch.from_numpy(rng.standard_normal(shape, dtype=np.float32))
    else:
        z = torch.from_numpy(rng.random(shape, dtype=np.float32))
    if cfg.fill == "gauss0":
        z = z * cfg.sigma_z
    return z.to(device=x.device, dtype=x.dtype)


def fuzzy_mask(x: torch.Tensor, cfg: FuzzyMaskConfig, rng: Rng) -> tuple[torch.Tensor, torch.Tensor]:
    """The fuzzy-masked copy of a batch ``x`` (N x C x H x W in [0, 1]).

    Returns ``(x_tilde, cells)``: ``cells`` is N x gh x gw bool, True where image j was masked.
    """
    if x.ndim != 4:
        raise ValueError(f"expected N x C x H x W, got shape {tuple(x.shape)}")
    n, _, h, w = x.shape
    gh, gw = _grid(h, w, cfg.cell)
    groups = complementary_partition(gh * gw, cfg.n_partitions or n, rng)
    cells = torch.zeros(n, gh * gw, dtype=torch.bool)
    for j in range(n):
        cells[j, torch.from_numpy(groups[j % len(groups)])] = True
    cells = cells.view(n, gh, gw).to(x.device)
    r = retention_map(cells, h, w, cfg.cell, cfg.w_max, cfg.sigma()).to(x.dtype)
    z = _fill(x, cfg, rng)
    mixed = (r * x + (1.0 - r) * z).clamp(0.0, 1.0)
    # where() rather than the blend itself outside the cells: r = 1 there, but copying keeps the
    # unmasked pixels exactly equal to x whatever z holds (even a non-finite blur at a border)
    sel = cell_pixels(cells, h, w, cfg.cell).expand_as(x)
    return torch.where(sel, mixed, x), cells
