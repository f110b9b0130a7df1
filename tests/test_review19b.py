"""Second review of rev 19, finding 5: ``auroc_stride`` (``inspector evaluate --auroc-stride N``)
reaches both the pixel and the per-class AUROC of a real probability bundle, is recorded in the
result (and in ``--record``'s provenance entry), and stride 1 stays exact. The accumulators'
own stride and exactness tests are in test_evaluation_metrics.py; finding 3 (a load cut short
by memory is not a bad graph) is in test_bundle.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from conftest import pairwise_auroc, run_cli
from inspector.bundle import load_bundle

NEU_CLASSES = ("background", "inclusion", "patches", "scratches")


def _neu_folder(root: Path, n: int = 4, size: int = 64, seed: int = 0) -> Path:
    """NEU-Seg layout: noisy grey images, a faint dark band of class i % 3 + 1 in each, so the
    AUROCs are neither 0.5 nor 1 and every 2nd pixel gives other values than every pixel."""
    rng = np.random.default_rng(seed)
    for d in ("images/training", "annotations/training"):
        (root / d).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        img = rng.normal(128, 12, (size, size))
        mask = np.zeros((size, size), np.uint8)
        mask[6 + 5 * i:16 + 5 * i, 5:45] = i % 3 + 1
        img[mask > 0] -= 10
        img = np.clip(img, 0, 255).astype(np.uint8)
        cv2.imwrite(str(root / "images/training" / f"{i:06d}.jpg"), np.repeat(img[:, :, None], 3, 2))
        cv2.imwrite(str(root / "annotations/training" / f"{i:06d}.png"), mask)
    return root


@pytest.fixture(scope="module")
def arcd_case(tmp_path_factory):
    """A real probability bundle (hand-built ONNX graph, 4 NEU classes) and a small NEU folder,
    with the AUROCs at strides 1 and 2 computed by hand from the runtime's own outputs."""
    from toy_models import dark_spot_bundle

    from inspector.evaluation.datasets import open_dataset
    from inspector.evaluation.evaluate import Runner

    tmp = tmp_path_factory.mktemp("r19b")
    bundle = dark_spot_bundle(tmp / "toy", tile=64, classes=NEU_CLASSES)
    data = _neu_folder(tmp / "neu")
    ds = open_dataset("neu-seg", data)
    runner = Runner(bundle)
    outs = []
    for i in range(len(ds)):
        s = ds.load(i)
        outs.append((s.mask, runner.run(s.image, keep_maps=True)))
    hand = {}
    for stride in (1, 2):
        truth = np.concatenate([t.ravel()[::stride] for t, _ in outs])
        score = np.concatenate([r.score_map.ravel()[::stride] for _, r in outs])
        hand[stride] = {"pixel_auroc": pairwise_auroc(score, truth > 0),
                        "per_class_auroc": {name: pairwise_auroc(
                            np.concatenate([r.probs[c].ravel()[::stride] for _, r in outs]), truth == c)
                            for c, name in enumerate(NEU_CLASSES)}}
    # the case tells the strides apart
    assert hand[1]["pixel_auroc"] != hand[2]["pixel_auroc"]
    assert all(hand[1]["per_class_auroc"][c] != hand[2]["per_class_auroc"][c] for c in NEU_CLASSES[:3])
    return bundle, data, hand


def _assert_aurocs(res: dict, hand: dict) -> None:
    assert res["pixel_auroc"] == pytest.approx(hand["pixel_auroc"], abs=1e-12)
    assert set(res["per_class_auroc"]) == set(NEU_CLASSES)
    for c in NEU_CLASSES:
        assert res["per_class_auroc"][c] == pytest.approx(hand["per_class_auroc"][c], abs=1e-12), c


def test_evaluate_bundle_passes_the_stride_to_both_aurocs_and_records_it(arcd_case):
    from inspector.evaluation.datasets import open_dataset
    from inspector.evaluation.evaluate import evaluate_bundle

    bundle, data, hand = arcd_case
    for stride in (1, 2):
        res = evaluate_bundle(bundle, open_dataset("neu-seg", data), auroc_stride=stride)
        assert res["auroc_stride"] == stride
        _assert_aurocs(res, hand[stride])
    with pytest.raises(ValueError, match="auroc_stride 0"):
        evaluate_bundle(bundle, open_dataset("neu-seg", data), auroc_stride=0)


def test_cli_auroc_stride_reaches_both_aurocs(arcd_case, tmp_path):
    bundle, data, hand = arcd_case
    common = ("evaluate", "--bundle", str(bundle), "--data", str(data), "--format", "neu-seg", "--json")
    p = run_cli(*common, "--auroc-stride", "2", "--out", str(tmp_path / "ev"), "--record",
                "--record-key", "stride2")
    assert p.returncode == 0, p.stderr[-2000:]
    res = json.loads(p.stdout)
    assert res["auroc_stride"] == 2
    _assert_aurocs(res, hand[2])
    assert json.loads((tmp_path / "ev" / "metrics.json").read_text())["auroc_stride"] == 2
    recorded = load_bundle(bundle).spec.provenance["metrics"]["stride2"]
    assert recorded["auroc_stride"] == 2 and recorded["pixel_auroc"] == res["pixel_auroc"]
    p = run_cli(*common)  # the default: every pixel, exact
    assert p.returncode == 0, p.stderr[-2000:]
    res = json.loads(p.stdout)
    assert res["auroc_stride"] == 1
    _assert_aurocs(res, hand[1])
    p = run_cli(*common, "--auroc-stride", "0")
    assert p.returncode == 2 and "--auroc-stride" in p.stderr
    assert "--auroc-stride N" in run_cli("evaluate", "--help").stdout
