"""The offline side of ARCD: simulation, networks, losses, training, ONNX export to a bundle.

Fast by construction (tiny tiles and widths); skipped cleanly where torch is not installed (the
runtime-only install).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import yaml

torch = pytest.importorskip("torch", reason="torch is needed for the offline ARCD code (pip install .[train])")
pytest.importorskip("onnx", reason="onnx is needed for the ARCD export")

from export.arcd.loss import DiceLoss, FocalLoss, ReconstructionLoss, balanced_alpha, ssim  # noqa: E402
from export.arcd.simulation import (AnomalySimulator, SimulationConfig, perlin_noise,  # noqa: E402
                                    square_pad_resize)
from export.arcd.torch_model import (ARCDInference, DiscriminativeSubNetwork,  # noqa: E402
                                     ReconstructiveSubNetwork, count_parameters)
from inspector.bundle import load_bundle  # noqa: E402
from inspector.sources.synthetic import CLASS_NAMES, StripRenderer  # noqa: E402

torch.set_num_threads(2)


def _normal_tile(seed: int = 0, size: int = 64, channels: int = 1) -> np.ndarray:
    img, _ = StripRenderer(256, size, seed=seed).render(np.random.default_rng(seed), 0.0)
    tile = img[:, 40:40 + size].astype(np.float32) / 255.0
    return np.repeat(tile[:, :, None], 3, axis=2) if channels == 3 else tile


# ----------------------------------------------------------------------------- simulation

@pytest.mark.parametrize("channels", [1, 3])
def test_simulation_stays_in_valid_region_and_keeps_the_rest(channels):
    img = _normal_tile(channels=channels)
    valid = np.zeros(img.shape[:2], bool)
    valid[8:40, :] = True  # a band, like the square-padded 1440x2560 frame's 144 of 256 rows
    sim = AnomalySimulator(SimulationConfig(clean_prob=0.0))
    rng = np.random.default_rng(3)
    for _ in range(12):
        out = sim(img, rng, valid=valid)
        assert out.anomalous and out.mask.any()
        assert set(np.unique(out.mask)) <= {0.0, 1.0}
        assert not out.mask[~valid].any(), "anomaly outside the valid region"
        outside = out.mask == 0
        np.testing.assert_array_equal(out.image[outside], img[outside])
        assert out.image.shape == img.shape and out.image.dtype == np.float32
        assert 0.0 <= out.image.min() and out.image.max() <= 1.0
        assert len(out.ops) == 3 and len(set(out.ops)) == 3
        assert 0.0 <= out.beta <= 0.8


def test_simulation_blend_formula_inside_mask():
    img = _normal_tile()
    sim = AnomalySimulator(SimulationConfig(clean_prob=0.0, num_augmentations=0,
                                            texture_weights={"field": 1.0}))
    out = sim(img, np.random.default_rng(5))
    m = out.mask > 0
    # I_A = beta*I + (1-beta)*A inside the mask, so A is recoverable and lies in [0, 1]
    a = (out.image[m] - out.beta * img[m]) / (1.0 - out.beta)
    assert a.min() >= -1e-4 and a.max() <= 1 + 1e-4


def test_simulation_is_deterministic_under_seed():
    img = _normal_tile()
    sim = AnomalySimulator(SimulationConfig(clean_prob=0.0))
    a = [sim(img, np.random.default_rng(11)) for _ in range(2)]
    np.testing.assert_array_equal(a[0].image, a[1].image)
    np.testing.assert_array_equal(a[0].mask, a[1].mask)
    assert a[0].beta == a[1].beta and a[0].ops == a[1].ops
    b = sim(img, np.random.default_rng(12))
    assert not np.array_equal(a[0].mask, b.mask)
    n1 = perlin_noise((32, 48), (4, 2), np.random.default_rng(1))
    n2 = perlin_noise((32, 48), (4, 2), np.random.default_rng(1))
    np.testing.assert_array_equal(n1, n2)


def test_grey_textures_get_three_augmentations_that_change_them():
    # thesis: 3 of the 7 operations; saturation cannot change a grey texture, so it is not drawn
    from export.arcd.simulation import augment_texture
    names = SimulationConfig().augmentations
    rng = np.random.default_rng(0)
    tex = rng.random((32, 32, 1), dtype=np.float32)
    draws = [augment_texture(tex, rng, names, 3)[1] for _ in range(200)]
    assert all(len(d) == 3 and "saturation" not in d for d in draws)
    rgb = [augment_texture(rng.random((32, 32, 3), dtype=np.float32), rng, names, 3)[1] for _ in range(200)]
    assert any("saturation" in d for d in rgb)


def test_clean_samples_and_square_pad():
    img = _normal_tile()
    out = AnomalySimulator(SimulationConfig(clean_prob=1.0))(img, np.random.default_rng(0))
    assert not out.anomalous and not out.mask.any()
    np.testing.assert_array_equal(out.image, img)
    frame = np.full((144, 256), 200, np.uint8)
    sq, valid = square_pad_resize(frame, 128)
    assert sq.shape == (128, 128) and valid.shape == (128, 128)
    assert valid[:72].all() and not valid[72:].any()  # 144/256 of the rows, top-aligned


# ----------------------------------------------------------------------------- networks

def test_thesis_network_sizes():
    # spec §10: R(3,3,128) 69.05 M and D(6,5,64) 28.38 M parameters
    assert count_parameters(ReconstructiveSubNetwork(3, 3, 128)) == 69_048_579
    assert count_parameters(DiscriminativeSubNetwork(6, 5, 64)) == 28_375_877


@pytest.mark.parametrize("channels", [1, 3])
def test_shapes(channels):
    r = ReconstructiveSubNetwork(channels, base_width=4)
    d = DiscriminativeSubNetwork(2 * channels, 4, base_channels=4, depth=5)
    x = torch.rand(2, channels, 64, 96)
    rec = r(x)
    assert rec.shape == x.shape
    assert d(torch.cat([rec, x], 1)).shape == (2, 4, 64, 96)
    model = ARCDInference(r, d).eval()
    with torch.no_grad():
        rec, probs = model(x)
    assert rec.shape == x.shape and probs.shape == (2, 4, 64, 96)
    torch.testing.assert_close(probs.sum(1), torch.ones(2, 64, 96))
    with torch.no_grad():
        logits = d(torch.cat([rec, x], 1))
    torch.testing.assert_close(probs, torch.softmax(logits, 1))
    with pytest.raises(ValueError):
        ARCDInference(r, DiscriminativeSubNetwork(channels, 4, 4))


# ----------------------------------------------------------------------------- losses

def test_ssim_identical_is_one_and_rec_loss_zero():
    x = torch.rand(2, 3, 32, 32)
    assert float(ssim(x, x)) == pytest.approx(1.0, abs=1e-5)
    assert float(ssim(x, 1 - x)) < 0.5
    loss, parts = ReconstructionLoss()(x, x)
    assert float(loss) == pytest.approx(0.0, abs=1e-6)
    # normalised inputs are mapped back to [0, 1] first
    loss_n, _ = ReconstructionLoss(mean=[0.5], std=[0.5])((x - 0.5) / 0.5, (x - 0.5) / 0.5)
    assert float(loss_n) == pytest.approx(0.0, abs=1e-6)


def test_reconstruction_accuracy_is_the_thesis_eq_4_9():
    from export.arcd.loss import reconstruction_accuracy

    assert reconstruction_accuracy(0.0, 1.0) == 1.0
    # Table 4.1's Base R (RA 0.5536) implies a combined loss of 5.91e-5 (spec §4.4)
    assert reconstruction_accuracy(5.91e-5, 1.0) == pytest.approx(0.5536, abs=5e-4)
    assert reconstruction_accuracy(2e-5, 1 - 3.91e-3) == pytest.approx(0.5536, abs=5e-4)
    assert reconstruction_accuracy(1e-3, 0.9) == pytest.approx(np.exp(-20.0))


def test_focal_loss_by_hand():
    # one image, 2 classes, 2 pixels: logits (2, 0) with truth 0 and (0, 1) with truth 0
    logits = torch.tensor([[[[2.0, 0.0]], [[0.0, 1.0]]]])
    target = torch.tensor([[[0, 0]]])
    p0 = 1 / (1 + math.exp(-2.0))      # softmax prob of class 0 at pixel 0
    p1 = 1 / (1 + math.exp(1.0))       # ... at pixel 1
    fl = lambda p, g: -((1 - p) ** g) * math.log(p)  # noqa: E731
    assert float(FocalLoss(gamma=2.0)(logits, target)) == pytest.approx((fl(p0, 2) + fl(p1, 2)) / 2, rel=1e-5)
    # gamma 0 and no alpha is cross-entropy (spec §10)
    ce = torch.nn.functional.cross_entropy(logits, target)
    assert float(FocalLoss(gamma=0.0)(logits, target)) == pytest.approx(float(ce), rel=1e-6)
    # fixed alpha weights each pixel by its true class's alpha
    assert float(FocalLoss(2.0, alpha=[0.25, 0.75])(logits, target)) == pytest.approx(
        0.25 * (fl(p0, 2) + fl(p1, 2)) / 2, rel=1e-5)
    # balanced alpha: alpha_c = 1 - freq_c, clamped
    t = torch.tensor([[[0, 0, 0, 1]]])
    torch.testing.assert_close(balanced_alpha(t, 2, (0.0, 1.0)), torch.tensor([0.25, 0.75]))
    torch.testing.assert_close(balanced_alpha(t, 2, (0.3, 0.7)), torch.tensor([0.3, 0.7]))
    # ignored pixels count for nothing
    t_ign = torch.tensor([[[0, 255]]])
    assert float(FocalLoss(2.0, ignore_index=255)(logits, t_ign)) == pytest.approx(fl(p0, 2), rel=1e-5)


def test_dice_loss():
    target = torch.tensor([[[0, 1], [2, 2]]])
    perfect = torch.nn.functional.one_hot(target, 3).permute(0, 3, 1, 2).float() * 100.0
    assert float(DiceLoss(smooth=0.0)(perfect, target)) == pytest.approx(0.0, abs=1e-6)
    # uniform logits: p = 1/3 everywhere; class 1: 2*(1/3)/(4/3 + 1) = 2/7, class 2: 4/3/(4/3 + 2) = 2/5
    flat = torch.zeros(1, 3, 2, 2)
    assert float(DiceLoss(smooth=0.0)(flat, target)) == pytest.approx(1 - (2 / 7 + 2 / 5) / 2, rel=1e-5)


def test_datasets_are_pure_functions_of_the_index():
    from export.arcd.data import SyntheticDefectDataset, SyntheticNormalDataset

    ds = SyntheticDefectDataset(tile=(32, 32), length=8, frame_size=(64, 160), seed=3,
                                crops_per_frame=4, focus_prob=1.0)
    late = ds[6]
    early = [ds[i] for i in range(8)]  # a different access order must not change sample 6
    torch.testing.assert_close(early[6]["image"], late["image"])
    torch.testing.assert_close(early[6]["mask"], late["mask"])
    assert early[0]["image"].shape == (1, 32, 32) and early[0]["mask"].dtype == torch.int64
    normal = SyntheticNormalDataset(tile=(32, 32), length=4, frame_size=(64, 160), seed=3,
                                    simulation=SimulationConfig(clean_prob=0.0))
    a, b = normal[1], normal[1]
    torch.testing.assert_close(a["image"], b["image"])
    diff = (a["image"] != a["target"]).any(0)
    assert diff.any() and not diff[a["anomaly_mask"][0] == 0].any()


# ----------------------------------------------------------------------------- training and export

TINY = {
    "name": "tiny-arcd",
    "seed": 0,
    "log_every": 5,
    "checkpoint_every": 4,
    "model": {"in_channels": 1, "tile": [64, 64], "r_base_width": 4, "r_depth": 4,
              "d_base_channels": 4, "d_depth": 4},
    "data": {"frame_size": [64, 192], "renderer_seeds": [0], "contrasts": [1.5],
             "val_frames": 2, "val_renderer_seeds": [5], "calib_frames": 2,
             "calib_renderer_seeds": [6], "focus_prob": 1.0},
    "simulation": {"clean_prob": 0.0},
    "stage1": {"steps": 12, "batch_size": 4, "lr": 0.005},
    "stage2": {"steps": 12, "batch_size": 4, "lr": 0.005, "focal_alpha": "balanced"},
    "evaluation": {"threshold_candidates": [0.4, 0.6], "per_class_thresholds": False},
}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from export.arcd.train import train

    root = tmp_path_factory.mktemp("arcd")
    cfg = root / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(TINY))
    run = train(cfg, root / "run")
    return cfg, run


def test_training_reduces_loss_and_writes_run(tiny_run):
    _, run = tiny_run
    for f in ("checkpoint.pt", "config.yaml", "metrics.json"):
        assert (run / f).is_file(), f
    m = json.loads((run / "metrics.json").read_text())
    ck = torch.load(run / "checkpoint.pt", weights_only=True)
    assert ck["done"] and ck["stage"] == 2 and ck["step"] == 12
    for stage in ("stage1", "stage2"):
        losses = [v for _, v in ck["history"][stage]]
        assert len(losses) == 12
        assert np.mean(losses[-3:]) < np.mean(losses[:3]), (stage, losses)
    assert set(m["validation"]["iou"]) == set(CLASS_NAMES)
    assert m["stage1"]["final_loss"] is not None
    hold = m["stage1"]["holdout"]
    assert 0 <= hold["ra"] <= 1 and -1 <= hold["ssim"] <= 1  # a 12-step R: RA underflows to 0
    assert hold["ra"] == pytest.approx(np.exp(-10000 * (hold["mse"] + (1 - hold["ssim"]) / 100)))
    # the same hold-out told apart: clean windows, simulated anomalies, and copying the input
    count = {k: (hold[k] or {}).get("samples", 0) for k in ("clean", "anomalous", "copy_input")}
    assert hold["samples"] == 64 and count["clean"] + count["anomalous"] == 64
    assert count["anomalous"] > 0 and count["copy_input"] == count["anomalous"]
    assert hold["beats_copy"] == (hold["anomalous"]["loss"] < hold["copy_input"]["loss"])



def test_r_holdout_script_scores_a_run_and_names_bad_inputs(tiny_run, tmp_path, caplog):
    """benchmarks/arcd_r_holdout.py: the trainer's hold-out on more windows, as JSON; a missing
    or damaged checkpoint, a plain baseline run and a data root for synthetic frames are one
    line each, exit 2."""
    import shutil

    from benchmarks.arcd_r_holdout import main

    _, run = tiny_run
    out = tmp_path / "r.json"
    assert main([str(run), "--samples", "12", "--threads", "1", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["samples"] == 12 and res["stage1_steps"] == 12
    assert (res["clean"] or {}).get("samples", 0) + res["anomalous"]["samples"] == 12
    assert res["beats_copy"] == (res["anomalous"]["loss"] < res["copy_input"]["loss"])
    assert res["ra"] == pytest.approx(np.exp(-10000 * (res["mse"] + (1 - res["ssim"]) / 100)))

    broken = tmp_path / "broken"
    shutil.copytree(run, broken)
    (broken / "checkpoint.pt").write_bytes(b"not a checkpoint")
    plain = tmp_path / "plain"
    shutil.copytree(run, plain)
    cfg = yaml.safe_load((plain / "config.yaml").read_text())
    cfg["model"]["reconstruction"] = False
    (plain / "config.yaml").write_text(yaml.safe_dump(cfg))
    cases = [
        ([str(tmp_path / "nowhere")], "config.yaml"),
        ([str(broken)], "unreadable checkpoint"),
        ([str(plain)], "has no R to score"),
        ([str(run), "--data-root", str(tmp_path)], "which have no data folder"),
    ]
    for bad in (["--threads", "0"], ["--samples", "0"]):  # torch.set_num_threads(0) raised before
        with pytest.raises(SystemExit) as e:
            main([str(run), *bad])
        assert e.value.code == 2
    for argv, why in cases:
        caplog.clear()
        assert main(argv + ["--samples", "2", "--threads", "1"]) == 2, argv
        errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
        assert len(errors) == 1 and why in errors[0], (argv, errors)

def _holdout_items(anomalous: int, clean: int) -> list[dict]:
    """Flat 0.3 windows; the anomalous ones carry a 0.9 square the target does not have."""
    items = []
    for i in range(anomalous + clean):
        target = torch.full((1, 32, 32), 0.3)
        image, mask = target.clone(), torch.zeros(1, 32, 32)
        if i < anomalous:
            image[:, 8:16, 8:16], mask[:, 8:16, 8:16] = 0.9, 1.0
        items.append({"image": image, "target": target, "anomaly_mask": mask})
    return items


class _Clamp(torch.nn.Module):
    """A perfect R for :func:`_holdout_items`: it removes everything brighter than the surface."""

    def forward(self, x):
        return torch.clamp(x, max=0.3)


def test_reconstruction_holdout_tells_clean_from_anomalous_and_compares_with_copying():
    from export.arcd.loss import ReconstructionLoss
    from export.arcd.train import reconstruction_holdout

    crit = ReconstructionLoss(0.01)
    # copying the input: perfect on clean windows (RA 1), no better than itself on anomalies
    copy = reconstruction_holdout(torch.nn.Identity(), _holdout_items(3, 2), crit)
    assert copy["clean"]["samples"] == 2 and copy["clean"]["mse"] == 0 and copy["clean"]["ra"] == pytest.approx(1)
    assert copy["anomalous"]["samples"] == 3 and copy["anomalous"]["loss"] == pytest.approx(copy["copy_input"]["loss"])
    assert copy["anomalous"]["mse"] == pytest.approx((0.6 ** 2) * 64 / 1024)
    assert copy["beats_copy"] is False
    assert copy["samples"] == 5 and copy["mse"] == pytest.approx(3 / 5 * copy["anomalous"]["mse"])
    # an R that repairs the anomaly beats copying, and scores RA 1 everywhere
    fixed = reconstruction_holdout(_Clamp(), _holdout_items(3, 2), crit)
    assert fixed["beats_copy"] is True and fixed["anomalous"]["mse"] == 0 and fixed["ra"] == pytest.approx(1)
    # an R that returns black loses to copying
    dark = reconstruction_holdout(_Dark(), _holdout_items(3, 2), crit)
    assert dark["beats_copy"] is False and dark["clean"]["ra"] < 1e-3
    # only clean samples: nothing to compare with
    only_clean = reconstruction_holdout(torch.nn.Identity(), _holdout_items(0, 4), crit)
    assert only_clean["anomalous"] is None and only_clean["copy_input"] is None
    assert only_clean["beats_copy"] is None and only_clean["clean"]["samples"] == 4


def test_resume_with_another_network_names_the_key(tiny_run, tmp_path):
    import shutil

    from export.arcd.train import train
    from inspector.errors import ConfigError

    _, run = tiny_run
    run2 = tmp_path / "run"
    shutil.copytree(run, run2)
    cfg = tmp_path / "wider.yaml"
    cfg.write_text(yaml.safe_dump(dict(TINY, model=dict(TINY["model"], d_base_channels=8))))
    with pytest.raises(ConfigError) as e:
        train(cfg, run2, resume=True)
    assert str(e.value).startswith(f"{cfg}: model.d_base_channels: 8, but the checkpoint "
                                   f"{run2 / 'checkpoint.pt'} was trained with 4")


class _Dark(torch.nn.Module):
    def forward(self, x):
        return torch.zeros_like(x)


def test_stage2_leaves_r_alone_and_resume_continues(tiny_run, tmp_path):
    from export.arcd.train import train

    cfg_path, run = tiny_run
    before = torch.load(run / "checkpoint.pt", weights_only=True)
    longer = dict(TINY, stage2=dict(TINY["stage2"], steps=16))
    cfg2 = tmp_path / "longer.yaml"
    cfg2.write_text(yaml.safe_dump(longer))
    with pytest.raises(FileExistsError):
        train(cfg2, run)  # never overwrites a run without resume
    import shutil

    run2 = tmp_path / "run"
    shutil.copytree(run, run2)
    train(cfg2, run2, resume=True)
    after = torch.load(run2 / "checkpoint.pt", weights_only=True)
    assert after["step"] == 16 and after["done"]
    assert len(after["history"]["stage2"]) == 16
    assert after["history"]["stage2"][:12] == before["history"]["stage2"]
    for k, v in before["reconstruction"].items():
        torch.testing.assert_close(after["reconstruction"][k], v)  # R frozen in stage 2


def test_a_copied_stage1_checkpoint_follows_the_new_configs_schedule(tiny_run, tmp_path):
    """The README's recipe (copy checkpoint-stage1.pt, --resume) with a longer stage 2: the
    learning rate decays at this config's milestones, not at those of the run that wrote it."""
    import shutil

    from export.arcd.train import train

    _, run = tiny_run
    longer = dict(TINY, stage2=dict(TINY["stage2"], steps=20))
    cfg = tmp_path / "longer.yaml"
    cfg.write_text(yaml.safe_dump(longer))
    (tmp_path / "run").mkdir()
    shutil.copy(run / "checkpoint-stage1.pt", tmp_path / "run" / "checkpoint.pt")
    saved = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)
    assert sorted(saved["scheduler"]["stage2"]["milestones"]) == [10, 11]  # 0.8 / 0.9 of 12
    after = torch.load(train(cfg, tmp_path / "run", resume=True) / "checkpoint.pt", weights_only=False)
    sched = after["scheduler"]["stage2"]
    assert sorted(sched["milestones"]) == [16, 18] and sched["last_epoch"] == 20
    lr = TINY["stage2"]["lr"]
    assert sched["_last_lr"] == pytest.approx([lr * 0.2 ** 2])
    assert after["optimizer"]["stage2"]["param_groups"][0]["lr"] == pytest.approx(lr * 0.2 ** 2)


def test_stage1_train_d_pretrains_d_without_changing_r(tmp_path):
    """stage1.train_d (spec §2.5 option): D learns the class-agnostic simulated masks in stage 1;
    R sees exactly the updates it would see without the option (D reads R's output detached)."""
    from export.arcd.loss import defect_vs_background
    from export.arcd.train import train

    short = dict(TINY, stage2=dict(TINY["stage2"], steps=0), evaluation=dict(TINY["evaluation"]))
    runs = {}
    for flag in (False, True):
        cfg = dict(short, stage1=dict(TINY["stage1"], train_d=flag, d_lr=0.01))
        path = tmp_path / f"d{int(flag)}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        runs[flag] = torch.load(train(path, tmp_path / f"run{int(flag)}") / "checkpoint-stage1.pt",
                                weights_only=True)
    plain, pre = runs[False], runs[True]
    for k, v in plain["reconstruction"].items():
        torch.testing.assert_close(pre["reconstruction"][k], v)  # R's training is unchanged
    changed = [k for k, v in plain["discrimination"].items()
               if v.is_floating_point() and not torch.equal(pre["discrimination"][k], v)]
    assert changed, "D must train in stage 1 with train_d"
    losses = pre["history"]["stage1"]
    assert len(losses) == TINY["stage1"]["steps"]

    # a checkpoint of the other setting is refused with the key, not a torch error
    import shutil

    from inspector.errors import ConfigError

    shutil.copytree(tmp_path / "run0", tmp_path / "resumed")
    with pytest.raises(ConfigError, match="stage1.train_d"):
        train(tmp_path / "d1.yaml", tmp_path / "resumed", resume=True)

    # the 2-class view is what the stage-1 loss sees: softmax of it = (p_bg, 1 - p_bg)
    z = torch.randn(2, 4, 3, 3)
    q = torch.softmax(defect_vs_background(z), 1)
    p = torch.softmax(z, 1)
    torch.testing.assert_close(q[:, 0], p[:, 0])
    torch.testing.assert_close(q[:, 1], 1 - p[:, 0])


@pytest.mark.parametrize("reconstruction", [True, False], ids=["arcd", "unet-baseline"])
def test_torchrun_two_ranks_on_cpu_train_both_stages_in_step(tmp_path, reconstruction):
    """`torchrun` (gloo on CPU; NCCL on GPUs) with stage-1 D pretraining on: R and D are wrapped
    in DistributedDataParallel where they train, and both ranks end with the same weights
    (checked inside train(); a mismatch raises)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from conftest import ROOT

    torchrun = Path(sys.executable).with_name("torchrun")
    if not torchrun.is_file():
        pytest.skip("torchrun not installed beside this python")
    cfg = dict(TINY, stage1=dict(TINY["stage1"], steps=4, train_d=True),
               stage2=dict(TINY["stage2"], steps=4), threads=1,
               model=dict(TINY["model"], reconstruction=reconstruction))
    path = tmp_path / "ddp.yaml"
    path.write_text(yaml.safe_dump(cfg))
    from ports import free_port  # torchrun's default 29500 lies in a test worker's port slice

    r = subprocess.run([str(torchrun), "--nproc_per_node=2", f"--master-port={free_port()}", "-m",
                        "export.arcd.train", "--config",
                        str(path), "--run-dir", str(tmp_path / "run")],
                       capture_output=True, text=True, timeout=300, cwd=ROOT,
                       env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    line = next(x for x in r.stderr.splitlines() if "R+D weight checksum per rank" in x)
    a, b = line.rsplit(":", 1)[1].split(",")  # two ranks, one checksum each
    assert float(a) == float(b)
    ck = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert ck["done"] and len(ck["history"]["stage2"]) == 4
    assert len(ck["history"]["stage1"]) == (4 if reconstruction else 0)


def test_onnx_export_parity_and_bundle(tiny_run, tmp_path):
    from export.onnx_export import export_bundle

    _, run = tiny_run
    out = export_bundle(run, tmp_path / "bundle", name="tiny")
    b = load_bundle(out)
    spec = b.spec
    assert spec.kind == "arcd" and spec.name == "tiny"
    assert spec.input.name == "image" and tuple(spec.input.tile) == (64, 64)
    assert spec.input.channels == 1 and spec.input.batch == 0
    assert spec.outputs == {"probabilities": "probs", "reconstruction": "reconstruction"}
    assert spec.classes == list(CLASS_NAMES)
    assert spec.tiling.overlap == 32 and spec.postprocess.type == "probability"
    prov = spec.provenance
    for key in ("data", "training_config", "commit", "metrics", "created", "parity"):
        assert key in prov
    assert all(v <= 1e-4 for d in prov["parity"]["max_abs_diff"].values() for v in d.values())

    import onnxruntime as ort

    sess = ort.InferenceSession(str(b.graph_path()), providers=["CPUExecutionProvider"])
    (inp,) = sess.get_inputs()
    assert inp.name == "image" and inp.shape[1:] == [1, 64, 64] and not isinstance(inp.shape[0], int)
    rec, probs = sess.run(["reconstruction", "probs"], {"image": np.zeros((3, 1, 64, 64), np.float32)})
    assert rec.shape == (3, 1, 64, 64) and probs.shape == (3, 4, 64, 64)


def test_parity_failure_is_reported(tmp_path):
    from export.onnx_export import ExportParityError, check_parity, export_onnx

    r = ReconstructiveSubNetwork(1, base_width=2, depth=3)
    d = DiscriminativeSubNetwork(2, 4, base_channels=2, depth=3)
    model = ARCDInference(r, d).eval()
    path = tmp_path / "m.onnx"
    export_onnx(model, path, 1, (32, 32))
    x = {"random": np.random.default_rng(0).random((2, 1, 32, 32), dtype=np.float32)}
    assert check_parity(model, path, x)["random"]["probs"] <= 1e-4
    with torch.no_grad():  # change the torch weights after export: the graph no longer matches
        d.final.bias[1] += 5.0
    with pytest.raises(ExportParityError, match="differs from torch"):
        check_parity(model, path, x)


def test_export_cli_parity_failure_is_one_line_and_the_tolerance_is_recorded(tiny_run, tmp_path,
                                                                             capsys):
    """`inspector export onnx` on a graph that misses the parity tolerance exits 2 with one line
    naming the graph and the tolerance (no traceback, no bundle); --parity-tol given knowingly
    exports and the bundle records the tolerance it passed."""
    from inspector.cli import main as cli_main

    _, run = tiny_run
    out = tmp_path / "strict"
    assert cli_main(["export", "onnx", "--run-dir", str(run), "--out", str(out),
                     "--parity-tol", "1e-12"]) == 2
    err = capsys.readouterr().err
    assert "differs from torch" in err and "tolerance 1e-12" in err and "--parity-tol" in err
    assert "Traceback" not in err and not (out / "bundle.yaml").exists()
    # the graph the bundle would have had, not the staged temporary file (gone by then)
    assert f"error: {out / 'model.onnx'}: ONNX Runtime differs" in err and ".export-" not in err
    assert cli_main(["export", "onnx", "--run-dir", str(run), "--out", str(tmp_path / "loose"),
                     "--parity-tol", "1e-3"]) == 0
    assert load_bundle(tmp_path / "loose").spec.provenance["parity"]["tolerance"] == 1e-3
    with pytest.raises(SystemExit):  # argparse: a tolerance must be a positive number
        cli_main(["export", "onnx", "--run-dir", str(run), "--out", str(out), "--parity-tol", "0"])


@pytest.mark.parametrize("damage", ["truncated", "garbage", "missing", "not-a-dict"])
def test_a_damaged_checkpoint_is_one_line_naming_it(tiny_run, tmp_path, capsys, damage):
    """Export and --resume of a run whose checkpoint.pt is cut short (a copy interrupted), random
    bytes, absent or some other torch file: exit 2, one line naming the file, no traceback; the
    file is left as it was."""
    import shutil

    from inspector.cli import main as cli_main

    cfg, run = tiny_run
    bad = tmp_path / "run"
    bad.mkdir()
    shutil.copy(run / "config.yaml", bad / "config.yaml")
    ck = bad / "checkpoint.pt"
    if damage == "truncated":
        ck.write_bytes((run / "checkpoint.pt").read_bytes()[:4096])
    elif damage == "garbage":
        ck.write_bytes(np.random.default_rng(0).bytes(2048))
    elif damage == "not-a-dict":
        torch.save(torch.zeros(3), ck)
    before = ck.read_bytes() if ck.exists() else None
    assert cli_main(["export", "onnx", "--run-dir", str(bad), "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert str(ck) in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "b" / "bundle.yaml").exists()
    if damage != "missing":  # --resume of a missing checkpoint starts a new run (logged); not here
        assert cli_main(["train", "arcd", "--config", str(cfg), "--run-dir", str(bad), "--resume"]) == 2
        err = capsys.readouterr().err
        assert str(ck) in err and "Traceback" not in err, err
        assert ck.read_bytes() == before


# ----------------------------------------------------------------------------- metrics of which checkpoint

def _copy_run(run, dst):
    import shutil

    shutil.copytree(run, dst)
    return dst


def test_metrics_record_their_checkpoint_and_a_stale_metrics_json_is_refused(tiny_run, tmp_path,
                                                                             capsys, caplog):
    """A finished run resumed with a longer stage 2 and stopped (SIGTERM) before it wrote new
    metrics: its metrics.json is the old network's. The exporter refuses it (exit 2, one line
    naming metrics.json, both steps and what to do; no bundle); --allow-stale-metrics exports
    with default thresholds and no metrics; a metrics.json of an older trainer (no checkpoint
    recorded) is used as before, with a warning."""
    import export.arcd.train as T
    from export.onnx_export import StaleMetricsError, export_bundle
    from export.onnx_export import main as export_main
    from inspector.cli import main as cli_main

    cfg_path, run = tiny_run
    m = json.loads((run / "metrics.json").read_text())
    ck = torch.load(run / "checkpoint.pt", weights_only=True)
    assert m["checkpoint"] == T.checkpoint_ref(ck)
    assert (m["checkpoint"]["stage"], m["checkpoint"]["step"], m["checkpoint"]["done"]) == (2, 12, True)

    stale = _copy_run(run, tmp_path / "run")
    longer = tmp_path / "longer.yaml"
    longer.write_text(yaml.safe_dump(dict(TINY, stage2=dict(TINY["stage2"], steps=20))))
    orig = T.atomic_save

    def stop_at_16(obj, path):  # what SIGTERM does at step 16: checkpoint saved, run stopped
        orig(obj, path)
        if (obj["stage"], obj["step"], obj["done"]) == (2, 16, False):
            T.atomic_save = orig
            raise KeyboardInterrupt("signal SIGTERM")

    T.atomic_save = stop_at_16
    try:
        with pytest.raises(KeyboardInterrupt):
            T.train(longer, stale, resume=True)
    finally:
        T.atomic_save = orig
    assert torch.load(stale / "checkpoint.pt", weights_only=True)["step"] == 16
    assert (stale / "metrics.json").read_text() == (run / "metrics.json").read_text()

    out = tmp_path / "b"
    with pytest.raises(StaleMetricsError, match="allow-stale-metrics") as e:
        export_bundle(stale, out)
    msg = str(e.value)
    assert str(stale / "metrics.json") in msg and "stage 2 step 12" in msg and "stage 2 step 16" in msg
    assert "--resume" in msg and not out.exists()
    capsys.readouterr()
    assert cli_main(["export", "onnx", "--run-dir", str(stale), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "metrics.json" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert export_main(["--run-dir", str(stale), "--out", str(out)]) == 2 and not out.exists()

    assert export_main(["--run-dir", str(stale), "--out", str(out), "--allow-stale-metrics"]) == 0
    spec = load_bundle(out).spec
    assert spec.provenance["metrics"] is None and spec.provenance["metrics_check"].startswith("stale")
    assert spec.postprocess.threshold == TINY.get("evaluation", {}).get("default_threshold", 0.5)

    # the same step, other weights (trained again from a copied checkpoint): also refused
    other = _copy_run(run, tmp_path / "other")
    ck["discrimination"]["final.bias"][1] += 1.0
    torch.save(ck, other / "checkpoint.pt")
    with pytest.raises(StaleMetricsError, match="other weights"):
        export_bundle(other, tmp_path / "b2")

    # an older trainer's metrics.json: no checkpoint recorded; warned once, used as before
    old = _copy_run(run, tmp_path / "old")
    m_old = {k: v for k, v in m.items() if k != "checkpoint"}
    (old / "metrics.json").write_text(json.dumps(m_old))
    caplog.clear()
    spec = load_bundle(export_bundle(old, tmp_path / "b3")).spec
    warned = [r for r in caplog.records if "records no checkpoint step" in r.getMessage()]
    assert len(warned) == 1
    assert spec.provenance["metrics"] == m_old
    assert spec.postprocess.threshold == pytest.approx(m["validation"]["global_threshold"])


def test_resume_with_more_stage1_steps_after_stage1_warns_and_records_the_steps_run(
        tiny_run, tmp_path, caplog, monkeypatch):
    """Stage 1 is over once stage 2 has begun: a larger stage1.steps on --resume is not acted on;
    the log says so, and metrics.json records the stage-1 steps run, not the config's."""
    import export.arcd.train as T
    from export.arcd.train import train

    # R's hold-out (64 single-tile forwards) is most of this test's time and not its subject
    monkeypatch.setattr(T, "_stage1_holdout", lambda state, data, n=64: None)
    _, run = tiny_run
    run2 = _copy_run(run, tmp_path / "run")
    cfg = tmp_path / "s1x2.yaml"
    cfg.write_text(yaml.safe_dump(dict(TINY, stage1=dict(TINY["stage1"], steps=24))))
    caplog.clear()
    with caplog.at_level("WARNING", logger="export.arcd.train"):
        train(cfg, run2, resume=True)
    assert any("stage 1 is not extended" in r.getMessage() for r in caplog.records)
    m = json.loads((run2 / "metrics.json").read_text())
    ck = torch.load(run2 / "checkpoint.pt", weights_only=True)
    assert len(ck["history"]["stage1"]) == 12
    assert m["stage1"]["steps"] == 12 and m["stage1"]["config_steps"] == 24
    assert m["stage2"]["steps"] == 12 and "config_steps" not in m["stage2"]


def test_torchrun_a_stop_reaching_one_rank_stops_both_after_the_same_step(tmp_path):
    """SIGTERM reaches the ranks of a torchrun job at slightly different moments (torchrun
    forwards it to each worker; an operator may kill one). The stop is agreed between the ranks
    at the end of each step, so all of them stop after the same step and rank 0 saves that
    step's checkpoint; a rank that carried on alone would hang in its next all-reduce (until
    NCCL's timeout on GPUs) or die in it without a checkpoint. Here the signal goes to rank 1
    only."""
    import os
    import re
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    from conftest import ROOT

    torchrun = Path(sys.executable).with_name("torchrun")
    if not torchrun.is_file():
        pytest.skip("torchrun not installed beside this python")
    cfg = dict(TINY, stage1=dict(TINY["stage1"], steps=2), log_every=1, checkpoint_every=10_000,
               stage2=dict(TINY["stage2"], steps=2000), threads=1)
    path = tmp_path / "ddp.yaml"
    path.write_text(yaml.safe_dump(cfg))
    log = tmp_path / "torchrun.log"
    with open(log, "w") as err:
        from ports import free_port  # torchrun's default 29500 lies in a test worker's port slice

        p = subprocess.Popen([str(torchrun), "--nproc_per_node=2", f"--master-port={free_port()}", "-m",
                              "export.arcd.train",
                              "--config", str(path), "--run-dir", str(tmp_path / "run")],
                             stdout=subprocess.DEVNULL, stderr=err, cwd=ROOT,
                             env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
        try:
            deadline = time.monotonic() + 240
            while not re.search(r"stage 2 step 5/", log.read_text()):
                assert p.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
                time.sleep(0.05)

            def rank_of(pid: int) -> str | None:
                try:
                    env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
                except OSError:
                    return None
                return next((e.split(b"=", 1)[1].decode() for e in env if e.startswith(b"RANK=")), None)

            children = [int(x) for x in Path(f"/proc/{p.pid}/task/{p.pid}/children").read_text().split()]
            (rank1,) = [c for c in children if rank_of(c) == "1"]
            os.kill(rank1, signal.SIGTERM)
            code = p.wait(timeout=120)
        finally:
            if p.poll() is None:
                p.kill()
    text = log.read_text()
    # no worker died in a collective (torchrun itself reports the workers' exit 130 as a failure)
    assert "[rank0]: Traceback" not in text and "[rank1]: Traceback" not in text, text[-3000:]
    stops = [int(m) for m in re.findall(r"interrupted at stage 2 step (\d+)", text)]
    assert len(stops) == 1, text[-3000:]  # rank 0 saved (only rank 0 writes)
    assert text.count("training stopped (signal SIGTERM)") == 1  # rank 1, which got it
    assert text.count("training stopped (another rank was stopped by a signal)") == 1  # rank 0
    ck = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert (ck["stage"], ck["step"]) == (2, stops[0]) and not ck["done"]
    assert len(ck["history"]["stage2"]) == stops[0]
    assert code != 0


def test_resume_with_a_changed_training_key_is_warned_recorded_and_exported(
        tiny_run, tmp_path, caplog, monkeypatch):
    """A finished run resumed with another stage2.lr trains nothing: the log says the change
    does nothing to the weights, and config.yaml, the checkpoint and the exported bundle agree,
    the change recorded with where it happened (it used to rewrite config.yaml alone, silently,
    while the bundle kept the old value). Resumed with more steps, the record says the later
    steps trained with the new value, and the stage-1 schedule (over) is not logged as if used."""
    import export.arcd.train as T
    from export.arcd.train import train
    from export.onnx_export import export_bundle
    from inspector.bundle import load_bundle

    monkeypatch.setattr(T, "_stage1_holdout", lambda state, data, n=64: None)
    _, run = tiny_run
    run2 = _copy_run(run, tmp_path / "run")
    weights = torch.load(run2 / "checkpoint.pt", weights_only=True)["discrimination"]
    cfg = tmp_path / "lr.yaml"
    cfg.write_text(yaml.safe_dump(dict(TINY, threads=1, stage2=dict(TINY["stage2"], lr=0.05))))
    caplog.clear()
    with caplog.at_level("INFO", logger="export.arcd.train"):
        train(cfg, run2, resume=True)
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("so nothing is left to train: stage2.lr 0.005 -> 0.05 change(s) nothing in the weights"
               in w for w in warned), warned
    assert not any("threads" in w for w in warned)  # how it runs, not what it learns
    ck = torch.load(run2 / "checkpoint.pt", weights_only=True)
    for k, v in weights.items():
        torch.testing.assert_close(ck["discrimination"][k], v)
    change = {"resumed_at": {"stage": 2, "step": 12, "done": True}, "trained_after": False,
              "changed": {"stage2.lr": [0.005, 0.05]}}  # threads: how it runs, not recorded
    assert ck["config"]["stage2"]["lr"] == 0.05 and ck["config_changes"] == [change]
    assert yaml.safe_load((run2 / "config.yaml").read_text())["stage2"]["lr"] == 0.05
    assert json.loads((run2 / "metrics.json").read_text())["config_changes"] == [change]
    prov = load_bundle(export_bundle(run2, tmp_path / "bundle")).spec.provenance
    assert prov["training_config"]["stage2"]["lr"] == 0.05 and prov["config_changes"] == [change]

    # more steps: the steps after the resume train with the new value, and the record says so
    cfg2 = tmp_path / "longer.yaml"
    cfg2.write_text(yaml.safe_dump(dict(TINY, stage2=dict(TINY["stage2"], steps=14, lr=0.02))))
    caplog.clear()
    with caplog.at_level("INFO", logger="export.arcd.train"):
        train(cfg2, run2, resume=True)
    msgs = [r.getMessage() for r in caplog.records]
    assert any("stage2.steps 12 -> 14, stage2.lr 0.05 -> 0.02; the steps from stage 2 step 12 on "
               "use the new value(s)" in m for m in msgs), msgs
    assert not any(m.startswith("stage 1: resumed schedule") for m in msgs), msgs
    assert any(m.startswith("stage 2: resumed schedule") for m in msgs), msgs
    ck = torch.load(run2 / "checkpoint.pt", weights_only=True)
    assert [c["trained_after"] for c in ck["config_changes"]] == [False, True]
    assert ck["config_changes"][1]["changed"] == {"stage2.steps": [12, 14], "stage2.lr": [0.05, 0.02]}
    # a run stopped at step 12 of 20 and resumed with 10 steps trains nothing: said, and recorded so
    ck.update(done=False, step=12)
    ck["config"]["stage2"]["steps"] = 20
    torch.save(ck, run2 / "checkpoint.pt")
    cfg3 = tmp_path / "fewer.yaml"
    cfg3.write_text(yaml.safe_dump(dict(TINY, stage2=dict(TINY["stage2"], steps=10, lr=0.03))))
    caplog.clear()
    with caplog.at_level("WARNING", logger="export.arcd.train"):
        train(cfg3, run2, resume=True)
    assert any("is at stage 2 step 12, so nothing is left to train" in r.getMessage() for r in caplog.records)
    ck = torch.load(run2 / "checkpoint.pt", weights_only=True)
    assert ck["config_changes"][-1]["trained_after"] is False and ck["step"] == 12
