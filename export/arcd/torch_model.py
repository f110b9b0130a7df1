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
    "NoReconstruction",
    "discriminator_input",
    "init_weights",
    "MaskedDilatedConv",
    "ChannelTransformer",
    "MFLM",
    "CALM",
    "count_parameters",
    "channel_softmax",
    "split_region_logits",
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


class MaskedDilatedConv(nn.Module):
    """Masked dilated convolution (spec §3.1a, SSPCAB's layout): four ``k`` x ``k`` convs on the
    four corners of a ``(2k + 2d + 1)``-wide neighbourhood, centre hidden, summed, ReLU. Each
    pixel is predicted from its surroundings only, which is what makes it self-supervised."""

    def __init__(self, channels: int, kernel: int = 3, dilation: int = 1):
        super().__init__()
        self.pad = kernel + dilation
        self.border = kernel + 2 * dilation + 1
        self.convs = nn.ModuleList(nn.Conv2d(channels, channels, kernel) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p, b = self.pad, self.border
        xp = nn.functional.pad(x, (p, p, p, p))
        c1, c2, c3, c4 = self.convs
        out = (c1(xp[:, :, :-b, :-b]) + c2(xp[:, :, b:, :-b]) + c3(xp[:, :, :-b, b:])
               + c4(xp[:, :, b:, b:]))
        return torch.relu(out)


class ChannelTransformer(nn.Module):
    """Transformer channel attention that replaces SSPCAB's SE layer (spec §3.1c, SSMCTB
    defaults): one token per channel from global average pooling, Linear(1 -> dim) plus a learned
    position embedding, pre-LayerNorm blocks whose attention heads are *summed* (eq. 4-7), then
    ``w = sigmoid(mean over dim)`` rescales the channels."""

    def __init__(self, channels: int, heads: int = 5, dim: int = 64, layers: int = 1,
                 mlp_ratio: int = 4):
        super().__init__()
        self.heads, self.dim = heads, dim
        self.embed = nn.Linear(1, dim)
        self.pos = nn.Parameter(torch.zeros(1, channels, dim))
        self.blocks = nn.ModuleList()
        for _ in range(layers):
            self.blocks.append(nn.ModuleDict({
                "norm1": nn.LayerNorm(dim),
                "qkv": nn.Linear(dim, 3 * heads * dim, bias=False),
                "norm2": nn.LayerNorm(dim),
                "mlp": nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(),
                                     nn.Linear(mlp_ratio * dim, dim)),
            }))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        n, c = z.shape[:2]
        t = self.embed(z.mean(dim=(2, 3)).unsqueeze(-1)) + self.pos  # N x c x dim
        for blk in self.blocks:
            q, k, v = blk["qkv"](blk["norm1"](t)).view(n, c, 3, self.heads, self.dim).unbind(2)
            q, k, v = (a.transpose(1, 2) for a in (q, k, v))  # N x H x c x dim
            att = torch.softmax(q @ k.transpose(-1, -2) / self.dim ** 0.5, dim=-1)
            t = (att @ v).sum(dim=1) + t  # heads summed, eq. (4-7), then residual (4-8)
            t = blk["mlp"](blk["norm2"](t)) + t
        w = torch.sigmoid(t.mean(dim=-1))
        return z * w[:, :, None, None]


class MFLM(nn.Module):
    """Masked Feature Learning Module (spec §3.1): masked dilated conv, then channel transformer.
    ``residual=True`` adds the input back (the thesis's "added to the original features")."""

    def __init__(self, channels: int, kernel: int = 3, dilation: int = 1, heads: int = 5,
                 dim: int = 64, layers: int = 1, residual: bool = False):
        super().__init__()
        self.mdc = MaskedDilatedConv(channels, kernel, dilation)
        self.attn = ChannelTransformer(channels, heads, dim, layers)
        self.residual = residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.attn(self.mdc(x))
        return x + out if self.residual else out


class CALM(nn.Module):
    """Contrastive Attention Learning Module (spec §3.2 default): CBAM channel attention from
    average *and* max pooling (r = 16, bias-free 1x1 convs), then coordinate-style attention from
    average pooling along X and along Y through one shared 1x1 conv c -> 1."""

    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        hidden = max(1, channels // reduction)
        self.w1 = nn.Conv2d(channels, hidden, 1, bias=False)
        self.w2 = nn.Conv2d(hidden, channels, 1, bias=False)
        self.axis = nn.Conv2d(channels, 1, 1)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        avg = f.mean(dim=(2, 3), keepdim=True)
        mx = f.amax(dim=(2, 3), keepdim=True)
        mc = torch.sigmoid(self.w2(torch.relu(self.w1(avg))) + self.w2(torch.relu(self.w1(mx))))
        f = f * mc
        a_h = torch.sigmoid(self.axis(f.mean(dim=3, keepdim=True)))  # N x 1 x H x 1
        a_w = torch.sigmoid(self.axis(f.mean(dim=2, keepdim=True)))  # N x 1 x 1 x W
        return f * a_h * a_w


def _calm_block(cin: int, cout: int, reduction: int = 16) -> nn.Sequential:
    # spec §3.2 [I]: CALM replaces the block's second 3x3 conv; its BN + ReLU stay
    return nn.Sequential(*_conv_bn_relu(cin, cout), CALM(cout, reduction), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True))


def _mflm_block(cin: int, cout: int, options: dict | None = None) -> nn.Sequential:
    # spec §3.1 default placement: MFLM replaces the bottleneck block's second conv
    return nn.Sequential(*_conv_bn_relu(cin, cout), MFLM(cout, **(options or {})))


class ReconstructiveSubNetwork(nn.Module):
    """R: maps a (possibly anomalous) image to its defect-free reconstruction.

    Encoder: ``depth`` levels of two 3x3 conv+BN+ReLU with widths ``base_width * [1, 2, 4, 8, 8]``
    and max-pooling between levels; no skip connections (a skip would let defects leak straight
    through to the output, which is what R must not do). Decoder: per level an upsample + conv,
    then two convs, narrowing back to ``base_width``; a final 3x3 conv without activation.

    ``in_channels=3, base_width=128`` is the thesis "Base" R (69,048,579 parameters).
    ``mflm_options`` are :class:`MFLM`'s keyword arguments (kernel, dilation, heads, dim, layers,
    residual); None keeps the spec's defaults.
    """

    def __init__(self, in_channels: int = 3, out_channels: int | None = None,
                 base_width: int = 128, depth: int = 5, mflm: bool = False,
                 mflm_options: dict | None = None):
        super().__init__()
        if depth < 2:
            raise ValueError(f"ReconstructiveSubNetwork depth must be >= 2, got {depth}")
        out_channels = in_channels if out_channels is None else out_channels
        self.in_channels, self.out_channels = in_channels, out_channels
        self.base_width, self.depth = base_width, depth
        widths = _encoder_widths(base_width, depth)
        enc: list[nn.Module] = []
        cin = in_channels
        for i, w in enumerate(widths):
            last = i == len(widths) - 1
            enc.append(_mflm_block(cin, w, mflm_options) if mflm and last
                       else _double_conv(cin, w, w))
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
                 depth: int = 6, calm: bool = False, calm_reduction: int = 16):
        super().__init__()
        if depth < 2:
            raise ValueError(f"DiscriminativeSubNetwork depth must be >= 2, got {depth}")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.base_channels, self.depth = base_channels, depth
        widths = _encoder_widths(base_channels, depth)
        enc: list[nn.Module] = []
        cin = in_channels
        for w in widths:
            enc.append(_calm_block(cin, w, calm_reduction) if calm else _double_conv(cin, w, w))
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


class NoReconstruction(nn.Module):
    """R switched off: the plain U-Net baseline of the thesis (D alone on the image).

    Passes the image through unchanged, so the fused graph keeps its two outputs (the runtime
    contract), while :func:`discriminator_input` hands D the image alone, not ``cat(x, x)``.
    """

    passthrough = True

    def __init__(self, in_channels: int):
        super().__init__()
        self.in_channels = self.out_channels = in_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def discriminator_input(reconstruction: nn.Module, rec: torch.Tensor, image: torch.Tensor
                        ) -> torch.Tensor:
    """What D sees: ``cat([rec, image])`` (spec order), or the image alone for the baseline."""
    if getattr(reconstruction, "passthrough", False):
        return image
    return torch.cat([rec, image], dim=1)


class ARCDInference(nn.Module):
    """R and D fused into the one graph the runtime runs.

    Input: normalised image ``[N, C, H, W]`` (H and W multiples of ``2 ** (depth - 1)`` of both
    networks). Outputs: ``(reconstruction [N, C, H, W], probs [N, K, H, W])`` with ``probs`` the
    softmax over the K classes (class 0 = background). D sees ``cat([reconstruction, input])``,
    the spec's default order. With ``region_head`` D has K + 2 output channels and a third
    output follows, ``region [N, 1, H, W]``: the probability of the machine region (the thesis's
    second sub-task), from its own softmax over D's last two channels.
    """

    def __init__(self, reconstruction: ReconstructiveSubNetwork | NoReconstruction,
                 discrimination: DiscriminativeSubNetwork, region_head: bool = False):
        super().__init__()
        want = reconstruction.in_channels if getattr(reconstruction, "passthrough", False) \
            else reconstruction.out_channels + reconstruction.in_channels
        if discrimination.in_channels != want:
            raise ValueError(
                f"D takes {discrimination.in_channels} channels but its input has {want}")
        self.reconstruction = reconstruction
        self.discrimination = discrimination
        self.region_head = region_head

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        rec = self.reconstruction(image)
        logits = self.discrimination(discriminator_input(self.reconstruction, rec, image))
        if not self.region_head:
            return rec, channel_softmax(logits)
        defects, region = split_region_logits(logits)
        # the region head is its own 2-way softmax (spec §2.4): a pixel can be a defect and
        # inside the machine region at once; only p(region) leaves the graph
        return rec, channel_softmax(defects), channel_softmax(region)[:, 1:2]


def split_region_logits(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """D's output with a region head -> (defect logits [N, K, ...], region logits [N, 2, ...]).

    The region head is D's last two channels ({not region, region}); the first K are the
    defect head's, as without a region head.
    """
    return logits[:, :-2], logits[:, -2:]


def channel_softmax(logits: torch.Tensor) -> torch.Tensor:
    """Softmax over dim 1, written out as max-shift, exp, sum, divide.

    Mathematically ``torch.softmax(logits, 1)``; spelled out because ONNX Runtime's CPU Softmax
    over the channel axis of an NCHW tensor transposes internally and cost ~50 ms for 7 tiles of
    4x256x256 on the 2-core line PC, against ~7 ms for these elementwise/reduce ops.
    """
    e = torch.exp(logits - logits.amax(dim=1, keepdim=True))
    return e / e.sum(dim=1, keepdim=True)
