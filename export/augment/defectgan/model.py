"""Defect-GAN networks (``../shared/seeds/003_spec.md`` §2): the defacement/restoration generator
with SPADE control (SCC), adaptive noise injection (ANI) and layer-wise composition (LWC), the
StarGAN PatchGAN + auxiliary-classifier critic, and the WGAN-GP gradient penalty.

Plain torch (no torchvision). Widths and depths are arguments so the CPU configs can shrink
them; the defaults are the spec's paper sizes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["SPADE", "NoiseInjection", "ResBlockEnc", "ResBlockSPADE", "UpBlockSPADE",
           "DefectGenerator", "DefectDiscriminator", "compose", "gradient_penalty",
           "count_parameters"]


def count_parameters(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def compose(x: torch.Tensor, f: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Eq. (2)/(4): ``x * (1 - m) + f * m``; the 1-channel ``m`` broadcasts over channels."""
    return x * (1 - m) + f * m


class NoiseInjection(nn.Module):
    """ANI: ``x + w * N(0, I)``, one noise channel broadcast over the features, ``w`` a learned
    scalar starting at 0 (StyleGAN), so a fresh network is deterministic until it learns to use
    noise. ``generator`` makes the noise reproducible (sampling under a seed)."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        b, _, h, w = x.shape
        if generator is None:
            noise = torch.randn((b, 1, h, w), device=x.device, dtype=x.dtype)
        else:  # drawn where the generator lives (the CPU for sampling), then moved
            noise = torch.randn((b, 1, h, w), generator=generator, device=generator.device,
                                dtype=x.dtype).to(x.device)
        return x + self.weight * noise


class SPADE(nn.Module):
    """``IN(x; no affine) * (1 + gamma(A)) + beta(A)``; A resized (nearest) to x's size, gamma
    and beta from a shared ``Conv3x3 -> ReLU`` then one ``Conv3x3`` each (Park et al.)."""

    def __init__(self, channels: int, n_classes: int, hidden: int = 128):
        super().__init__()
        self.norm = nn.InstanceNorm2d(channels, affine=False)
        self.shared = nn.Sequential(nn.Conv2d(n_classes, hidden, 3, padding=1), nn.ReLU(inplace=True))
        self.gamma = nn.Conv2d(hidden, channels, 3, padding=1)
        self.beta = nn.Conv2d(hidden, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        a = F.interpolate(a, size=x.shape[2:], mode="nearest")
        h = self.shared(a)
        return self.norm(x) * (1 + self.gamma(h)) + self.beta(h)


class ResBlockEnc(nn.Module):
    """Encoder residual block: ``conv3-IN-ReLU-conv3-IN`` + skip, noise after each conv block."""

    def __init__(self, ch: int, ani: bool = True):
        super().__init__()
        self.c1 = nn.Conv2d(ch, ch, 3, padding=1, bias=False)
        self.n1 = nn.InstanceNorm2d(ch, affine=True)
        self.c2 = nn.Conv2d(ch, ch, 3, padding=1, bias=False)
        self.n2 = nn.InstanceNorm2d(ch, affine=True)
        self.z1 = NoiseInjection() if ani else None
        self.z2 = NoiseInjection() if ani else None

    def forward(self, x: torch.Tensor, gen: torch.Generator | None = None) -> torch.Tensor:
        h = F.relu(self.n1(self.c1(x)))
        if self.z1 is not None:
            h = self.z1(h, gen)
        h = self.n2(self.c2(h))
        if self.z2 is not None:
            h = self.z2(h, gen)
        return x + h


class ResBlockSPADE(nn.Module):
    """Decoder residual block: ``SPADE-ReLU-conv3-SPADE-ReLU-conv3`` + skip, noise after each conv."""

    def __init__(self, ch: int, n_classes: int, hidden: int, ani: bool = True):
        super().__init__()
        self.s1 = SPADE(ch, n_classes, hidden)
        self.c1 = nn.Conv2d(ch, ch, 3, padding=1)
        self.s2 = SPADE(ch, n_classes, hidden)
        self.c2 = nn.Conv2d(ch, ch, 3, padding=1)
        self.z1 = NoiseInjection() if ani else None
        self.z2 = NoiseInjection() if ani else None

    def forward(self, x: torch.Tensor, a: torch.Tensor,
                gen: torch.Generator | None = None) -> torch.Tensor:
        h = self.c1(F.relu(self.s1(x, a)))
        if self.z1 is not None:
            h = self.z1(h, gen)
        h = self.c2(F.relu(self.s2(h, a)))
        if self.z2 is not None:
            h = self.z2(h, gen)
        return x + h


class UpBlockSPADE(nn.Module):
    """``SPADE -> ReLU -> Deconv4x4(s2)`` then noise (spec §2.2 decoder upsampling)."""

    def __init__(self, cin: int, cout: int, n_classes: int, hidden: int, ani: bool = True):
        super().__init__()
        self.spade = SPADE(cin, n_classes, hidden)
        self.up = nn.ConvTranspose2d(cin, cout, 4, stride=2, padding=1)
        self.z = NoiseInjection() if ani else None

    def forward(self, x: torch.Tensor, a: torch.Tensor,
                gen: torch.Generator | None = None) -> torch.Tensor:
        h = self.up(F.relu(self.spade(x, a)))
        return self.z(h, gen) if self.z is not None else h


class _DownBlock(nn.Module):
    """``Conv -> IN -> ReLU`` then noise: the encoder's stem and stride-2 stages."""

    def __init__(self, cin: int, cout: int, k: int, s: int, p: int, ani: bool):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, stride=s, padding=p, bias=False)
        self.norm = nn.InstanceNorm2d(cout, affine=True)
        self.z = NoiseInjection() if ani else None

    def forward(self, x: torch.Tensor, gen: torch.Generator | None = None) -> torch.Tensor:
        h = F.relu(self.norm(self.conv(x)))
        return self.z(h, gen) if self.z is not None else h


class DefectGenerator(nn.Module):
    """G of spec §2.2: encoder (stride 4 in total, ``n_res_enc`` IN residual blocks), decoder
    (``n_res_dec`` SPADE residual blocks, two SPADE upsampling blocks), ``Conv7x7 -> channels+1``
    split into the foreground ``f = tanh`` and the distribution map ``m = sigmoid``.

    ``forward(x, a)`` returns ``(y, f, m)`` with ``y = compose(x, f, m)`` under LWC; without LWC
    (``lwc=False``, the StarGAN+SPADE ablation) ``y = f`` and ``m`` is all ones.
    """

    def __init__(self, channels: int = 3, n_classes: int = 5, ngf: int = 64, n_res_enc: int = 3,
                 n_res_dec: int = 3, spade_hidden: int = 128, ani: bool = True, lwc: bool = True):
        super().__init__()
        self.channels, self.n_classes, self.lwc = channels, n_classes, lwc
        self.stem = _DownBlock(channels, ngf, 7, 1, 3, ani)
        self.down1 = _DownBlock(ngf, ngf * 2, 4, 2, 1, ani)
        self.down2 = _DownBlock(ngf * 2, ngf * 4, 4, 2, 1, ani)
        self.enc = nn.ModuleList(ResBlockEnc(ngf * 4, ani) for _ in range(n_res_enc))
        self.dec = nn.ModuleList(ResBlockSPADE(ngf * 4, n_classes, spade_hidden, ani)
                                 for _ in range(n_res_dec))
        self.up1 = UpBlockSPADE(ngf * 4, ngf * 2, n_classes, spade_hidden, ani)
        self.up2 = UpBlockSPADE(ngf * 2, ngf, n_classes, spade_hidden, ani)
        self.out = nn.Conv2d(ngf, channels + 1, 7, padding=3)

    def forward(self, x: torch.Tensor, a: torch.Tensor, gen: torch.Generator | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``x`` (B, channels, H, W) in [-1, 1]; ``a`` the control map (B, C, H, W) or a label
        (B, C), tiled (training: image-level labels only)."""
        if a.dim() == 2:
            a = a[:, :, None, None].expand(-1, -1, x.shape[2], x.shape[3])
        h = self.down2(self.down1(self.stem(x, gen), gen), gen)
        for blk in self.enc:
            h = blk(h, gen)
        for blk in self.dec:
            h = blk(h, a, gen)
        h = self.up2(self.up1(h, a, gen), a, gen)
        o = self.out(F.relu(h))
        f = torch.tanh(o[:, :self.channels])
        if not self.lwc:
            return f, f, torch.ones_like(o[:, self.channels:])
        m = torch.sigmoid(o[:, self.channels:])
        return compose(x, f, m), f, m


class DefectDiscriminator(nn.Module):
    """StarGAN critic (spec §2.3): ``n_layers`` x ``Conv4x4(s2) + LeakyReLU(0.01)``, widths
    ``ndf * 2**i``, no normalisation (WGAN-GP); ``D_src`` a 3x3 conv giving a patch map,
    ``D_cls`` a conv over the whole remaining map giving C logits."""

    def __init__(self, image_size: int = 128, channels: int = 3, n_classes: int = 5, ndf: int = 64,
                 n_layers: int = 6):
        super().__init__()
        if image_size % (2 ** n_layers):
            raise ValueError(f"image size {image_size} is not divisible by 2**{n_layers} "
                             f"(discriminator layers)")
        layers: list[nn.Module] = []
        cin = channels
        for i in range(n_layers):
            cout = ndf * 2 ** i
            layers += [nn.Conv2d(cin, cout, 4, stride=2, padding=1), nn.LeakyReLU(0.01)]
            cin = cout
        self.trunk = nn.Sequential(*layers)
        k = image_size // 2 ** n_layers
        self.src = nn.Conv2d(cin, 1, 3, padding=1, bias=False)
        self.cls = nn.Conv2d(cin, n_classes, k, bias=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(patch scores (B, 1, k, k), class logits (B, C))."""
        h = self.trunk(x)
        return self.src(h), self.cls(h).flatten(1)


def gradient_penalty(critic: nn.Module, real: torch.Tensor, fake: torch.Tensor,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """WGAN-GP: ``E[(||grad_x^ D_src(x^)||_2 - 1)^2]`` at random interpolates of real and fake.
    ``critic`` returns the patch map (or a tuple whose first item is it); the patch scores are
    summed per sample, so the norm is that of one scalar critic value per image."""
    eps = torch.rand((real.shape[0], 1, 1, 1), generator=generator).to(real)
    x = (eps * real.detach() + (1 - eps) * fake.detach()).requires_grad_(True)
    out = critic(x)
    if isinstance(out, tuple):
        out = out[0]
    grad, = torch.autograd.grad(out.sum(), x, create_graph=True)
    return ((grad.flatten(1).norm(2, dim=1) - 1) ** 2).mean()
