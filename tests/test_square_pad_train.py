"""The thesis's square pad-and-resize as a training option (``data.square_pad``, spec §2.2): the
images, masks, region labels and valid region it gives, what it keeps out of stage 1 and the
scores, the config errors, and a tiny run exported to a bundle that runs frames the same way.
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from conftest import run_cli

pytest.importorskip("torch")
yaml = pytest.importorskip("yaml")

CLASSES = ["background", "inclusion", "patches", "scratches"]


def wide_folder(root: Path, n: int = 16, h: int = 48, w: int = 128, seed: int = 0) -> Path:
    """NEU-Seg layout with non-square 48x128 images: a dark class-(i % 3 + 1) spot near the
    right end, a bright region band in the left quarter."""
    rng = np.random.default_rng(seed)
    for sub in ("images", "annotations", "regions"):
        (root / sub / "training").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        img = rng.integers(110, 150, (h, w), dtype=np.uint8)
        mask = np.zeros((h, w), np.uint8)
        mask[20:30, 100:116] = i % 3 + 1
        img[mask > 0] = 30
        region = np.zeros((h, w), np.uint8)
        region[:, :32] = 1
        stem = f"{i:06d}"
        cv2.imwrite(str(root / "images" / "training" / f"{stem}.png"), img)
        cv2.imwrite(str(root / "annotations" / "training" / f"{stem}.png"), mask)
        cv2.imwrite(str(root / "regions" / "training" / f"{stem}.png"), region * 255)
    return root


@pytest.mark.parametrize("align", ["top", "center"])
def test_square_pad_gives_the_runtime_image_and_aligned_labels(align):
    from export.arcd.data import SquarePad
    from export.arcd.simulation import square_pad_resize

    img = np.random.default_rng(1).integers(0, 255, (48, 128), dtype=np.uint8)
    mask = np.zeros((48, 128), np.uint8)
    mask[20:30, 100:116] = 2
    region = np.zeros((48, 128), np.uint8)
    region[:, :32] = 1
    out, m, r, valid = SquarePad(64, align).apply(img, mask, region)
    want, want_valid = square_pad_resize(img, 64, align)
    np.testing.assert_array_equal(out, want)
    np.testing.assert_array_equal(valid, want_valid)
    assert out.shape == m.shape == r.shape == valid.shape == (64, 64)
    # 128 -> 64: half scale; top puts the image at row 0, center at row (128 - 48) // 2 = 40 -> 20
    top = 0 if align == "top" else 20
    assert valid[top:top + 24].all() and valid.sum() == 24 * 64
    ys, xs = np.nonzero(m == 2)
    assert (ys.min(), ys.max(), xs.min(), xs.max()) == (top + 10, top + 14, 50, 57)
    assert set(np.unique(m[~valid])) == {0}  # padding is background, left out by ``valid``
    assert set(np.unique(r[~valid])) == {255}  # and ignored by the region's loss and score
    assert r[valid].reshape(24, 64)[:, :16].all() and not r[valid].reshape(24, 64)[:, 16:].any()


def test_stage1_windows_stay_inside_the_image(tmp_path):
    from export.arcd.data import DatasetFrames, DefectFreePatches, SquarePad
    from inspector.evaluation.datasets import open_dataset

    root = wide_folder(tmp_path / "neu", n=4)
    ds = open_dataset("neu-seg", str(root), split="all")
    frames = DatasetFrames(ds, 1, SquarePad(64, "top"))
    f = frames.frame(0)
    assert f.valid is not None and f.valid[:24].all() and not f.valid[24:].any()
    patches = DefectFreePatches(frames, 16, stride=4)
    rng = np.random.default_rng(0)
    for _ in range(50):
        win = patches.normal(rng)
        # the padding is zeros; the image is 110-150 (a resampled edge stays well above 0)
        assert win.shape == (16, 16) and win.min() > 60, win.min()


def test_config_errors_name_the_keys(tmp_path):
    from pydantic import ValidationError

    from export.arcd.train import TrainConfig

    base = {"model": {"in_channels": 1, "classes": CLASSES, "tile": [64, 64], "r_base_width": 2,
                      "r_depth": 3, "d_base_channels": 2, "d_depth": 3},
            "data": {"source": "neu-seg", "root": str(tmp_path), "square_pad": "top"}}
    cfg = TrainConfig.model_validate(base)
    assert cfg.data.square_side == 64  # filled from model.tile
    bad = [({"model": {**base["model"], "tile": [64, 128]}}, "square model.tile"),
           ({"data": {**base["data"], "frame_size": [64, 64]}}, "square_pad and frame_size"),
           ({"data": {**base["data"], "square_side": 128}}, "must equal model.tile"),
           ({"data": {**base["data"], "train_crop": [128, 128]}}, "larger than the padded square"),
           ({"data": {**base["data"], "square_pad": "bottom"}}, "square_pad")]
    for change, words in bad:
        with pytest.raises(ValidationError, match=words):
            TrainConfig.model_validate({**base, **change})


def test_a_square_padded_run_exports_a_bundle_that_pads_frames_too(tmp_path):
    pytest.importorskip("onnx")
    from inspector.bundle import InputSpec

    if "fit" not in InputSpec.model_fields:
        pytest.skip("the runtime's input.fit is not in this version")
    from export.arcd.train import train
    from export.onnx_export import export_bundle

    root = wide_folder(tmp_path / "neu")
    cfg = {"name": "tiny-square", "threads": 1, "log_every": 5,
           "model": {"in_channels": 1, "classes": CLASSES, "tile": [64, 64], "r_base_width": 2,
                     "r_depth": 3, "d_base_channels": 4, "d_depth": 3, "region_head": True},
           "data": {"source": "neu-seg", "root": str(root), "calib_images": 2, "normal_patch": 16,
                    "square_pad": "center"},
           "stage1": {"steps": 2, "batch_size": 2},
           "stage2": {"steps": 4, "batch_size": 2, "lr": 0.01},
           "evaluation": {"threshold_candidates": [0.5]}}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    run = train(path, tmp_path / "run")
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["validation"]["frames"] > 0
    bundle = export_bundle(run, tmp_path / "bundle")
    spec = yaml.safe_load((bundle / "bundle.yaml").read_text())
    assert spec["input"]["fit"] == "square_pad" and spec["input"]["pad_align"] == "center"
    p = run_cli("evaluate", "--bundle", str(bundle), "--data", str(root), "--format", "neu-seg",
                "--split", "all", "--json", "--threads", "1", timeout=240)
    assert p.returncode == 0, p.stderr[-2000:]
    res = json.loads(p.stdout)
    assert res["images"] == 16 and res["region"]["images"] == 16


def test_stage1_on_a_folder_of_normal_images_puts_no_anomaly_in_the_pad(tmp_path):
    """With whole normal images as stage 1's source (``normal_source: folder`` or ``mt-free``),
    the square pad's zeros must stay outside the simulated anomalies, as with defect-free
    windows (the frames' valid region travels into the simulator)."""
    from export.arcd.data import FolderDataConfig, build_data
    from export.arcd.simulation import SimulationConfig

    root = wide_folder(tmp_path / "neu", n=16)
    normals = tmp_path / "normals"
    normals.mkdir()
    rng = np.random.default_rng(3)
    for i in range(4):
        cv2.imwrite(str(normals / f"n{i}.png"), rng.integers(110, 150, (48, 128), dtype=np.uint8))
    cfg = FolderDataConfig(source="neu-seg", root=str(root), normal_source="folder",
                           normal_root=str(normals), square_pad="top", square_side=64,
                           calib_images=1)
    data = build_data(cfg, tile=(64, 64), channels=1, mean=[0.0], std=[1.0],
                      simulation=SimulationConfig(clean_prob=0.0), stage1_length=8,
                      stage2_length=2, seed=0)
    inside = 0
    for i in range(8):
        item = data.stage1[i]
        m = item["anomaly_mask"][0].numpy()
        # valid rows: 48 * 64 / 128 = 24 of 64, at the top (or the bottom after a vertical flip)
        rows = np.nonzero((item["target"][0].numpy() > 0.2).any(1))[0]
        assert len(rows) == 24
        pad = np.ones(64, bool)
        pad[rows] = False
        assert m[pad].sum() == 0, i
        inside += m[~pad].sum()
    assert inside > 0  # anomalies were simulated, inside the image


@pytest.mark.parametrize("align", ["top", "center"])
def test_a_colour_file_on_a_grey_model_gives_training_the_runtime_pixels(tmp_path, align):
    """Colour files on a grey model: the runtime converts to grey (rounded BT.601) before it pads
    and resizes; training does the same, so the two see the very same pixels (converting after
    the resize differed by up to 1.4 grey levels)."""
    from export.arcd.data import DatasetFrames, SquarePad
    from inspector.bundle import load_bundle
    from inspector.engines.onnxruntime import OnnxRuntimeConfig, OnnxRuntimeEngine
    from inspector.evaluation.datasets import open_dataset
    from inspector.models import make_adapter
    from toy_models import square_pad_bundle

    root = wide_folder(tmp_path / "neu", n=1)
    colour = np.random.default_rng(7).integers(0, 256, (47, 129, 3), dtype=np.uint8)
    (root / "annotations" / "training" / "000000.png").unlink()
    cv2.imwrite(str(root / "images" / "training" / "000000.png"), colour)
    cv2.imwrite(str(root / "annotations" / "training" / "000000.png"), np.zeros((47, 129), np.uint8))
    (root / "regions" / "training" / "000000.png").unlink()
    (root / "regions").rename(tmp_path / "no-regions")
    ds = open_dataset("neu-seg", str(root), split="all")
    frame = DatasetFrames(ds, 1, SquarePad(64, align)).frame(0)
    bundle = load_bundle(square_pad_bundle(tmp_path / "b", tile=64, align=align))
    engine = OnnxRuntimeEngine(bundle.graph_path("model"), OnnxRuntimeConfig(providers=["cpu"]))
    try:
        fed = make_adapter(bundle, engine).square_input(ds.load(0).image)[0]
    finally:
        engine.close()
    np.testing.assert_array_equal(frame.image, fed[:, :, 0])
