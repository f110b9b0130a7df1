"""benchmarks/compare_bundles.py: two bundles on the same images, B − A with a paired bootstrap
over the images, from the per-image confusions ``inspector evaluate --out`` writes."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT
from inspector.evaluation.datasets import open_dataset
from inspector.evaluation.evaluate import evaluate_bundle
from inspector.evaluation.metrics import class_scores
from test_arcd_neu import neu_folder

sys.path.insert(0, str(ROOT / "benchmarks"))
import compare_bundles  # noqa: E402


def _jsonl(path: Path, rows: list[tuple[str, list[list[int]]]]) -> Path:
    path.write_text("".join(json.dumps({"image": n, "confusion": c}) + "\n" for n, c in rows))
    return path


@pytest.fixture(scope="module")
def two_evaluations(tmp_path_factory, toy_bundle):
    """The dark-spot bundle evaluated twice on one tiny NEU folder: its own threshold (A) and a
    stricter one (B), each with DIR/per_image.jsonl."""
    tmp = tmp_path_factory.mktemp("cmp")
    ds = open_dataset("neu-seg", neu_folder(tmp / "neu", n=8, size=128, n_classes=1))
    res = {}
    for name, pp in (("a", None), ("b", {"threshold": 0.97})):
        res[name] = evaluate_bundle(toy_bundle, ds, out_dir=tmp / name, postprocess=pp)
    return tmp, res


def test_per_image_confusions_add_up_to_the_evaluation(two_evaluations):
    tmp, res = two_evaluations
    names, cms = compare_bundles.read_confusions(tmp / "a" / "per_image.jsonl")
    assert len(names) == 8 and cms.shape == (8, 4, 4)
    assert cms.sum(0).tolist() == res["a"]["confusion"]


def test_real_evaluations_compare_exactly_and_a_bundle_ties_itself(two_evaluations):
    tmp, res = two_evaluations
    out = compare_bundles.compare(tmp / "a" / "per_image.jsonl", tmp / "b" / "per_image.jsonl",
                                  resamples=200)
    m = out["figures"]["miou"]
    assert m["a"] == pytest.approx(res["a"]["miou"]) and m["b"] == pytest.approx(res["b"]["miou"])
    assert m["b_minus_a"] == pytest.approx(res["b"]["miou"] - res["a"]["miou"])
    assert m["ci95"][0] <= m["ci95"][1] and len(out["bootstrap_miou_deltas"]) == 200
    same = compare_bundles.compare(tmp / "a" / "per_image.jsonl", tmp / "a" / "per_image.jsonl",
                                   resamples=200)
    assert same["figures"]["miou"]["b_minus_a"] == 0.0 and same["figures"]["miou"]["ci95"] == [0.0, 0.0]
    assert same["figures"]["miou"]["share_b_ahead"] == 0.0


def test_hand_made_pair_bootstrap_by_hand(tmp_path):
    """Two images, two classes. B finds one more defect pixel on image 1 and is equal on image 2,
    so B leads in every resample that draws image 1 (all but the draw of image 2 twice: 1/4)."""
    a1, b1 = [[90, 0], [4, 6]], [[90, 0], [3, 7]]
    i2 = [[95, 1], [0, 4]]
    pa = _jsonl(tmp_path / "a.jsonl", [("x/1", a1), ("x/2", i2)])
    pb = _jsonl(tmp_path / "b.jsonl", [("x/1", b1), ("x/2", i2)])
    out = compare_bundles.compare(pa, pb, resamples=4000, seed=1)
    want = class_scores(np.array(b1) + i2)["miou"] - class_scores(np.array(a1) + i2)["miou"]
    assert out["figures"]["miou"]["b_minus_a"] == pytest.approx(want) and want > 0
    assert out["figures"]["miou"]["share_b_ahead"] == pytest.approx(0.75, abs=0.03)
    # class 1 pooled: A 10 of a union of 15 pixels, B 11 of 15
    assert out["per_class_iou"][1]["b_minus_a"] == pytest.approx(11 / 15 - 10 / 15)


@pytest.mark.parametrize("case, message", [
    ("missing", "no such file"),
    ("not-json", "b.jsonl:2: not JSON"),
    ("no-confusion", "b.jsonl:1: no 'confusion'"),
    ("other-images", "differ at image 2: x/2 vs x/3"),
    ("fewer-images", "has 2 images"),
    ("other-truth", "image x/1 has different ground truth"),
    ("ragged", "image x/1: confusion is not a square matrix"),
    ("text", "image x/1: confusion is not a square matrix"),
    ("null", "b.jsonl:1: image x/1: confusion is not a square matrix"),
    ("not-a-row", "b.jsonl:1: no 'confusion'"),
])
def test_bad_inputs_are_one_line_naming_the_file(tmp_path, caplog, case, message):
    c = [[90, 0], [4, 6]]
    pa = _jsonl(tmp_path / "a.jsonl", [("x/1", c), ("x/2", c)])
    pb = tmp_path / "b.jsonl"
    if case == "not-json":
        pb.write_text(json.dumps({"image": "x/1", "confusion": c}) + "\n{oops\n")
    elif case == "no-confusion":
        pb.write_text(json.dumps({"image": "x/1", "defective": True}) + "\n")
    elif case == "other-images":
        _jsonl(pb, [("x/1", c), ("x/3", c)])
    elif case == "fewer-images":
        _jsonl(pb, [("x/1", c)])
    elif case == "other-truth":
        _jsonl(pb, [("x/1", [[80, 0], [4, 6]]), ("x/2", c)])
    elif case == "ragged":
        _jsonl(pb, [("x/1", [[90, 0], [4]]), ("x/2", c)])
    elif case == "text":
        _jsonl(pb, [("x/1", [["a", 0], [4, 6]]), ("x/2", c)])
    elif case == "null":
        _jsonl(pb, [("x/1", None), ("x/2", c)])
    elif case == "not-a-row":
        pb.write_text("[1, 2]\n")
    assert compare_bundles.main([str(pa), str(pb)]) == 2
    (rec,) = [r for r in caplog.records if r.levelname == "ERROR"]
    assert message in rec.getMessage() and rec.exc_info is None


def test_cli_writes_json_and_plot(two_evaluations, tmp_path, capsys):
    tmp, _ = two_evaluations
    assert compare_bundles.main([str(tmp / "a" / "per_image.jsonl"), str(tmp / "b" / "per_image.jsonl"),
                                 "--names", "own", "strict", "--resamples", "300",
                                 "--out", str(tmp_path / "o")]) == 0
    assert "| miou |" in capsys.readouterr().out
    saved = json.loads((tmp_path / "o" / "compare.json").read_text())
    assert saved["names"] == ["own", "strict"] and saved["resamples"] == 300
    assert (tmp_path / "o" / "compare.png").stat().st_size > 5000
