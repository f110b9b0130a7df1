"""The thesis's other discrimination backbones: SegNet, PSPNet and DeepLabV3+ as D.

The thesis (spec §2.4) compares ARCD with four D backbones: U-Net (the default,
:class:`~export.arcd.torch_model.DiscriminativeSubNetwork`), SegNet, PSPNet and DeepLabV3+; it
states no depths or encoders. The spec's defaults, followed here, all from scratch (no pretrained
weights can be downloaded): SegNet with a VGG16-style encoder, PSPNet and DeepLabV3+ on a
ResNet-50-style encoder at output stride 8 and 16. Every width scales with one ``base_channels``
(64 = the published sizes; 4-12 for networks a CPU trains), so the same code gives the
thesis-scale networks on a GPU box and a small one for a line PC.

All three take ``in_channels`` (6 for ARCD on RGB: ``cat([reconstruction, input])``; 3 for the
plain baselines) and return ``out_channels`` logits at the input's size, like the U-Net D.

Everything here exports to ONNX (opset 17, TorchScript exporter) and runs in ONNX Runtime
within the export parity tolerance. Two choices serve that:

* SegNet's unpooling puts a value back where the encoder's max came from. ONNX has no MaxUnpool
  that torch can export, and an exact argmax is a step function: on flat strip background,
  where a pooling window holds near-tied maxima, torch's and ONNX Runtime's ~1e-6 rounding
  differences pick different pixels, and the exported graph missed the 1e-4 parity tolerance
  (measured on synthetic strip tiles: 1.4e-4 with an ``x == max`` mask, 1.6e-3 with
  ``x >= max - 1e-3``).
  So each position of a window receives the value weighted by ``exp(-(max - x) / T)``,
  :data:`UNPOOL_TEMPERATURE` ``T``: 1 at the max, under 5e-5 for a position 0.5 below it (the
  features are batch-normalised, order 1), the same share for tied maxima, and continuous, so
  rounding moves the output by rounding's order times the weights' slope (up to 1 / T = 20 per
  stage). Fresh networks stay far inside 1e-4; a trained plain SegNet (NEU-Seg, width 12, five
  stages) was 2.7e-4 from torch on random-noise tiles and 8.5e-6 on real ones (README,
  "ARCD(SegNet) on NEU-Seg"). Like SegNet's indices it carries no gradient.
* PSPNet's pyramid pooling needs adaptive average pooling at bins that do not divide the feature
  size (3 and 6 on a 28 x 28 map), which the exporter rejects; it is written as two averaging
  matrices (:func:`adaptive_average`), numerically the same as ``F.adaptive_avg_pool2d``.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn

from export.arcd.torch_model import _conv_bn_relu, _encoder_widths, init_weights

__all__ = [
    "BACKBONES",
    "SegNetDiscriminator",
    "ResNetEncoder",
    "PSPNetDiscriminator",
    "DeepLabV3PlusDiscriminator",
    "adaptive_average",
    "input_multiple",
]

#: D backbones by config name (``model.d_backbone``); "unet" is the DRAEM U-Net of torch_model
BACKBONES = ("unet", "segnet", "pspnet", "deeplabv3plus")


def input_multiple(backbone: str, depth: int) -> int:
    """What an input's height and width must be a multiple of for this D."""
    if backbone == "unet":
        return 2 ** (depth - 1)
    if backbone == "segnet":
        return 2 ** depth
    if backbone == "pspnet":
        return 8
    if backbone == "deeplabv3plus":
        return 16
    raise ValueError(f"unknown D backbone {backbone!r}; choose one of {', '.join(BACKBONES)}")


def _conv_bn_relu_k(cin: int, cout: int, kernel: int, stride: int = 1, dilation: int = 1
                    ) -> nn.Sequential:
    # Conv directly followed by BN inside one Sequential, so export folds the BN in float64.
    pad = dilation * (kernel // 2)
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, stride, pad, dilation=dilation, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


# ---------------------------------------------------------------------------------------------
# SegNet
# ---------------------------------------------------------------------------------------------

def _vgg_convs(level: int) -> int:
    """Convs per level as in VGG16 (2, 2, 3, 3, 3), three for any deeper level."""
    return 2 if level < 2 else 3


def _conv_stack(cin: int, cout: int, n: int, narrow_last: bool) -> nn.Sequential:
    """``n`` 3x3 conv+BN+ReLU; the first (encoder) or the last (decoder) changes the width."""
    layers: list[nn.Module] = []
    for i in range(n):
        if narrow_last:
            a, b = cin, (cout if i == n - 1 else cin)
        else:
            a, b = (cin if i == 0 else cout), cout
        layers += _conv_bn_relu(a, b)
    return nn.Sequential(*layers)


#: softness of the unpooling weights (see the module docstring); at 0.05 a position 0.5 below
#: its window's max gets weight exp(-10) = 4.5e-5
UNPOOL_TEMPERATURE = 0.05


def _pool_with_mask(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    pooled = F.max_pool2d(x, 2)
    lead = x - F.interpolate(pooled, scale_factor=2.0, mode="nearest")  # <= 0, 0 at the max
    return pooled, torch.exp(lead / UNPOOL_TEMPERATURE).detach()


def _unpool_with_mask(x: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, scale_factor=2.0, mode="nearest") * where


class SegNetDiscriminator(nn.Module):
    """SegNet as D: a VGG-style encoder, a max-unpooling decoder, no skip concatenations.

    ``depth`` stages, each of 3x3 conv+BN+ReLU (VGG16's counts: 2, 2, 3, 3, 3, then 3) followed by
    a 2x2 max-pool, widths ``base_channels * [1, 2, 4, 8, 8, 8]``; ``depth=5, base_channels=64`` is
    SegNet's VGG16 encoder. The decoder mirrors it stage by stage: unpool (values go back to the
    positions the encoder's maxima came from, see the module docstring), then that stage's convs at
    its width, the last narrowing to the next stage's; a final 3x3 conv gives the logits.
    Inputs must be a multiple of ``2 ** depth``.
    """

    def __init__(self, in_channels: int = 6, out_channels: int = 4, base_channels: int = 64,
                 depth: int = 5):
        super().__init__()
        if depth < 1:
            raise ValueError(f"SegNetDiscriminator depth must be >= 1, got {depth}")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.base_channels, self.depth = base_channels, depth
        widths = _encoder_widths(base_channels, depth)
        self.encoder = nn.ModuleList(
            _conv_stack(in_channels if i == 0 else widths[i - 1], w, _vgg_convs(i), False)
            for i, w in enumerate(widths))
        # decoder[j] runs at stage depth-1-j and narrows to the stage above it
        self.decoder = nn.ModuleList(
            _conv_stack(widths[st], widths[max(st - 1, 0)], _vgg_convs(st), True)
            for st in range(depth - 1, -1, -1))
        self.final = nn.Conv2d(widths[0], out_channels, 3, padding=1)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        masks: list[torch.Tensor] = []
        for block in self.encoder:
            x, where = _pool_with_mask(block(x))
            masks.append(where)
        for block in self.decoder:
            x = block(_unpool_with_mask(x, masks.pop()))
        return self.final(x)


# ---------------------------------------------------------------------------------------------
# ResNet encoder (PSPNet, DeepLabV3+)
# ---------------------------------------------------------------------------------------------

class _Bottleneck(nn.Module):
    """ResNet bottleneck (1x1, 3x3 carrying stride and dilation, 1x1 to 4x the width)."""

    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int = 1, dilation: int = 1):
        super().__init__()
        cout = planes * self.expansion
        self.body = nn.Sequential(
            *_conv_bn_relu_k(cin, planes, 1),
            *_conv_bn_relu_k(planes, planes, 3, stride, dilation),
            nn.Conv2d(planes, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                          nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.body(x) + self.shortcut(x))


class ResNetEncoder(nn.Module):
    """ResNet-50-style trunk: 7x7 stem (stride 2), 3x3 max-pool, four bottleneck stages.

    ``base_channels=64, layers=(3, 4, 6, 3)`` is ResNet-50 without its classifier. With
    ``output_stride`` 16 the last stage, with 8 the last two, keep their resolution and dilate
    instead (DeepLab's scheme). ``forward`` returns the stride-4 features of stage 1 (DeepLabV3+'s
    low-level input) and the last stage's.
    """

    def __init__(self, in_channels: int, base_channels: int = 64,
                 layers: tuple[int, ...] = (3, 4, 6, 3), output_stride: int = 16):
        super().__init__()
        if len(layers) != 4 or min(layers) < 1:
            raise ValueError(f"ResNet layers must be four counts >= 1, got {list(layers)}")
        if output_stride not in (8, 16, 32):
            raise ValueError(f"output_stride must be 8, 16 or 32, got {output_stride}")
        c = base_channels
        self.stem = nn.Sequential(*_conv_bn_relu_k(in_channels, c, 7, stride=2),
                                  nn.MaxPool2d(3, 2, 1))
        strides = {32: (1, 2, 2, 2), 16: (1, 2, 2, 1), 8: (1, 2, 1, 1)}[output_stride]
        dilations = {32: (1, 1, 1, 1), 16: (1, 1, 1, 2), 8: (1, 1, 2, 4)}[output_stride]
        stages: list[nn.Module] = []
        cin = c
        for i, (n, s, d) in enumerate(zip(layers, strides, dilations)):
            planes = c * 2 ** i
            blocks = [_Bottleneck(cin, planes, s, d)]
            cin = planes * _Bottleneck.expansion
            blocks += [_Bottleneck(cin, planes, 1, d) for _ in range(n - 1)]
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.ModuleList(stages)
        self.low_channels = c * _Bottleneck.expansion
        self.out_channels = cin

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.stem(x)
        low = x = self.stages[0](x)
        for stage in self.stages[1:]:
            x = stage(x)
        return low, x


def _resize(x: torch.Tensor, size: tuple[int, int] | torch.Size) -> torch.Tensor:
    # align_corners=True as the U-Net D's upsampling: ONNX Resize reproduces it exactly.
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=True)


# ---------------------------------------------------------------------------------------------
# PSPNet
# ---------------------------------------------------------------------------------------------

@lru_cache(maxsize=64)
def _pool_matrix(n: int, bins: int) -> tuple[tuple[float, ...], ...]:
    """Rows average the spans adaptive pooling uses: [floor(i n / b), ceil((i + 1) n / b))."""
    rows = []
    for i in range(bins):
        lo, hi = (i * n) // bins, math.ceil((i + 1) * n / bins)
        rows.append(tuple(1.0 / (hi - lo) if lo <= k < hi else 0.0 for k in range(n)))
    return tuple(rows)


def adaptive_average(x: torch.Tensor, bins: int) -> torch.Tensor:
    """``F.adaptive_avg_pool2d(x, bins)`` as two matrix products (exportable at any bin count)."""
    h, w = int(x.shape[-2]), int(x.shape[-1])
    ph = torch.tensor(_pool_matrix(h, bins), dtype=x.dtype, device=x.device)
    pw = torch.tensor(_pool_matrix(w, bins), dtype=x.dtype, device=x.device)
    return torch.matmul(torch.matmul(ph, x), pw.transpose(0, 1))


class _PyramidBranch(nn.Module):
    def __init__(self, cin: int, cout: int, bins: int):
        super().__init__()
        self.bins = bins
        # no BN here: a 1x1 bin of a batch of one has no spread to normalise
        self.conv = nn.Sequential(nn.Conv2d(cin, cout, 1), nn.ReLU(inplace=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _resize(self.conv(adaptive_average(x, self.bins)), x.shape[-2:])


class PSPNetDiscriminator(nn.Module):
    """PSPNet as D: ResNet trunk at output stride 8, pyramid pooling (bins 1, 2, 3, 6), a 3x3
    fusion conv and a 1x1 classifier, upsampled back to the input size."""

    def __init__(self, in_channels: int = 6, out_channels: int = 4, base_channels: int = 64,
                 layers: tuple[int, ...] = (3, 4, 6, 3), bins: tuple[int, ...] = (1, 2, 3, 6)):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.encoder = ResNetEncoder(in_channels, base_channels, layers, output_stride=8)
        feat = self.encoder.out_channels
        branch = max(feat // len(bins), 1)
        self.pyramid = nn.ModuleList(_PyramidBranch(feat, branch, b) for b in bins)
        self.fuse = _conv_bn_relu_k(feat + branch * len(bins), max(feat // 4, 1), 3)
        self.classifier = nn.Conv2d(max(feat // 4, 1), out_channels, 1)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, f = self.encoder(x)
        f = torch.cat([f, *(p(f) for p in self.pyramid)], dim=1)
        return _resize(self.classifier(self.fuse(f)), x.shape[-2:])


# ---------------------------------------------------------------------------------------------
# DeepLabV3+
# ---------------------------------------------------------------------------------------------

class _ASPP(nn.Module):
    """Atrous spatial pyramid pooling: 1x1, three dilated 3x3 (6, 12, 18 at stride 16), image
    pooling; concatenated and projected by a 1x1 conv."""

    def __init__(self, cin: int, cout: int, rates: tuple[int, ...] = (6, 12, 18)):
        super().__init__()
        self.branches = nn.ModuleList(
            [_conv_bn_relu_k(cin, cout, 1)] + [_conv_bn_relu_k(cin, cout, 3, dilation=r) for r in rates])
        # no BN on the 1x1 pooled map, for the same reason as PSPNet's bins
        self.image_pool = nn.Sequential(nn.Conv2d(cin, cout, 1), nn.ReLU(inplace=True))
        self.project = _conv_bn_relu_k(cout * (len(rates) + 2), cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = self.image_pool(x.mean(dim=(2, 3), keepdim=True)).expand(-1, -1, *x.shape[-2:])
        return self.project(torch.cat([*(b(x) for b in self.branches), pooled], dim=1))


class DeepLabV3PlusDiscriminator(nn.Module):
    """DeepLabV3+ as D: ResNet trunk at output stride 16, ASPP (``4 * base_channels`` wide, 256
    at 64), a decoder that joins the upsampled ASPP output with the stride-4 features reduced to
    ``3/4 * base_channels`` (48 at 64), two 3x3 convs and a 1x1 classifier, upsampled 4x."""

    def __init__(self, in_channels: int = 6, out_channels: int = 4, base_channels: int = 64,
                 layers: tuple[int, ...] = (3, 4, 6, 3)):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.encoder = ResNetEncoder(in_channels, base_channels, layers, output_stride=16)
        width = 4 * base_channels
        low = max(3 * base_channels // 4, 1)
        self.aspp = _ASPP(self.encoder.out_channels, width)
        self.reduce_low = _conv_bn_relu_k(self.encoder.low_channels, low, 1)
        self.decode = nn.Sequential(*_conv_bn_relu_k(width + low, width, 3),
                                    *_conv_bn_relu_k(width, width, 3))
        self.classifier = nn.Conv2d(width, out_channels, 1)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        low, f = self.encoder(x)
        low = self.reduce_low(low)
        f = _resize(self.aspp(f), low.shape[-2:])
        y = self.classifier(self.decode(torch.cat([f, low], dim=1)))
        return _resize(y, x.shape[-2:])
