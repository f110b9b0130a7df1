"""Weighted SSIM, the dissimilarity map D and the training loss of the fuzzy-mask inpainter
(spec §3.2, §3.3, §4.1).

SSIM components on a Gaussian window (11 x 11, sigma 1.5, reflect padding so the map is H x W):

    I = (2 mu_x mu_y + C1) / (mu_x^2 + mu_y^2 + C1)
    C = (2 s_x s_y + C2) / (s_x^2 + s_y^2 + C2)
    S = (s_xy + C3) / (s_x s_y + C3)                        ("standard", spec default)
    S = (2 s_xy + C3) / (s_x + s_y + C3)                    ("literal": the paper's eq. 3 as printed)
    ssimloss_map = mean_c(1 - (I^alpha * C * S^beta)^(1 / gamma))

with s_x = sqrt(max(var_x, 0) + 1e-8) and the spec's clamps (I, C, S to [1e-4, 1], the product
to >= 1e-8) so that fractional powers never see a negative base and gradients stay finite. The
1e-8 that keeps the square root differentiable is also added to s_xy, so S(x, x) = 1 exactly
(without it S would be C3 / (C3 + 1e-8) on flat patches and D(x, x) ~1e-5 instead of 0).

(alpha, beta, gamma) per image type (Table 1): I (0.2, 0.5, 2.3) textured backgrounds, II
(0.1, 0.8, 2.1) standard shapes on large backgrounds, III (0.3, 0.6, 2.1) mixed.

D(x, y) = mean_c (x - y)^2 + ssimloss_map(x, y) is the per-pixel anomaly function; the runtime
has a numpy twin (``inspector.models.fuzzymask.dissimilarity_map``) that must agree to 1e-4.

Example::

    >>> x = torch.rand(1, 1, 32, 32)
    >>> float(dissimilarity_map(x, x, *TYPE_WEIGHTS["I"]).abs().max()) < 1e-6
    True
"""

from __future__ import annotations

import logging
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

log = logging.getLogger(__name__)

__all__ = ["TYPE_WEIGHTS", "C1", "C2", "C3", "gaussian_window", "ssim_components", "ssimloss_map",
           "dissimilarity_map", "FuzzyMaskLoss"]

#: Table 1 of the paper: (alpha, beta, gamma) per image type
TYPE_WEIGHTS: dict[str, tuple[float, float, float]] = {
    "I": (0.2, 0.5, 2.3), "II": (0.1, 0.8, 2.1), "III": (0.3, 0.6, 2.1)}
C1, C2, C3 = 0.01 ** 2, 0.03 ** 2, 0.015 ** 2
_EPS_SIGMA = 1e-8
_LO = 1e-4  # clamp floor of I, C and S before the fractional powers (spec §3.2)

Structure = Literal["standard", "literal"]


def gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Normalised 1-D Gaussian of ``size`` taps (the 2-D window is its outer product)."""
    if size < 1 or size % 2 == 0:
        raise ValueError(f"SSIM window must be odd and positive, got {size}")
    r = torch.arange(size, dtype=torch.float64) - (size - 1) / 2.0
    g = torch.exp(-r ** 2 / (2.0 * sigma ** 2))
    return (g / g.sum()).float()


def _filter(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Separable depth-wise Gaussian filter with reflect padding (numpy's twin: OpenCV
    BORDER_REFLECT_101, the same mirror without repeating the edge pixel)."""
    c, k = x.shape[1], g.numel()
    p = k // 2
    y = F.conv2d(F.pad(x, (p, p, 0, 0), mode="reflect"), g.view(1, 1, 1, k).expand(c, 1, 1, k), groups=c)
    return F.conv2d(F.pad(y, (0, 0, p, p), mode="reflect"), g.view(1, 1, k, 1).expand(c, 1, k, 1), groups=c)


def ssim_components(x: torch.Tensor, y: torch.Tensor, window: int = 11, sigma: float = 1.5,
                    structure: Structure = "standard", c1: float = C1, c2: float = C2,
                    c3: float = C3) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pixel, per-channel (I, C, S), clamped to [1e-4, 1]; inputs N x C x H x W."""
    if x.shape != y.shape or x.ndim != 4:
        raise ValueError(f"expected two N x C x H x W tensors of one shape, got {tuple(x.shape)} "
                         f"and {tuple(y.shape)}")
    dtype = x.dtype
    # moments in float64: var = E[x^2] - E[x]^2 cancels catastrophically on flat patches, and in
    # float32 its rounding (~1e-8 at grey 0.3) is as large as the 1e-8 below, so D(x, x) would
    # read ~4e-5 there instead of 0; the filter is a small share of a training step
    x, y = x.double(), y.double()
    g = gaussian_window(window, sigma).to(device=x.device, dtype=x.dtype)
    n = x.shape[0]
    # one filter call over the five moment images of the whole batch
    m = _filter(torch.cat([x, y, x * x, y * y, x * y]), g)
    mx, my, exx, eyy, exy = m.split(n)
    vx = (exx - mx * mx).clamp_min(0.0)
    vy = (eyy - my * my).clamp_min(0.0)
    cov = exy - mx * my
    sx, sy = torch.sqrt(vx + _EPS_SIGMA), torch.sqrt(vy + _EPS_SIGMA)
    lum = (2 * mx * my + c1) / (mx * mx + my * my + c1)
    con = (2 * sx * sy + c2) / (sx * sx + sy * sy + c2)
    if structure == "standard":
        st = (cov + _EPS_SIGMA + c3) / (sx * sy + c3)
    elif structure == "literal":
        st = (2 * cov + c3) / (sx + sy + c3)
    else:
        raise ValueError(f"ssim_structure must be standard or literal, got {structure!r}")
    return (lum.clamp(_LO, 1.0).to(dtype), con.clamp(_LO, 1.0).to(dtype),
            st.clamp(_LO, 1.0).to(dtype))


def ssimloss_map(x: torch.Tensor, y: torch.Tensor, alpha: float, beta: float, gamma: float,
                 window: int = 11, sigma: float = 1.5, structure: Structure = "standard",
                 c1: float = C1, c2: float = C2, c3: float = C3) -> torch.Tensor:
    """N x H x W map of ``1 - (I^alpha C S^beta)^(1/gamma)``, averaged over channels."""
    lum, con, st = ssim_components(x, y, window, sigma, structure, c1, c2, c3)
    prod = (lum.pow(alpha) * con * st.pow(beta)).clamp_min(1e-8)
    return (1.0 - prod.pow(1.0 / gamma)).mean(dim=1)


def dissimilarity_map(x: torch.Tensor, y: torch.Tensor, alpha: float, beta: float, gamma: float,
                      window: int = 11, sigma: float = 1.5, structure: Structure = "standard",
                      c1: float = C1, c2: float = C2, c3: float = C3) -> torch.Tensor:
    """D(x, y) = mean_c (x - y)^2 + ssimloss_map(x, y): N x H x W (spec §4.1, "1 - Sim")."""
    return ((x - y) ** 2).mean(dim=1) + ssimloss_map(x, y, alpha, beta, gamma, window, sigma,
                                                     structure, c1, c2, c3)


class FuzzyMaskLoss(nn.Module):
    """Eq. (5): ``[MSE + L_SSIM](x, Model(x)) + lambda [MSE + L_SSIM](x, Model(x~))``.

    ``forward(model, x, x_tilde)`` runs ONE forward pass of ``cat([x, x_tilde])`` (BatchNorm sees
    clean and masked images together, spec §3.4) and returns the total and its parts.
    ``use_ssim=False`` leaves plain MSE (the ablation "+(1)" of spec §6.2).
    """

    def __init__(self, alpha: float, beta: float, gamma: float, lam: float = 0.1,
                 use_ssim: bool = True, window: int = 11, sigma: float = 1.5,
                 structure: Structure = "standard", c1: float = C1, c2: float = C2, c3: float = C3):
        super().__init__()
        self.alpha, self.beta, self.gamma, self.lam = alpha, beta, gamma, lam
        self.use_ssim = use_ssim
        self.kw = dict(window=window, sigma=sigma, structure=structure, c1=c1, c2=c2, c3=c3)

    def term(self, out: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mse = F.mse_loss(out, x)
        if not self.use_ssim:
            return mse, torch.zeros((), device=x.device)
        return mse, ssimloss_map(out, x, self.alpha, self.beta, self.gamma, **self.kw).mean()

    def forward(self, model: nn.Module, x: torch.Tensor,
                x_tilde: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        n = x.shape[0]
        out = model(torch.cat([x, x_tilde]))
        rec, inp = out[:n], out[n:]
        mse_r, ssim_r = self.term(rec, x)
        mse_i, ssim_i = self.term(inp, x)
        total = mse_r + ssim_r + self.lam * (mse_i + ssim_i)
        parts = {"loss": total.detach(), "mse_rec": mse_r.detach(), "ssim_rec": ssim_r.detach(),
                 "mse_inp": mse_i.detach(), "ssim_inp": ssim_i.detach()}
        return total, parts
