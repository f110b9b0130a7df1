"""Fuzzy-mask inpainter, training side: the masking module, the weighted SSIM / D map and the
network (spec ../shared/seeds/001_spec.md §2.3, §3.1, §3.2, acceptance checks §8)."""

from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the training side needs the train extra (torch)")

from export.fuzzymask.loss import (C1, C2, C3, TYPE_WEIGHTS, FuzzyMaskLoss, dissimilarity_map,  # noqa: E402
                                   gaussian_window, ssimloss_map)
from export.fuzzymask.masking import (FuzzyMaskConfig, cell_kernel, cell_pixels,  # noqa: E402
                                      complementary_partition, fuzzy_mask)
from export.fuzzymask.torch_model import FuzzyMaskNet  # noqa: E402

torch.set_num_threads(1)


# ---------------------------------------------------------------------------------------------
# masking (spec §2.3, §8.2)
# ---------------------------------------------------------------------------------------------

def test_partition_covers_every_cell_once():
    groups = complementary_partition(256, 6, np.random.default_rng(0))
    assert sorted(len(g) for g in groups) == [42, 42, 43, 43, 43, 43]
    allc = np.concatenate(groups)
    assert len(allc) == 256 and len(np.unique(allc)) == 256


def test_batch_masks_are_complementary_and_cover_the_image():
    x = torch.rand(6, 3, 256, 256)
    _, cells = fuzzy_mask(x, FuzzyMaskConfig(), np.random.default_rng(1))
    assert cells.shape == (6, 16, 16)
    assert bool((cells.sum(dim=0) == 1).all()), "every cell masked in exactly one image of the batch"
    assert sorted(cells.sum(dim=(1, 2)).tolist()) == [42, 42, 43, 43, 43, 43]


@pytest.mark.parametrize("k,grid", [(8, 8), (16, 4), (32, 2)])
def test_cell_sizes(k, grid):
    x = torch.rand(4, 1, 64, 64)
    _, cells = fuzzy_mask(x, FuzzyMaskConfig(cell=k), np.random.default_rng(0))
    assert cells.shape == (4, grid, grid)
    assert bool((cells.sum(dim=0) == 1).all())


def test_fewer_partitions_repeat_groups():
    x = torch.rand(6, 1, 64, 64)
    _, cells = fuzzy_mask(x, FuzzyMaskConfig(n_partitions=3), np.random.default_rng(0))
    assert torch.equal(cells[0], cells[3]) and torch.equal(cells[2], cells[5])
    assert bool((cells[:3].sum(dim=0) == 1).all())


@pytest.mark.parametrize("make_rng", [lambda s: np.random.default_rng(s),
                                      lambda s: torch.Generator().manual_seed(s)])
def test_deterministic_under_a_seed(make_rng):
    x = torch.rand(6, 1, 64, 64)
    a, ca = fuzzy_mask(x, FuzzyMaskConfig(), make_rng(7))
    b, cb = fuzzy_mask(x, FuzzyMaskConfig(), make_rng(7))
    c, cc = fuzzy_mask(x, FuzzyMaskConfig(), make_rng(8))
    assert torch.equal(a, b) and torch.equal(ca, cb)
    assert not torch.equal(a, c)


@pytest.mark.parametrize("fill", ["gauss0", "uniform01", "blurred_self"])
def test_outside_cells_bit_identical_and_range(fill):
    x = torch.rand(6, 3, 96, 80)  # 80 is not a multiple of 16: a partial last cell column
    xt, cells = fuzzy_mask(x, FuzzyMaskConfig(fill=fill), np.random.default_rng(2))
    sel = cell_pixels(cells, 96, 80, 16).expand_as(x)
    assert torch.equal(xt[~sel], x[~sel])
    assert bool((xt[sel] != x[sel]).float().mean() > 0.9)
    assert float(xt.min()) >= 0.0 and float(xt.max()) <= 1.0


def test_centre_keeps_most_of_the_original():
    # spec §2.3(b) figures: r = 0.49 at the centre pixels, 0.086 mid-edge, 0.015 in the corner
    k = cell_kernel(16, 0.5, 4.0)
    assert k[7, 7] == pytest.approx(0.5 * math.exp(-0.5 / 32), rel=1e-5)
    assert k[0, 7] == pytest.approx(0.0855, abs=5e-4) and k[0, 0] == pytest.approx(0.0149, abs=5e-4)
    x = torch.full((6, 1, 128, 128), 0.6)
    xt, cells = fuzzy_mask(x, FuzzyMaskConfig(), np.random.default_rng(3))
    d = (xt - x).abs()[:, 0].reshape(6, 8, 16, 8, 16).permute(0, 1, 3, 2, 4)  # N, gy, gx, 16, 16
    d = d[cells]  # selected cells only: M x 16 x 16
    centre = d[:, 7:9, 7:9].mean()
    edge = d[:, 0, 6:10].mean()
    corner = d[:, [0, 0, 15, 15], [0, 15, 0, 15]].mean()
    assert centre < edge < corner


# ---------------------------------------------------------------------------------------------
# weighted SSIM and D (spec §3.2, §4.1, §8.1)
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("t", ["I", "II", "III"])
def test_d_of_x_with_x_is_zero_even_on_flat_patches(t):
    x = torch.rand(2, 3, 48, 48)
    x[:, :, :24, :24] = 0.3  # constant patch: sigma = 0
    x[1] = 0.0               # an all-black image
    assert float(ssimloss_map(x, x, *TYPE_WEIGHTS[t]).abs().max()) == 0.0
    assert float(dissimilarity_map(x, x, *TYPE_WEIGHTS[t]).abs().max()) == 0.0


def test_no_nan_and_finite_gradients_on_constant_inputs():
    for s in ("standard", "literal"):
        y = torch.full((1, 1, 32, 32), 0.5, requires_grad=True)
        for target in (torch.full((1, 1, 32, 32), 0.5), torch.zeros(1, 1, 32, 32), torch.rand(1, 1, 32, 32)):
            d = dissimilarity_map(y, target, *TYPE_WEIGHTS["I"], structure=s)
            assert bool(torch.isfinite(d).all())
            y.grad = None
            d.mean().backward()
            assert bool(torch.isfinite(y.grad).all())


def test_constant_images_closed_form():
    # flat x = a, y = b: variances and covariance vanish, so C = S = 1 and only luminance is left
    a, b = 0.5, 0.3
    alpha, beta, gamma = TYPE_WEIGHTS["I"]
    lum = (2 * a * b + C1) / (a * a + b * b + C1)
    want = 1 - lum ** (alpha / gamma)
    x, y = torch.full((1, 1, 16, 16), a), torch.full((1, 1, 16, 16), b)
    got = ssimloss_map(x, y, alpha, beta, gamma)
    assert torch.allclose(got, torch.full_like(got, want), atol=1e-6)
    assert torch.allclose(dissimilarity_map(x, y, alpha, beta, gamma), got + (a - b) ** 2, atol=1e-6)


def _by_hand(x: np.ndarray, y: np.ndarray, i: int, j: int, alpha: float, beta: float, gamma: float,
             structure: str = "standard") -> float:
    """The weighted SSIM loss at one pixel written out: explicit 11x11 window, numpy reflect."""
    g1 = np.exp(-(np.arange(11) - 5.0) ** 2 / (2 * 1.5 ** 2))
    g = np.outer(g1, g1) / g1.sum() ** 2
    xp, yp = np.pad(x, 5, mode="reflect"), np.pad(y, 5, mode="reflect")
    wx, wy = xp[i:i + 11, j:j + 11], yp[i:i + 11, j:j + 11]
    mx, my = (g * wx).sum(), (g * wy).sum()
    vx, vy = max((g * wx * wx).sum() - mx * mx, 0), max((g * wy * wy).sum() - my * my, 0)
    cov = (g * wx * wy).sum() - mx * my
    sx, sy = math.sqrt(vx + 1e-8), math.sqrt(vy + 1e-8)
    lum = (2 * mx * my + C1) / (mx * mx + my * my + C1)
    con = (2 * sx * sy + C2) / (sx * sx + sy * sy + C2)
    st = (cov + 1e-8 + C3) / (sx * sy + C3) if structure == "standard" else (2 * cov + C3) / (sx + sy + C3)
    lum, con, st = (min(max(v, 1e-4), 1.0) for v in (lum, con, st))
    return 1 - max(lum ** alpha * con * st ** beta, 1e-8) ** (1 / gamma)


@pytest.mark.parametrize("structure", ["standard", "literal"])
def test_weighted_ssim_matches_a_hand_computed_case(structure):
    rng = np.random.default_rng(4)
    x = rng.random((12, 12)).astype(np.float32)
    y = np.clip(0.7 * x + 0.2 + rng.normal(0, 0.05, (12, 12)), 0, 1).astype(np.float32)
    alpha, beta, gamma = TYPE_WEIGHTS["III"]
    got = ssimloss_map(torch.from_numpy(x)[None, None], torch.from_numpy(y)[None, None], alpha, beta,
                       gamma, structure=structure)[0].numpy()
    for i, j in [(0, 0), (5, 6), (11, 3), (11, 11)]:
        assert got[i, j] == pytest.approx(_by_hand(x, y, i, j, alpha, beta, gamma, structure), abs=2e-6)


def test_gamma_override_and_window():
    assert float(gaussian_window(11, 1.5).sum()) == pytest.approx(1.0)
    x, y = torch.full((1, 1, 16, 16), 0.5), torch.full((1, 1, 16, 16), 0.3)
    a = ssimloss_map(x, y, 0.2, 0.5, 2.3).mean()
    b = ssimloss_map(x, y, 0.2, 0.5, 3.0).mean()
    assert float(b) < float(a)  # a higher root flattens the similarity


def test_loss_is_eq5_with_one_forward():
    calls = []

    class Ident(torch.nn.Module):
        def forward(self, z):
            calls.append(z.shape[0])
            return z.clamp(0, 1) * 0.9

    x, xt = torch.rand(3, 1, 32, 32), torch.rand(3, 1, 32, 32)
    crit = FuzzyMaskLoss(*TYPE_WEIGHTS["II"], lam=0.1)
    total, parts = crit(Ident(), x, xt)
    assert calls == [6]
    want = (torch.nn.functional.mse_loss(0.9 * x, x) + ssimloss_map(0.9 * x, x, *TYPE_WEIGHTS["II"]).mean()
            + 0.1 * (torch.nn.functional.mse_loss(0.9 * xt, x)
                     + ssimloss_map(0.9 * xt, x, *TYPE_WEIGHTS["II"]).mean()))
    assert float(total) == pytest.approx(float(want), rel=1e-6)
    assert set(parts) == {"loss", "mse_rec", "ssim_rec", "mse_inp", "ssim_inp"}


def test_torch_and_runtime_d_agree():
    rt = pytest.importorskip("inspector.models.fuzzymask", reason="runtime side not present")
    if not hasattr(rt, "dissimilarity_map"):
        pytest.skip("inspector.models.fuzzymask has no dissimilarity_map yet")
    rng = np.random.default_rng(5)
    x = rng.random((1, 40, 48)).astype(np.float32)
    x[:, :16, :16] = 0.25
    y = np.clip(x + rng.normal(0, 0.1, x.shape), 0, 1).astype(np.float32)
    a, b, g = TYPE_WEIGHTS["I"]
    params = rt.FuzzymaskParams(ssim_alpha=a, ssim_beta=b, ssim_gamma=g, tau=0.5)
    want = dissimilarity_map(torch.from_numpy(x)[None], torch.from_numpy(y)[None], a, b, g)[0].numpy()
    got = rt.dissimilarity_map(x, y, params)
    assert float(np.abs(got - want).max()) <= 1e-4


# ---------------------------------------------------------------------------------------------
# network (spec §3.1, §8.3)
# ---------------------------------------------------------------------------------------------

def _fusion_inputs(net: FuzzyMaskNet, x: torch.Tensor) -> dict[str, tuple[int, ...]]:
    seen: dict[str, tuple[int, ...]] = {}
    hooks = [m.register_forward_hook(lambda mod, inp, out, n=name: seen.__setitem__(n, tuple(inp[0].shape)))
             for name, m in net.fuse.items()]
    with torch.no_grad():
        out = net.eval()(x)
    for h in hooks:
        h.remove()
    assert out.shape == x.shape and float(out.min()) >= 0 and float(out.max()) <= 1
    return seen


def test_spec_network_shapes_and_skips():
    net = FuzzyMaskNet(in_channels=3, width=64)
    assert sum(len(getattr(net.encoder, f"layer{i}")) for i in range(1, 5)) == 16  # 3 + 4 + 6 + 3
    seen = _fusion_inputs(net, torch.rand(1, 3, 256, 256))
    # the decoder output concatenated with the encoder skip: (256 + 256) at 16x16, (128 + 128) at
    # 32x32 in the spec's table, i.e. 2 x 4w and 2 x 2w channels at width w = 64
    assert seen == {"layer3": (1, 512, 16, 16), "layer2": (1, 256, 32, 32)}


def test_small_width_other_skips_and_cae():
    x = torch.rand(2, 1, 64, 96)
    assert _fusion_inputs(FuzzyMaskNet(1, 8, skip_layers=("layer1", "layer2")), x) == \
        {"layer2": (2, 32, 8, 12), "layer1": (2, 16, 16, 24)}
    cae = FuzzyMaskNet(1, 8, fusion=False)
    assert len(cae.fuse) == 0 and _fusion_inputs(cae, x) == {}
    up = FuzzyMaskNet(1, 4, upsample="convtranspose")
    assert up(x).shape == x.shape
    with pytest.raises(ValueError, match="multiples of 32"):
        up(torch.rand(1, 1, 48, 48))


def test_local_encoder_checkpoint(tmp_path):
    src = FuzzyMaskNet(3, 8)
    sd = {k: v for k, v in src.encoder.state_dict().items()}
    sd["fc.weight"] = torch.zeros(10, 64)  # a classifier head, as in a torchvision file: ignored
    torch.save(sd, tmp_path / "enc.pt")
    rgb = FuzzyMaskNet(3, 8)
    rgb.load_encoder(tmp_path / "enc.pt")
    assert torch.equal(rgb.encoder.layer3[0].conv1.weight, src.encoder.layer3[0].conv1.weight)
    grey = FuzzyMaskNet(1, 8)
    grey.load_encoder(tmp_path / "enc.pt")  # 3-channel stem summed onto the grey one
    assert torch.allclose(grey.encoder.conv1.weight, src.encoder.conv1.weight.sum(1, keepdim=True))
    with pytest.raises(ValueError, match="does not fit"):
        FuzzyMaskNet(3, 16).load_encoder(tmp_path / "enc.pt")
    (tmp_path / "cut.pt").write_bytes((tmp_path / "enc.pt").read_bytes()[:1000])
    with pytest.raises(ValueError, match="cut.pt: unreadable checkpoint"):  # a copy cut short
        FuzzyMaskNet(3, 8).load_encoder(tmp_path / "cut.pt")
