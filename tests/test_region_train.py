"""ARCD's machine-region head (spec §2.4, §2.5; issue #3 item 2) from training to the bundle:
the fused module's third output, stage 2 learning the region beside the defects, the training
run's region threshold and Table 3.3 figures, the export's parity on the region output and the
bundle's ``region`` key, ``inspector evaluate``'s region block, and the config errors.

The fixture is a tiny NEU-Seg-layout folder whose images hold a bright "machine" band (the
region, written to ``regions/training/``) and dark defects that overlap it.
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from conftest import run_cli

torch = pytest.importorskip("torch")
yaml = pytest.importorskip("yaml")

CLASSES = ["background", "inclusion", "patches", "scratches"]
BAND = slice(0, 24)  # the region: the left 24 columns


def region_folder(root: Path, n: int = 24, size: int = 64, seed: int = 0,
                  regions: bool = True) -> Path:
    """NEU-Seg layout with region labels: a bright band in the left columns is the region; a
    dark defect of class i % 3 + 1 in the top rows straddles the band's edge (defect and region
    overlap, as the thesis's fold and machine region do)."""
    rng = np.random.default_rng(seed)
    for sub in ("images", "annotations") + (("regions",) if regions else ()):
        (root / sub / "training").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        img = rng.integers(110, 150, (size, size), dtype=np.uint8)
        region = np.zeros((size, size), np.uint8)
        region[:, BAND] = 1
        img[region > 0] = rng.integers(190, 230, int(region.sum()), dtype=np.uint8)
        mask = np.zeros((size, size), np.uint8)
        mask[4:14, 8:40] = i % 3 + 1
        img[mask > 0] = 30
        stem = f"{i:06d}"
        cv2.imwrite(str(root / "images" / "training" / f"{stem}.jpg"), np.repeat(img[:, :, None], 3, 2))
        cv2.imwrite(str(root / "annotations" / "training" / f"{stem}.png"), mask)
        if regions:
            cv2.imwrite(str(root / "regions" / "training" / f"{stem}.png"), region * 255)
    return root


def tiny_config(root: Path, **model) -> dict:
    return {"name": "tiny-region", "threads": 1, "log_every": 5,
            "model": {"in_channels": 1, "classes": CLASSES, "tile": [64, 64], "r_base_width": 2,
                      "r_depth": 3, "d_base_channels": 4, "d_depth": 3, "region_head": True,
                      "region_name": "mill housing", **model},
            "data": {"source": "neu-seg", "root": str(root), "calib_images": 3, "normal_patch": 32,
                     "train_crop": [64, 64], "crops_per_frame": 1},
            "stage1": {"steps": 2, "batch_size": 2},
            "stage2": {"steps": 60, "batch_size": 4, "lr": 0.01, "focal_alpha": "balanced"},
            "evaluation": {"threshold_candidates": [0.3, 0.5, 0.7]}}


def write(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_fused_module_returns_the_region_from_its_own_softmax():
    from export.arcd.train import ModelConfig, build_models
    from export.arcd.torch_model import ARCDInference, split_region_logits

    mc = ModelConfig(in_channels=1, classes=CLASSES, tile=(32, 32), r_base_width=2, r_depth=3,
                     d_base_channels=2, d_depth=3, region_head=True)
    r, d = build_models(mc)
    assert mc.d_outputs() == len(CLASSES) + 2
    model = ARCDInference(r, d, region_head=True).eval()
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        rec, probs, region = model(x)
        logits = d(torch.cat([r(x), x], 1))
    assert rec.shape == (2, 1, 32, 32) and probs.shape == (2, 4, 32, 32) and region.shape == (2, 1, 32, 32)
    # the defect head's softmax ignores the region channels, and the region is p(channel K+1)
    defects, reg = split_region_logits(logits)
    torch.testing.assert_close(probs, torch.softmax(defects, 1), atol=1e-6, rtol=0)
    torch.testing.assert_close(region, torch.softmax(reg, 1)[:, 1:2], atol=1e-6, rtol=0)
    # without the head: two outputs, K channels, as before
    r2, d2 = build_models(ModelConfig(**{**mc.model_dump(), "region_head": False}))
    assert len(ARCDInference(r2, d2).eval()(x)) == 2


def test_train_export_evaluate_and_run_with_a_region_head(tmp_path, capsys):
    pytest.importorskip("onnx")
    from export.arcd.train import train
    from export.onnx_export import export_bundle
    from inspector.bundle import load_bundle
    from inspector.engines.onnxruntime import OnnxRuntimeConfig, OnnxRuntimeEngine
    from inspector.models import make_adapter

    root = region_folder(tmp_path / "neu")
    run = train(write(tmp_path / "cfg.yaml", tiny_config(root)), tmp_path / "run")
    metrics = json.loads((run / "metrics.json").read_text())
    reg = metrics["validation"]["region"]
    assert reg["name"] == "mill housing" and reg["threshold"] in (0.3, 0.5, 0.7)
    assert reg["frames"] > 0 and reg["calibration_frames"] == 3
    # the band is an easy target: stage 2 learnt it (a head left at its start scores p = 0.5
    # everywhere, so every pixel or none is region: IoU 24 / 64 = 0.375 or 0)
    assert reg["iou"] > 0.8 and reg["miou"] > 0.8 and reg["mpa"] > 0.85, reg
    # the logged stage-2 lines carry the region's loss; the last is below the first
    hist = metrics["stage2"]
    assert hist["final_loss"] < hist["first_loss"]

    bundle_dir = export_bundle(run, tmp_path / "bundle")
    spec = yaml.safe_load((bundle_dir / "bundle.yaml").read_text())
    assert spec["outputs"]["region"] == "region"
    assert spec["region"] == {"name": "mill housing", "threshold": reg["threshold"]}
    parity = spec["provenance"]["parity"]["max_abs_diff"]
    assert all("region" in v and v["region"] <= 1e-4 for v in parity.values()), parity

    # the runtime runs it on a frame wider than a tile: the region map is in frame coordinates
    bundle = load_bundle(bundle_dir)
    engine = OnnxRuntimeEngine(bundle.graph_path("model"), OnnxRuntimeConfig(providers=["cpu"]))
    try:
        adapter = make_adapter(bundle, engine)
        frame = np.full((64, 160), 130, np.uint8)
        frame[:, 100:140] = 210  # the band moved: the head follows the brightness, not a position
        out = adapter.infer(frame)
        assert out.region is not None and out.region.shape == (64, 160)
        inside = out.region[:, 104:136] >= reg["threshold"]
        outside = out.region[:, 30:90] >= reg["threshold"]
        assert inside.mean() > 0.8 and outside.mean() < 0.2
        if out.release:
            out.release()
    finally:
        engine.close()

    p = run_cli("evaluate", "--bundle", str(bundle_dir), "--data", str(root), "--format", "neu-seg",
                "--split", "all", "--json", "--threads", "1", timeout=240)
    assert p.returncode == 0, p.stderr[-2000:]
    res = json.loads(p.stdout)
    assert res["region"]["name"] == "mill housing" and res["region"]["images"] == 24
    for key in ("mpa", "miou", "iou", "auroc"):
        assert 0.8 < res["region"][key] <= 1.0, (key, res["region"])
    # the plain-text summary names the region and its figures
    p = run_cli("evaluate", "--bundle", str(bundle_dir), "--data", str(root), "--format", "neu-seg",
                "--split", "all", "--threads", "1", timeout=240)
    assert p.returncode == 0, p.stderr[-2000:]
    line = next(l for l in p.stdout.splitlines() if l.strip().startswith("region:"))
    assert "mill housing" in line and f"miou {res['region']['miou']:.4f}" in line


def test_region_head_without_region_labels_is_refused_before_anything_is_written(tmp_path):
    from export.arcd.train import train
    from inspector.errors import ConfigError

    root = region_folder(tmp_path / "neu", n=8, regions=False)
    with pytest.raises(ConfigError) as e:
        train(write(tmp_path / "cfg.yaml", tiny_config(root)), tmp_path / "run")
    assert "model.region_head" in str(e.value) and "regions/" in str(e.value)
    assert "cfg.yaml" in str(e.value)
    assert not (tmp_path / "run").exists()
    # the synthetic strip has no region labels either
    cfg = tiny_config(root)
    cfg["data"] = {"source": "synthetic"}
    with pytest.raises(ConfigError, match="model.region_head"):
        train(write(tmp_path / "syn.yaml", cfg), tmp_path / "run2")


def test_resuming_with_the_region_head_switched_is_refused(tmp_path):
    from export.arcd.train import train
    from inspector.errors import ConfigError

    root = region_folder(tmp_path / "neu", n=8)
    cfg = tiny_config(root)
    cfg["stage2"]["steps"] = 2
    # without calibration frames the region takes the default threshold, as the defects do
    cfg["data"]["calib_images"] = 0
    cfg["evaluation"]["default_threshold"] = 0.7
    run = train(write(tmp_path / "cfg.yaml", cfg), tmp_path / "run")
    assert json.loads((run / "metrics.json").read_text())["validation"]["region"]["threshold"] == 0.7
    cfg["model"]["region_head"] = False
    with pytest.raises(ConfigError, match="region_head"):
        train(write(tmp_path / "cfg2.yaml", cfg), run, resume=True)


def test_region_threshold_on_frames_without_region_predicts_none():
    """Frames with no region at all (a camera angle away from the mill housing): the threshold
    that predicts no region is right there; ranking by the region's IoU would pick the one with
    the most false region (every candidate that predicts some scores IoU 0)."""
    from export.arcd.evaluate import choose_region_threshold, region_confusion, region_scores

    p = np.full((16, 16), 0.1, np.float32)
    p[:, :8] = 0.6
    truth = np.zeros((16, 16), np.uint8)
    thr, best = choose_region_threshold([p], [truth], [0.3, 0.5, 0.7, 0.9])
    assert thr == 0.7 and best == 1.0
    assert region_scores(region_confusion([p], [truth], thr)) == {"mpa": 1.0, "miou": 1.0, "iou": None}
    # with a region present the best MIoU is the threshold that cuts it out exactly
    truth[:, :8] = 1
    assert choose_region_threshold([p], [truth], [0.05, 0.5, 0.7])[0] == 0.5
