"""AnomalyAlign (export/augment/anomalyalign): shapes, the alignment loss, the prompt generator,
a short training run, deterministic sampling and the written NEU-Seg folder.

Everything runs on tiny synthetic data at 16 px; only the last test reads NEU-Seg.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="AnomalyAlign needs the train extra (torch)")
pytest.importorskip("diffusers", reason="AnomalyAlign needs the augment extra (diffusers); "
                                        "pip install -e '.[augment]'")

from export.augment.anomalyalign.nets import (SegUNet, build_controlnet, build_unet, denoise,  # noqa: E402
                                              mask_to_cond)
from export.augment.anomalyalign.prompts import build_library, select_prompts  # noqa: E402
from export.augment.anomalyalign.sample import SourceMasks, plan_pair, sample, transform_mask  # noqa: E402
from export.augment.anomalyalign.train import (AnomalyAlignConfig, DiffusionTrainer,  # noqa: E402
                                               align_weight_at, alignment_loss, from_arrays,
                                               make_scheduler, train)
from inspector.evaluation.datasets import NEU_SEG_CLASSES, open_dataset  # noqa: E402

NEU = Path(__file__).resolve().parents[2] / "shared" / "data" / "neu_seg"
TINY = {
    "kind": "anomalyalign", "name": "tiny", "seed": 0, "threads": 1, "device": "cpu",
    "log_every": 5, "checkpoint_every": 1000,
    "data": {"resolution": 16},
    "segmenter": {"width": 4, "steps": 3, "batch_size": 4},
    "prompts": {"dim": 16, "image_width": 4, "steps": 3, "batch_size": 4},
    "model": {"widths": [8, 16], "attention": [False, True], "head_dim": 4, "norm_groups": 4,
              "hint_channels": [8]},
    "diffusion": {"text_dropout": 0.0},
    "optim": {"lr": 2e-3, "batch_size": 4, "epochs": 3, "warmup": 0, "ema_decay": 0.9},
    "sample": {"steps": 3, "batch_size": 4, "max_shift": 0.1},
}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One torch thread (restored after): tiny models gain nothing from more, and on a busy
    machine more threads than free cores slow them many-fold."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_cfg() -> AnomalyAlignConfig:
    return AnomalyAlignConfig.model_validate(TINY)


def tiny_nets(cfg: AnomalyAlignConfig):
    m = cfg.model
    torch.manual_seed(0)
    unet = build_unet(16, m.widths, m.attention, cfg.prompts.dim, 1, m.head_dim, m.norm_groups)
    return unet, build_controlnet(unet, 3, m.hint_channels)


def synthetic_arrays(n: int = 12, size: int = 40, seed: int = 0):
    """Grey noise with one bright (class 1/3) or dark (class 2) square defect each."""
    rng = np.random.default_rng(seed)
    images, masks = [], []
    for i in range(n):
        img = rng.normal(120, 10, (size, size)).clip(0, 255).astype(np.uint8)
        m = np.zeros((size, size), np.uint8)
        c = 1 + i % 3
        y, x = rng.integers(4, size - 16, 2)
        m[y:y + 12, x:x + 12] = c
        img[m > 0] = 220 if c != 2 else 30
        images.append(img)
        masks.append(m)
    return images, masks


def synthetic_data(res: int = 16):
    images, masks = synthetic_arrays()
    return from_arrays(images, masks, list(NEU_SEG_CLASSES), [f"s{i:02d}" for i in range(len(images))],
                       res, "synthetic")


def test_shapes_and_zero_init_controlnet():
    cfg = tiny_cfg()
    unet, controlnet = tiny_nets(cfg)
    x = torch.randn(2, 1, 16, 16)
    t = torch.tensor([10, 500])
    text = torch.randn(2, 1, cfg.prompts.dim)
    mask = torch.zeros(2, 16, 16, dtype=torch.long)
    mask[:, 4:8, 4:8] = 3
    cond = mask_to_cond(mask, 3)
    assert cond.shape == (2, 3, 16, 16) and cond[:, 2].sum() == 32 and cond[:, :2].sum() == 0
    with torch.no_grad():
        eps = denoise(unet, controlnet, x, t, text, cond)
        base = unet(x, t, encoder_hidden_states=text).sample
    assert eps.shape == x.shape
    # ControlNet's zero convolutions: at init the control branch adds nothing
    assert torch.allclose(eps, base, atol=1e-6)
    seg = SegUNet(4, width=4)
    assert seg(torch.rand(2, 1, 16, 16)).shape == (2, 4, 16, 16)


def test_alignment_loss_tiny_case_and_schedule():
    class Flat(torch.nn.Module):  # logits 0 everywhere: softmax 1/2 per class
        def forward(self, x):
            return torch.zeros(x.shape[0], 2, *x.shape[2:]) + 0 * x

    mask = torch.zeros(1, 4, 4, dtype=torch.long)
    x = torch.zeros(1, 1, 4, 4)
    # every pixel: (0.5 - 1)^2 and (0.5 - 0)^2 -> MSE 0.25
    assert alignment_loss(Flat(), x, mask).item() == pytest.approx(0.25)

    seg = SegUNet(4, width=4)
    seg.eval()
    for p in seg.parameters():
        p.requires_grad_(False)
    x0_hat = torch.randn(2, 1, 16, 16, requires_grad=True)
    mask = torch.zeros(2, 16, 16, dtype=torch.long)
    mask[:, 2:6, 2:6] = 1
    loss = alignment_loss(seg, x0_hat, mask)
    loss.backward()
    assert loss.item() > 0 and x0_hat.grad is not None and x0_hat.grad.abs().sum() > 0
    assert all(p.grad is None for p in seg.parameters())  # the segmenter stays frozen

    o = tiny_cfg().optim
    assert [align_weight_at(s, 100, o) for s in (0, 39, 40, 99)] == [0.01, 0.01, 0.0, 0.0]


def test_prompt_generator_picks_highest_scoring_prompt():
    lib = build_library(["inclusion", "scratches"],
                        {"inclusion": ["inclusion", "impurity"], "scratches": ["scratch"]},
                        ["steel strip"], ["a photo of {}.", "an image of {}."])
    assert len(lib.prompts) == 3 * 1 * 2
    assert lib.of_class("scratches") == [4, 5]
    text = torch.eye(6)  # prompt j's embedding points along axis j
    img = torch.tensor([[0.0, 0.0, 1.0, 0.2, 0.0, 0.0],
                        [0.1, 0.0, 0.0, 1.0, 0.0, 0.3],
                        [1.0, 0.0, 0.0, 0.0, 0.9, 0.0]])
    best, scores = select_prompts(img, text)
    assert best == [2, 3, 0]
    assert torch.allclose(scores, torch.nn.functional.normalize(img, dim=-1).max(1).values)
    # restricted to the image's class: the best of that class's prompts, even if lower overall
    best, _ = select_prompts(img, text, [lib.of_class("scratches")] * 3)
    assert best == [4, 5, 4]
    assert lib.token_ids().shape == (6, lib.max_len)


def test_short_training_reduces_denoising_loss():
    cfg = tiny_cfg()
    data = synthetic_data()
    unet, controlnet = tiny_nets(cfg)
    text_table = torch.randn(5, cfg.prompts.dim)
    trainer = DiffusionTrainer(cfg, unet, controlnet, None, text_table, torch.device("cpu"))
    sched = make_scheduler(cfg.diffusion)
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(data.images.shape, generator=g)
    t = torch.linspace(50, 950, len(data)).long()
    pidx = torch.arange(len(data)) % 5

    def eval_loss() -> float:
        with torch.no_grad():
            xt = sched.add_noise(data.images, noise, t)
            eps = denoise(unet, controlnet, xt, t, text_table[pidx][:, None], mask_to_cond(data.masks, 3))
            return torch.nn.functional.mse_loss(eps, noise).item()

    before = eval_loss()
    for step in range(40):
        pick = torch.arange(4) + (step * 4) % len(data)
        trainer.step(data.images[pick], data.masks[pick], pidx[pick],
                     torch.Generator().manual_seed(step), 0.0, cfg.optim.lr)
    after = eval_loss()
    assert after < 0.7 * before, (before, after)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    import yaml

    root = tmp_path_factory.mktemp("aa")
    (root / "tiny.yaml").write_text(yaml.safe_dump(TINY))
    run = train(root / "tiny.yaml", root / "run", max_iters=4, data=synthetic_data())
    return run


def tiny_sources() -> SourceMasks:
    _, masks = synthetic_arrays()
    return SourceMasks(masks, [f"s{i:02d}" for i in range(len(masks))], [i % 5 for i in range(len(masks))],
                       masks[0].shape)


def test_run_folder(tiny_run: Path):
    for f in ("checkpoint.pt", "config.yaml", "segmenter.pt", "prompts.json", "metrics.json",
              "losses.jsonl", "preview.png"):
        assert (tiny_run / f).is_file(), f
    metrics = json.loads((tiny_run / "metrics.json").read_text())
    assert metrics["iterations"] == 4 and metrics["stopped_by"] == "max_iters"
    chosen = json.loads((tiny_run / "prompts.json").read_text())["chosen"]
    assert len(chosen) == 12
    lib = build_library(["inclusion", "patches", "scratches"])
    for c in chosen:  # each image's prompt comes from its own class's candidates
        assert c["prompt"] in [lib.prompts[j] for j in lib.of_class(c["class"])]
    # resume continues the count
    run = train(tiny_run / "config.yaml", tiny_run, resume=True, max_iters=1, data=synthetic_data())
    assert json.loads((run / "metrics.json").read_text())["iterations"] == 5


def test_sampling_deterministic_and_written_folder_opens(tiny_run: Path, tmp_path: Path):
    src = tiny_sources()
    a = sample(tiny_run, tmp_path / "a", 5, seed=3, sources=src)
    sample(tiny_run, tmp_path / "b", 5, seed=3, sources=src, batch_size=2)
    sample(tiny_run, tmp_path / "c", 5, seed=4, sources=src)
    read = lambda root, kind, ext: [(p.name, p.read_bytes())  # noqa: E731
                                    for p in sorted((root / kind / "training").glob(f"*.{ext}"))]
    assert read(tmp_path / "a", "images", "jpg") == read(tmp_path / "b", "images", "jpg")
    assert read(tmp_path / "a", "annotations", "png") == read(tmp_path / "b", "annotations", "png")
    assert read(tmp_path / "a", "images", "jpg") != read(tmp_path / "c", "images", "jpg")

    man = json.loads(a.read_text())
    assert man["generator"] == "anomalyalign" and man["pairs"] == 5
    assert man["checkpoint"].endswith("checkpoint.pt") and man["config"]["kind"] == "anomalyalign"
    for item in man["items"]:
        assert item["prompt"] and item["source_mask"] in src.stems

    ds = open_dataset("neu-seg", tmp_path / "a", split="all")
    assert len(ds) == 5
    for s, item in zip(ds, man["items"]):
        assert s.image.shape == (40, 40) and s.mask.shape == (40, 40)
        present = [int(v) for v in np.unique(s.mask) if v]
        assert present and set(np.unique(s.mask)) <= {0, *present}
        assert [NEU_SEG_CLASSES[v] for v in present] == item["classes"]
        src_class = int(src.masks[src.stems.index(item["source_mask"])].max())
        assert present == [src_class]  # the source mask's class, one binary region per class


def test_mask_transform_is_deterministic_flip_and_shift():
    src = tiny_sources()
    p1, p2 = plan_pair(src, 0, 7, 0.2), plan_pair(src, 0, 7, 0.2)
    assert p1 == p2 and plan_pair(src, 1, 7, 0.2) != p1
    m = np.zeros((10, 10), np.uint8)
    m[2:4, 2:4] = 2
    out = transform_mask(m, {"hflip": True, "vflip": False, "dy": 1, "dx": -1})
    assert out.sum() == m.sum() and out[3:5, 5:7].min() == 2


@pytest.mark.skipif(not NEU.is_dir(), reason=f"NEU-Seg data not present at {NEU}")
def test_labelled_subset_is_arcd_10_percent():
    from export.augment.anomalyalign.train import DataConfig, load_train_data

    data = load_train_data(DataConfig(root=str(NEU), resolution=32))
    assert len(data) == 293
    assert data.images.shape == (293, 1, 32, 32) and data.masks.shape == (293, 32, 32)
    assert float(data.images.min()) >= -1 and float(data.images.max()) <= 1
    assert set(data.labels) == {"inclusion", "patches", "scratches"}
    assert int(data.masks.max()) <= 3
