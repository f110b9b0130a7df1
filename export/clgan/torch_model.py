"""CLGAN networks as plain ``nn.Module``s: generator G, PatchGAN discriminator D, projection heads H.

Layer plans follow ``../shared/seeds/002_spec.md`` §1.2-§1.4 (the CUT ``resnet_9blocks`` generator,
the 70x70 PatchGAN with batch norm, one 4-layer MLP head per PatchNCE layer). Every width and
count is an argument whose default is the spec's, so the same code gives the paper-size network
on a GPU box and the narrow one that trains on a line PC's CPU.

Example::

    >>> import torch
    >>> g = ResnetGenerator(in_channels=1, ngf=8, n_resblocks=2)
    >>> tuple(g(torch.zeros(2, 1, 64, 64)).shape)
    (2, 1, 64, 64)
    >>> feats = g(torch.zeros(2, 1, 64, 64), nce_layers=["input", "E2", "R1"])
    >>> [tuple(f.shape) for f in feats]
    [(2, 1, 70, 70), (2, 16, 32, 32), (2, 32, 16, 16)]
    >>> tuple(PatchGANDiscriminator(in_channels=1, ndf=8)(torch.zeros(1, 1, 256, 256)).shape)
    (1, 1, 30, 30)
"""

from __future__ import annotations

from typing import Literal, Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "ResnetGenerator",
    "PatchGANDiscriminator",
    "ProjectionHeads",
    "init_weights",
    "count_parameters",
    "DEFAULT_NCE_LAYERS",
]

NormKind = Literal["instance", "batch", "none"]
#: spec §1.4 DEFAULT: the padded input, the outputs of E2's and E3's convs, ResNet blocks 1 and 5
DEFAULT_NCE_LAYERS = ("input", "E2", "E3", "R1", "R5")


def _norm(kind: NormKind, ch: int) -> nn.Module:
    if kind == "instance":
        # CUT's generator norm: no affine parameters, statistics of each image (train and eval)
        return nn.InstanceNorm2d(ch, affine=False, track_running_stats=False)
    if kind == "batch":
        return nn.BatchNorm2d(ch)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"norm must be instance|batch|none, got {kind!r}")


def _uses_bias(kind: NormKind) -> bool:
    # A conv right before batch norm has its bias cancelled by the mean subtraction; CUT keeps the
    # bias only in front of instance norm (and where there is no norm at all).
    return kind != "batch"


class _Blur(nn.Module):
    """Fixed 3x3 binomial low-pass per channel ([1,2,1] outer [1,2,1] / 16), reflect-padded."""

    def __init__(self, ch: int, stride: int = 1):
        super().__init__()
        k = torch.tensor([1.0, 2.0, 1.0])
        k = (k[:, None] * k[None, :]) / 16.0
        self.register_buffer("kernel", k.expand(ch, 1, 3, 3).clone())
        self.stride = stride
        self.ch = ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.pad(x, (1, 1, 1, 1), mode="reflect"), self.kernel, stride=self.stride,
                        groups=self.ch)


class ResnetBlock(nn.Module):
    """x + [RefPad1, Conv3x3, norm, ReLU, RefPad1, Conv3x3, norm](x)."""

    def __init__(self, ch: int, norm: NormKind = "instance"):
        super().__init__()
        b = _uses_bias(norm)
        self.body = nn.Sequential(
            nn.ReflectionPad2d(1), nn.Conv2d(ch, ch, 3, bias=b), _norm(norm, ch), nn.ReLU(True),
            nn.ReflectionPad2d(1), nn.Conv2d(ch, ch, 3, bias=b), _norm(norm, ch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class ResnetGenerator(nn.Module):
    """G = G_dec o G_enc: 3-layer conv encoder, ResNet blocks, 3-layer (transposed-)conv decoder.

    Spec §1.2 defaults: ``ngf=64``, ``n_resblocks=9``, instance norm, plain strided convs
    (``antialias=True`` gives CUT's anti-aliased down/up-sampling instead), no encoder-to-decoder
    skips (``skip='add'|'concat'`` is an ablation: skips let the network copy defects through),
    Tanh output in [-1, 1].

    ``forward(x)`` returns the reconstruction; ``forward(x, nce_layers=[...])`` returns the encoder
    features at the named taps (``input`` = after E1's reflection pad, ``E1`` = after E1, ``E2`` /
    ``E3`` = the down-sampling conv outputs, ``R<i>`` = ResNet block i, 1-based) and stops there.
    The feature path goes through ``forward`` so a distributed wrapper sees every call.
    """

    def __init__(self, in_channels: int = 3, out_channels: int | None = None, ngf: int = 64,
                 n_resblocks: int = 9, norm: NormKind = "instance", antialias: bool = False,
                 skip: Literal["none", "add", "concat"] = "none"):
        super().__init__()
        if n_resblocks < 0:
            raise ValueError(f"n_resblocks must be >= 0, got {n_resblocks}")
        if skip not in ("none", "add", "concat"):
            raise ValueError(f"skip must be none|add|concat, got {skip!r}")
        out_channels = in_channels if out_channels is None else out_channels
        self.in_channels, self.out_channels = in_channels, out_channels
        self.ngf, self.n_resblocks, self.skip = ngf, n_resblocks, skip
        b = _uses_bias(norm)
        self.e1_pad = nn.ReflectionPad2d(3)
        self.e1 = nn.Sequential(nn.Conv2d(in_channels, ngf, 7, bias=b), _norm(norm, ngf), nn.ReLU(True))
        if antialias:
            # CUT's anti-aliased variant: stride-1 conv, norm, ReLU, then blur-and-subsample
            self.e2_conv = nn.Conv2d(ngf, 2 * ngf, 3, padding=1, bias=b)
            self.e2_post = nn.Sequential(_norm(norm, 2 * ngf), nn.ReLU(True), _Blur(2 * ngf, 2))
            self.e3_conv = nn.Conv2d(2 * ngf, 4 * ngf, 3, padding=1, bias=b)
            self.e3_post = nn.Sequential(_norm(norm, 4 * ngf), nn.ReLU(True), _Blur(4 * ngf, 2))
        else:
            self.e2_conv = nn.Conv2d(ngf, 2 * ngf, 3, stride=2, padding=1, bias=b)
            self.e2_post = nn.Sequential(_norm(norm, 2 * ngf), nn.ReLU(True))
            self.e3_conv = nn.Conv2d(2 * ngf, 4 * ngf, 3, stride=2, padding=1, bias=b)
            self.e3_post = nn.Sequential(_norm(norm, 4 * ngf), nn.ReLU(True))
        self.blocks = nn.ModuleList(ResnetBlock(4 * ngf, norm) for _ in range(n_resblocks))
        cat = 2 if skip == "concat" else 1
        self.d1 = self._up(4 * ngf, 2 * ngf, norm, b, antialias)
        self.d2 = self._up(2 * ngf * cat, ngf, norm, b, antialias)
        self.d3 = nn.Sequential(nn.ReflectionPad2d(3), nn.Conv2d(ngf * cat, out_channels, 7), nn.Tanh())
        init_weights(self)

    @staticmethod
    def _up(cin: int, cout: int, norm: NormKind, bias: bool, antialias: bool) -> nn.Sequential:
        if antialias:
            return nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), _Blur(cin),
                                 nn.Conv2d(cin, cout, 3, padding=1, bias=bias), _norm(norm, cout),
                                 nn.ReLU(True))
        return nn.Sequential(nn.ConvTranspose2d(cin, cout, 3, stride=2, padding=1, output_padding=1,
                                                bias=bias), _norm(norm, cout), nn.ReLU(True))

    def layer_names(self) -> list[str]:
        return ["input", "E1", "E2", "E3"] + [f"R{i + 1}" for i in range(self.n_resblocks)]

    def feature_channels(self, names: Sequence[str]) -> list[int]:
        ch = {"input": self.in_channels, "E1": self.ngf, "E2": 2 * self.ngf, "E3": 4 * self.ngf}
        out = []
        for n in names:
            if n in ch:
                out.append(ch[n])
            elif n in self.layer_names():
                out.append(4 * self.ngf)
            else:
                raise ValueError(f"nce layer {n!r} is not a tap of this generator "
                                 f"(taps: {', '.join(self.layer_names())})")
        return out

    def forward(self, x: torch.Tensor, nce_layers: Sequence[str] | None = None):
        if nce_layers is not None:
            return self._encode(x, list(nce_layers))
        x = self.e1_pad(x)
        s1 = self.e1(x)
        s2 = self.e2_post(self.e2_conv(s1))
        x = self.e3_post(self.e3_conv(s2))
        for blk in self.blocks:
            x = blk(x)
        x = self.d1(x)
        x = self._join(x, s2)
        x = self.d2(x)
        x = self._join(x, s1)
        return self.d3(x)

    def _join(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        if self.skip == "add":
            return x + skip
        if self.skip == "concat":
            return torch.cat([x, skip], 1)
        return x

    def _encode(self, x: torch.Tensor, names: list[str]) -> list[torch.Tensor]:
        self.feature_channels(names)  # validates the names
        want = set(names)
        got: dict[str, torch.Tensor] = {}

        def tap(name: str, t: torch.Tensor) -> bool:
            if name in want:
                got[name] = t
            return len(got) == len(want)  # stop as soon as every tap is filled

        x = self.e1_pad(x)
        if tap("input", x):
            return [got[n] for n in names]
        x = self.e1(x)
        if tap("E1", x):
            return [got[n] for n in names]
        x = self.e2_conv(x)
        if tap("E2", x):
            return [got[n] for n in names]
        x = self.e3_conv(self.e2_post(x))
        if tap("E3", x):
            return [got[n] for n in names]
        x = self.e3_post(x)
        for i, blk in enumerate(self.blocks):
            x = blk(x)
            if tap(f"R{i + 1}", x):
                break
        return [got[n] for n in names]


class PatchGANDiscriminator(nn.Module):
    """The 70x70 PatchGAN: a 30x30 map of real/fake logits for a 256x256 input.

    Spec §1.3 DEFAULT (``layout='standard'``): C1 k4 s2 (no norm unless ``first_norm``), then
    ``n_layers - 1`` more k4 s2 convs, one k4 s1 conv, each with ``norm`` (batch, as the paper) and
    LeakyReLU 0.2, and a k4 s1 conv to one logit channel. ``layout='table1_literal'`` reproduces the
    paper's Table 1 sizes (256, 127, 63, 31, 30 for a 256 input) with batch norm on C1 too.
    """

    def __init__(self, in_channels: int = 3, ndf: int = 64, n_layers: int = 3,
                 norm: NormKind = "batch", layout: Literal["standard", "table1_literal"] = "standard",
                 first_norm: bool | None = None):
        super().__init__()
        b = _uses_bias(norm)
        lrelu = lambda: nn.LeakyReLU(0.2, True)  # noqa: E731
        layers: list[nn.Module] = []
        if layout == "table1_literal":
            first_norm = True if first_norm is None else first_norm
            w = [ndf, ndf * 2, ndf * 4, ndf * 8]
            # C1: k4 s1 'same' (TensorFlow pads an even kernel 1 before, 2 after)
            layers += [nn.ZeroPad2d((1, 2, 1, 2)), nn.Conv2d(in_channels, w[0], 4, 1, 0, bias=b)]
            layers += [_norm(norm, w[0])] if first_norm else []
            layers += [lrelu()]
            layers += [nn.Conv2d(w[0], w[1], 4, 2, 0, bias=b), _norm(norm, w[1]), lrelu()]
            layers += [nn.Conv2d(w[1], w[2], 4, 2, 1, bias=b), _norm(norm, w[2]), lrelu()]
            layers += [nn.Conv2d(w[2], w[3], 4, 2, 1, bias=b), _norm(norm, w[3]), lrelu()]
            layers += [nn.Conv2d(w[3], 1, 4, 1, 1)]
        elif layout == "standard":
            first_norm = False if first_norm is None else first_norm
            layers += [nn.Conv2d(in_channels, ndf, 4, 2, 1, bias=b if first_norm else True)]
            layers += [_norm(norm, ndf)] if first_norm else []
            layers += [lrelu()]
            mult = 1
            for n in range(1, n_layers):
                prev, mult = mult, min(2 ** n, 8)
                layers += [nn.Conv2d(ndf * prev, ndf * mult, 4, 2, 1, bias=b), _norm(norm, ndf * mult),
                           lrelu()]
            prev, mult = mult, min(2 ** n_layers, 8)
            layers += [nn.Conv2d(ndf * prev, ndf * mult, 4, 1, 1, bias=b), _norm(norm, ndf * mult), lrelu()]
            layers += [nn.Conv2d(ndf * mult, 1, 4, 1, 1)]
        else:
            raise ValueError(f"layout must be standard|table1_literal, got {layout!r}")
        self.model = nn.Sequential(*layers)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class ProjectionHeads(nn.Module):
    """H: one MLP per PatchNCE layer, applied to features sampled at patch locations.

    Spec §1.4 DEFAULT: ``mlp_layers=4`` fully-connected layers of ``mlp_dim=256`` with ReLU between
    them (``mlp_last_relu=True`` adds the Table-2-literal ReLU after the last), then L2
    normalisation, without which a temperature of 0.07 would not be meaningful.
    """

    def __init__(self, in_channels: Sequence[int], mlp_layers: int = 4, mlp_dim: int = 256,
                 mlp_last_relu: bool = False):
        super().__init__()
        if mlp_layers < 1:
            raise ValueError(f"mlp_layers must be >= 1, got {mlp_layers}")
        heads = []
        for cin in in_channels:
            layers: list[nn.Module] = []
            for i in range(mlp_layers):
                layers.append(nn.Linear(cin if i == 0 else mlp_dim, mlp_dim))
                if i < mlp_layers - 1 or mlp_last_relu:
                    layers.append(nn.ReLU(True))
            heads.append(nn.Sequential(*layers))
        self.heads = nn.ModuleList(heads)
        self.mlp_dim = mlp_dim
        init_weights(self)

    @staticmethod
    def sample_ids(feat: torch.Tensor, num_patches: int, generator: torch.Generator | None = None
                   ) -> torch.Tensor:
        """``num_patches`` distinct locations of ``feat`` (all of them when it has fewer)."""
        hw = feat.shape[2] * feat.shape[3]
        perm = torch.randperm(hw, generator=generator, device="cpu")
        return perm[:min(num_patches, hw)].to(feat.device)

    def forward(self, feats: Sequence[torch.Tensor], num_patches: int = 256,
                patch_ids: Sequence[torch.Tensor] | None = None,
                generator: torch.Generator | None = None
                ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Sample the same locations in every image of the batch, project, L2-normalise.

        Returns (one ``[B * S_l, mlp_dim]`` tensor per layer, grouped image by image; the location
        ids used), so the query side can reuse the key side's ids.
        """
        if len(feats) != len(self.heads):
            raise ValueError(f"{len(feats)} feature maps for {len(self.heads)} projection heads")
        out, ids_out = [], []
        for i, (f, head) in enumerate(zip(feats, self.heads)):
            b, c = f.shape[:2]
            flat = f.flatten(2).permute(0, 2, 1)  # B, HW, C
            ids = patch_ids[i] if patch_ids is not None else self.sample_ids(f, num_patches, generator)
            x = flat[:, ids, :].reshape(-1, c)
            # eps as CUT's Normalize (1e-7). Freshly initialised 4-layer heads (gain 0.02) give
            # vectors of about that norm, so for the first few dozen updates the embeddings are
            # shorter than 1; Adam's first steps grow the weights well past that.
            out.append(F.normalize(head(x), dim=1, eps=1e-7))
            ids_out.append(ids)
        return out, ids_out


def init_weights(module: nn.Module, gain: float = 0.02) -> None:
    """Spec §1.2 DEFAULT (CUT ``init_type=xavier, init_gain=0.02``): conv and linear weights
    xavier-normal with gain 0.02, biases 0, batch-norm weights N(1, 0.02)."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            nn.init.xavier_normal_(m.weight, gain=gain)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, gain)
            nn.init.zeros_(m.bias)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
