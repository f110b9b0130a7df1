"""ARCD losses (seed spec ``004_spec.md`` §2.6).

* Loss1, reconstruction: ``L_rec = MSE + (1/100) * (1 - SSIM)``. The thesis picked the 1/100 weight
  by experiment because SSIM's term is two orders of magnitude larger than the per-pixel MSE of a
  decent reconstruction; MSE (not L1) because it amplifies small differences and has smoother
  gradients. SSIM uses an 11x11 Gaussian window, sigma 1.5, C1 = (0.01 L)^2, C2 = (0.03 L)^2.
* Loss2, discrimination: multi-class softmax focal loss ``-alpha_t (1 - p_t)^gamma log p_t``,
  gamma = 2. ``alpha`` is None (DRAEM), a fixed per-class list, or ``"balanced"``: the thesis's
  eps = n / (n + m) (fraction of negatives) generalised per class as ``alpha_c = 1 - freq_c``,
  counted per batch and clamped, so rare defect pixels weigh more than background.

Example::

    >>> import torch
    >>> x = torch.rand(1, 1, 32, 32)
    >>> round(float(ssim(x, x)), 4)
    1.0
    >>> fl = FocalLoss(gamma=0.0)
    >>> logits = torch.zeros(1, 2, 1, 1); target = torch.zeros(1, 1, 1, dtype=torch.long)
    >>> round(float(fl(logits, target)), 4)   # gamma 0, no alpha: cross-entropy, -log(0.5)
    0.6931
"""

from __future__ import annotations

import math
from typing import Literal, Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["gaussian_window", "ssim", "ReconstructionLoss", "FocalLoss", "balanced_alpha", "DiceLoss",
           "defect_vs_background"]


def gaussian_window(size: int = 11, sigma: float = 1.5, channels: int = 1,
                    dtype: torch.dtype = torch.float32, device: torch.device | None = None
                    ) -> torch.Tensor:
    """Normalised 2-D Gaussian kernel ``[channels, 1, size, size]`` (the SSIM window, explicit)."""
    g = _gauss_1d(size, sigma, dtype, device or torch.device("cpu"))
    w = g[:, None] @ g[None, :]
    return w.expand(channels, 1, size, size).contiguous()


def _gauss_1d(size: int, sigma: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2.0
    g = torch.exp(-(x ** 2) / (2.0 * sigma ** 2))
    return (g / g.sum()).to(dtype=dtype, device=device)


def ssim(x: torch.Tensor, y: torch.Tensor, window_size: int = 11, sigma: float = 1.5,
         data_range: float = 1.0, reduction: Literal["mean", "none"] = "mean") -> torch.Tensor:
    """Structural similarity of two ``[N, C, H, W]`` batches (Wang et al. 2004, eq. 3-10).

    Local statistics come from a Gaussian window applied per channel with zero padding of
    ``window_size // 2`` (DRAEM's choice, so the map has the input's size). The window is applied
    as two 1-D passes (the 2-D Gaussian is their outer product, and zero padding commutes with
    the split), one grouped conv over x, y, x², y², xy together: same values as the 2-D window,
    about 5x cheaper, which matters when SSIM costs as much as a small R's backward pass.
    ``reduction="none"`` returns the SSIM map; ``"mean"`` its mean.
    """
    if x.shape != y.shape or x.dim() != 4:
        raise ValueError(f"ssim needs two equal [N, C, H, W] tensors, got {tuple(x.shape)} and "
                         f"{tuple(y.shape)}")
    c = x.shape[1]
    g = _gauss_1d(window_size, sigma, x.dtype, x.device)
    pad = window_size // 2
    stack = torch.cat([x, y, x * x, y * y, x * y], dim=1)
    n = stack.shape[1]
    gv = g.view(1, 1, -1, 1).expand(n, 1, window_size, 1)
    gh = g.view(1, 1, 1, -1).expand(n, 1, 1, window_size)
    f = F.conv2d(F.conv2d(stack, gv, padding=(pad, 0), groups=n), gh, padding=(0, pad), groups=n)
    mu_x, mu_y, e_xx, e_yy, e_xy = torch.split(f, c, dim=1)
    mu_x2, mu_y2, mu_xy = mu_x * mu_x, mu_y * mu_y, mu_x * mu_y
    sigma_x2 = e_xx - mu_x2
    sigma_y2 = e_yy - mu_y2
    sigma_xy = e_xy - mu_xy
    c1 = (0.01 * data_range) ** 2
    c2 = (0.03 * data_range) ** 2
    smap = ((2 * mu_xy + c1) * (2 * sigma_xy + c2)) / ((mu_x2 + mu_y2 + c1) * (sigma_x2 + sigma_y2 + c2))
    return smap.mean() if reduction == "mean" else smap


class ReconstructionLoss(nn.Module):
    """``MSE + ssim_weight * (1 - SSIM)`` (thesis: ssim_weight = 1/100).

    Inputs are compared in the [0, 1] pixel range the SSIM constants assume; pass ``mean``/``std``
    when the tensors are normalised, and they are mapped back first.
    """

    def __init__(self, ssim_weight: float = 0.01, window_size: int = 11, sigma: float = 1.5,
                 mean: Sequence[float] = (0.0,), std: Sequence[float] = (1.0,)):
        super().__init__()
        self.ssim_weight = ssim_weight
        self.window_size = window_size
        self.sigma = sigma
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, reconstruction: torch.Tensor, target: torch.Tensor
                ) -> tuple[torch.Tensor, dict[str, float]]:
        rec = reconstruction * self.std + self.mean
        tgt = target * self.std + self.mean
        mse = F.mse_loss(rec, tgt)
        s = ssim(rec, tgt, self.window_size, self.sigma)
        total = mse + self.ssim_weight * (1.0 - s)
        return total, {"mse": float(mse.detach()), "ssim": float(s.detach())}


def reconstruction_accuracy(mse: float, ssim_value: float) -> float:
    """The thesis's RA (eq. 4-9): ``exp(-10000 * (L2 + (1 - SSIM) / 100))``, in (0, 1].

    ``mse`` is the mean squared error in [0, 1] pixel units and ``ssim_value`` the mean SSIM, as
    :class:`ReconstructionLoss` reports them. The weight 1/100 is the thesis's, fixed here
    whatever ``ssim_weight`` the training used. RA falls fast: 0.55 at a combined loss of
    6e-5, 0.37 at 1e-4, below 1e-4 at 1e-3 (the thesis's own R scored 0.55-0.71, Table 4.1).
    """
    return math.exp(-10000.0 * (mse + (1.0 - ssim_value) / 100.0))


def balanced_alpha(target: torch.Tensor, num_classes: int, clamp: tuple[float, float] = (0.25, 0.999),
                   ignore_index: int | None = None) -> torch.Tensor:
    """Per-class alpha from the batch's pixel counts: ``alpha_c = clamp(1 - freq_c)``.

    For two classes this is the thesis's eps = n / (n + m) for the positives and 1 - eps for the
    negatives (eq. 3-13); the clamp keeps a class absent from the batch from getting weight 1
    and the dominant background from getting almost 0.
    """
    t = target
    if ignore_index is not None:
        t = t[t != ignore_index]
    counts = torch.bincount(t.reshape(-1), minlength=num_classes)[:num_classes].to(torch.float32)
    freq = counts / counts.sum().clamp_min(1.0)
    return (1.0 - freq).clamp(*clamp)


class FocalLoss(nn.Module):
    """Multi-class softmax focal loss, mean over pixels (eq. 3-16 generalised to K classes).

    ``alpha``: None (no class weights), a list of K weights, or ``"balanced"`` (see
    :func:`balanced_alpha`). ``ignore_index`` pixels (e.g. padding outside the valid band) add
    nothing and are not counted in the mean.
    """

    def __init__(self, gamma: float = 2.0, alpha: None | Literal["balanced"] | Sequence[float] = None,
                 alpha_clamp: tuple[float, float] = (0.25, 0.999), ignore_index: int | None = None):
        super().__init__()
        if gamma < 0:
            raise ValueError(f"focal loss gamma must be >= 0, got {gamma}")
        if isinstance(alpha, str) and alpha != "balanced":
            raise ValueError(f"focal loss alpha: expected None, 'balanced' or a list, got {alpha!r}")
        self.gamma = gamma
        self.alpha = alpha
        self.alpha_clamp = alpha_clamp
        self.ignore_index = ignore_index

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if logits.dim() != 4 or target.shape != (logits.shape[0],) + tuple(logits.shape[2:]):
            raise ValueError(f"focal loss needs logits [N, K, H, W] and target [N, H, W], got "
                             f"{tuple(logits.shape)} and {tuple(target.shape)}")
        k = logits.shape[1]
        valid = None
        tgt = target
        if self.ignore_index is not None:
            valid = target != self.ignore_index
            tgt = torch.where(valid, target, torch.zeros_like(target))
        logp = F.log_softmax(logits.float(), dim=1)
        logp_t = logp.gather(1, tgt.unsqueeze(1)).squeeze(1)
        p_t = logp_t.exp()
        loss = -((1.0 - p_t).clamp_min(0.0) ** self.gamma) * logp_t if self.gamma else -logp_t
        if self.alpha is not None:
            if self.alpha == "balanced":
                a = balanced_alpha(target, k, self.alpha_clamp, self.ignore_index).to(logits.device)
            else:
                a = torch.as_tensor(list(self.alpha), dtype=torch.float32, device=logits.device)
                if a.numel() != k:
                    raise ValueError(f"focal loss alpha has {a.numel()} values for {k} classes")
            loss = loss * a[tgt]
        if valid is not None:
            n = valid.sum()
            return (loss * valid).sum() / n.clamp_min(1) if n > 0 else loss.sum() * 0.0
        return loss.mean()

    def extra_repr(self) -> str:
        return f"gamma={self.gamma}, alpha={self.alpha!r}" + (
            f", ignore_index={self.ignore_index}" if self.ignore_index is not None else "")


class DiceLoss(nn.Module):
    """Soft Dice loss over the defect classes (not in the thesis; off unless configured).

    ``1 - mean_c (2 sum p_c g_c + s) / (sum p_c + sum g_c + s)`` over classes 1..K-1 and the whole
    batch. Why it exists: the focal loss is the spec's Loss2, but with a few hundred CPU steps
    thin classes (2-3 px scratches) stay under-segmented because their pixels are a tiny share
    of the mean; an overlap term weighs each class by its own area and speeds that up.
    """

    def __init__(self, smooth: float = 1.0, ignore_index: int | None = None):
        super().__init__()
        self.smooth = smooth
        self.ignore_index = ignore_index

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        k = logits.shape[1]
        probs = torch.softmax(logits.float(), dim=1)
        tgt = target
        if self.ignore_index is not None:
            valid = (target != self.ignore_index).unsqueeze(1)
            tgt = torch.where(valid.squeeze(1), target, torch.zeros_like(target))
            probs = probs * valid
        onehot = F.one_hot(tgt, k).permute(0, 3, 1, 2).to(probs.dtype)
        if self.ignore_index is not None:
            onehot = onehot * valid
        dims = (0, 2, 3)
        inter = (probs * onehot).sum(dims)[1:]
        denom = probs.sum(dims)[1:] + onehot.sum(dims)[1:]
        dice = (2 * inter + self.smooth) / (denom + self.smooth)
        return 1.0 - dice.mean()


def defect_vs_background(logits: torch.Tensor) -> torch.Tensor:
    """K-class logits [N, K, H, W] -> 2-class logits [N, 2, H, W] (background, any defect).

    A softmax over the result gives ``(p_background, 1 - p_background)`` of the K-class softmax,
    so a 2-class loss on it trains the K-class head without naming a defect class (the stage-1
    class-agnostic target of spec §2.5).

    >>> z = torch.tensor([1.0, 0.5, -1.0, 2.0]).view(1, 4, 1, 1)
    >>> p = torch.softmax(z, 1); q = torch.softmax(defect_vs_background(z), 1)
    >>> bool(torch.allclose(q[0, 0], p[0, 0]) and torch.allclose(q[0, 1], p[0, 1:].sum()))
    True
    """
    return torch.cat([logits[:, :1], torch.logsumexp(logits[:, 1:], dim=1, keepdim=True)], dim=1)
