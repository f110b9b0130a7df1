"""CLGAN networks and losses (export/clgan): shapes, PatchNCE by hand, training reduces the loss."""

from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="CLGAN training code needs the train extra (torch)")

from export.clgan.data import DataSource  # noqa: E402
from export.clgan.loss import GANLoss, PatchNCE, patchnce_loss  # noqa: E402
from export.clgan.torch_model import (DEFAULT_NCE_LAYERS, PatchGANDiscriminator,  # noqa: E402
                                      ProjectionHeads, ResnetGenerator, count_parameters,
                                      init_weights)
from export.clgan.train import ClganTrainConfig, ClganTrainer, build_networks, lr_at  # noqa: E402


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny tensors on a shared 2-core box: a second intra-op thread mostly spins in OpenMP
    # barriers while other processes hold the cores (15 tiny steps: 2.6 s on 1 thread, 26 s on 2).
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_spec_generator_is_cut_resnet_9blocks_and_keeps_the_size():
    torch.manual_seed(0)
    g = ResnetGenerator()  # spec defaults: RGB, ngf 64, 9 blocks, instance norm
    # CycleGAN/CUT resnet_9blocks without anti-aliasing has exactly this many parameters
    assert count_parameters(g) == 11_378_179
    with torch.no_grad():
        y = g(torch.rand(1, 3, 128, 128) * 2 - 1)
    assert tuple(y.shape) == (1, 3, 128, 128)
    assert float(y.abs().max()) <= 1.0  # Tanh output


@pytest.mark.parametrize("antialias,skip", [(False, "none"), (True, "none"), (False, "add"), (False, "concat")])
def test_generator_variants_and_feature_taps(antialias, skip):
    g = ResnetGenerator(in_channels=1, ngf=4, n_resblocks=3, antialias=antialias, skip=skip)
    x = torch.zeros(2, 1, 48, 64)
    assert tuple(g(x).shape) == (2, 1, 48, 64)
    names = ["input", "E1", "E2", "E3", "R1", "R3"]
    feats = g(x, nce_layers=names)
    assert [f.shape[1] for f in feats] == g.feature_channels(names) == [1, 4, 8, 16, 16, 16]
    # E2/E3 tap the convs' outputs: strided without anti-aliasing, full-size before the blur-pool with it
    e2, e3 = ((48, 64), (24, 32)) if antialias else ((24, 32), (12, 16))
    assert [tuple(f.shape[2:]) for f in feats] == [(54, 70), (48, 64), e2, e3, (12, 16), (12, 16)]
    with pytest.raises(ValueError, match="R4"):
        g(x, nce_layers=["R4"])


def test_discriminator_standard_gives_30x30_for_256():
    d = PatchGANDiscriminator()  # spec default: ndf 64, 3 layers, batch norm, no norm on C1
    assert count_parameters(d) == 2_765_633  # the pix2pix 70x70 PatchGAN
    assert not isinstance(d.model[1], torch.nn.BatchNorm2d)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in d.modules())
    with torch.no_grad():
        assert tuple(d(torch.zeros(2, 3, 256, 256)).shape) == (2, 1, 30, 30)


def test_discriminator_table1_literal_sizes():
    d = PatchGANDiscriminator(layout="table1_literal").eval()
    sizes = []
    for m in d.model:
        if isinstance(m, torch.nn.Conv2d):
            m.register_forward_hook(lambda mod, i, o: sizes.append(tuple(o.shape[1:])))
    with torch.no_grad():
        d(torch.zeros(1, 3, 256, 256))
    # the paper's Table 1: 256x256x64, 127x127x128, 63x63x256, 31x31x512, then 30x30x1
    assert sizes == [(64, 256, 256), (128, 127, 127), (256, 63, 63), (512, 31, 31), (1, 30, 30)]
    assert isinstance(d.model[2], torch.nn.BatchNorm2d)  # the table lists BN on C1 too


def test_projection_heads_share_locations_and_normalise():
    torch.manual_seed(0)
    h = ProjectionHeads([3, 8], mlp_layers=4, mlp_dim=16)
    assert sum(isinstance(m, torch.nn.Linear) for m in h.heads[0]) == 4
    assert not isinstance(h.heads[0][-1], torch.nn.ReLU)  # spec default: no ReLU after the last
    assert isinstance(ProjectionHeads([3], mlp_last_relu=True).heads[0][-1], torch.nn.ReLU)
    # x 1e4: four freshly initialised layers of gain 0.02 shrink a vector ~1e-7-fold, below the
    # normalisation's eps (CUT's 1e-7); the heads are positively homogeneous, so scaling the input
    # lifts the outputs above it without changing their direction
    f = [torch.randn(2, 3, 5, 5) * 1e4, torch.randn(2, 8, 2, 2) * 1e4]
    out, ids = h(f, num_patches=10)
    assert [tuple(o.shape) for o in out] == [(20, 16), (8, 16)]  # 2x2 has only 4 locations
    assert torch.allclose(out[0].norm(dim=1), torch.ones(20), atol=1e-5)
    out2, ids2 = h(f, num_patches=10, patch_ids=ids)
    assert all(torch.equal(a, b) for a, b in zip(ids, ids2))
    assert all(torch.allclose(a, b) for a, b in zip(out, out2))


def test_patchnce_equals_the_hand_computed_value():
    # 2 images x 3 patches, 2-d embeddings (unit vectors at angles), tau 0.07
    ang_q = [0.0, 1.0, 2.0, 0.3, 1.7, 3.0]
    ang_k = [0.1, 0.9, 2.5, 0.0, 1.5, -2.0]
    # float64: some of these losses are ~1e-7, below float32's resolution around 1
    q = torch.tensor([[math.cos(a), math.sin(a)] for a in ang_q], dtype=torch.float64)
    k = torch.tensor([[math.cos(a), math.sin(a)] for a in ang_k], dtype=torch.float64)
    tau = 0.07
    got = patchnce_loss(q, k, batch_size=2, tau=tau).numpy()
    want = []
    for img in range(2):
        for s in range(3):
            i = img * 3 + s
            pos = math.exp(math.cos(ang_q[i] - ang_k[i]) / tau)
            negs = sum(math.exp(math.cos(ang_q[i] - ang_k[img * 3 + n]) / tau) for n in range(3) if n != s)
            want.append(-math.log(pos / (pos + negs)))
    np.testing.assert_allclose(got, want, rtol=1e-7)
    # the layer/patch mean of Eq. (3) over two layers
    two = PatchNCE(tau)([q, q], [k, k], batch_size=2)
    assert float(two) == pytest.approx(float(np.mean(want)), rel=1e-7)


def test_patchnce_negatives_come_from_the_same_image_only():
    torch.manual_seed(1)
    q = torch.nn.functional.normalize(torch.randn(8, 4), dim=1)
    k = torch.nn.functional.normalize(torch.randn(8, 4), dim=1)
    base = patchnce_loss(q, k, batch_size=2)
    k2 = k.clone()
    k2[4:] = torch.nn.functional.normalize(torch.randn(4, 4), dim=1)  # change image 2's keys
    changed = patchnce_loss(q, k2, batch_size=2)
    assert torch.allclose(base[:4], changed[:4]) and not torch.allclose(base[4:], changed[4:])
    # gradients reach both the queries and the keys (spec: no detach)
    q.requires_grad_(True)
    k.requires_grad_(True)
    patchnce_loss(q, k, batch_size=2).mean().backward()
    assert q.grad.abs().sum() > 0 and k.grad.abs().sum() > 0


def test_gan_loss_modes():
    x = torch.tensor([[0.5, -1.0]])
    assert float(GANLoss("vanilla")(x, True)) == pytest.approx(
        float(torch.nn.functional.binary_cross_entropy_with_logits(x, torch.ones_like(x))))
    assert float(GANLoss("lsgan")(x, False)) == pytest.approx((0.25 + 1.0) / 2)
    with pytest.raises(ValueError):
        GANLoss("wgan")


def tiny_config(**over) -> ClganTrainConfig:
    raw = {
        "data": {"sources": [DataSource(format="folder", root="unused").model_dump()], "crop": 32,
                 "channels": 1},
        "generator": {"ngf": 4, "n_resblocks": 2},
        "discriminator": {"ndf": 4},
        "nce": {"nce_layers": ["input", "E2", "E3", "R1"], "num_patches": 32, "mlp_dim": 16},
        "optim": {"lr": 1e-3},
    }
    raw.update(over)
    return ClganTrainConfig.model_validate(raw)


def textures(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    out = []
    for _ in range(n):
        f = rng.uniform(0.3, 0.9)
        img = 0.5 * np.sin(xx * f + rng.uniform(0, 6)) + 0.2 * rng.normal(size=(size, size))
        out.append(np.clip(img, -1, 1)[None])
    return torch.tensor(np.stack(out), dtype=torch.float32)


def test_a_few_training_steps_reduce_the_contrastive_loss():
    torch.manual_seed(0)
    cfg = tiny_config()
    G, D, H = build_networks(cfg)
    trainer = ClganTrainer(cfg, G, D, H)
    a, b = textures(2, seed=1), textures(2, seed=2)

    def nce() -> float:
        gen = torch.Generator().manual_seed(123)  # the same patch locations every time
        with torch.no_grad():
            return float(trainer.nce_loss(a, G(a), generator=gen))

    before = nce()
    assert before > 0.6 * math.log(32)  # untrained: no better than about chance (log S)
    history = [trainer.step(a, b) for _ in range(15)]
    after = nce()
    assert after < before - 0.3, (before, after)
    assert {"D", "G_GAN", "NCE_X", "NCE_Y", "G"} <= set(history[-1])
    assert "L1" not in history[-1]  # the paper has no reconstruction loss (lambda_l1 = 0)


def test_lr_schedule_constant_then_linear_to_zero():
    o = tiny_config(optim={"lr": 2e-4, "n_epochs": 2, "n_epochs_decay": 2}).optim
    assert lr_at(0, o, 10) == lr_at(19, o, 10) == 2e-4
    assert lr_at(30, o, 10) == pytest.approx(1e-4)
    assert lr_at(40, o, 10) == 0.0


def test_spec_defaults_are_the_config_defaults():
    cfg = tiny_config()
    fresh = ClganTrainConfig.model_validate({"data": {"sources": cfg.data.sources}})
    assert fresh.data.crop == 256 and fresh.data.channels == 3
    assert fresh.data.real_b_mode == "independent"
    assert (fresh.generator.ngf, fresh.generator.n_resblocks) == (64, 9)
    assert (fresh.discriminator.ndf, fresh.discriminator.normD) == (64, "batch")
    assert tuple(fresh.nce.nce_layers) == DEFAULT_NCE_LAYERS
    assert (fresh.nce.num_patches, fresh.nce.nce_T, fresh.nce.mlp_layers, fresh.nce.mlp_dim) == (256, 0.07, 4, 256)
    l = fresh.loss
    assert (l.lambda_X, l.lambda_Y, l.lambda_GAN, l.lambda_l1, l.gan_mode) == (1, 1, 1, 0, "vanilla")
    o = fresh.optim
    assert (o.lr, o.betas, o.batch_size, o.n_epochs, o.n_epochs_decay) == (2e-4, (0.5, 0.999), 1, 200, 200)
    d = fresh.detection
    assert (d.gauss_ksize, d.gauss_sigma, d.residual_mode, d.k1, d.k2, d.kernel_size) == (3, 0, "abs", 3, 1, 3)


def test_training_crops_from_the_three_layouts(tmp_path):
    import cv2

    from export.clgan.data import CropPairs, load_normal_images
    from inspector.evaluation.datasets import SplitFractions

    # NEU-Seg: defect-free windows only; every image here has defect rows 0-19
    (tmp_path / "neu" / "images" / "training").mkdir(parents=True)
    (tmp_path / "neu" / "annotations" / "training").mkdir(parents=True)
    for i in range(3):
        img = np.full((64, 64, 3), 200, np.uint8)
        img[:20] = 10  # the defect is dark; any crop containing it would show a 10
        m = np.zeros((64, 64), np.uint8)
        m[:20] = 3
        cv2.imwrite(str(tmp_path / "neu" / "images" / "training" / f"{i:06d}.jpg"), img)
        cv2.imwrite(str(tmp_path / "neu" / "annotations" / "training" / f"{i:06d}.png"), m)
    # magnetic-tile: only MT_Free by default; a small image is reflect-padded to the crop
    (tmp_path / "mt" / "MT_Free" / "Imgs").mkdir(parents=True)
    (tmp_path / "mt" / "MT_Crack" / "Imgs").mkdir(parents=True)
    cv2.imwrite(str(tmp_path / "mt" / "MT_Free" / "Imgs" / "a.jpg"), np.full((20, 40), 128, np.uint8))
    cv2.imwrite(str(tmp_path / "mt" / "MT_Crack" / "Imgs" / "b.jpg"), np.full((40, 40), 5, np.uint8))
    cv2.imwrite(str(tmp_path / "mt" / "MT_Crack" / "Imgs" / "b.png"), np.full((40, 40), 255, np.uint8))
    sources = [DataSource(format="neu-seg", root="neu", split="all", stride=4),
               DataSource(format="magnetic-tile", root="mt", split="all")]
    imgs, desc = load_normal_images(sources, tmp_path, channels=1, crop=32, fractions=SplitFractions())
    assert len(imgs) == 4 and "3 images" in desc[0] and "1 images" in desc[1]
    pairs = CropPairs(imgs, crop=32, channels=1, seed=3, flip=True)
    for i in range(40):
        a, b = pairs.pair(i)
        assert a.shape == b.shape == (1, 32, 32)
        assert a.min() > -0.5 and b.min() > -0.5  # never a defect pixel (10 or 5 -> about -0.95)
    a1, _ = pairs.pair(7)
    a2, _ = pairs.pair(7)
    np.testing.assert_array_equal(a1, a2)  # pair i is a pure function of (seed, rank, i)
    same = CropPairs(imgs, crop=32, channels=1, seed=3, real_b_mode="same_as_A").pair(1)
    np.testing.assert_array_equal(same[0], same[1])


def test_spec_generator_is_blind_to_brightness_and_contrast():
    """Why the spec-default CLGAN cannot reconstruct a surface's grey level: the first conv is
    linear and the instance norm after it (no affine, per image) removes any gain a > 0 and
    offset b of the input, so G(a x + b) == G(x). Batch norm (eval: running statistics) keeps them."""
    torch.manual_seed(0)
    x = textures(1, size=48, seed=3) * 0.5
    for norm, invariant in (("instance", True), ("batch", False)):
        g = ResnetGenerator(1, ngf=4, n_resblocks=1, norm=norm)
        # trained-size weights: at the 0.02 init the feature variance is near the norm's eps
        init_weights(g, gain=1.0)
        if norm == "batch":  # give the running statistics something to hold, then evaluate
            g.train()
            with torch.no_grad():
                g(textures(4, size=48, seed=4))
        g.eval()
        with torch.no_grad():
            y1, y2 = g(x), g(0.6 * x + 0.3)
        diff = float((y1 - y2).abs().max())  # output range [-1, 1]; 0.01 is ~1 grey level
        assert (diff < 0.01) if invariant else (diff > 0.05), (norm, diff)
