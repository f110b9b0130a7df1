"""CLGAN losses: PatchNCE (spec §1.4, Eq. 2-3) and the adversarial loss (§1.5, Eq. 1).

Example (a query equal to its positive, orthogonal to its negatives, gives a small loss)::

    >>> import torch
    >>> q = torch.eye(3)                      # 1 image, 3 patches, 3-d embeddings
    >>> loss = patchnce_loss(q, q.clone(), batch_size=1, tau=0.07)
    >>> round(float(loss.mean()), 6)
    0.0
"""

from __future__ import annotations

from typing import Literal, Sequence

import torch
import torch.nn.functional as F

__all__ = ["patchnce_loss", "PatchNCE", "GANLoss"]


def patchnce_loss(q: torch.Tensor, k: torch.Tensor, batch_size: int, tau: float = 0.07,
                  detach_keys: bool = False) -> torch.Tensor:
    """Per-patch PatchNCE loss, Eq. (2): an (S)-way softmax cross-entropy per query.

    ``q`` (from the reconstruction) and ``k`` (from the input, same locations) are
    ``[B * S, K]`` L2-normalised embeddings grouped image by image. Query s's positive is key s of
    the same image; its negatives are the other S - 1 keys of the same image, never keys of other
    images (spec §1.4 DEFAULT). Returns ``[B * S]`` losses.
    """
    if q.shape != k.shape or q.ndim != 2:
        raise ValueError(f"q and k must be equal [B*S, K] tensors, got {tuple(q.shape)} and {tuple(k.shape)}")
    n, dim = q.shape
    if batch_size < 1 or n % batch_size:
        raise ValueError(f"{n} embeddings do not split into {batch_size} images")
    if detach_keys:  # CUT's code detaches the keys; the spec keeps both branches (default False)
        k = k.detach()
    s = n // batch_size
    qv = q.view(batch_size, s, dim)
    kv = k.view(batch_size, s, dim)
    l_pos = (qv * kv).sum(dim=2, keepdim=True)                  # B, S, 1
    l_neg = torch.bmm(qv, kv.transpose(1, 2))                   # B, S, S
    # A query's own location is its positive, not a negative: exclude it from the negatives
    # exactly (exp(-inf) = 0) rather than CUT's large-negative fill.
    eye = torch.eye(s, dtype=torch.bool, device=q.device)[None]
    l_neg = l_neg.masked_fill(eye, float("-inf"))
    logits = torch.cat([l_pos, l_neg], dim=2).view(n, s + 1) / tau
    target = torch.zeros(n, dtype=torch.long, device=q.device)
    return F.cross_entropy(logits, target, reduction="none")


class PatchNCE:
    """Eq. (3) over layers: mean over the sampled patches of each layer, then mean over layers
    (spec §1.4 DEFAULT; the paper's literal sum only rescales the loss)."""

    def __init__(self, tau: float = 0.07, detach_keys: bool = False):
        self.tau = tau
        self.detach_keys = detach_keys

    def __call__(self, q_layers: Sequence[torch.Tensor], k_layers: Sequence[torch.Tensor],
                 batch_size: int) -> torch.Tensor:
        if len(q_layers) != len(k_layers) or not q_layers:
            raise ValueError("PatchNCE needs the same (non-zero) number of query and key layers")
        total = 0.0
        for q, k in zip(q_layers, k_layers):
            total = total + patchnce_loss(q, k, batch_size, self.tau, self.detach_keys).mean()
        return total / len(q_layers)


class GANLoss:
    """Eq. (1) on every element of the PatchGAN map.

    ``vanilla`` (the paper's log form, default): binary cross-entropy on logits, non-saturating
    for the generator. ``lsgan`` (CUT's code default): squared error to 1 / 0.
    """

    def __init__(self, mode: Literal["vanilla", "lsgan"] = "vanilla"):
        if mode not in ("vanilla", "lsgan"):
            raise ValueError(f"gan_mode must be vanilla|lsgan, got {mode!r}")
        self.mode = mode

    def __call__(self, logits: torch.Tensor, target_real: bool) -> torch.Tensor:
        target = torch.ones_like(logits) if target_real else torch.zeros_like(logits)
        if self.mode == "vanilla":
            return F.binary_cross_entropy_with_logits(logits, target)
        return F.mse_loss(logits, target)
