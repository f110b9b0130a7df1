"""``inspector calibrate convergence``: the fuzzymask convergence threshold m from normal frames."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import run_cli
from toy_models import fuzzymask_toy_bundle

from calibration.convergence import (calibrate_convergence, choose_m, conv_sequences, passes_to_converge,
                                     save_report)
from calibration.frames import CalibrationInputError, FrameItem, FrameSet
from inspector.bundle import load_bundle
from inspector.engines.onnxruntime import OnnxRuntimeConfig
from inspector.evaluation.evaluate import Runner
from inspector.flatfield import FlatField
from inspector.models.fuzzymask import dissimilarity_map

TILE = 64


def texture(rng: np.random.Generator, h: int, w: int, sigma: float) -> np.ndarray:
    img = 128 + rng.normal(0, sigma, (h, w))
    return np.clip(cv2.GaussianBlur(img.astype(np.float32), (0, 0), 1.5), 0, 255).astype(np.uint8)


def test_choose_m_is_the_quantile_of_the_best_mse_within_the_allowed_passes():
    # rows: tiles; columns: MSE at iterations 1, 2, 3
    seqs = np.array([[4.0, 1.0, 0.5],
                     [3.0, 2.0, 0.1],
                     [1.0, 5.0, 5.0],
                     [9.0, 8.0, 7.0]])
    # best within 2 passes: 1, 2, 1, 8 -> sorted 1, 1, 2, 8
    assert choose_m(seqs, 0.5, within=2) == 1.0
    assert choose_m(seqs, 0.75, within=2) == 2.0
    assert choose_m(seqs, 1.0, within=2) == 8.0
    # from iteration 2 on only: best of columns 2..3 within 3 passes: 0.5, 0.1, 5, 7
    assert choose_m(seqs, 0.5, within=3, first_check_from=2) == 0.5
    with pytest.raises(ValueError, match="quantile"):
        choose_m(seqs, 0.0, within=2)
    with pytest.raises(ValueError, match="within"):
        choose_m(seqs, 0.5, within=4)


def test_passes_to_converge_counts_the_iteration_the_runtime_would_stop_at():
    seqs = np.array([[4.0, 1.0, 0.5], [0.1, 2.0, 0.1], [9.0, 8.0, 7.0]])
    assert passes_to_converge(seqs, 1.0).tolist() == [2, 1, 4]          # 4 = never within 3
    assert passes_to_converge(seqs, 1.0, first_check_from=2).tolist() == [2, 3, 4]


def test_mse_sequences_match_iterating_the_graph_by_hand(tmp_path):
    bundle = fuzzymask_toy_bundle(tmp_path / "toy", tile=TILE)
    runner = Runner(bundle, engine=OnnxRuntimeConfig(intra_op_threads=1))
    img = texture(np.random.default_rng(0), TILE, TILE, 8.0)
    seq, has = conv_sequences(runner.adapter, img, 3, truth=np.zeros_like(img))
    assert seq.shape == (1, 3) and not has.any()
    x = img.astype(np.float32)[None, None] / 255.0
    rec = runner.adapter.engine
    prev = x
    for i in range(3):
        out = rec.run({"image": prev})["reconstruction"]
        assert seq[0, i] == pytest.approx(float(np.mean((out - prev) ** 2)), rel=1e-5)
        prev = out
    # the toy graph is a partial repair: iterating it settles geometrically
    assert seq[0, 2] < seq[0, 0]


# -- the tool measures what the runtime does ------------------------------------------------------
def normal_frames(n: int = 12, seed: int = 7) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [texture(rng, TILE, 2 * TILE, rng.uniform(3, 12)) for _ in range(n)]


def frame_set(images: list[np.ndarray]) -> FrameSet:
    return FrameSet("normal", "memory", [FrameItem(f"n{i}", "calibration", (lambda im=im: (im, None)))
                                         for i, im in enumerate(images)])


def runner_for(bundle: Path, flat_field: FlatField | None = None, **kind_params) -> Runner:
    r = Runner(bundle, engine=OnnxRuntimeConfig(intra_op_threads=1), kind_params=kind_params or None)
    r.adapter.flat_field = flat_field
    return r


def runtime_converged(runner: Runner, images: list[np.ndarray], within: int) -> np.ndarray:
    """Per tile of ``images``: did the runtime's infer() converge by iteration ``within``?"""
    per_tile = []
    for img in images:
        out = runner.adapter.infer(img)
        if out.release:
            out.release()
        last = runner.adapter.last_frame
        per_tile.append(last["converged"] & (last["iterations"] <= within))
    return np.concatenate(per_tile)


def check_runtime_agrees(bundle: Path, images: list[np.ndarray], quantile: float, within: int,
                         flat_field: FlatField | None = None, **kind_params) -> dict:
    """Calibrate m on ``images``, then run the runtime at that m: tile by tile it converges by
    ``within`` exactly where the report says, so at least ``quantile`` of the tiles do."""
    rep = calibrate_convergence(runner_for(bundle, flat_field, **kind_params).adapter, frame_set(images),
                                quantile, within, passes=4)
    first = rep["checked_iterations"][0]
    predicted = passes_to_converge(rep["_cal"], rep["m"], first) <= rep["within_runtime"]
    got = runtime_converged(runner_for(bundle, flat_field, **kind_params, m=rep["m"]), images, within)
    assert np.array_equal(got, predicted)
    assert got.mean() >= quantile and rep["calibration"]["converged_within"] == got.mean()
    return rep


def test_the_adapters_flat_field_is_applied_as_at_run_time(tmp_path):
    bundle = fuzzymask_toy_bundle(tmp_path / "toy", tile=TILE)
    images = normal_frames()
    h, w = images[0].shape
    # doubles the contrast: the runtime's consecutive-reconstruction MSEs are four times larger
    ff = FlatField(np.full((h, w), 2.0, np.float32), np.full((h, w), 96.0, np.float32))
    plain = runner_for(bundle).adapter
    with_ff = runner_for(bundle, ff).adapter
    seq_ff, _ = conv_sequences(with_ff, images[0], 2)
    seq_corrected, _ = conv_sequences(plain, np.array(ff.apply(images[0]), copy=True), 2)
    assert np.array_equal(seq_ff, seq_corrected)
    assert not np.allclose(seq_ff, conv_sequences(plain, images[0], 2)[0])
    check_runtime_agrees(bundle, images, 0.9, 2, ff)


def test_conv_metric_d_mean_is_measured_as_the_runtime_tests_it(tmp_path):
    bundle = fuzzymask_toy_bundle(tmp_path / "toy", tile=TILE, conv_metric="D_mean")
    images = normal_frames()
    runner = runner_for(bundle)
    seq, _ = conv_sequences(runner.adapter, images[0][:, :TILE], 2)
    # by hand: mean of D between consecutive reconstructions, not their MSE
    x = images[0][:, :TILE].astype(np.float32)[None, None] / 255.0
    r1 = runner.adapter.engine.run({"image": x})["reconstruction"]
    r2 = runner.adapter.engine.run({"image": r1})["reconstruction"]
    p = runner.adapter.params
    assert seq[0, 0] == pytest.approx(float(dissimilarity_map(x[0], r1[0], p).mean()), rel=1e-5)
    assert seq[0, 1] == pytest.approx(float(dissimilarity_map(r1[0], r2[0], p).mean()), rel=1e-5)
    assert seq[0, 0] > 2 * float(np.mean((r1 - x) ** 2))
    rep = check_runtime_agrees(bundle, images, 0.9, 2)
    assert rep["conv_metric"] == "D_mean" and "mean of D" in rep["rule"]


def test_apply_line18_counts_only_the_first_test_as_the_runtime_does(tmp_path):
    bundle = fuzzymask_toy_bundle(tmp_path / "toy", tile=TILE, apply_line18=True)
    images = normal_frames()
    rep = check_runtime_agrees(bundle, images, 0.9, 2)
    # the runtime computes R1 only: no later pass is measured or counted, whatever --within
    assert rep["within"] == 2 and rep["within_runtime"] == 1 and rep["passes_measured"] == 1
    assert rep["checked_iterations"] == [1, 1] and "apply_line18" in rep["note"]
    assert rep["m"] == choose_m(rep["_cal"], 0.9, within=1)
    save_report(rep, tmp_path / "out")  # the plot copes with a single measured pass
    # nothing is ever tested when the first test is skipped as well: refused, naming the keys
    with pytest.raises(CalibrationInputError, match="kind_params.apply_line18.*first_check_from"):
        calibrate_convergence(runner_for(bundle, first_check_from=2).adapter, frame_set(images[:1]),
                              0.9, 2)


def test_cli_writes_m_so_that_the_asked_share_of_normal_tiles_converge(tmp_path):
    bundle = fuzzymask_toy_bundle(tmp_path / "toy", tile=TILE, m=1e-12)
    normal = tmp_path / "normal"
    normal.mkdir()
    rng = np.random.default_rng(3)
    for i in range(40):
        cv2.imwrite(str(normal / f"n{i:03d}.png"), texture(rng, TILE, 2 * TILE, rng.uniform(3, 12)))
    out = tmp_path / "report"
    r = run_cli("calibrate", "convergence", "--bundle", str(bundle), "--normal", str(normal),
                "--quantile", "0.9", "--within", "2", "--passes", "4", "--threads", "1",
                "--out", str(out))
    assert r.returncode == 0, r.stderr
    rep = json.loads((out / "convergence.json").read_text())
    assert cv2.imread(str(out / "convergence.png")) is not None
    m = rep["m"]
    assert rep["previous_m"] == 1e-12 and m > 1e-12
    assert rep["calibration"]["converged_within"] >= 0.9
    spec = load_bundle(bundle).spec
    assert spec.kind_params["m"] == m
    assert spec.provenance["convergence_calibration"]["previous_m"] == 1e-12
    # the runtime now converges within 2 passes on (at least) that share of calibration tiles
    runner = Runner(bundle, engine=OnnxRuntimeConfig(intra_op_threads=1))
    conv = tiles = 0
    for p in sorted(normal.glob("*.png")):
        runner.adapter.infer(cv2.imread(str(p), cv2.IMREAD_GRAYSCALE))
        last = runner.adapter.last_frame
        conv += int((last["converged"] & (last["iterations"] <= 2)).sum())
        tiles += len(last["converged"])
    assert conv / tiles >= 0.85  # check + calibration parts together, so a little below 0.9
    # a dry run reports but leaves the bundle alone
    r = run_cli("calibrate", "convergence", "--bundle", str(bundle), "--normal", str(normal),
                "--quantile", "0.5", "--dry-run", "--threads", "1", "--out", str(tmp_path / "dry"))
    assert r.returncode == 0, r.stderr
    assert "dry run" in r.stdout
    assert load_bundle(bundle).spec.kind_params["m"] == m


def test_cli_errors_name_the_argument(tmp_path, toy_bundle):
    fm = fuzzymask_toy_bundle(tmp_path / "toy", tile=TILE)
    normal = tmp_path / "normal"
    normal.mkdir()
    cv2.imwrite(str(normal / "a.png"), np.full((TILE, TILE), 128, np.uint8))
    cases = [
        (["--bundle", str(fm), "--normal", str(normal), "--quantile", "1.5"], "--quantile"),
        (["--bundle", str(fm), "--normal", str(normal), "--within", "0"], "--within"),
        (["--bundle", str(fm), "--normal", str(tmp_path / "nope")], "--normal"),
        (["--bundle", str(fm), "--normal", str(normal), "--within", "50"], "--within"),
        (["--bundle", str(toy_bundle), "--normal", str(normal)], "--bundle"),
    ]
    for args, name in cases:
        r = run_cli("calibrate", "convergence", *args, "--out", str(tmp_path / "o"))
        assert r.returncode == 2, (args, r.stderr)
        assert name in r.stderr, (args, r.stderr)


@pytest.mark.skipif(not (Path(__file__).resolve().parents[1] / "deploy/models/fuzzymask-mt/bundle.yaml").is_file(),
                    reason="no shipped fuzzymask-mt bundle")
def test_shipped_bundle_records_its_convergence_calibration():
    spec = load_bundle(Path(__file__).resolve().parents[1] / "deploy/models/fuzzymask-mt").spec
    cal = spec.provenance.get("convergence_calibration")
    assert cal is not None and cal["m"] == spec.kind_params["m"]


def test_an_out_that_cannot_be_written_is_refused_before_the_bundle_is_touched(tmp_path):
    """--out below a regular file: exit 2 naming --out, and kind_params.m not rewritten (it used
    to be written first, then the report failed with a bare [Errno 20], exit 1)."""
    bundle = fuzzymask_toy_bundle(tmp_path / "toy", tile=TILE, m=1e-12)
    before = (bundle / "bundle.yaml").read_text()
    normal = tmp_path / "normal"
    normal.mkdir()
    rng = np.random.default_rng(3)
    for i in range(12):
        cv2.imwrite(str(normal / f"n{i:03d}.png"), texture(rng, TILE, 2 * TILE, rng.uniform(3, 12)))
    afile = tmp_path / "afile"
    afile.write_text("x")
    r = run_cli("calibrate", "convergence", "--bundle", str(bundle), "--normal", str(normal),
                "--threads", "1", "--out", str(afile / "cv"))
    assert r.returncode == 2, r.stderr
    err = r.stderr.strip().splitlines()[-1]
    assert err.startswith(f"inspector: error: --out {afile / 'cv'}: ") and "Errno" not in err, err
    assert (bundle / "bundle.yaml").read_text() == before


def test_a_non_finite_m_is_never_written(tmp_path, monkeypatch):
    # a network emitting inf/NaN gives no meaningful m; written, the bundle was refused only at
    # the daemon's next start (review 26 L5)
    import yaml

    import calibration.convergence as conv
    from calibration.convergence import write_m
    from inspector.errors import BundleError

    bundle = fuzzymask_toy_bundle(tmp_path / "toy", tile=TILE)
    before = (bundle / "bundle.yaml").read_text()
    for bad in (float("inf"), float("nan"), -1.0):
        with pytest.raises(BundleError, match=r"kind_params\.m: .*nothing written"):
            write_m(bundle, bad, {})
    assert (bundle / "bundle.yaml").read_text() == before
    monkeypatch.setattr(conv, "choose_m", lambda *a, **k: float("nan"))
    with pytest.raises(BundleError, match="give m = nan: nothing written"):
        calibrate_convergence(runner_for(bundle).adapter, frame_set(normal_frames()[:1]), 0.9, 2, passes=2)
    assert yaml.safe_load((bundle / "bundle.yaml").read_text()) == yaml.safe_load(before)
