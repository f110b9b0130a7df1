"""``inspector evaluate`` on a bundle with ARCD's machine-region head (contract section 5): the
JSON's "region" block against a confusion matrix counted by hand, the null case (data without
region labels), and no key for a bundle without a head."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from conftest import run_cli
from inspector.bundle import load_bundle
from inspector.evaluation.datasets import NEU_SEG_CLASSES, open_dataset
from inspector.evaluation.evaluate import evaluate_bundle, record_metrics
from inspector.evaluation.metrics import RegionMetrics
from toy_models import dark_spot_bundle, region_bundle

H, W = 40, 100
BRIGHT, DARK = 200, 50  # the toy graph's p(region) = sigmoid(40 (x/255 - 0.5)): region from 128 up


def images_and_regions() -> list[tuple[np.ndarray, np.ndarray]]:
    """Two images (grey) and their region labels (0/1), chosen so that the toy graph's region
    prediction (bright pixels) disagrees with the label in known places."""
    img0 = np.full((H, W), DARK, np.uint8)
    img0[:, :50] = BRIGHT                 # predicted region: columns 0-49
    reg0 = np.zeros((H, W), np.uint8)
    reg0[:, :40] = 1                      # labelled region: columns 0-39
    img1 = np.full((H, W), DARK, np.uint8)
    img1[:10, :20] = BRIGHT               # predicted: a 10 x 20 block
    reg1 = np.zeros((H, W), np.uint8)
    reg1[:20, :30] = 1                    # labelled: the 20 x 30 block around it
    return [(img0, reg0), (img1, reg1)]


# counted by hand from the pictures above (rows truth, columns prediction):
#   image 0: TP 40x40 = 1600, FP 10x40 = 400, FN 0, TN 50x40 = 2000
#   image 1: TP 10x20 = 200, FP 0, FN 20x30 - 200 = 400, TN 4000 - 600 = 3400
TP, FP, FN, TN = 1800, 400, 400, 5400


def hand_figures() -> dict:
    iou_region = TP / (TP + FP + FN)            # 1800 / 2600
    iou_not = TN / (TN + FN + FP)               # 5400 / 6200 (the corrected MIoU denominator)
    pa_region, pa_not = TP / (TP + FN), TN / (TN + FP)
    # two score values: bright (high) and dark (low) pixels; ties count half
    pos_hi, pos_lo, neg_hi, neg_lo = TP, FN, FP, TN
    auroc = (pos_hi * neg_lo + 0.5 * (pos_hi * neg_hi + pos_lo * neg_lo)) / ((TP + FN) * (TN + FP))
    return {"iou": iou_region, "miou": (iou_region + iou_not) / 2, "mpa": (pa_region + pa_not) / 2,
            "auroc": auroc}


def neu_fixture(root: Path, regions: bool = True) -> Path:
    for d in ("images", "annotations") + (("regions",) if regions else ()):
        (root / d / "training").mkdir(parents=True, exist_ok=True)
    for i, (img, reg) in enumerate(images_and_regions()):
        stem = f"{i:06d}"
        cv2.imwrite(str(root / "images" / "training" / f"{stem}.png"), img)
        cv2.imwrite(str(root / "annotations" / "training" / f"{stem}.png"), np.zeros((H, W), np.uint8))
        if regions:
            cv2.imwrite(str(root / "regions" / "training" / f"{stem}.png"), reg * np.uint8(255))
    return root


@pytest.fixture(scope="module")
def rbundle(tmp_path_factory) -> Path:
    return region_bundle(tmp_path_factory.mktemp("reval") / "toy-region", classes=NEU_SEG_CLASSES)


def test_region_figures_match_the_hand_counted_confusion(rbundle, tmp_path):
    ds = open_dataset("neu-seg", neu_fixture(tmp_path / "neu"))
    res = evaluate_bundle(rbundle, ds, out_dir=tmp_path / "out")
    region = res["region"]
    assert set(region) == {"name", "threshold", "mpa", "miou", "iou", "auroc", "images"}
    assert region["name"] == "machine region" and region["threshold"] == 0.5 and region["images"] == 2
    expect = hand_figures()
    for key, value in expect.items():
        assert region[key] == pytest.approx(value, abs=1e-12), key
    # the figures written are the ones returned
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["region"] == region


def test_resize_scales_the_region_label_nearest(rbundle, tmp_path):
    # halving keeps every labelled / predicted block whole (all edges on even pixels): the same
    # shares, so the same figures
    ds = open_dataset("neu-seg", neu_fixture(tmp_path / "neu"))
    region = evaluate_bundle(rbundle, ds, resize=(H // 2, W // 2))["region"]
    for key, value in hand_figures().items():
        assert region[key] == pytest.approx(value, abs=1e-12), key


def test_auroc_stride_bounds_memory_and_keeps_the_confusion_exact(rbundle, tmp_path):
    ds = open_dataset("neu-seg", neu_fixture(tmp_path / "neu"))
    region = evaluate_bundle(rbundle, ds, auroc_stride=3)["region"]
    expect = hand_figures()
    for key in ("mpa", "miou", "iou"):  # counted over every pixel whatever the stride
        assert region[key] == pytest.approx(expect[key], abs=1e-12), key
    assert region["auroc"] == pytest.approx(expect["auroc"], abs=0.02)


def test_threshold_and_name_come_from_the_bundle(tmp_path):
    # p(region) of grey 200 is sigmoid(11.4) < 1 in float32: at threshold 1 nothing is predicted
    # region, so TP = FP = 0, FN = 2200, TN = 5800
    b = region_bundle(tmp_path / "strict", classes=NEU_SEG_CLASSES, threshold=1.0, name="roll gap")
    region = evaluate_bundle(b, open_dataset("neu-seg", neu_fixture(tmp_path / "neu")))["region"]
    assert region["name"] == "roll gap" and region["threshold"] == 1.0
    assert region["iou"] == 0.0
    assert region["miou"] == pytest.approx((0.0 + 5800 / 8000) / 2, abs=1e-12)
    assert region["mpa"] == pytest.approx((0.0 + 1.0) / 2, abs=1e-12)
    assert region["auroc"] == pytest.approx(hand_figures()["auroc"], abs=1e-12)  # no threshold in it


def test_region_metrics_by_hand():
    m = RegionMetrics("r", 0.999)
    p = np.array([[0.9999, 0.9], [0.2, 0.9995]], np.float32)
    t = np.array([[1, 1], [0, 0]], np.uint8)
    m.update(t, p)
    # TP 1 (0.9999), FN 1 (0.9 < 0.999), FP 1 (0.9995), TN 1 (0.2)
    np.testing.assert_array_equal(m.confusion(), [[1, 1], [1, 1]])
    r = m.result()
    assert r["iou"] == pytest.approx(1 / 3) and r["miou"] == pytest.approx(1 / 3)
    assert r["mpa"] == pytest.approx(0.5) and r["auroc"] == pytest.approx(0.75)
    with pytest.raises(ValueError, match="differ in shape"):
        m.update(t, p[:1])
    # no image at all: nothing to score, no error
    assert RegionMetrics("r", 0.5).result()["auroc"] is None


def test_region_is_null_with_a_log_line_when_the_data_has_no_labels(rbundle, tmp_path, caplog):
    ds = open_dataset("neu-seg", neu_fixture(tmp_path / "neu", regions=False))
    with caplog.at_level(logging.INFO, logger="inspector.evaluation.evaluate"):
        res = evaluate_bundle(rbundle, ds)
    assert "region" in res and res["region"] is None
    assert any("region head (machine region) is not scored" in r.getMessage()
               and "no region labels" in r.getMessage() for r in caplog.records), caplog.text
    assert res["miou"] is not None  # the defect figures are there as ever


def test_a_bundle_without_a_region_head_adds_no_key(tmp_path):
    plain = dark_spot_bundle(tmp_path / "plain", classes=NEU_SEG_CLASSES)
    res = evaluate_bundle(plain, open_dataset("neu-seg", neu_fixture(tmp_path / "neu")))
    assert "region" not in res


def test_record_keeps_the_region_figures(rbundle, tmp_path):
    b = Path(shutil.copytree(rbundle, tmp_path / "b"))
    res = evaluate_bundle(b, open_dataset("neu-seg", neu_fixture(tmp_path / "neu")))
    key = record_metrics(b, res)
    stored = load_bundle(b).spec.provenance["metrics"][key]
    assert stored["region"] == res["region"]
    # a region bundle scored without labels records no region entry
    res2 = evaluate_bundle(b, open_dataset("neu-seg", neu_fixture(tmp_path / "plain", regions=False)))
    key2 = record_metrics(b, res2, "no-regions")
    assert "region" not in load_bundle(b).spec.provenance["metrics"][key2]


def test_the_evaluate_command_prints_the_region_block(rbundle, tmp_path):
    root = neu_fixture(tmp_path / "neu")
    p = run_cli("evaluate", "--bundle", str(rbundle), "--data", str(root), "--format", "neu-seg",
                "--split", "all", "--json", "--threads", "1")
    assert p.returncode == 0, p.stderr[-2000:]
    region = json.loads(p.stdout)["region"]
    for key, value in hand_figures().items():
        assert region[key] == pytest.approx(value, abs=1e-12), key
