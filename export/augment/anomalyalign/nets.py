"""The networks: the ControlNet-form diffusion model (diffusers) and the small segmentation U-Net.

* Base UNet: ``UNet2DConditionModel`` in pixel space (1 grey channel), cross-attention on the
  prompt's text embedding, attention only in the low-resolution blocks (spec §8.2: attention at
  32x32 costs ~4x on a CPU).
* ControlNet: ``ControlNetModel.from_unet`` (a trainable copy of the encoder with zero convs);
  its condition is the class-index mask as one binary channel per defect class, so the mask
  carries both where and which defect.
* :class:`SegUNet`: the frozen defect segmenter of the alignment loss (the AnomalyDiffusion
  detector's stand-in, spec §2.3 / §8.2), softmax over background + defect classes.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["build_unet", "build_controlnet", "denoise", "SegUNet", "mask_to_cond",
           "count_parameters"]


def count_parameters(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def build_unet(resolution: int, widths: Sequence[int], attention: Sequence[bool], text_dim: int,
               layers_per_block: int = 1, head_dim: int = 8, norm_groups: int = 8):
    from diffusers import UNet2DConditionModel

    down = tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention)
    up = tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention))
    return UNet2DConditionModel(
        sample_size=resolution, in_channels=1, out_channels=1, block_out_channels=tuple(widths),
        down_block_types=down, up_block_types=up, layers_per_block=layers_per_block,
        cross_attention_dim=text_dim, attention_head_dim=head_dim, norm_num_groups=norm_groups)


def build_controlnet(unet, num_classes: int, hint_channels: Sequence[int] = (16,)):
    """The trainable encoder copy. ``hint_channels`` of length 1: no downsampling in the hint
    encoder, because the model works in pixel space (no 8x latent grid to reach)."""
    from diffusers import ControlNetModel

    return ControlNetModel.from_unet(unet, conditioning_channels=num_classes,
                                     conditioning_embedding_out_channels=tuple(hint_channels))


def mask_to_cond(mask: torch.Tensor, num_classes: int) -> torch.Tensor:
    """[B, H, W] class indices (0 = background) -> [B, K, H, W] binary, one channel per defect
    class (background has none: all-zero is "no defect here")."""
    onehot = F.one_hot(mask.long(), num_classes + 1).permute(0, 3, 1, 2)[:, 1:]
    return onehot.to(torch.float32)


def denoise(unet, controlnet, x: torch.Tensor, t: torch.Tensor, text: torch.Tensor,
            cond: torch.Tensor, control_scale: float = 1.0) -> torch.Tensor:
    """ε prediction of the base UNet with the ControlNet residuals added (ControlNet's forward)."""
    down, mid = controlnet(x, t, encoder_hidden_states=text, controlnet_cond=cond,
                           conditioning_scale=control_scale, return_dict=False)
    return unet(x, t, encoder_hidden_states=text, down_block_additional_residuals=down,
                mid_block_additional_residual=mid).sample


class _Block(nn.Sequential):
    def __init__(self, cin: int, cout: int):
        super().__init__(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                         nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class SegUNet(nn.Module):
    """A 3-level U-Net (DRAEM's discriminative sub-network, shrunk): image in [0, 1] ->
    logits over ``classes`` (background first)."""

    def __init__(self, classes: int, width: int = 16, in_channels: int = 1):
        super().__init__()
        self.width, self.classes = width, classes
        w = width
        self.e1, self.e2, self.e3 = _Block(in_channels, w), _Block(w, 2 * w), _Block(2 * w, 4 * w)
        self.mid = _Block(4 * w, 4 * w)
        self.d3, self.d2, self.d1 = _Block(8 * w, 2 * w), _Block(4 * w, w), _Block(2 * w, w)
        self.head = nn.Conv2d(w, classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e1 = self.e1(x)
        e2 = self.e2(F.max_pool2d(e1, 2))
        e3 = self.e3(F.max_pool2d(e2, 2))
        m = self.mid(F.max_pool2d(e3, 2))
        def up(a: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
            return F.interpolate(a, size=ref.shape[2:], mode="bilinear", align_corners=False)

        d3 = self.d3(torch.cat([up(m, e3), e3], 1))
        d2 = self.d2(torch.cat([up(d3, e2), e2], 1))
        d1 = self.d1(torch.cat([up(d2, e1), e1], 1))
        return self.head(d1)
