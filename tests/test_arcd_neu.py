"""ARCD on labelled image folders (NEU-Seg layout first): readers' error paths, defect-free
stage-1 windows, labelled-data sampling, the U-Net baseline switch, MFLM / CALM, the thesis's
class metrics, ``inspector evaluate`` on a probability bundle, and DDP's single-process path.

Fixtures are tiny folders written into ``tmp_path``; tests that read ``../shared/data`` skip with
a reason where it is absent.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import cv2
import numpy as np
import pytest

from conftest import SHARED_DATA, run_cli, sigterm_when, write_config
from inspector.evaluation.datasets import open_dataset, split_of
from inspector.evaluation.metrics import ClassConfusion, FrameResult, class_scores, confusion_matrix

NEU = SHARED_DATA / "neu_seg"
CLASSES = ["background", "inclusion", "patches", "scratches"]


def neu_folder(root, n: int = 12, size: int = 64, seed: int = 0, n_classes: int = 3,
               subset: str = "training", first: int = 0):
    """A NEU-Seg-layout folder: grey 3-channel JPEGs, a dark defect band of class
    i % n_classes + 1 in the top rows, the rest clean; stems first .. first + n - 1."""
    rng = np.random.default_rng(seed)
    (root / "images" / subset).mkdir(parents=True, exist_ok=True)
    (root / "annotations" / subset).mkdir(parents=True, exist_ok=True)
    for i in range(first, first + n):
        img = rng.integers(110, 150, (size, size), dtype=np.uint8)
        mask = np.zeros((size, size), np.uint8)
        mask[4:14, 8:40] = i % n_classes + 1
        img[mask > 0] = 30
        cv2.imwrite(str(root / "images" / subset / f"{i:06d}.jpg"), np.repeat(img[:, :, None], 3, 2))
        cv2.imwrite(str(root / "annotations" / subset / f"{i:06d}.png"), mask)
    return root


# ----------------------------------------------------------------------------- metrics

def test_class_scores_against_a_hand_computed_confusion_matrix():
    # rows = truth, columns = prediction; 3 classes (background + 2 defects)
    cm = np.array([[50, 2, 3],
                   [4, 10, 1],
                   [0, 5, 20]])
    s = class_scores(cm)
    iou = [50 / (55 + 54 - 50), 10 / (15 + 17 - 10), 20 / (25 + 24 - 20)]
    pa = [50 / 55, 10 / 15, 20 / 25]
    assert s["per_class_iou"] == pytest.approx(iou)
    assert s["miou"] == pytest.approx(np.mean(iou))  # the corrected (- p_ii) denominator
    assert s["miou_defects"] == pytest.approx(np.mean(iou[1:]))
    assert s["mpa"] == pytest.approx(np.mean(pa))
    # the thesis's printed formula (no - p_ii) would give a smaller value: not what we compute
    printed = np.mean([50 / 109, 10 / 32, 20 / 49])
    assert s["miou"] > printed
    # a class absent from truth and prediction has no IoU and leaves the means alone
    s2 = class_scores(np.array([[5, 0, 0], [1, 3, 0], [0, 0, 0]]))
    assert s2["per_class_iou"][2] is None and s2["per_class_pa"][2] is None
    assert s2["miou"] == pytest.approx(np.mean([5 / 6, 3 / 4]))


def test_confusion_matrix_and_accumulator_grow_to_the_classes_seen():
    truth = np.array([[0, 1], [2, 2]])
    pred = np.array([[0, 1], [1, 2]])
    np.testing.assert_array_equal(confusion_matrix(pred, truth, 3),
                                  [[1, 0, 0], [0, 1, 0], [0, 1, 1]])
    with pytest.raises(ValueError, match="class index 2"):
        confusion_matrix(pred, truth, 2)
    acc = ClassConfusion()
    acc.update(truth, FrameResult(label=pred.astype(np.uint8), score_map=np.zeros((2, 2), np.float32)))
    acc.update(np.zeros((2, 2), np.int64), FrameResult(label=np.zeros((2, 2), np.uint8),
                                                       score_map=np.zeros((2, 2), np.float32),
                                                       probs=np.zeros((4, 2, 2), np.float32)))
    r = acc.result()
    assert np.asarray(r["confusion"]).shape == (4, 4) and np.asarray(r["confusion"]).sum() == 8
    assert r["per_class_iou"][3] is None


# ----------------------------------------------------------------------------- readers

def test_readers_reject_bad_files_naming_them(tmp_path):
    root = neu_folder(tmp_path / "neu", n=3)
    # missing annotation: an error naming it (evaluation and training alike); skipped, and named,
    # only where a caller asks for it
    (root / "annotations" / "training" / "000001.png").unlink()
    with pytest.raises(FileNotFoundError, match="000001"):
        open_dataset("neu-seg", root)
    assert len(open_dataset("neu-seg", root, strict=False)) == 2
    # size mismatch
    cv2.imwrite(str(root / "annotations" / "training" / "000001.png"), np.zeros((10, 12), np.uint8))
    ds = open_dataset("neu-seg", root)
    i = [e.stem for e in ds.entries].index("000001")
    with pytest.raises(ValueError, match="000001.png: mask is 12x10"):
        ds.load(i)
    # unreadable image
    (root / "images" / "training" / "000002.jpg").write_bytes(b"not a jpeg")
    ds = open_dataset("neu-seg", root)
    with pytest.raises(ValueError, match="000002.jpg: cannot read"):
        ds.load([e.stem for e in ds.entries].index("000002"))
    # magnetic tile: a defect image without its mask
    mt = tmp_path / "mt" / "MT_Crack" / "Imgs"
    mt.mkdir(parents=True)
    cv2.imwrite(str(mt / "exp1_num_1.jpg"), np.zeros((16, 16), np.uint8))
    with pytest.raises(FileNotFoundError, match="exp1_num_1"):
        open_dataset("magnetic-tile", tmp_path / "mt")
    lenient = open_dataset("magnetic-tile", tmp_path / "mt", strict=False)
    assert len(lenient) == 0 and lenient.notes == [
        "1 defect image(s) without a mask skipped: MT_Crack/Imgs/exp1_num_1.jpg"]


def test_empty_folders_are_errors_naming_the_folder(tmp_path):
    from export.arcd.data import DatasetFrames

    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty"):
        DatasetFrames(open_dataset("folder", tmp_path / "empty"))
    (tmp_path / "neu" / "images" / "training").mkdir(parents=True)
    (tmp_path / "neu" / "annotations" / "training").mkdir(parents=True)
    with pytest.raises(ValueError, match="neu"):
        DatasetFrames(open_dataset("neu-seg", tmp_path / "neu"))


# ----------------------------------------------------------------------------- training data

def test_labelled_sampling_is_nested_and_sized_by_rate():
    from export.arcd.data import sample_labelled

    subsets = {r: sample_labelled(2049, r, seed=0) for r in (1.0, 0.8, 0.5, 0.3)}
    for r, idx in subsets.items():
        assert len(idx) == round(r * 2049) and len(set(idx)) == len(idx)
    assert set(subsets[0.3]) <= set(subsets[0.5]) <= set(subsets[0.8]) <= set(subsets[1.0])
    assert sample_labelled(2049, 0.3, seed=0) == subsets[0.3]
    assert sample_labelled(2049, 0.3, seed=1) != subsets[0.3]


def test_folder_source_builds_both_stages(tmp_path):
    torch = pytest.importorskip("torch")
    from export.arcd.data import FolderDataConfig, build_data
    from export.arcd.simulation import SimulationConfig

    root = neu_folder(tmp_path / "neu", n=40)
    cfg = FolderDataConfig(source="neu-seg", root=str(root), train_splits=["train", "test"],
                           calib_images=2, label_fraction=0.3, normal_patch=32, train_crop=(32, 32))
    data = build_data(cfg, tile=(32, 32), channels=1, mean=[0.0], std=[1.0],
                      simulation=SimulationConfig(clean_prob=0.0), stage1_length=4,
                      stage2_length=4, seed=0)
    n_train = sum(split_of(f"{i:06d}") != "val" for i in range(40))
    assert f"{round(0.3 * n_train)} of {n_train} images" in data.description
    s1 = data.stage1[0]
    assert tuple(s1["image"].shape) == (1, 32, 32) and s1["anomaly_mask"].any()
    # the clean target comes from a defect-free window: no dark (defect) pixels in it
    assert float(s1["target"].min()) > 80 / 255
    s2 = data.stage2[1]
    assert tuple(s2["image"].shape) == (1, 32, 32) and s2["mask"].dtype == torch.int64
    val = data.val()
    assert val and all(f.truth is not None for f in val)
    assert len(data.calib()) == 2 and data.class_names == tuple(CLASSES)


def test_neu_seg_own_test_folder_is_the_test_split_and_never_trained_on(tmp_path):
    """A full NEU-Seg root (training/ + test/): `--split test` scores the data set's own test
    folder, whole; the hash splits and training read the training folder only."""
    root = neu_folder(tmp_path / "neu", n=40)
    neu_folder(root, n=20, subset="test", first=1000)
    test = open_dataset("neu-seg", root, split="test")
    assert sorted(e.stem for e in test.entries) == [f"{i:06d}" for i in range(1000, 1020)]
    assert {e.category for e in test.entries} == {"test"} and {e.split for e in test.entries} == {"test"}
    for split in ("train", "val"):
        ds = open_dataset("neu-seg", root, split=split)
        assert ds.entries and {e.category for e in ds.entries} == {"training"}
    assert len(open_dataset("neu-seg", root, split="all")) == 60
    # naming the subsets keeps the plain hash split, over those folders
    hashed = open_dataset("neu-seg", root, split="test", subsets=["training"])
    assert [e.stem for e in hashed.entries] == [f"{i:06d}" for i in range(40) if split_of(f"{i:06d}") == "test"]

    pytest.importorskip("torch")
    from export.arcd.data import FolderDataConfig, build_data
    from export.arcd.simulation import SimulationConfig

    cfg = FolderDataConfig(source="neu-seg", root=str(root), train_splits=["train", "test"],
                           calib_images=2, normal_patch=32, train_crop=(32, 32))
    data = build_data(cfg, tile=(32, 32), channels=1, mean=[0.0], std=[1.0],
                      simulation=SimulationConfig(clean_prob=0.0), stage1_length=2,
                      stage2_length=2, seed=0)
    n_train = sum(split_of(f"{i:06d}") != "val" for i in range(40))
    assert f"{n_train} of {n_train} images" in data.description


# ----------------------------------------------------------------------------- networks

def test_mflm_and_calm_keep_shapes_and_calm_matches_the_thesis_size():
    torch = pytest.importorskip("torch")
    from export.arcd.torch_model import (CALM, MFLM, ARCDInference, DiscriminativeSubNetwork,
                                         MaskedDilatedConv, ReconstructiveSubNetwork,
                                         count_parameters)

    x = torch.rand(2, 16, 12, 20)
    assert MaskedDilatedConv(16, 3, 1)(x).shape == x.shape
    assert MaskedDilatedConv(16, 1, 2)(x).shape == x.shape
    assert MFLM(16)(x).shape == x.shape and MFLM(16, residual=True)(x).shape == x.shape
    assert CALM(16)(x).shape == x.shape
    r = ReconstructiveSubNetwork(1, base_width=4, depth=4, mflm=True)
    d = DiscriminativeSubNetwork(2, 4, base_channels=4, depth=4, calm=True)
    rec, probs = ARCDInference(r, d).eval()(torch.rand(2, 1, 32, 48))
    assert rec.shape == (2, 1, 32, 48) and probs.shape == (2, 4, 32, 48)
    assert torch.allclose(probs.sum(1), torch.ones(2, 32, 48), atol=1e-5)
    # spec §3.2 / §10: CALM in the six encoder blocks of the thesis D gives 20.63 M parameters
    assert count_parameters(DiscriminativeSubNetwork(6, 5, 64, calm=True)) / 1e6 == pytest.approx(20.63, abs=0.01)


def test_mflm_and_calm_internals_are_config_keys_with_the_spec_defaults(tmp_path):
    pytest.importorskip("torch")
    from pydantic import ValidationError

    from export.arcd.torch_model import CALM, MFLM
    from export.arcd.train import ModelConfig, build_models

    base = dict(in_channels=1, classes=CLASSES, tile=(32, 32), r_base_width=8, r_depth=3,
                d_base_channels=16, d_depth=3, mflm=True, calm=True)

    def parts(mc):
        r, d = build_models(mc)
        return ([m for m in r.modules() if isinstance(m, MFLM)],
                [m for m in d.modules() if isinstance(m, CALM)])

    (mflm,), calms = parts(ModelConfig(**base))
    # the spec's defaults: corner convs k = 3 a border of k + 2d + 1 = 6 apart (dilation 1),
    # 5 heads of 64, reduction 16
    assert mflm.mdc.convs[0].kernel_size == (3, 3) and mflm.mdc.border == 3 + 2 + 1
    assert (mflm.attn.heads, mflm.attn.dim, len(mflm.attn.blocks), mflm.residual) == (5, 64, 1, False)
    assert [c.w1.out_channels for c in calms] == [max(1, c.w1.in_channels // 16) for c in calms]
    opts = {"kernel": 1, "dilation": 2, "heads": 2, "dim": 16, "layers": 2, "residual": True}
    (mflm,), calms = parts(ModelConfig(**base, mflm_options=opts, calm_reduction=4))
    assert mflm.mdc.convs[0].kernel_size == (1, 1) and mflm.mdc.border == 1 + 4 + 1
    assert (mflm.attn.heads, mflm.attn.dim, len(mflm.attn.blocks), mflm.residual) == (2, 16, 2, True)
    assert [c.w1.out_channels for c in calms] == [c.w1.in_channels // 4 for c in calms]
    # a misspelt or impossible value is refused, naming the key
    with pytest.raises(ValidationError, match="mflm_options.kernal"):
        ModelConfig(**base, mflm_options={"kernal": 5})
    with pytest.raises(ValidationError, match="calm_reduction"):
        ModelConfig(**base, calm_reduction=0)


def test_baseline_switch_drops_r_and_feeds_d_the_image(tmp_path):
    torch = pytest.importorskip("torch")
    from export.arcd.torch_model import ARCDInference
    from export.arcd.train import _validate, build_models

    cfg = _validate({"model": {"in_channels": 3, "tile": [64, 64], "r_base_width": 2, "r_depth": 3,
                               "d_base_channels": 2, "d_depth": 3, "reconstruction": False},
                     "stage1": {"steps": 50}, "stage2": {"steps": 1}}, "test")
    assert cfg.stage1.steps == 0  # nothing for stage 1 to train without R
    r, d = build_models(cfg.model)
    assert d.in_channels == 3 and not list(r.parameters())
    x = torch.rand(1, 3, 64, 64)
    rec, probs = ARCDInference(r, d).eval()(x)
    assert torch.equal(rec, x) and probs.shape == (1, 4, 64, 64)
    r2, d2 = build_models(cfg.model.model_copy(update={"reconstruction": True}))
    assert d2.in_channels == 6 and list(r2.parameters())


def test_batches_shard_disjointly_across_ranks():
    pytest.importorskip("torch")
    from export.arcd.train import _batches, _dist_rank_world

    assert _dist_rank_world() == (0, 1)  # plain single process: no process group

    class Idx:
        def __len__(self):
            return 10 ** 6

        def __getitem__(self, i):
            import torch
            return {"i": torch.tensor(i)}

    seen = [[int(v) for b in _batches(Idx(), 3, 1, 4, 0, rank, 2) for v in b["i"]] for rank in (0, 1)]
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == list(range(6, 24))
    single = [int(v) for b in _batches(Idx(), 3, 0, 2, 0) for v in b["i"]]
    assert single == list(range(6))


# ----------------------------------------------------------------------------- train + evaluate

def test_train_export_evaluate_on_a_tiny_neu_folder(tmp_path, capsys):
    """ARCD and the U-Net baseline from one config (R switched off), in process to stay quick;
    the ``inspector evaluate`` command runs once on the result."""
    pytest.importorskip("torch")
    pytest.importorskip("onnx")
    import yaml

    from export.arcd.train import train
    from export.onnx_export import export_bundle

    root = neu_folder(tmp_path / "neu", n=24)
    base = {"name": "tiny", "threads": 1, "log_every": 1,
            "model": {"in_channels": 1, "classes": CLASSES, "tile": [64, 64], "r_base_width": 2,
                      "r_depth": 3, "d_base_channels": 2, "d_depth": 3},
            "data": {"source": "neu-seg", "root": str(root), "calib_images": 2, "normal_patch": 32,
                     "train_crop": [32, 32], "crops_per_frame": 2},
            "stage1": {"steps": 2, "batch_size": 2},
            "stage2": {"steps": 2, "batch_size": 2, "focal_alpha": "balanced", "dice_weight": 1.0},
            "evaluation": {"threshold_candidates": [0.5]}}
    bundles = {}
    for variant, recon in (("arcd", True), ("unet", False)):
        path = tmp_path / f"{variant}.yaml"
        path.write_text(yaml.safe_dump(dict(base, model=dict(base["model"], reconstruction=recon))))
        run = train(path, tmp_path / f"run-{variant}")
        assert (run / "checkpoint.pt").is_file() and (run / "metrics.json").is_file()
        assert (run / "checkpoint-stage1.pt").is_file() == recon
        bundles[variant] = export_bundle(run, tmp_path / f"bundle-{variant}")
        prov = yaml.safe_load((bundles[variant] / "bundle.yaml").read_text())["provenance"]
        assert "real_tiles" in prov["parity"]["max_abs_diff"]
    out = tmp_path / "eval"
    p = run_cli("evaluate", "--bundle", str(bundles["arcd"]), "--data", str(root), "--format",
                "neu-seg", "--split", "all", "--json", "--out", str(out), "--overlays", "4",
                "--threads", "1", timeout=240)
    assert p.returncode == 0, p.stderr[-2000:]
    res = json.loads(p.stdout)
    for key in ("miou", "miou_defects", "mpa", "pixel_auroc", "precision", "recall", "f1"):
        assert key in res
    assert set(res["per_class_iou"]) == set(CLASSES) and 0 <= res["miou"] <= 1
    assert set(res["per_class_auroc"]) == set(CLASSES)  # the thesis's per-class AUC, named
    names = sorted(f.name for f in (out / "overlays").iterdir())
    assert any(n.startswith("worst_01_") for n in names) and any(n.startswith("best_01_") for n in names)

    # --engine torch: the run's checkpoint in torch scores the same as the graph on ONNX Runtime
    import torch

    from inspector.cli import main as cli_main

    args = ["evaluate", "--bundle", str(bundles["arcd"]), "--data", str(root), "--format", "neu-seg",
            "--split", "all", "--json"]
    assert cli_main(args + ["--engine", "torch", "--torch-device", "cpu"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["engine"].startswith("torch-eager:cpu:fp32") and "checkpoint" in got["engine"]
    assert res["engine"].startswith("onnxruntime:CPUExecutionProvider")
    for key in ("miou", "mpa", "pixel_auroc", "f1"):
        assert got[key] == pytest.approx(res[key], abs=2e-3), key
    # a checkpoint that is not the exported one (changed after the export) is refused, one line
    ck = torch.load(tmp_path / "run-arcd" / "checkpoint.pt", weights_only=True)
    ck["discrimination"]["final.bias"][1] += 5.0
    torch.save(ck, tmp_path / "changed.pt")
    assert cli_main(args + ["--engine", "torch", "--torch-device", "cpu",
                            "--checkpoint", str(tmp_path / "changed.pt")]) == 2
    err = capsys.readouterr().err
    assert "differs from the graph" in err and "changed.pt" in err and "Traceback" not in err
    # another network's checkpoint (the U-Net baseline has no R) and a missing one: named
    assert cli_main(args + ["--engine", "torch", "--torch-device", "cpu",
                            "--checkpoint", str(tmp_path / "run-unet" / "checkpoint.pt")]) == 2
    assert "not a checkpoint of" in capsys.readouterr().err
    assert cli_main(args + ["--engine", "torch", "--checkpoint", str(tmp_path / "nope.pt")]) == 2
    assert "nope.pt" in capsys.readouterr().err
    if not torch.cuda.is_available():  # a GPU asked for where torch has none: named, no traceback
        assert cli_main(args + ["--engine", "torch", "--torch-device", "cuda"]) == 2
        assert "sees no CUDA GPU" in capsys.readouterr().err
    assert cli_main(args + ["--engine", "torch", "--torch-device", "gpu0"]) == 2
    assert "torch device 'gpu0'" in capsys.readouterr().err
    # the torch options without --engine torch are a mistake, not ignored
    assert cli_main(args + ["--checkpoint", str(tmp_path / "changed.pt")]) == 2
    assert "--engine torch only" in capsys.readouterr().err


def test_sigterm_saves_a_checkpoint_that_resumes(tmp_path):
    """`kill` (SIGTERM) stops a run started in the background of a script (SIGINT ignored there)
    the way Ctrl-C does: a checkpoint of the step reached, exit 130, and --resume goes on from
    that step."""
    pytest.importorskip("torch")
    import torch
    import yaml

    root = neu_folder(tmp_path / "neu", n=8)
    cfg = {"name": "term", "threads": 1, "log_every": 1, "checkpoint_every": 10 ** 6,
           "model": {"in_channels": 1, "classes": CLASSES, "tile": [64, 64], "r_base_width": 2,
                     "r_depth": 3, "d_base_channels": 2, "d_depth": 3},
           "data": {"source": "neu-seg", "root": str(root), "calib_images": 2, "val_images": 2,
                    "normal_patch": 32, "train_crop": [32, 32]},
           "stage1": {"steps": 2, "batch_size": 2},
           "stage2": {"steps": 100000, "batch_size": 2},
           "evaluation": {"threshold_candidates": [0.5]}}
    path = write_config(tmp_path / "term.yaml", cfg)
    run = tmp_path / "run"
    rc, err = sigterm_when(["inspector", "train", "arcd", "--config", str(path), "--run-dir", str(run)],
                           tmp_path / "train.log", r"stage 2 step [3-9]/")
    assert rc == 130, err[-2000:]
    assert "signal SIGTERM" in err and "continue with --resume" in err and "Traceback" not in err
    saved = re.search(r"interrupted at stage 2 step (\d+); checkpoint saved", err)
    assert saved, err[-2000:]
    step = int(saved.group(1))
    ck = torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=False)
    assert (ck["stage"], ck["step"], ck["done"]) == (2, step, False)
    # the resumed run starts at that step and finishes the (now shorter) stage 2
    cfg["stage2"]["steps"] = step + 2
    write_config(path, cfg)
    p = run_cli("train", "arcd", "--config", str(path), "--run-dir", str(run), "--resume")
    assert p.returncode == 0, p.stderr[-2000:]
    assert f"from step {step})" in p.stderr and f"stage 2 step {step + 2}/{step + 2}" in p.stderr
    assert yaml.safe_load((run / "config.yaml").read_text())["stage2"]["steps"] == step + 2


def test_evaluate_a_probability_bundle_on_a_fixture_set(tmp_path, toy_bundle):
    """The hand-built dark-spot graph marks dark pixels as class 1: on the fixture the class-1
    IoU is high, classes 2/3 are never predicted, and the figures follow from the confusion."""
    from inspector.evaluation.evaluate import evaluate_bundle

    root = neu_folder(tmp_path / "neu", n=6, size=128, n_classes=1)
    res = evaluate_bundle(toy_bundle, open_dataset("neu-seg", root), out_dir=tmp_path / "ev", overlays=2)
    cm = np.asarray(res["confusion"])
    assert cm.shape == (4, 4) and cm.sum() == 6 * 128 * 128
    assert res["miou"] == pytest.approx(class_scores(cm)["miou"])
    assert res["per_class_iou"]["inclusion"] > 0.5
    assert cm[:, 2:].sum() == 0  # the toy graph never predicts patches or scratches
    assert res["pixel_auroc"] > 0.8
    assert sorted(f.name[:5] for f in (tmp_path / "ev" / "overlays").iterdir()) == ["best_", "worst"]


# ----------------------------------------------------------------------------- shared data

@pytest.mark.skipif(not NEU.is_dir(), reason=f"NEU-Seg not found at {NEU} (../shared/data absent)")
def test_shared_neu_seg_split_and_defect_free_windows():
    from export.arcd.data import DatasetFrames, DefectFreePatches

    val = open_dataset("neu-seg", NEU, split="val")
    train = open_dataset("neu-seg", NEU, split="train")
    assert len(val) > 500 and not {e.stem for e in val.entries} & {e.stem for e in train.entries}
    patches = DefectFreePatches(DatasetFrames(train, channels=1), 64)
    rng = np.random.default_rng(0)
    for _ in range(5):
        assert patches.normal(rng).shape[:2] == (64, 64)


@pytest.mark.skipif(not (SHARED_DATA / "magnetic_tile").is_dir(),
                    reason=f"magnetic tiles not found at {SHARED_DATA / 'magnetic_tile'}")
def test_shared_magnetic_tile_source_with_mt_free_normals():
    pytest.importorskip("torch")
    from export.arcd.data import FolderDataConfig, build_data
    from export.arcd.simulation import SimulationConfig

    cfg = FolderDataConfig(source="magnetic-tile", root=str(SHARED_DATA / "magnetic_tile"),
                           normal_source="mt-free", frame_size=(128, 128), calib_images=1,
                           val_images=2)
    data = build_data(cfg, tile=(64, 64), channels=1, mean=[0.0], std=[1.0],
                      simulation=SimulationConfig(), stage1_length=2, stage2_length=2, seed=0)
    assert tuple(data.stage1[0]["image"].shape) == (1, 64, 64)
    assert int(data.stage2[0]["mask"].max()) < len(data.class_names)
    assert len(data.val()) == 2


@pytest.mark.skipif(not NEU.is_dir(), reason=f"NEU-Seg not found at {NEU} (../shared/data absent)")
@pytest.mark.parametrize("name", ["arcd-neu", "unet-neu"])
def test_shipped_neu_bundles_segment_held_out_images(name):
    """The shipped pair (ARCD and its plain U-Net baseline) runs on the runtime path and finds
    the defects of held-out images; the val figures the README quotes are in its provenance."""
    from inspector.bundle import load_bundle
    from inspector.evaluation.evaluate import evaluate_bundle

    path = Path(__file__).resolve().parents[1] / "deploy" / "models" / name
    spec = load_bundle(path).spec
    recorded = spec.provenance["metrics"]["neu-seg/val"]
    assert recorded["images"] == 699 and 0.75 < recorded["miou"] < 0.85
    val = open_dataset("neu-seg", NEU, split="val")
    # 48: the first 24 hold inclusions only, where one stray scratch pixel makes that class's IoU
    # 0 and halves a 3-class MIoU
    val.entries = val.entries[:48]
    res = evaluate_bundle(path, val)
    assert res["miou"] > 0.6 and res["pixel_auroc"] > 0.95, res


@pytest.mark.parametrize("name", ["arcd-neu", "unet-neu", "demo-arcd"])
def test_shipped_arcd_bundles_say_stage_1_only_where_an_r_trained(name):
    """A user comparing the shipped pair reads in provenance what each learnt from: the plain
    U-Net (no R, zero stage-1 steps) must not claim a stage 1 of simulated anomalies."""
    from inspector.bundle import load_bundle

    prov = load_bundle(Path(__file__).resolve().parents[1] / "deploy" / "models" / name).spec.provenance
    tc = prov["training_config"]
    has_r = tc["model"].get("reconstruction", True) and tc["stage1"]["steps"] > 0
    for text in (prov["data"], prov["metrics"]["data"]):
        stage1 = text.split("stage 1", 1)[1]
        assert ("simulated anomalies" in stage1) == bool(has_r), text


def test_evaluate_engine_torch_without_torch_says_what_to_install(tmp_path, toy_bundle):
    """A line PC has the runtime only: --engine torch there is one line naming the extra, and the
    default engine still runs (torch made unimportable by a shadowing module)."""
    import os

    root = neu_folder(tmp_path / "neu", n=4)
    (tmp_path / "shadow").mkdir()
    (tmp_path / "shadow" / "torch.py").write_text("raise ImportError('No module named torch')\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path / "shadow"), os.environ.get("PYTHONPATH", "")]))
    args = ("evaluate", "--bundle", str(toy_bundle), "--data", str(root), "--format", "neu-seg",
            "--split", "all", "--json")
    p = run_cli(*args, "--engine", "torch", env=env)
    assert p.returncode == 2, p.stderr[-2000:]
    assert "needs the training extra" in p.stderr and "Traceback" not in p.stderr
    p = run_cli(*args, env=env)
    assert p.returncode == 0, p.stderr[-2000:]
    assert json.loads(p.stdout)["engine"].startswith("onnxruntime:")
