"""A square-pad run (``data.square_pad``) chooses its thresholds and scores its validation
frames as its bundle runs them: each NATIVE frame padded to a square, resized to the tile, run as
one input and its outputs resized back and cropped (``input.fit: square_pad``), not the padded,
resized squares training sees. Tiled runs are scored as before.
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

torch = pytest.importorskip("torch")
yaml = pytest.importorskip("yaml")

from test_square_pad_train import CLASSES, wide_folder  # noqa: E402


def tiny_config(root: Path, square_pad: str) -> dict:
    return {"name": f"tiny-{square_pad}", "threads": 1, "log_every": 5,
            "model": {"in_channels": 1, "classes": CLASSES, "tile": [64, 64], "r_base_width": 2,
                      "r_depth": 3, "d_base_channels": 4, "d_depth": 3, "region_head": True},
            "data": {"source": "neu-seg", "root": str(root), "calib_images": 2, "normal_patch": 16,
                     "square_pad": square_pad},
            "stage1": {"steps": 2, "batch_size": 2},
            "stage2": {"steps": 6, "batch_size": 2, "lr": 0.01},
            "evaluation": {"threshold_candidates": [0.2, 0.35, 0.5, 0.65, 0.8]}}


def train_tiny(tmp_path: Path, square_pad: str, root: Path | None = None) -> Path:
    from export.arcd.train import train

    root = root or wide_folder(tmp_path / "neu")
    path = tmp_path / f"cfg-{square_pad}.yaml"
    path.write_text(yaml.safe_dump(tiny_config(root, square_pad)))
    return train(path, tmp_path / f"run-{square_pad}")


def load_model(run: Path):
    """The run's networks as the exporter loads them, and the run's config."""
    from export.arcd.torch_model import ARCDInference
    from export.arcd.train import CHECKPOINT, TrainConfig, build_models, load_checkpoint

    ck = load_checkpoint(run / CHECKPOINT)
    cfg = TrainConfig.model_validate(ck["config"])
    r, d = build_models(cfg.model)
    r.load_state_dict(ck["reconstruction"])
    d.load_state_dict(ck["discrimination"])
    if cfg.channels_last:
        # the trainer's memory format, so the figures below are bit for bit the trainer's
        r.to(memory_format=torch.channels_last)
        d.to(memory_format=torch.channels_last)
    return ARCDInference(r, d, region_head=cfg.model.region_head).eval(), cfg


def native_predictions(model, cfg, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(class probabilities, p(region)) of one native frame, the trainer's way."""
    from export.arcd.evaluate import predict_frame

    mc, ec = cfg.model, cfg.evaluation
    fit = {"fit": "square_pad", "pad_align": cfg.data.square_pad}
    probs = predict_frame(model, image, mc.tile, ec.overlap, mc.in_channels, mc.mean, mc.std, **fit)
    region = predict_frame(model, image, mc.tile, ec.overlap, mc.in_channels, mc.mean, mc.std,
                           output=2, **fit)[0]
    return probs, region


def frames_of_every_kind(root: Path) -> list[np.ndarray]:
    """Native frames the line could send: the data set's own wide grey ones, a colour frame of
    odd size (grey model: the runtime rounds its luma before the pad), a tall frame (the pad
    goes left/right) and a square one (no pad)."""
    rng = np.random.default_rng(11)
    files = sorted((root / "images" / "training").glob("*.png"))[:2]
    frames = [cv2.imread(str(f), cv2.IMREAD_GRAYSCALE) for f in files]
    colour = rng.integers(0, 256, (47, 129, 3), dtype=np.uint8)
    tall = rng.integers(90, 160, (101, 37), dtype=np.uint8)
    tall[40:50, 10:20] = 20
    square = rng.integers(90, 160, (80, 80), dtype=np.uint8)
    return frames + [colour, tall, square]


@pytest.mark.parametrize("align", ["top", "center"])
def test_native_prediction_is_the_exported_bundles_runtime_output(tmp_path, align):
    """``predict_frame(fit="square_pad")`` on a native frame gives the maps the runtime gives for
    the exported bundle (ONNX Runtime, the arcd adapter): class probabilities and p(region)."""
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from export.onnx_export import export_bundle
    from inspector.bundle import load_bundle
    from inspector.engines.onnxruntime import OnnxRuntimeConfig, OnnxRuntimeEngine
    from inspector.models import make_adapter

    root = wide_folder(tmp_path / "neu")
    run = train_tiny(tmp_path, align, root)
    bundle = load_bundle(export_bundle(run, tmp_path / "bundle"))
    assert bundle.spec.input.fit == "square_pad" and bundle.spec.input.pad_align == align
    model, cfg = load_model(run)
    engine = OnnxRuntimeEngine(bundle.graph_path("model"), OnnxRuntimeConfig(providers=["cpu"]))
    try:
        adapter = make_adapter(bundle, engine)
        for image in frames_of_every_kind(root):
            out = adapter.infer(image)
            want_probs, want_region = np.array(out.probs), np.array(out.region)
            if out.release is not None:
                out.release()
            probs, region = native_predictions(model, cfg, image)
            assert probs.shape == want_probs.shape == (len(CLASSES),) + image.shape[:2]
            assert region.shape == want_region.shape == image.shape[:2]
            np.testing.assert_allclose(probs, want_probs, atol=1e-4, rtol=0)
            np.testing.assert_allclose(region, want_region, atol=1e-4, rtol=0)
    finally:
        engine.close()


def test_a_square_pad_run_chooses_and_scores_on_native_frames(tmp_path):
    """metrics.json says so (``validation.scored_on: native``), its held-out frames are the
    native images (no pad, so no valid mask), and its thresholds, region threshold and figures
    are those chosen and measured on native predictions."""
    from export.arcd.evaluate import (choose_region_threshold, choose_thresholds, evaluate,
                                      region_confusion, region_scores)
    from export.arcd.train import training_data

    run = train_tiny(tmp_path, "center")
    metrics = json.loads((run / "metrics.json").read_text())
    val = metrics["validation"]
    assert val["scored_on"] == "native"
    model, cfg = load_model(run)
    ec = cfg.evaluation
    data = training_data(cfg)
    assert data.square_fit is not None and data.square_fit.align == "center"
    calib, frames = data.calib(), data.val()
    assert len(calib) == val["calibration_frames"] == 2 and len(frames) == val["frames"] > 0
    for f in calib + frames:
        assert f.image.shape == f.truth.shape == f.region.shape == (48, 128) and f.valid is None

    cal = [native_predictions(model, cfg, f.image) for f in calib]
    g, per, _ = choose_thresholds([p for p, _ in cal], [f.truth for f in calib],
                                  ec.threshold_candidates, ec.per_class_thresholds,
                                  ec.open_kernel, ec.close_kernel, [f.valid for f in calib])
    assert val["global_threshold"] == g
    # metrics.json keeps them as evaluate() records them (float32)
    assert val["thresholds"] == pytest.approx(dict(zip(CLASSES[1:], per)), abs=1e-6)
    region_thr, _ = choose_region_threshold([r for _, r in cal], [f.region for f in calib],
                                            ec.threshold_candidates)
    assert val["region"]["threshold"] == region_thr

    vp = [native_predictions(model, cfg, f.image) for f in frames]
    res = evaluate([p for p, _ in vp], frames, CLASSES, per, ec.open_kernel, ec.close_kernel)
    assert val["iou"] == res.iou and val["pixel_accuracy"] == res.pixel_accuracy
    assert val["thresholds"] == res.thresholds
    want = region_scores(region_confusion([r for _, r in vp], [f.region for f in frames],
                                          region_thr))
    assert {k: val["region"][k] for k in want} == want


def test_a_tiled_run_is_scored_as_before(tmp_path):
    """square_pad none: the held-out frames and the tiled prediction are untouched and
    metrics.json has no ``scored_on`` (tiled runs always scored native frames, tiled)."""
    from export.arcd.evaluate import choose_thresholds, evaluate, predict_frame
    from export.arcd.train import training_data

    run = train_tiny(tmp_path, "none")
    val = json.loads((run / "metrics.json").read_text())["validation"]
    assert "scored_on" not in val
    model, cfg = load_model(run)
    mc, ec = cfg.model, cfg.evaluation
    data = training_data(cfg)
    assert data.square_fit is None

    def probs_of(frames):
        return [predict_frame(model, f.image, mc.tile, ec.overlap, mc.in_channels, mc.mean,
                              mc.std) for f in frames]

    calib, frames = data.calib(), data.val()
    g, per, _ = choose_thresholds(probs_of(calib), [f.truth for f in calib],
                                  ec.threshold_candidates, ec.per_class_thresholds,
                                  ec.open_kernel, ec.close_kernel, [f.valid for f in calib])
    res = evaluate(probs_of(frames), frames, CLASSES, per, ec.open_kernel, ec.close_kernel)
    assert (val["global_threshold"], val["thresholds"]) == (g, res.thresholds)
    assert val["iou"] == res.iou
