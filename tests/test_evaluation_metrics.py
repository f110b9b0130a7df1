"""inspector.evaluation: pixel metrics, AUROC without sklearn, data-set readers and splits,
and the dual-threshold calibration helpers (numpy/OpenCV only)."""

from __future__ import annotations

import itertools

import cv2
import numpy as np
import pytest

from conftest import SHARED_DATA, pairwise_auroc
from inspector.evaluation.datasets import (MAGNETIC_TILE_CLASSES, SplitFractions, defect_free_windows,
                                           hash_fraction, open_dataset, split_of)
from inspector.evaluation.evaluate import METRICS_BY_KIND, overlay
from inspector.evaluation.metrics import (Counts, DefectPixelMetrics, FalseAlarm, FrameResult,
                                          PerClassAUROC, PixelAUROC, auroc, scores)


def brute_auroc(s: np.ndarray, y: np.ndarray) -> float:
    pos, neg = s[y], s[~y]
    wins = sum((p > n) + 0.5 * (p == n) for p, n in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


def test_auroc_matches_pairwise_counting_with_ties():
    rng = np.random.default_rng(0)
    for _ in range(5):
        s = rng.integers(0, 6, 60).astype(np.float32)  # many ties
        y = rng.random(60) < 0.3
        assert auroc(s, y) == pytest.approx(brute_auroc(s, y), abs=1e-12)
    assert auroc(np.array([1, 2, 3, 4.0]), np.array([0, 0, 1, 1], bool)) == 1.0
    assert auroc(np.array([1, 2, 3, 4.0]), np.array([1, 1, 0, 0], bool)) == 0.0
    assert auroc(np.ones(4), np.array([0, 1, 0, 1], bool)) == 0.5
    assert auroc(np.ones(4), np.zeros(4, bool)) is None


def test_counts_and_scores_by_hand():
    pred = np.zeros((4, 5), bool)
    truth = np.zeros((4, 5), bool)
    pred[0, :3] = True      # 3 predicted
    truth[0, 1:4] = True    # 3 true, overlap 2
    c = Counts.of(pred, truth)
    assert (c.tp, c.fp, c.fn, c.tn) == (2, 1, 1, 16)
    s = scores(c)
    assert s["precision"] == pytest.approx(2 / 3) and s["recall"] == pytest.approx(2 / 3)
    assert s["f1"] == pytest.approx(2 / 3) and s["iou"] == pytest.approx(0.5)
    assert s["acc"] == pytest.approx(18 / 20)
    assert scores(Counts(0, 0, 5, 5)) == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "iou": 0.0, "acc": 0.5}
    with pytest.raises(ValueError):
        Counts.of(pred, truth[:3])


def frame(label: np.ndarray, score: np.ndarray | None = None) -> FrameResult:
    return FrameResult(label=label.astype(np.uint8),
                       score_map=(label.astype(np.float32) if score is None else score))


def test_per_image_average_differs_from_pooled_as_the_paper_implies():
    m = DefectPixelMetrics()
    big_t = np.zeros((10, 10), np.uint8)
    big_t[:5] = 1               # 50 defect pixels, all found
    small_t = np.zeros((10, 10), np.uint8)
    small_t[0, 0] = 1           # 1 defect pixel, missed
    m.update(big_t, frame(big_t))
    m.update(small_t, frame(np.zeros((10, 10), np.uint8)))
    m.update(np.zeros((10, 10), np.uint8), frame(big_t))  # a normal image: not in the averages
    r = m.result()
    assert r["defective_images"] == 2
    assert r["f1"] == pytest.approx(0.5) and r["iou"] == pytest.approx(0.5)  # (1 + 0) / 2
    assert r["pooled"]["recall"] == pytest.approx(50 / 51)
    assert r["pooled_with_normals"]["precision"] == pytest.approx(50 / 100)
    assert DefectPixelMetrics().result()["f1"] is None


def test_false_alarm_and_pixel_auroc_accumulators():
    fa, au = FalseAlarm(), PixelAUROC()
    clean = np.zeros((100, 100), np.uint8)
    noisy = clean.copy()
    noisy[:2, :5] = 1  # 10 px
    truth_def = np.zeros((100, 100), np.uint8)
    truth_def[50:60, 50:60] = 2
    score = np.zeros((100, 100), np.float32)
    score[50:60, 50:60] = 5.0
    for t, lab, sc in ((clean, clean, score * 0), (clean, noisy, score * 0), (truth_def, clean, score)):
        fr = frame(lab, sc)
        fa.update(t, fr)
        au.update(t, fr)
    r = fa.result()
    assert r["normal_images"] == 2 and r["false_alarm_rate"] == 0.5
    assert r["false_alarm_px_per_mpx"] == pytest.approx(10 / 20000 * 1e6)
    assert r["false_alarm_rate_reported"] == 0.0  # these frames carry no defect list
    assert au.result()["pixel_auroc"] == 1.0
    assert FalseAlarm().result()["false_alarm_rate"] is None


def test_per_class_auroc_is_one_vs_rest_of_each_class_probability():
    rng = np.random.default_rng(1)
    acc = PerClassAUROC()
    truths, probs = [], []
    for _ in range(3):
        truth = rng.integers(0, 3, (12, 10)).astype(np.uint8)
        p = rng.random((4, 12, 10)).astype(np.float32)
        p[2][truth == 2] += 0.5  # class 2 well separated; class 3 never in the truth
        truths.append(truth)
        probs.append(p)
        acc.update(truth, FrameResult(label=np.zeros_like(truth), score_map=1 - p[0], probs=p))
    r = acc.result()["per_class_auroc"]
    t = np.concatenate([x.ravel() for x in truths])
    for c in range(3):
        s = np.concatenate([p[c].ravel() for p in probs])
        assert r[c] == pytest.approx(brute_auroc(s, t == c))
    assert r[2] > 0.8 and r[3] is None
    assert PerClassAUROC().result()["per_class_auroc"] is None


def _frames(n: int = 5, seed: int = 3):
    """Frames of different sizes with ties (probabilities on a 1/16 grid), classes 0..2 in the
    truth (3 of 4 never), class 1 partly separable."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        h, w = 9 + i, 7 + 2 * i
        truth = rng.integers(0, 3, (h, w)).astype(np.uint8)
        p = np.round(rng.random((4, h, w)) * 16) / 16
        p[1][truth == 1] += 0.25
        p = p.astype(np.float32)
        score = np.round(rng.random((h, w)) * 8).astype(np.float32) / 8 + (truth > 0) * 0.3
        out.append((truth, FrameResult(label=np.zeros_like(truth), score_map=score.astype(np.float32),
                                       probs=p)))
    return out


@pytest.mark.parametrize("stride", [1, 2, 3])
def test_auroc_accumulators_score_every_stride_th_pixel_of_each_image(stride, monkeypatch):
    import inspector.evaluation.metrics as M

    # several binary-search chunks on this small data (raising=False: the review's code had none)
    monkeypatch.setattr(M, "_SEARCH_CHUNK", 7, raising=False)
    frames = _frames()
    px, pc = M.PixelAUROC(stride), M.PerClassAUROC(stride)
    for truth, fr in frames:
        px.update(truth, fr)
        pc.update(truth, fr)
    # by hand: every stride-th pixel of each image, row-major, pooled over the images
    truth = np.concatenate([t.ravel()[::stride] for t, _ in frames])
    score = np.concatenate([fr.score_map.ravel()[::stride] for _, fr in frames])
    assert px.result()["pixel_auroc"] == pytest.approx(pairwise_auroc(score, truth > 0), abs=1e-12)
    per_class = pc.result()["per_class_auroc"]
    for c in range(3):
        probs_c = np.concatenate([fr.probs[c].ravel()[::stride] for _, fr in frames])
        assert per_class[c] == pytest.approx(pairwise_auroc(probs_c, truth == c), abs=1e-12), c
    assert per_class[3] is None  # class 3 never in the truth
    assert pc.result() == {"per_class_auroc": per_class}  # result() leaves the accumulator as it was


def _auroc_as_before(score: np.ndarray, label: np.ndarray) -> float | None:
    """metrics.auroc as it was at the review (HEAD 5391521), for the stride-1 comparison."""
    s = np.asarray(score, np.float32).ravel()
    y = np.asarray(label, bool).ravel()
    pos, neg = s[y], np.sort(s[~y])
    if pos.size == 0 or neg.size == 0:
        return None
    below = np.searchsorted(neg, pos, side="left").astype(np.float64)
    upto = np.searchsorted(neg, pos, side="right").astype(np.float64)
    return float((below.sum() + 0.5 * (upto - below).sum()) / (pos.size * float(neg.size)))


def test_stride_1_is_the_exact_auroc_of_every_pixel_as_before():
    # what PerClassAUROC and PixelAUROC returned before (one auroc() over the concatenated
    # pixels), to the last bit
    frames = _frames(seed=5)
    px, pc = PixelAUROC(), PerClassAUROC()
    for truth, fr in frames:
        px.update(truth, fr)
        pc.update(truth, fr)
    truth = np.concatenate([t.ravel() for t, _ in frames])
    score = np.concatenate([fr.score_map.ravel() for _, fr in frames])
    assert px.result()["pixel_auroc"] == _auroc_as_before(score, truth > 0) == auroc(score, truth > 0)
    assert pc.result()["per_class_auroc"] == [
        _auroc_as_before(np.concatenate([fr.probs[c].ravel() for _, fr in frames]), truth == c)
        for c in range(4)]


def test_auroc_results_need_one_float32_per_kept_pixel_beyond_what_is_kept():
    # numpy reports its buffers to tracemalloc: the peak of result() over what update() kept is
    # the positives and negatives of one score (4 B/px) plus the binary searches' fixed chunk,
    # not copies of everything (16 B/px per-class, 27 B/px pixel AUROC at the review)
    import tracemalloc

    rng = np.random.default_rng(0)
    for acc in (PerClassAUROC(), PixelAUROC()):
        n = 0
        for _ in range(40):
            truth = rng.integers(0, 4, (100, 100)).astype(np.uint8)
            p = rng.random((4, 100, 100), dtype=np.float32)
            acc.update(truth, FrameResult(label=truth, score_map=p[1], probs=p))
            n += truth.size
        tracemalloc.start()
        try:
            kept = tracemalloc.get_traced_memory()[0]
            acc.result()
            peak = tracemalloc.get_traced_memory()[1] - kept
        finally:
            tracemalloc.stop()
        assert peak < 4 * n + (2 << 20), (type(acc).__name__, peak / n)


def test_every_kind_has_the_binary_metrics_and_overlay_renders():
    for kind in ("clgan", "arcd", "fuzzymask"):
        assert DefectPixelMetrics in METRICS_BY_KIND[kind]
    img = np.full((30, 40), 100, np.uint8)
    lab = np.zeros((30, 40), np.uint8)
    lab[5:10, 5:10] = 1
    ov = overlay(img, lab.astype(np.float32), lab, lab)
    assert ov.shape == (30, 120, 3) and ov.dtype == np.uint8


def test_split_by_stem_hash_is_deterministic_and_proportional():
    stems = [f"exp{i % 7}_num_{i}" for i in range(4000)]
    splits = [split_of(s) for s in stems]
    assert splits == [split_of(s) for s in stems]
    share = {k: splits.count(k) / len(stems) for k in ("train", "val", "test")}
    assert share["test"] == pytest.approx(0.3, abs=0.03) and share["val"] == pytest.approx(0.2, abs=0.03)
    assert 0 <= hash_fraction("a") < 1 and hash_fraction("a") != hash_fraction("b")
    # a larger test share only moves images into test, never out of it
    wider = SplitFractions(test=0.4, val=0.2)
    assert all(split_of(s, wider) == "test" for s, k in zip(stems, splits) if k == "test")
    with pytest.raises(ValueError):
        SplitFractions(test=0.8, val=0.3)


def write_mt(root, cat: str, stems: list[str], defect: bool, size=(40, 50)):
    d = root / f"MT_{cat}" / "Imgs"
    d.mkdir(parents=True, exist_ok=True)
    for s in stems:
        cv2.imwrite(str(d / f"{s}.jpg"), np.full(size, 120, np.uint8))
        m = np.zeros(size, np.uint8)
        if defect:
            m[5:10, 5:10] = 255
            m[10, 10] = 100  # an anti-aliased edge value: below 128, background
        cv2.imwrite(str(d / f"{s}.png"), m)


def test_magnetic_tile_reader(tmp_path):
    write_mt(tmp_path, "Free", [f"f{i}" for i in range(20)], defect=False)
    write_mt(tmp_path, "Crack", [f"c{i}" for i in range(10)], defect=True)
    write_mt(tmp_path, "Scuff", ["s0"], defect=True)  # an unknown category gets its own class
    (tmp_path / "MT_Crack" / "Imgs" / "c9.png").unlink()  # a defect without its mask: named ...
    with pytest.raises(FileNotFoundError, match="c9.jpg: no mask c9.png"):
        open_dataset("magnetic-tile", tmp_path)
    ds = open_dataset("magnetic-tile", tmp_path, strict=False)  # ... or skipped where asked
    assert ds.classes == list(MAGNETIC_TILE_CLASSES) + ["Scuff"]
    assert len(ds) == 30 and ds.notes
    crack = [ds.load(i) for i, e in enumerate(ds.entries) if e.category == "MT_Crack"]
    assert all(s.mask.max() == MAGNETIC_TILE_CLASSES.index("Crack") for s in crack)
    assert all(int((s.mask > 0).sum()) == 25 for s in crack)  # 100 < 128 is background
    assert all(not s.defective for s in ds.filter(lambda e: e.category == "MT_Free"))
    parts = [open_dataset("magnetic-tile", tmp_path, split=k, strict=False) for k in ("train", "val", "test")]
    assert sum(len(p) for p in parts) == 30
    assert all(e.split == p.split for p in parts for e in p.entries)
    only_free = open_dataset("magnetic-tile", tmp_path, categories=["MT_Free"])
    assert {e.category for e in only_free.entries} == {"MT_Free"}
    with pytest.raises(FileNotFoundError, match="MT_Nope"):
        open_dataset("magnetic-tile", tmp_path, categories=["MT_Nope"])
    with pytest.raises(FileNotFoundError, match="magnetic-tile"):
        open_dataset("magnetic-tile", tmp_path / "MT_Free")
    with pytest.raises(ValueError, match="format"):
        open_dataset("mvtec", tmp_path)


def test_neu_seg_and_folder_readers_and_defect_free_windows(tmp_path):
    (tmp_path / "images" / "training").mkdir(parents=True)
    (tmp_path / "annotations" / "training").mkdir(parents=True)
    for i in range(4):
        cv2.imwrite(str(tmp_path / "images" / "training" / f"{i:06d}.jpg"), np.full((64, 64, 3), 90, np.uint8))
        m = np.zeros((64, 64), np.uint8)
        m[:20, :] = (i % 3) + 1
        cv2.imwrite(str(tmp_path / "annotations" / "training" / f"{i:06d}.png"), m)
    ds = open_dataset("neu-seg", tmp_path)
    s = ds.load(0)
    assert ds.classes[0] == "background" and len(ds.classes) == 4
    assert s.image.shape == (64, 64, 3) and s.mask.max() == 1
    win = defect_free_windows(s.mask, 32, stride=8)
    assert len(win) > 0 and all(not s.mask[y:y + 32, x:x + 32].any() for y, x in win)
    assert win[:, 0].min() >= 20  # none overlaps the defect rows
    assert len(defect_free_windows(s.mask, 128)) == 0
    # a folder of normal images, recursively
    (tmp_path / "plain" / "a").mkdir(parents=True)
    for name in ("x1.png", "x2.png", "a/x10.png"):
        cv2.imwrite(str(tmp_path / "plain" / name), np.zeros((8, 8), np.uint8))
    f = open_dataset("folder", tmp_path / "plain")
    assert len(f) == 3 and not any(x.defective for x in f)


@pytest.mark.skipif(not (SHARED_DATA / "magnetic_tile").is_dir(),
                    reason=f"shared data not found at {SHARED_DATA}")
def test_shared_magnetic_tile_split_sizes():
    root = SHARED_DATA / "magnetic_tile"
    all_ = open_dataset("magnetic-tile", root)
    test = open_dataset("magnetic-tile", root, split="test")
    free_train = open_dataset("magnetic-tile", root, split="train", categories=["MT_Free"])
    assert len(all_) >= 800
    assert 0.25 < len(test) / len(all_) < 0.35
    test_stems = {e.stem for e in test.entries}
    assert not test_stems & {e.stem for e in free_train.entries}
    assert any(e.category != "MT_Free" for e in test.entries)
    s = test.load(len(test) - 1)
    assert s.mask.shape == s.image.shape[:2]


def test_calibration_range_and_write(tmp_path):
    from calibration.dual_threshold import parse_range
    assert parse_range("2:3:0.5") == [2.0, 2.5, 3.0]
    assert parse_range("2.0:4.0:0.1")[-1] == 4.0 and len(parse_range("2.0:4.0:0.1")) == 21
    assert parse_range("2.5, 3") == [2.5, 3.0]
    for bad in ("3:2:0.5", "2:3:0", "x", ""):
        with pytest.raises(ValueError):
            parse_range(bad)


def test_evaluate_splits_with_the_fractions_the_bundle_was_trained_with(tmp_path):
    # A clgan / fuzzymask run trained with split_test 0.1 has trained on images the default
    # 0.3 split calls test: evaluate must split as training did.
    import json
    import shutil

    import yaml

    from conftest import ROOT, run_cli
    from inspector.evaluation.datasets import SplitFractions, split_of
    data = tmp_path / "frames"
    data.mkdir()
    stems = [f"f{i:03d}" for i in range(60)]
    for s in stems:
        cv2.imwrite(str(data / f"{s}.png"), np.full((64, 64), 120, np.uint8))
    b = tmp_path / "bundle"
    shutil.copytree(ROOT / "deploy/models/clgan-mt", b)
    meta = yaml.safe_load((b / "bundle.yaml").read_text())
    meta.setdefault("provenance", {})["split_fractions"] = {"test": 0.1, "val": 0.1}
    (b / "bundle.yaml").write_text(yaml.safe_dump(meta, sort_keys=False))
    r = run_cli("evaluate", "--bundle", str(b), "--data", str(data), "--format", "folder",
                "--split", "test", "--json", timeout=300)
    assert r.returncode == 0, r.stderr
    want = sum(split_of(s, SplitFractions(0.1, 0.1)) == "test" for s in stems)
    default = sum(split_of(s) == "test" for s in stems)
    assert want != default  # the test means something with these stems
    assert json.loads(r.stdout)["images"] == want
    assert "trained with: test 0.1, val 0.1" in r.stderr
