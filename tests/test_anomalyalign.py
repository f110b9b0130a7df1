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


# ---------------------------------------------------------------------------------------------
# Resume: interrupts, crashes, changed data (review of export/augment, entries 1, 4, 5, 10)
# ---------------------------------------------------------------------------------------------

def write_tiny(path: Path, **over) -> Path:
    """TINY with sections updated from ``over`` (log every iteration), as a YAML file."""
    import yaml

    cfg = json.loads(json.dumps(TINY))
    cfg["log_every"] = 1
    for k, v in over.items():
        cfg[k] = {**cfg.get(k, {}), **v} if isinstance(v, dict) else v
    path.write_text(yaml.safe_dump(cfg))
    return path


def load_ck(run: Path) -> dict:
    return torch.load(run / "checkpoint.pt", weights_only=True)


def assert_same_run(a: Path, b: Path) -> None:
    """Bit-equal networks, weight EMA and optimiser state, and the same logged losses."""
    ca, cb = load_ck(a), load_ck(b)
    assert ca["step"] == cb["step"]
    for part in ("unet", "controlnet"):
        for k, v in ca[part].items():
            assert torch.equal(v, cb[part][k]), (part, k)
        for k, v in ca["ema"][part].items():
            assert torch.equal(v, cb["ema"][part][k]), ("ema", part, k)
    sa, sb = ca["optimizer"]["state"], cb["optimizer"]["state"]
    assert sa.keys() == sb.keys()
    for i in sa:
        for k in sa[i]:
            assert torch.equal(sa[i][k], sb[i][k]), ("optimizer", i, k)
    rows = lambda run: [{k: v for k, v in json.loads(line).items() if k != "elapsed_s"}  # noqa: E731
                        for line in (run / "losses.jsonl").read_text().splitlines()]
    assert rows(a) == rows(b)
    ma, mb = (json.loads((r / "metrics.json").read_text()) for r in (a, b))
    for k in ("iterations", "final_losses_ema", "epoch_mean_diff_loss", "first_logged_diff_loss"):
        assert ma[k] == mb[k], k


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> tuple[Path, Path]:
    """(config, run of 8 iterations in one go): what every split run below must equal."""
    base = tmp_path_factory.mktemp("aa-whole")
    cfg = write_tiny(base / "tiny.yaml", checkpoint_every=3)
    return cfg, train(cfg, base / "whole", max_iters=8, data=synthetic_data())


def test_sigterm_inside_a_step_saves_the_whole_step_and_resume_is_bit_exact(uninterrupted, tmp_path):
    """SIGTERM arriving right after opt.step() (inside the weight-EMA update) used to save the
    weights one update ahead of the step count: --resume then repeated that update. Now the
    signal takes effect after the step: checkpoint at 5, resume to 8 equals the 8 in one go."""
    import os
    import subprocess
    import sys

    cfg, whole = uninterrupted
    run = tmp_path / "run"
    driver = f"""
import os, signal, sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
import torch
torch.set_num_threads(1)
from test_anomalyalign import synthetic_data
from export.augment.anomalyalign import train as T
T.load_train_data = lambda cfg: synthetic_data()
orig, calls = T.DiffusionTrainer._update_ema, [0]
def ema(self):  # called right after opt.step()
    calls[0] += 1
    if calls[0] == 5:
        os.kill(os.getpid(), signal.SIGTERM)
    return orig(self)
T.DiffusionTrainer._update_ema = ema
sys.exit(T.main(["--config", {str(cfg)!r}, "--run-dir", {str(run)!r}, "--max-iters", "8"]))
"""
    p = subprocess.run([sys.executable, "-c", driver], capture_output=True, text=True, timeout=300,
                       cwd=Path(__file__).resolve().parents[1],
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 130, p.stderr[-3000:]
    ck = load_ck(run)
    # the step the signal arrived in was finished (weights, EMA, count), no update beyond the count
    assert (ck["step"], ck["optimizer"]["state"][0]["step"].item()) == (5, 5)
    assert "stopping after this step" in p.stderr
    train(cfg, run, resume=True, max_iters=3, data=synthetic_data())
    assert_same_run(whole, run)


def test_resume_keeps_the_running_loss_averages(uninterrupted, tmp_path):
    """--resume started the loss averages from scratch: losses.jsonl's rows after the resume and
    metrics.json's final_losses_ema described the resumed part only."""
    cfg, whole = uninterrupted
    train(cfg, tmp_path / "run", max_iters=4, data=synthetic_data())
    train(cfg, tmp_path / "run", resume=True, max_iters=4, data=synthetic_data())
    assert_same_run(whole, tmp_path / "run")
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert "align" in m["final_losses_ema"]  # L_a ran in the first part only, and is still reported


def test_resume_after_a_crash_drops_the_losses_rows_past_the_checkpoint(uninterrupted, tmp_path,
                                                                        monkeypatch):
    """A run that died (not by Ctrl-C) after its periodic checkpoint at 6 had logged 7; the
    resumed run logged 7 again: losses.jsonl repeated iterations."""
    from export.augment.anomalyalign import train as T

    cfg, whole = uninterrupted
    orig, calls = T.DiffusionTrainer.step, [0]

    def step(self, *a, **kw):
        calls[0] += 1
        if calls[0] == 8:
            raise RuntimeError("killed")
        return orig(self, *a, **kw)

    monkeypatch.setattr(T.DiffusionTrainer, "step", step)
    with pytest.raises(RuntimeError, match="killed"):
        train(cfg, tmp_path / "run", max_iters=8, data=synthetic_data())
    monkeypatch.setattr(T.DiffusionTrainer, "step", orig)
    assert load_ck(tmp_path / "run")["step"] == 6
    train(cfg, tmp_path / "run", resume=True, max_iters=2, data=synthetic_data())
    its = [json.loads(line)["it"] for line in (tmp_path / "run" / "losses.jsonl").read_text().splitlines()]
    assert its == list(range(1, 9))
    assert_same_run(whole, tmp_path / "run")

    # a torn last line (a kill in the middle of writing it) goes too
    from export.training import trim_losses

    path = tmp_path / "losses.jsonl"
    path.write_text('{"it": 1, "diff": 1.0}\n{"it": 2, "diff": 0.9}\n{"it": 3, "di')
    trim_losses(path, 2)
    assert path.read_text() == '{"it": 1, "diff": 1.0}\n{"it": 2, "diff": 0.9}\n'


def test_resume_with_other_training_images_or_subset_keys_is_a_config_error(tmp_path):
    """The checkpoint's per-image prompts were reused for another image list: an IndexError
    traceback for more images, silently wrong prompts for fewer. Now a ConfigError naming the
    key, and the run folder's config.yaml is left as it was."""
    from inspector.errors import ConfigError

    from export.augment.anomalyalign.train import TrainData

    cfg = write_tiny(tmp_path / "tiny.yaml")
    run = train(cfg, tmp_path / "run", max_iters=2, data=synthetic_data())
    saved_cfg = (run / "config.yaml").read_text()
    data = synthetic_data()

    def subset(keep: list[int]) -> TrainData:
        return TrainData(data.images[keep], data.masks[keep], [data.labels[i] for i in keep],
                         [data.stems[i] for i in keep], data.classes, "synthetic subset")

    images, masks = synthetic_arrays(16)
    more = from_arrays(images, masks, list(NEU_SEG_CLASSES), [f"s{i:02d}" for i in range(16)], 16,
                       "synthetic, 16 images")
    for other in (subset(list(range(8))), more, subset(list(range(11, -1, -1)))):
        with pytest.raises(ConfigError, match="data.root") as e:
            train(cfg, run, resume=True, max_iters=1, data=other)
        assert str(run / "checkpoint.pt") in str(e.value)
    cfg2 = write_tiny(tmp_path / "tiny2.yaml", data={"resolution": 16, "label_fraction": 0.3})
    with pytest.raises(ConfigError, match="data.label_fraction"):
        train(cfg2, run, resume=True, max_iters=1, data=data)
    # the schedule: more epochs would reopen the alignment-loss window after it had closed
    base = TINY["optim"]
    for key, value in (("epochs", base["epochs"] + 5), ("batch_size", base["batch_size"] + 1),
                       ("align_frac", 0.9), ("seed", 7)):
        other = (write_tiny(tmp_path / "tiny-seed.yaml", seed=7) if key == "seed"
                 else write_tiny(tmp_path / f"tiny-{key}.yaml", optim={key: value}))
        with pytest.raises(ConfigError, match=key if key == "seed" else f"optim.{key}"):
            train(other, run, resume=True, max_iters=1, data=data)
    assert (run / "config.yaml").read_text() == saved_cfg and load_ck(run)["step"] == 2
    train(cfg, run, resume=True, max_iters=1, data=data)  # the same images: resumes
    assert load_ck(run)["step"] == 3


def test_resume_of_a_run_without_weight_ema_starts_the_ema_from_its_weights(tmp_path):
    """A checkpoint of a run with optim.ema_decay 0 resumed with ema_decay > 0: the EMA (copied
    from the random initial weights at build) was averaged on from there, and sampled from."""
    cfg0 = write_tiny(tmp_path / "no-ema.yaml", optim={"ema_decay": 0.0})
    run = train(cfg0, tmp_path / "run", max_iters=3, data=synthetic_data())
    before = load_ck(run)
    assert before["ema"] is None
    cfg = write_tiny(tmp_path / "ema.yaml", optim={"ema_decay": 0.9})
    train(cfg, run, resume=True, max_iters=1, data=synthetic_data())
    after = load_ck(run)
    for part in ("unet", "controlnet"):
        for k, v in after["ema"][part].items():
            if v.is_floating_point():
                want = 0.9 * before[part][k] + 0.1 * after[part][k]
                assert torch.allclose(v, want, atol=1e-6), (part, k)


# ---------------------------------------------------------------------------------------------
# Sampling (review entries 2, 3, 8, 9)
# ---------------------------------------------------------------------------------------------

def run_with(tiny_run: Path, folder: Path, **sample_cfg) -> Path:
    """A copy of the tiny run whose checkpoint's config has ``sample`` keys changed."""
    folder.mkdir()
    ck = load_ck(tiny_run)
    ck["config"]["sample"].update(sample_cfg)
    torch.save(ck, folder / "checkpoint.pt")
    return folder


def pair_files(root: Path) -> list[tuple[str, bytes]]:
    return [(str(p.relative_to(root)), p.read_bytes()) for p in sorted(root.rglob("*.*"))
            if p.name != "manifest.json"]


def test_sampling_with_eta_depends_on_the_pair_and_seed_not_the_batch(tiny_run, tmp_path):
    """With sample.eta > 0 the DDIM variance noise came from one generator seeded 0 for the
    whole batch: pair i depended on its place in the batch, and not on --seed."""
    run = run_with(tiny_run, tmp_path / "eta1", eta=1.0)
    src = tiny_sources()
    sample(run, tmp_path / "b4", 4, seed=3, sources=src, batch_size=4)
    sample(run, tmp_path / "b1", 4, seed=3, sources=src, batch_size=1)
    sample(run, tmp_path / "b3", 4, seed=3, sources=src, batch_size=3)
    assert pair_files(tmp_path / "b4") == pair_files(tmp_path / "b1") == pair_files(tmp_path / "b3")
    sample(run, tmp_path / "s4", 4, seed=4, sources=src, batch_size=4)
    assert pair_files(tmp_path / "s4") != pair_files(tmp_path / "b4")
    # eta does draw noise here: the same pairs with eta 0 differ
    sample(run_with(tiny_run, tmp_path / "eta0", eta=0.0), tmp_path / "e0", 4, seed=3, sources=src)
    assert [f for f in pair_files(tmp_path / "e0") if f[0].startswith("images")] != \
        [f for f in pair_files(tmp_path / "b4") if f[0].startswith("images")]


def test_manifest_records_the_shift_applied_to_the_mask(tiny_run, tmp_path):
    """A planned shift that would push more than half of the defect off the image is dropped;
    the manifest used to record the planned one anyway."""
    masks = []
    for i in range(4):  # a defect in the top-left corner: shifts up or left drop most of it
        m = np.zeros((40, 40), np.uint8)
        m[0:5, 0:5] = 1 + i % 3
        masks.append(m)
    src = SourceMasks(masks, [f"c{i}" for i in range(4)], [0, 1, 2, 3], (40, 40))

    def shifted(m: np.ndarray, dy: int, dx: int) -> np.ndarray:
        out = np.zeros_like(m)
        h, w = m.shape
        out[max(0, dy):h + min(0, dy), max(0, dx):w + min(0, dx)] = \
            m[max(0, -dy):h - max(0, dy), max(0, -dx):w - max(0, dx)]
        return out

    n, seed = 12, 0
    man = json.loads(sample(tiny_run, tmp_path / "out", n, seed=seed, sources=src).read_text())
    dropped = 0
    for i, item in enumerate(man["items"]):
        plan = plan_pair(src, seed, i, 0.1)
        m = src.masks[plan["source"]]
        m = m[:, ::-1] if plan["hflip"] else m
        m = m[::-1, :] if plan["vflip"] else m
        applied = transform_mask(src.masks[plan["source"]], plan)
        assert np.array_equal(shifted(np.ascontiguousarray(m), *item["shift"]), applied), (i, item)
        dropped += item["shift"] != [plan["dy"], plan["dx"]]
    assert dropped  # the case under test occurred
    from export.augment.anomalyalign.sample import place_mask

    m = np.zeros((10, 10), np.uint8)
    m[0:2, 0:2] = 1
    assert place_mask(m, {"hflip": False, "vflip": False, "dy": -1, "dx": 0})[1] == [-1, 0]  # half kept
    assert place_mask(m, {"hflip": False, "vflip": False, "dy": -2, "dx": 0})[1] == [0, 0]
    assert place_mask(m, {"hflip": False, "vflip": False, "dy": 2, "dx": 1})[1] == [2, 1]


def test_guidance_below_one_is_refused(tiny_run, tmp_path, capsys):
    """--guidance 0.5 (or 0) sampled as 1 (CFG only runs above 1) and was recorded as given."""
    from inspector.cli import main as inspector_main

    for bad in ("0.5", "0", "-1", "nan"):
        with pytest.raises(SystemExit) as e:
            inspector_main(["augment", "anomalyalign", "sample", "--run-dir", str(tiny_run),
                            "--out", str(tmp_path / "o"), "--n", "1", "--guidance", bad])
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert "--guidance" in err and ">= 1" in err, err
    with pytest.raises(ValueError, match="--guidance"):
        sample(tiny_run, tmp_path / "o", 1, sources=tiny_sources(), guidance=0.5)
    assert not (tmp_path / "o").exists()
    man = json.loads(sample(tiny_run, tmp_path / "g", 1, sources=tiny_sources(), guidance=2.0).read_text())
    assert man["sampling"]["guidance_scale"] == 2.0


def test_a_failed_sample_leaves_no_output_and_out_must_be_new(tiny_run, tmp_path, monkeypatch):
    """An interrupted sample left pairs without a manifest (read by ARCD's synthetic_root); a
    re-run into it with a smaller --n kept the stale pairs; a data set's root was written into."""
    from export.augment import dataset as D

    src = tiny_sources()
    orig = D.PairWriter.add

    def add(self, *a, **kw):
        if len(self.pairs) == 2:
            raise KeyboardInterrupt
        return orig(self, *a, **kw)

    monkeypatch.setattr(D.PairWriter, "add", add)
    with pytest.raises(KeyboardInterrupt):
        sample(tiny_run, tmp_path / "out", 6, seed=0, sources=src)
    monkeypatch.setattr(D.PairWriter, "add", orig)
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no output, no temporary folder
    sample(tiny_run, tmp_path / "out", 3, seed=0, sources=src)
    assert len(open_dataset("neu-seg", tmp_path / "out", split="all")) == 3
    with pytest.raises(FileExistsError, match="manifest"):
        sample(tiny_run, tmp_path / "out", 2, seed=0, sources=src)
    # a real data set's root (images, no manifest) is refused, not written into
    real = tmp_path / "neu"
    (real / "images" / "training").mkdir(parents=True)
    (real / "images" / "training" / "000001.jpg").write_bytes(b"x")
    with pytest.raises(FileExistsError, match="data set"):
        sample(tiny_run, real, 2, seed=0, sources=src)
    assert [p.name for p in real.rglob("*") if p.is_file()] == ["000001.jpg"]
    (tmp_path / "empty").mkdir()  # an empty folder is fine
    sample(tiny_run, tmp_path / "empty", 2, seed=0, sources=src)
    assert len(open_dataset("neu-seg", tmp_path / "empty", split="all")) == 2
