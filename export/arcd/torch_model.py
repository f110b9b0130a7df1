"""ARCD networks as plain ``nn.Module``s: reconstruction net R, discrimination net D, and the fused
inference module that is exported to ONNX.

The layer plan follows the seed spec (``shared/seeds/004_spec.md`` §2.3, §2.4): R is a DRAEM-style
encoder-decoder without skips (thesis "Base" R: ``base_width=128``, 69.05 M parameters for RGB),
D is a DRAEM-style U-Net on ``cat([reconstruction, input])`` (thesis "Base" D: ``base_channels=64``,
six encoder levels, 28.38 M parameters with 5 outputs). Widths and depths are arguments so the same
code gives the thesis networks on a GPU box and the tiny ARCD-lite that runs on a line PC's CPU.

Example::

    >>> import torch
    >>> r = ReconstructiveSubNetwork(in_channels=1, base_width=4)
    >>> d = DiscriminativeSubNetwork(in_channels=2, out_channels=4, base_channels=4)
    >>> model = ARCDInference(r, d).eval()
    >>> rec, probs = model(torch.zeros(2, 1, 64, 64))
    >>> tuple(rec.shape), tuple(probs.shape)
    ((2, 1, 64, 64), (2, 4, 64, 64))
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = [
    "ReconstructiveSubNetwork",
    "DiscriminativeSubNetwork",
    "ARCDInference",
    "init_weights",
    "count_parameters",
    "channel_softmax",
]


def _conv_bn_relu(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


def _double_conv(cin: int, cmid: int, cout: int) -> nn.Sequential:
    return nn.Sequential(*_conv_bn_relu(cin, cmid), *_conv_bn_relu(cmid, cout))


def _up_conv(cin: int, cout: int) -> nn.Sequential:
    # Bilinear upsampling with align_corners=True, as DRAEM does; ONNX Resize supports it exactly.
    return nn.Sequential(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True),
                         *_conv_bn_relu(cin, cout))


def _encoder_widths(base: int, depth: int) -> list[int]:
    """Channel widths per encoder level: base * 1, 2, 4, 8, 8, ... (capped at 8x, as DRAEM)."""
    return [base * min(2 ** i, 8) for i in range(depth)]


def init_weights(module: nn.Module) -> None:
    """DRAEM / spec init: conv weights ~ N(0, 0.02), BN weight ~ N(1, 0.02), biases 0.

    Zero conv biases are our choice (the spec only fixes the weights); it makes a fresh network's
    output independent of PyTorch's default bias init, which keeps seeded runs comparable.
    """
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


class ReconstructiveSubNetwork(nn.Module):
    """R: maps a (possibly anomalous) image to its defect-free reconstruction.

    Encoder: ``depth`` levels of two 3x3 conv+BN+ReLU with widths ``base_width * [1, 2, 4, 8, 8]``
    and max-pooling between levels; no skip connections (a skip would let defects leak straight
    through to the output, which is what R must not do). Decoder: per level an upsample + conv,
    then two convs, narrowing back to ``base_width``; a final 3x3 conv without activation.

    ``in_channels=3, base_width=128`` is the thesis "Base" R (69,048,579 parameters).
    """

    def __init__(self, in_channels: int = 3, out_channels: int | None = None,
                 base_width: int = 128, depth: int = 5):
        super().__init__()
        if depth < 2:
            raise ValueError(f"ReconstructiveSubNetwork depth must be >= 2, got {depth}")
        out_channels = in_channels if out_channels is None else out_channels
        self.in_channels, self.out_channels = in_channels, out_channels
        self.base_width, self.depth = base_width, depth
        widths = _encoder_widths(base_width, depth)
        enc: list[nn.Module] = []
        cin = in_channels
        for w in widths:
            enc.append(_double_conv(cin, w, w))
            cin = w
        self.encoder = nn.ModuleList(enc)
        self.pool = nn.MaxPool2d(2)
        ups: list[nn.Module] = []
        blocks: list[nn.Module] = []
        cur = widths[-1]
        for level in range(depth - 2, -1, -1):
            out = widths[max(level - 1, 0)]
            ups.append(_up_conv(cur, cur))
            blocks.append(_double_conv(cur, cur, out))
            cur = out
        self.ups = nn.ModuleList(ups)
        self.dec_blocks = nn.ModuleList(blocks)
        self.final = nn.Conv2d(cur, out_channels, 3, padding=1)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.encoder):
            if i > 0:
                x = self.pool(x)
            x = block(x)
        for up, block in zip(self.ups, self.dec_blocks):
            x = block(up(x))
        return self.final(x)


class DiscriminativeSubNetwork(nn.Module):
    """D: a U-Net that segments defects from ``cat([reconstruction, input])``.

    Encoder: ``depth`` levels of two 3x3 conv+BN+ReLU, widths ``base_channels * [1, 2, 4, 8, 8, 8]``.
    Decoder: per level upsample + conv, concatenate the encoder skip, two convs; the decoder width
    at a level is the encoder width one level up (DRAEM's plan). Final 3x3 conv to ``out_channels``
    logits (no softmax here; :class:`ARCDInference` applies it).

    ``in_channels=6, out_channels=5, base_channels=64, depth=6`` is the thesis "Base" D
    (28,375,877 parameters).
    """

    def __init__(self, in_channels: int = 6, out_channels: int = 4, base_channels: int = 64,
                 depth: int = 6):
        super().__init__()
        if depth < 2:
            raise ValueError(f"DiscriminativeSubNetwork depth must be >= 2, got {depth}")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.base_channels, self.depth = base_channels, depth
        widths = _encoder_widths(base_channels, depth)
        enc: list[nn.Module] = []
        cin = in_channels
        for w in widths:
            enc.append(_double_conv(cin, w, w))
            cin = w
        self.encoder = nn.ModuleList(enc)
        self.pool = nn.MaxPool2d(2)
        ups: list[nn.Module] = []
        blocks: list[nn.Module] = []
        cur = widths[-1]
        for level in range(depth - 2, -1, -1):
            out = widths[max(level - 1, 0)]
            ups.append(_up_conv(cur, out))
            blocks.append(_double_conv(out + widths[level], out, out))
            cur = out
        self.ups = nn.ModuleList(ups)
        self.dec_blocks = nn.ModuleList(blocks)
        self.final = nn.Conv2d(cur, out_channels, 3, padding=1)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips: list[torch.Tensor] = []
        for i, block in enumerate(self.encoder):
            if i > 0:
                x = self.pool(x)
            x = block(x)
            skips.append(x)
        x = skips.pop()
        for up, block in zip(self.ups, self.dec_blocks):
            x = block(torch.cat([up(x), skips.pop()], dim=1))
        return self.final(x)


class ARCDInference(nn.Module):
    """R and D fused into the one graph the runtime runs.

    Input: normalised image ``[N, C, H, W]`` (H and W multiples of ``2 ** (depth - 1)`` of both
    networks). Outputs: ``(reconstruction [N, C, H, W], probs [N, K, H, W])`` with ``probs`` the
    softmax over the K classes (class 0 = background). D sees ``cat([reconstruction, input])``,
    the spec's default order.
    """

    def __init__(self, reconstruction: ReconstructiveSubNetwork,
                 discrimination: DiscriminativeSubNetwork):
        super().__init__()
        if discrimination.in_channels != reconstruction.out_channels + reconstruction.in_channels:
            raise ValueError(
                f"D takes {discrimination.in_channels} channels but cat(R(x), x) has "
                f"{reconstruction.out_channels + reconstruction.in_channels}")
        self.reconstruction = reconstruction
        self.discrimination = discrimination

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rec = self.reconstruction(image)
        logits = self.discrimination(torch.cat([rec, image], dim=1))
        return rec, channel_softmax(logits)


def channel_softmax(logits: torch.Tensor) -> torch.Tensor:
    """Softmax over dim 1, written out as max-shift, exp, sum, divide.

    Mathematically ``torch.softmax(logits, 1)``; spelled out because ONNX Runtime's CPU Softmax
    over the channel axis of an NCHW tensor transposes internally and cost ~50 ms for 7 tiles of
    4x256x256 on the 2-core line PC, against ~7 ms for these elementwise/reduce ops.
    """
    e = torch.exp(logits - logits.amax(dim=1, keepdim=True))
    return e / e.sum(dim=1, keepdim=True)
