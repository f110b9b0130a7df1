"""Defect-GAN (export/augment/defectgan): network shapes, composition, noise injection, the WGAN-GP
penalty, a short training run on a tiny NEU-layout folder, deterministic sampling into a folder
the NEU-Seg reader opens, and the CLI's errors. The check on the real labelled subset skips when
../shared/data is not on this machine."""

from __future__ import annotations

import json
import re
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

from conftest import SHARED_DATA

torch = pytest.importorskip("torch", reason="Defect-GAN needs the train extra (torch)")

from export.augment.defectgan.data import CropSampler, load_subset  # noqa: E402
from export.augment.defectgan.model import (DefectDiscriminator, DefectGenerator,  # noqa: E402
                                            NoiseInjection, compose, gradient_penalty)
from export.augment.defectgan.sample import sample, write_grid  # noqa: E402
from export.augment.defectgan.train import (DefectGanTrainer, build_networks,  # noqa: E402
                                            load_config, lr_at, train)
from inspector.cli import main as inspector_main  # noqa: E402
from inspector.evaluation.datasets import open_dataset  # noqa: E402

torch.set_num_threads(1)
NEU = SHARED_DATA / "neu_seg"


# ---------------------------------------------------------------------------------------------
# Fixtures: a tiny NEU-Seg folder and a tiny config
# ---------------------------------------------------------------------------------------------

def make_neu(root: Path, n: int = 12, side: int = 96, seed: int = 0) -> Path:
    """Grey noise images, each with one blob of class 1..3 (NEU-Seg layout, index masks)."""
    rng = np.random.default_rng(seed)
    (root / "images" / "training").mkdir(parents=True)
    (root / "annotations" / "training").mkdir(parents=True)
    for i in range(n):
        img = np.clip(rng.normal(128, 12, (side, side)), 0, 255).astype(np.uint8)
        mask = np.zeros((side, side), np.uint8)
        c = i % 3 + 1
        cy, cx = rng.integers(12, 28, 2)  # defects in the top-left, free room elsewhere
        if c == 3:  # a scratch: thin dark line
            cv2.line(mask, (int(cx) - 10, int(cy)), (int(cx) + 10, int(cy) + 4), 3, 2)
        else:
            cv2.circle(mask, (int(cx), int(cy)), 6 if c == 1 else 10, c, -1)
        img[mask > 0] = (img[mask > 0] * (0.4 if c != 2 else 1.4)).clip(0, 255).astype(np.uint8)
        cv2.imwrite(str(root / "images" / "training" / f"img{i:03d}.jpg"), img)
        cv2.imwrite(str(root / "annotations" / "training" / f"img{i:03d}.png"), mask)
    return root


def tiny_config(base: Path, **over) -> Path:
    cfg = {
        "kind": "defectgan", "name": "tiny", "seed": 0, "threads": 1, "device": "cpu",
        "log_every": 5, "checkpoint_every": 1000,
        "data": {"root": "neu", "label_fraction": 1.0, "size": 32, "min_class_px": 8},
        "model": {"ngf": 4, "n_res_enc": 1, "n_res_dec": 1, "spade_hidden": 8, "ndf": 4,
                  "d_layers": 3},
        "optim": {"batch_size": 4, "n_critic": 1, "iterations": 400, "lr": 1e-3},
    }
    for k, v in over.items():
        if isinstance(v, dict):
            cfg[k] = {**cfg.get(k, {}), **v}
        else:
            cfg[k] = v
    path = base / "dg.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """A tiny folder and a 60-iteration run on it (shared by the training and sampling tests)."""
    base = tmp_path_factory.mktemp("dg")
    make_neu(base / "neu")
    cfg = tiny_config(base)
    return train(cfg, base / "run", max_iters=60)


# ---------------------------------------------------------------------------------------------
# Networks
# ---------------------------------------------------------------------------------------------

def test_generator_and_discriminator_shapes():
    G = DefectGenerator(channels=1, n_classes=3, ngf=4, n_res_enc=1, n_res_dec=2, spade_hidden=8)
    x = torch.rand(2, 1, 32, 32) * 2 - 1
    with torch.no_grad():
        y, f, m = G(x, torch.tensor([[1.0, 0, 0], [0, 0, 1.0]]))
    assert y.shape == f.shape == (2, 1, 32, 32) and m.shape == (2, 1, 32, 32)
    assert f.abs().max() <= 1 and 0 <= float(m.min()) and float(m.max()) <= 1
    assert torch.allclose(y, compose(x, f, m))
    a = torch.zeros(2, 3, 32, 32)
    a[:, 0, 8:24, 8:24] = 1  # a spatial control map (place a defect) works as well
    with torch.no_grad():
        assert G(x, a)[0].shape == (2, 1, 32, 32)
    D = DefectDiscriminator(image_size=64, channels=1, n_classes=3, ndf=4, n_layers=4)
    src, cls = D(torch.zeros(3, 1, 64, 64))
    assert src.shape == (3, 1, 4, 4) and cls.shape == (3, 3)
    with pytest.raises(ValueError, match="divisible"):
        DefectDiscriminator(image_size=48, n_layers=5)


def test_compose_and_noise_injection():
    x, f = torch.rand(1, 1, 4, 4), torch.rand(1, 1, 4, 4)
    assert torch.equal(compose(x, f, torch.zeros(1, 1, 4, 4)), x)
    assert torch.equal(compose(x, f, torch.ones(1, 1, 4, 4)), f)
    z = NoiseInjection()
    h = torch.zeros(1, 2, 4, 4)
    assert torch.equal(z(h), h)  # scale starts at 0: a fresh network is deterministic
    with torch.no_grad():
        z.weight.fill_(0.5)
    assert not torch.equal(z(h), z(h))
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(z(h, g1), z(h, g2))  # seeded noise repeats (deterministic sampling)


def test_gradient_penalty_tiny_case():
    class Linear(torch.nn.Module):
        def __init__(self, scale: float):
            super().__init__()
            self.w = torch.full((1, 1, 2, 2), scale / 2.0)  # ||w||_2 = scale

        def forward(self, x):
            return (x * self.w).sum(dim=(1, 2, 3))

    real, fake = torch.rand(5, 1, 2, 2), torch.rand(5, 1, 2, 2)
    assert float(gradient_penalty(Linear(1.0), real, fake)) == pytest.approx(0.0, abs=1e-10)
    assert float(gradient_penalty(Linear(3.0), real, fake)) == pytest.approx(4.0, rel=1e-5)


def test_config_defaults_are_the_spec(tmp_path):
    cfg = load_config(tiny_config(tmp_path, loss={}, optim={}))
    lc = cfg.loss
    assert (lc.lambda_cls_real, lc.lambda_cls_fake, lc.lambda_rec, lc.lambda_sd_cyc,
            lc.lambda_sd_con, lc.lambda_gp) == (2.0, 5.0, 5.0, 5.0, 1.0, 10.0)
    o = cfg.optim.model_copy(update={"lr": 2e-4, "iterations": 100})
    assert lr_at(0, o) == 2e-4 and lr_at(49, o) == 2e-4 and lr_at(100, o) == pytest.approx(1e-6)


# ---------------------------------------------------------------------------------------------
# Training and sampling on the tiny folder
# ---------------------------------------------------------------------------------------------

def test_short_training_reduces_restoration_loss(tiny_run):
    cfg = load_config(tiny_run.parent / "dg.yaml")
    data = load_subset(cfg.data_root(), 1.0, 0)
    sampler = CropSampler(data, cfg.data.crop, cfg.data.size, 0, cfg.data.min_class_px)
    nb, db, lab = sampler.batch(10 ** 6, 8)  # a batch the run never drew
    tgt = sampler.target_labels(10 ** 6, 8)
    args = [torch.from_numpy(a) for a in (nb, db, lab, tgt)]

    def rec_loss(G):
        torch.manual_seed(0)
        G.eval()
        with torch.no_grad():
            return float(DefectGanTrainer(cfg, G, D).g_losses(*args)[1]["G_rec"])

    torch.manual_seed(cfg.seed)  # the run's initial weights (start_ranks seeds, then builds)
    G0, D = build_networks(cfg, 3)
    G1, _ = build_networks(cfg, 3)
    G1.load_state_dict(torch.load(tiny_run / "checkpoint.pt", weights_only=True)["G"])
    before, after = rec_loss(G0), rec_loss(G1)
    assert after < 0.8 * before, (before, after)
    m = json.loads((tiny_run / "metrics.json").read_text())
    assert m["iterations"] == 60 and m["stopped_by"] == "max_iters"
    assert all(np.isfinite(v) for v in m["final_losses_ema"].values())
    assert (tiny_run / "preview.png").is_file()


def test_sampling_deterministic_binary_masks_and_readable(tiny_run, tmp_path):
    a = sample(tiny_run, tmp_path / "a", 6, seed=5, threshold=0.05, min_defect_px=1)
    sample(tiny_run, tmp_path / "b", 6, seed=5, threshold=0.05, min_defect_px=1)
    sample(tiny_run, tmp_path / "c", 6, seed=6, threshold=0.05, min_defect_px=1)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.*")
                   if p.name != "manifest.json")
    assert len(files) == 12
    same = all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files)
    assert same, "same seed, different output"
    differ = any(not (tmp_path / "c" / f).is_file()
                 or (tmp_path / "a" / f).read_bytes() != (tmp_path / "c" / f).read_bytes() for f in files)
    assert differ, "another seed gave the same output"
    ds = open_dataset("neu-seg", tmp_path / "a", split="all")
    assert len(ds) == 6
    for s in ds:
        assert s.image.shape[:2] == s.mask.shape == (96, 96)
        assert set(np.unique(s.mask)) <= {0, 1, 2, 3}
    man = json.loads(a.read_text())
    assert man["generator"] == "defectgan" and man["pairs"] == 6 and man["config"]["seed"] == 5
    it = man["items"][0]
    assert it["source"].startswith("training/") and it["stem"].startswith("syn-defectgan-")
    d = it["defects"][0]
    assert d["class"] in ("inclusion", "patches", "scratches") and {"x", "y", "size"} <= set(d)
    assert all(d["defect_px"] >= 1 for it in man["items"] for d in it["defects"])
    with pytest.raises(ValueError, match="--threshold"):  # a map that never gets there: told, not looped
        sample(tiny_run, tmp_path / "d", 1, seed=0, threshold=0.99)
    png = write_grid(tmp_path / "a", tmp_path / "grid.png")
    assert png.stat().st_size < 300_000 and cv2.imread(str(png)) is not None


def test_sampled_label_is_the_thresholded_map_as_the_chosen_class(tiny_run, tmp_path):
    """A generator whose map is 1 everywhere repaints its whole window: the label must be the
    real mask plus that window as the requested class, the rest of the image untouched."""
    run = tmp_path / "run"
    run.mkdir()
    ck = torch.load(tiny_run / "checkpoint.pt", weights_only=True)
    ck["G"]["out.weight"].zero_()
    ck["G"]["out.bias"].copy_(torch.tensor([0.0, 20.0]))  # f = 0 (mid grey), m = sigmoid(20)
    torch.save(ck, run / "checkpoint.pt")
    sample(run, tmp_path / "out", 3, seed=0, classes="scratches")
    man = json.loads((tmp_path / "out" / "manifest.json").read_text())
    ds = open_dataset("neu-seg", tmp_path / "out", split="all")
    real = {e.stem: e for e in open_dataset("neu-seg", tiny_run.parent / "neu", split="all").entries}
    for s, it in zip(ds, man["items"]):
        d = it["defects"][0]
        y, x, w = d["y"], d["x"], d["size"]
        src = real[it["source"].split("/")[1]]
        real_mask = cv2.imread(str(src.mask), cv2.IMREAD_GRAYSCALE)
        want = real_mask.copy()
        want[y:y + w, x:x + w] = 3
        assert np.array_equal(s.mask, want) and d["class"] == "scratches" and d["defect_px"] == w * w
        real_img = cv2.imread(str(src.image), cv2.IMREAD_GRAYSCALE)
        outside = np.ones_like(real_mask, bool)
        outside[y:y + w, x:x + w] = False
        # JPEG re-encoding only: the pixels outside the place are the real image's
        assert np.abs(s.image[outside].astype(int) - real_img[outside]).mean() < 3
        # a map of 1 labels everything it painted: no halo
        assert (d["halo_px"], d["halo_px_ge8"], d["halo_max_gl"]) == (0, 0, 0)
    assert man["halo"]["defects"] == 3 and man["halo"]["halo_px"] == 0


def test_the_paste_halo_counts_what_changed_outside_the_label():
    from export.augment.defectgan.sample import halo_summary, paste_halo

    before = np.full((8, 8), 100, np.uint8)
    after = before.copy()
    labelled = np.zeros((8, 8), bool)
    labelled[2:4, 2:4] = True
    after[2:4, 2:4] = 20        # the defect, labelled
    after[4, 2:4] = 91          # its soft rim: 9 grey levels, not labelled
    after[0, 0] = 101           # 1 grey level: not counted
    after[7, 7] = 97            # 3: a faint change
    h = paste_halo(before, after, labelled)
    assert h == {"halo_px": 3, "halo_px_ge8": 2, "halo_max_gl": 9}
    s = halo_summary([{"defect_px": 4, **h}, {"defect_px": 4, "halo_px": 0, "halo_px_ge8": 0, "halo_max_gl": 0}])
    assert s["halo_per_labelled_px"] == 0.375 and s["halo_ge8_per_labelled_px"] == 0.25
    assert s["defects_with_halo_ge8"] == 0.5 and s["median_halo_px"] == 1.5 and s["max_gl"] == 9


def test_resume_is_bit_exact(tiny_run, tmp_path):
    """3 iterations + --resume for 4 more end with the very weights of one run of 7: the noise
    and gradient-penalty draws are functions of the iteration, not of the global torch RNG
    (which a resume re-seeds). n_critic 2, so G steps (with noise) fall on both sides."""
    cfg = tiny_config(tmp_path, data={"root": str(tiny_run.parent / "neu")},
                      optim={"iterations": 7, "n_critic": 2})
    whole = train(cfg, tmp_path / "whole")
    train(cfg, tmp_path / "parts", max_iters=3)
    torch.rand(5)  # whatever the process drew meanwhile must not matter
    parts = train(cfg, tmp_path / "parts", resume=True)
    a = torch.load(whole / "checkpoint.pt", weights_only=True)
    b = torch.load(parts / "checkpoint.pt", weights_only=True)
    assert a["step"] == b["step"] == 7
    for net in ("G", "D"):
        for k in a[net]:
            assert torch.equal(a[net][k], b[net][k]), (net, k)
    # the noise is in play: the injection weights moved off their zero start
    G, _ = build_networks(load_config(cfg), 3)
    noise = [f"{n}.weight" for n, m in G.named_modules() if isinstance(m, NoiseInjection)]
    assert noise and any(float(a["G"][k].abs()) > 0 for k in noise)


def test_resume_refuses_other_data_or_schedule_naming_the_key(tmp_path, capsys, caplog):
    """A resume used to compare only the network and data.size with the checkpoint: a changed
    label fraction, label seed, splits, window or planned iterations (the learning-rate decay)
    went on silently with other data or another schedule. Each is refused naming the dotted key,
    and the checkpoint is left as it was; the learning rate may change."""
    from inspector.errors import ConfigError

    make_neu(tmp_path / "neu")
    base = tiny_config(tmp_path, optim={"iterations": 6})
    run = train(base, tmp_path / "run", max_iters=1)
    before = (run / "checkpoint.pt").read_bytes()
    raw = yaml.safe_load(base.read_text())
    for section, key, value in [("data", "label_fraction", 0.5), ("data", "label_seed", 3),
                                ("data", "splits", ["train"]), ("data", "window", 48),
                                ("optim", "iterations", 9), ("model", "ngf", 8)]:
        changed = tmp_path / f"{key}.yaml"
        changed.write_text(yaml.safe_dump({**raw, section: {**raw[section], key: value}}))
        with pytest.raises(ConfigError, match="^" + re.escape(
                f"{changed}: {section}.{key}: {value!r}, but the checkpoint "
                f"{run / 'checkpoint.pt'} was trained with")):
            train(changed, run, resume=True)
    assert inspector_main(["augment", "defectgan", "train", "--config", str(tmp_path / "iterations.yaml"),
                           "--run-dir", str(run), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "optim.iterations: 9, but the checkpoint" in err and "Traceback" not in err
    # the same keys on another folder's images: data.root is named
    make_neu(tmp_path / "other", n=8)
    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump({**raw, "data": {**raw["data"], "root": "other"}}))
    with pytest.raises(ConfigError, match=r"data\.root: .*other than the 9 the checkpoint"):
        train(other, run, resume=True)
    assert (run / "checkpoint.pt").read_bytes() == before
    # a lower learning rate (what the NaN message advises) resumes
    lower = tmp_path / "lr.yaml"
    lower.write_text(yaml.safe_dump({**raw, "optim": {**raw["optim"], "lr": 1e-4}}))
    caplog.clear()
    with caplog.at_level("WARNING"):
        assert torch.load(train(lower, run, resume=True, max_iters=1) / "checkpoint.pt",
                          weights_only=True)["step"] == 2
    # not silently: the log names the change and where it took effect
    assert any(f"{lower} differs from the config of {run / 'checkpoint.pt'}: optim.lr "
               in r.getMessage() and "-> 0.0001; the steps from iteration 1 on use the new value(s)"
               in r.getMessage() for r in caplog.records), [r.getMessage() for r in caplog.records]


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------

def test_cli_train_sample_and_errors(tiny_run, tmp_path, capsys):
    base = tiny_run.parent
    assert inspector_main(["augment", "defectgan", "train", "--config", str(base / "dg.yaml"),
                           "--run-dir", str(tmp_path / "r"), "--max-iters", "2"]) == 0
    assert (tmp_path / "r" / "checkpoint.pt").is_file()
    assert inspector_main(["augment", "defectgan", "train", "--config", str(base / "dg.yaml"),
                           "--run-dir", str(tmp_path / "r"), "--resume", "--max-iters", "2"]) == 0
    m = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert m["iterations"] == 4 and m["first_g_losses"] is not None  # continued, not restarted
    assert inspector_main(["augment", "defectgan", "sample", "--run-dir", str(tmp_path / "r"),
                           "--out", str(tmp_path / "o"), "--n", "2", "--seed", "1"]) == 0
    capsys.readouterr()

    def err(*argv: str) -> str:
        assert inspector_main(["augment", "defectgan", *argv]) == 2
        return capsys.readouterr().err

    assert "--config" in err("train", "--config", str(tmp_path / "missing.yaml"))
    bad = tiny_config(tmp_path, model={"ngf": 4, "bogus": 1})
    assert "model.bogus" in err("train", "--config", str(bad)) and str(bad) in err(
        "train", "--config", str(bad))
    assert "--resume" in err("train", "--config", str(base / "dg.yaml"), "--run-dir", str(tmp_path / "r"))
    assert "--run-dir" in err("sample", "--run-dir", str(tmp_path / "nope"), "--out",
                              str(tmp_path / "x"), "--n", "1")
    assert "--classes" in err("sample", "--run-dir", str(tmp_path / "r"), "--out",
                              str(tmp_path / "y"), "--n", "1", "--classes", "rust")
    assert "--out" in err("sample", "--run-dir", str(tmp_path / "r"), "--out", str(tmp_path / "o"),
                          "--n", "1")
    with pytest.raises(SystemExit):  # argparse names --n itself
        inspector_main(["augment", "defectgan", "sample", "--run-dir", "r", "--out", "o", "--n", "0"])
    assert "--n" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# The real labelled subset
# ---------------------------------------------------------------------------------------------

@pytest.mark.skipif(not NEU.is_dir(), reason=f"NEU-Seg not found at {NEU} (../shared/data absent)")
def test_real_subset_crops():
    data = load_subset(NEU, 0.1, 0)
    assert len(data.images) == 293 and data.n_classes == 3
    sampler = CropSampler(data, 64, 64, seed=0)
    n, d, lab = sampler.batch(0, 6)
    assert n.shape == d.shape == (6, 1, 64, 64) and lab.shape == (6, 3)
    assert (lab.sum(1) >= 1).all() and -1 <= n.min() and n.max() <= 1
    n2, _, _ = sampler.batch(0, 6)
    assert np.array_equal(n, n2)  # batch s is a pure function of (seed, s)


def test_augment_without_torch_says_what_to_install():
    """The runtime builds its parser (with the augment group) without torch; the command itself
    asks for the train extra."""
    import subprocess
    import sys

    from conftest import ROOT
    from test_runtime_without_torch import BLOCK_TORCH

    r = subprocess.run([sys.executable, "-c", BLOCK_TORCH, "augment", "defectgan", "sample",
                        "--run-dir", "r", "--out", "o", "--n", "1"],
                       capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert r.returncode == 2 and "pip install" in r.stderr, r.stderr


def test_a_failed_sample_leaves_no_output_folder(tiny_run, tmp_path, monkeypatch):
    """Sampling that raised (no pair reaches --threshold often enough) or was stopped after
    writing some pairs left them without a manifest; ARCD's data.synthetic_root read them, and
    a later run into the same --out with a smaller --n kept the stale ones beside its own."""
    from export.augment import dataset as D

    with pytest.raises(ValueError, match="--threshold"):
        sample(tiny_run, tmp_path / "out", 1, seed=0, threshold=0.99)
    assert list(tmp_path.iterdir()) == []
    orig = D.PairWriter.add

    def add(self, *a, **kw):
        if len(self.pairs) == 3:
            raise KeyboardInterrupt  # Ctrl-C in the middle
        return orig(self, *a, **kw)

    monkeypatch.setattr(D.PairWriter, "add", add)
    with pytest.raises(KeyboardInterrupt):
        sample(tiny_run, tmp_path / "out", 5, seed=0, threshold=0.05, min_defect_px=1)
    monkeypatch.setattr(D.PairWriter, "add", orig)
    assert list(tmp_path.iterdir()) == []
    sample(tiny_run, tmp_path / "out", 2, seed=0, threshold=0.05, min_defect_px=1)
    assert len(open_dataset("neu-seg", tmp_path / "out", split="all")) == 2


def test_the_halo_benchmark_writes_its_json_and_plot(tiny_run, tmp_path):
    import sys

    from conftest import ROOT

    run = tmp_path / "run"
    run.mkdir()
    ck = torch.load(tiny_run / "checkpoint.pt", weights_only=True)
    ck["G"]["out.weight"].zero_()
    ck["G"]["out.bias"].copy_(torch.tensor([0.0, 20.0]))  # a map of 1: labels all it paints
    torch.save(ck, run / "checkpoint.pt")
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from defectgan_halo import main

    out = tmp_path / "out"
    assert main(["--run-dir", str(run), "--n", "3", "--thresholds", "0.5,0.1", "--out", str(out)]) == 0
    res = json.loads((out / "defectgan-halo.json").read_text())
    assert [r["threshold"] for r in res["rows"]] == [0.5, 0.1]
    assert all(r["defects"] == 3 and r["halo_px"] == 0 for r in res["rows"])
    assert res["rim"]["pastes"] == 3 and (out / "defectgan-halo.png").stat().st_size > 5000
