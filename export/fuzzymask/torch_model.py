"""The fuzzy-mask inpainter network (spec §3.1): a ResNet34-style encoder, a conv decoder, and two
shallow-fusion skips that concatenate encoder features into the decoder.

Encoder (written here, not torchvision's): stem conv7x7/2 + BN + ReLU, maxpool 3x3/2, then
``layer1..layer4`` of BasicBlocks (3/4/6/3 by default) with widths w, 2w, 4w, 8w (w = 64 in the
spec; smaller widths keep CPU training and the shipped ONNX small). Module names follow the
usual ResNet layout (``conv1``, ``bn1``, ``layerN.i.conv1``, ``downsample.0``), so a local
torchvision-style ResNet34 state dict loads into the encoder with ``pretrained_encoder``.

Decoder (spec table): D4 up + 2 x conv-BN-ReLU 8w->4w (H/16), D3 4w->2w (H/8), D2 2w->w (H/4),
D1 w->w (H/2), D0 w->w/2 (H), head conv3x3 -> C + sigmoid. A fusion concatenates the encoder
output of the same scale after the decoder stage (layer3 after D4, layer2 after D3, layer1 after
D2) and a conv-BN-ReLU brings the channels back (2c -> c). ``skip_layers`` picks the two fused
layers (spec default layer2 + layer3; layer1 + layer2 is the other reading); ``fusion=False`` is
the paper's CAE ablation. Input sides must be multiples of 32.

Example::

    >>> net = FuzzyMaskNet(in_channels=1, width=8)
    >>> net(torch.rand(2, 1, 64, 64)).shape
    torch.Size([2, 1, 64, 64])
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

log = logging.getLogger(__name__)

__all__ = ["BasicBlock", "ResNetEncoder", "FuzzyMaskNet", "count_parameters", "LAYER_SCALE",
           "IMAGENET_MEAN", "IMAGENET_STD"]

#: downsampling factor of each encoder layer's output
LAYER_SCALE = {"layer1": 4, "layer2": 8, "layer3": 16, "layer4": 32}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN with an identity (or 1x1 conv-BN when the shape changes) shortcut."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                            nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        idt = x if self.downsample is None else self.downsample(x)
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return self.relu(y + idt)


class ResNetEncoder(nn.Module):
    """ResNet34 layout (BasicBlocks ``blocks`` per layer) at base width ``width``."""

    def __init__(self, in_channels: int = 3, width: int = 64, blocks: Sequence[int] = (3, 4, 6, 3)):
        super().__init__()
        if len(blocks) != 4:
            raise ValueError(f"blocks needs 4 entries (layer1..layer4), got {list(blocks)}")
        self.widths = [width, 2 * width, 4 * width, 8 * width]
        self.conv1 = nn.Conv2d(in_channels, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        cin = width
        for i, (n, cout) in enumerate(zip(blocks, self.widths)):
            stride = 1 if i == 0 else 2
            layer = [BasicBlock(cin, cout, stride)] + [BasicBlock(cout, cout) for _ in range(n - 1)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*layer))
            cin = cout
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        feats = {}
        for name in ("layer1", "layer2", "layer3", "layer4"):
            x = getattr(self, name)(x)
            feats[name] = x
        return feats


def _conv_bn_relu(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True))


class _UpStage(nn.Module):
    """Up x2 (bilinear, align_corners=False, or a 2x2 stride-2 transposed conv) + 2 conv-BN-ReLU."""

    def __init__(self, cin: int, cout: int, upsample: Literal["bilinear", "convtranspose"]):
        super().__init__()
        self.up: nn.Module | None = (nn.ConvTranspose2d(cin, cin, 2, 2)
                                     if upsample == "convtranspose" else None)
        self.conv = nn.Sequential(_conv_bn_relu(cin, cout), _conv_bn_relu(cout, cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.up is not None:
            x = self.up(x)
        else:
            x = F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)
        return self.conv(x)


class FuzzyMaskNet(nn.Module):
    """Encoder-decoder with shallow feature fusion; maps [0, 1] images to [0, 1] images."""

    def __init__(self, in_channels: int = 3, width: int = 64, blocks: Sequence[int] = (3, 4, 6, 3),
                 skip_layers: Sequence[str] = ("layer2", "layer3"), fusion: bool = True,
                 upsample: Literal["bilinear", "convtranspose"] = "bilinear",
                 imagenet_norm: bool = False):
        super().__init__()
        if in_channels not in (1, 3):
            raise ValueError(f"in_channels must be 1 or 3, got {in_channels}")
        bad = [s for s in skip_layers if s not in ("layer1", "layer2", "layer3")]
        if bad or len(set(skip_layers)) != len(skip_layers):
            raise ValueError(f"skip_layers must be distinct names among layer1..layer3, got {list(skip_layers)}")
        if width < 2:
            raise ValueError(f"width must be >= 2, got {width}")
        self.in_channels = in_channels
        self.skip_layers = tuple(skip_layers) if fusion else ()
        self.imagenet_norm = imagenet_norm
        w = width
        self.encoder = ResNetEncoder(in_channels, w, blocks)
        # decoder stage -> output channels and the encoder layer at the same scale
        self.dec4 = _UpStage(8 * w, 4 * w, upsample)   # H/16, like layer3
        self.dec3 = _UpStage(4 * w, 2 * w, upsample)   # H/8, like layer2
        self.dec2 = _UpStage(2 * w, w, upsample)       # H/4, like layer1
        self.dec1 = _UpStage(w, w, upsample)           # H/2
        self.dec0 = _UpStage(w, max(1, w // 2), upsample)  # H
        self.fuse = nn.ModuleDict({name: _conv_bn_relu(2 * c, c) for name, c in
                                   (("layer3", 4 * w), ("layer2", 2 * w), ("layer1", w))
                                   if name in self.skip_layers})
        self.head = nn.Conv2d(max(1, w // 2), in_channels, 3, 1, 1)
        if imagenet_norm:
            c = in_channels
            mean = torch.tensor(IMAGENET_MEAN[:c] if c == 3 else (sum(IMAGENET_MEAN) / 3,))
            std = torch.tensor(IMAGENET_STD[:c] if c == 3 else (sum(IMAGENET_STD) / 3,))
            self.register_buffer("in_mean", mean.view(1, c, 1, 1))
            self.register_buffer("in_std", std.view(1, c, 1, 1))

    def _fuse(self, name: str, d: torch.Tensor, feats: dict[str, torch.Tensor]) -> torch.Tensor:
        if name not in self.fuse:
            return d
        return self.fuse[name](torch.cat([d, feats[name]], dim=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] % 32 or x.shape[-2] % 32:
            raise ValueError(f"input sides must be multiples of 32, got {tuple(x.shape[-2:])}")
        # a pretrained encoder expects its own input statistics; the loss and the output stay
        # in [0, 1] (spec §1: normalise inside forward only)
        z = (x - self.in_mean) / self.in_std if self.imagenet_norm else x
        feats = self.encoder(z)
        d = self._fuse("layer3", self.dec4(feats["layer4"]), feats)
        d = self._fuse("layer2", self.dec3(d), feats)
        d = self._fuse("layer1", self.dec2(d), feats)
        d = self.dec0(self.dec1(d))
        return torch.sigmoid(self.head(d))

    def load_encoder(self, path: str | Path) -> None:
        """Load encoder weights from a local checkpoint (never downloaded).

        Accepts a plain state dict, ``{"state_dict": ...}`` or ``{"encoder": ...}``, with keys as
        in torchvision's ResNet (``fc.*`` ignored) or prefixed ``encoder.``. A 3-channel stem on a
        1-channel model is summed over its input channels (grey = the sum of equal RGB inputs).
        """
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"{p}: pretrained_encoder checkpoint not found")
        from export.training import read_checkpoint  # a damaged file: one line naming it

        sd = read_checkpoint(p)
        for key in ("encoder", "state_dict", "model"):
            if isinstance(sd, dict) and isinstance(sd.get(key), dict):
                sd = sd[key]
        sd = {k.removeprefix("encoder."): v for k, v in sd.items() if not k.startswith("fc.")}
        w = sd.get("conv1.weight")
        if w is not None and w.shape[1] == 3 and self.in_channels == 1:
            sd["conv1.weight"] = w.sum(dim=1, keepdim=True)
        try:
            missing, unexpected = self.encoder.load_state_dict(sd, strict=False)
        except RuntimeError as e:  # shape mismatches: another width or block layout
            raise ValueError(f"{p}: does not fit the encoder: {str(e)[:300]}; check model.width "
                             f"and model.blocks") from None
        if unexpected or missing:
            raise ValueError(f"{p}: does not fit the encoder (missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}); check model.width and model.blocks")
        log.info("encoder weights loaded from %s", p)


def count_parameters(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())
