"""Fuzzy-mask inpainter, review 19 fixes (/tmp/rev19/spec-recon/FINDINGS.md 1, 2, 4):

* tau on a NEU-Seg source with ``inference.tile`` > ``data.crop``: the tau crops have the tile's
  shape and lie in defect-free windows of the tile's size, in training and in the export's
  recomputation; a tile no image has such a window for is refused before training;
* ``tau_mode: per_image_sigma``: the bundle's first ``score_threshold`` is the train-envelope
  tau, not 0 (which marks every pixel);
* ``inference_fill: fuzzy`` overlays the training mask's ``fill`` (gauss0, uniform01,
  blurred_self), exported into ``kind_params.fill``.

Real parts only: tiny training runs on tiny NEU-Seg / folder fixtures built here, real ONNX
Runtime sessions (the exported graph, the toy graph of tests/toy_models.py)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

from conftest import ROOT
from toy_models import fuzzymask_toy_bundle

torch = pytest.importorskip("torch", reason="training and export need the train extra (torch)")
pytest.importorskip("onnx")

from export.fuzzymask.data import DataSource, NormalCrops, load_normal_images  # noqa: E402
from export.fuzzymask.masking import FuzzyMaskConfig, cell_pixels, fuzzy_mask, retention_map  # noqa: E402
from inspector.bundle import load_bundle  # noqa: E402
from inspector.engines.onnxruntime import OnnxRuntimeConfig, OnnxRuntimeEngine  # noqa: E402
from inspector.errors import BundleError, ConfigError  # noqa: E402
from inspector.evaluation.datasets import SplitFractions  # noqa: E402
from inspector.models import make_adapter  # noqa: E402
from inspector.models.fuzzymask import FuzzymaskAdapter, FuzzymaskParams  # noqa: E402

torch.set_num_threads(1)

#: NEU-Seg fixture: 128 px images whose rows 0-39 are a defect (grey 0, class 2 in the mask); the
#: rest is bright texture (>= 110). Row 40 starts a JPEG block, so no defect ringing crosses it.
NEU_SIDE, DEFECT_ROWS = 128, 40
DARK = 60  # any crop with a pixel below this holds defect pixels


def make_neu(root: Path, n: int = 4, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    (root / "images" / "training").mkdir(parents=True)
    (root / "annotations" / "training").mkdir(parents=True)
    for i in range(n):
        img = np.clip(rng.normal(160, 12, (NEU_SIDE, NEU_SIDE)), 110, 230).astype(np.uint8)
        img[:DEFECT_ROWS] = 0
        mask = np.zeros((NEU_SIDE, NEU_SIDE), np.uint8)
        mask[:DEFECT_ROWS] = 2
        cv2.imwrite(str(root / "images" / "training" / f"{i:06d}.jpg"), img)
        cv2.imwrite(str(root / "annotations" / "training" / f"{i:06d}.png"), mask)
    return root


def make_folder(root: Path, n: int = 4, seed: int = 0) -> Path:
    root.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        img = np.tile(rng.normal(120, 14, 80), (64, 1)) + rng.normal(0, 5, (64, 80))
        cv2.imwrite(str(root / f"normal_{i}.png"), np.clip(img, 0, 255).astype(np.uint8))
    return root


def tiny_config(base: Path, data: dict, inference: dict, mask: dict | None = None) -> Path:
    cfg = {"kind": "fuzzymask", "name": "tiny", "seed": 0, "threads": 1, "device": "cpu",
           "log_every": 1, "checkpoint_every": 100,
           "data": {"channels": 1, **data},
           "model": {"width": 4, "blocks": [1, 1, 1, 1]},
           "optim": {"batch_size": 2, "epochs": 1, "iters_per_epoch": 2},
           "inference": {"tau_images": 12, "overlap": 0, **inference}}
    if mask:
        cfg["mask"] = mask
    path = base / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def trained_net(run: Path):
    from export.fuzzymask.train import FuzzymaskTrainConfig, build_model, load_checkpoint

    ck = load_checkpoint(run / "checkpoint.pt")
    cfg = FuzzymaskTrainConfig.model_validate(ck["config"])
    net = build_model(cfg, load_pretrained=False)
    net.load_state_dict(ck["model"])
    return cfg, net.eval()


# -- finding 1: tau crops on NEU-Seg with a tile larger than the crop ---------------------------
NEU_DATA = {"sources": [{"format": "neu-seg", "root": "neu", "split": "all", "stride": 8}], "crop": 32}


def test_neu_seg_tau_crops_are_tile_sized_and_defect_free_in_training_and_export(tmp_path):
    """Windows were found for the 32 px crop; tau crops of the 64 px tile cut at those corners ran
    off the image (compute_tau's stack failed after training) or into the defect rows."""
    from export.fuzzymask.export import export_bundle
    from export.fuzzymask.train import TAU_START, compute_tau, train

    make_neu(tmp_path / "neu")
    config = tiny_config(tmp_path, NEU_DATA, {"tile": 64})
    run = train(config, tmp_path / "run", max_iters=1)
    m = json.loads((run / "metrics.json").read_text())
    assert m["tau_stats"]["tile"] == 64 and m["tau_stats"]["images"] == 12 and m["tau"] > 0

    # tau is the one of tile-sized crops from defect-free windows of the tile's size
    cfg, net = trained_net(run)
    images, _ = load_normal_images([DataSource(**NEU_DATA["sources"][0])], tmp_path, 1, 64, SplitFractions())
    crops = NormalCrops(images, 64, 1, cfg.seed, 0)
    x = crops.stack(range(TAU_START, TAU_START + 12))
    assert x.shape == (12, 1, 64, 64) and float(x.min()) * 255 > DARK  # no defect pixel in any
    want = compute_tau(net, crops, cfg, torch.device("cpu"))["tau"]
    assert m["tau"] == pytest.approx(want, abs=2e-6)

    # the export recomputes tau when metrics.json is gone: the same crops, the same value
    (run / "metrics.json").unlink()
    export_bundle(run, tmp_path / "bundle")
    s = load_bundle(tmp_path / "bundle").spec
    assert s.provenance["tau"]["stats"]["computed_by"] == "export"
    assert s.provenance["tau"]["stats"]["tile"] == 64 and s.input.tile == (64, 64)
    assert s.kind_params["tau"] == pytest.approx(m["tau"], abs=2e-6)
    assert s.postprocess.score_threshold == s.kind_params["tau"]


def test_neu_seg_tile_without_a_defect_free_window_is_refused_before_training(tmp_path):
    from export.fuzzymask.train import train

    make_neu(tmp_path / "neu")
    config = tiny_config(tmp_path, NEU_DATA, {"tile": 160})  # larger than the 128 px images
    with pytest.raises(ConfigError) as e:
        train(config, tmp_path / "run", max_iters=1)
    msg = str(e.value)
    assert msg.startswith(f"{config}: inference.tile: 160") and "data.sources" in msg and "data.crop 32" in msg
    assert not (tmp_path / "run" / "checkpoint.pt").exists()  # refused before any step


# -- finding 2: per_image_sigma gets a real first threshold ----------------------------------------
def test_per_image_sigma_export_thresholds_at_the_train_envelope_not_zero(tmp_path, caplog):
    from export.fuzzymask.export import export_bundle
    from export.fuzzymask.train import train
    from inspector.evaluation.evaluate import Runner

    make_folder(tmp_path / "imgs")
    data = {"sources": [{"format": "folder", "root": "imgs", "split": "all"}], "crop": 64}
    run = train(tiny_config(tmp_path, data, {"tau_mode": "per_image_sigma"}), tmp_path / "run", max_iters=2)
    envelope = json.loads((run / "metrics.json").read_text())["tau"]
    with caplog.at_level(logging.WARNING):
        export_bundle(run, tmp_path / "bundle")
    s = load_bundle(tmp_path / "bundle").spec
    assert s.kind_params["tau_mode"] == "per_image_sigma" and s.kind_params["tau"] is None
    assert s.postprocess.score_threshold == envelope > 0
    assert s.provenance["tau"]["score_threshold"] == {"value": envelope, "from": "train_envelope tau"}
    assert "per_image_sigma" in caplog.text and "calibrate thresholds" in caplog.text

    # the bundle as exported on a normal training image: not every pixel is a defect (it was, at 0)
    img = cv2.imread(str(tmp_path / "imgs" / "normal_0.png"), cv2.IMREAD_GRAYSCALE)
    for extra in ({}, {"apply_line18": True}):  # line 18: every tile scores S_rep
        r = Runner(tmp_path / "bundle", engine=OnnxRuntimeConfig(intra_op_threads=1), kind_params=extra)
        out = r.adapter.infer(img)
        flagged = r.post.mask(out.probs, out.residual, out.score_map).mean()
        out.release()
        assert flagged < 0.5, (extra, flagged)

    # recomputed by the export (no metrics.json) it is the same envelope
    (run / "metrics.json").unlink()
    export_bundle(run, tmp_path / "bundle2")
    s2 = load_bundle(tmp_path / "bundle2").spec
    assert s2.postprocess.score_threshold == pytest.approx(envelope, abs=2e-6)
    assert s2.kind_params["tau"] is None


# -- finding 4: the runtime's fuzzy fill is the training fill ----------------------------------------
TILE, CELL = 64, 8


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> Path:
    return fuzzymask_toy_bundle(tmp_path_factory.mktemp("fm19") / "toy", tile=TILE, cell=CELL)


def adapter_for(root: Path, **kind_params) -> FuzzymaskAdapter:
    b = load_bundle(root)
    b.spec.kind_params.update(kind_params)
    a = make_adapter(b, OnnxRuntimeEngine(b.graph_path(), OnnxRuntimeConfig(intra_op_threads=1)))
    assert isinstance(a, FuzzymaskAdapter)
    return a


@pytest.mark.parametrize("fill", ["gauss0", "uniform01", "blurred_self"])
def test_export_writes_the_training_fill_into_kind_params(fill):
    from export.fuzzymask.export import kind_params
    from export.fuzzymask.train import FuzzymaskTrainConfig

    cfg = FuzzymaskTrainConfig.model_validate({"data": {"sources": [{"format": "folder", "root": "."}]},
                                              "mask": {"fill": fill}, "inference": {"inference_fill": "fuzzy"}})
    kp = kind_params(cfg, 0.5)
    assert kp["fill"] == fill and kp["inference_fill"] == "fuzzy"
    assert FuzzymaskParams.model_validate(kp).fill == fill


def test_fill_defaults_to_gauss0_and_a_bad_fill_names_the_key(toy):
    assert FuzzymaskParams(tau=0.1).fill == "gauss0"  # bundles without the key: as before
    with pytest.raises(BundleError, match=r"bundle.yaml: kind_params\.fill: .*'pink'"):
        adapter_for(toy, fill="pink")


def training_overlay(x: np.ndarray, cells: np.ndarray, fill: str, z: torch.Tensor | None) -> np.ndarray:
    """export/fuzzymask/masking.py's overlay of one tile on the given cells with interference z
    (None: blurred_self, which fuzzy_mask computes itself)."""
    cfg = FuzzyMaskConfig(cell=CELL, fill=fill, n_partitions=1)
    xt = torch.from_numpy(x[None])
    if z is None:  # one image, one partition: fuzzy_mask masks every cell; keep the wanted ones
        full, sel = fuzzy_mask(xt, cfg, np.random.default_rng(0))
        assert bool(sel.all())
        pix = cell_pixels(torch.from_numpy(cells)[None], TILE, TILE, CELL).expand_as(xt)
        return torch.where(pix, full, xt)[0].numpy()
    c = torch.from_numpy(cells)[None]
    r = retention_map(c, TILE, TILE, CELL, cfg.w_max, cfg.sigma())
    mixed = (r * xt + (1.0 - r) * z).clamp(0.0, 1.0)
    return torch.where(cell_pixels(c, TILE, TILE, CELL).expand_as(xt), mixed, xt)[0].numpy()


@pytest.mark.parametrize("fill", ["gauss0", "uniform01", "blurred_self"])
def test_runtime_fuzzy_overlay_equals_the_training_overlay(toy, fill):
    from export.fuzzymask.masking import _fill

    a = adapter_for(toy, inference_fill="fuzzy", fill=fill, sigma_z=0.1)
    x = np.random.default_rng(3).random((1, TILE, TILE), dtype=np.float32)
    cells = np.random.default_rng(4).random((TILE // CELL, TILE // CELL)) < 0.4
    got = np.empty_like(x)
    a._masked_input(x, cells, got)
    if fill == "gauss0":
        # the runtime's noise: N(0, sigma_z^2) drawn once from numpy default_rng(0) (as before)
        z = torch.from_numpy(np.random.default_rng(0).normal(0.0, 0.1, (1, 1, TILE, TILE)).astype(np.float32))
    elif fill == "uniform01":
        # drawn as training draws it from a numpy generator: with seed 0 the same z
        z = _fill(torch.from_numpy(x[None]), FuzzyMaskConfig(fill=fill), np.random.default_rng(0))
    else:
        z = None
    want = training_overlay(x, cells, fill, z)
    np.testing.assert_allclose(got, want, rtol=0, atol=5e-7)
    out = ~np.repeat(np.repeat(cells, CELL, 0), CELL, 1)
    np.testing.assert_array_equal(got[0][out], x[0][out])  # outside the cells: x, bit for bit
    if fill == "uniform01":  # the interference is U(0, 1), not N(0, 0.01)
        zz = z.numpy()
        assert 0.0 <= zz.min() and zz.max() < 1.0 and abs(float(zz.mean()) - 0.5) < 0.01


def test_blurred_self_fill_is_per_tile_and_deterministic(toy):
    a = adapter_for(toy, inference_fill="fuzzy", fill="blurred_self")
    rng = np.random.default_rng(5)
    x1 = rng.random((1, TILE, TILE), dtype=np.float32)
    x2 = np.ascontiguousarray(x1[:, ::-1])
    cells = np.ones((TILE // CELL, TILE // CELL), bool)
    d1, d1b, d2 = (np.empty_like(x1) for _ in range(3))
    a._masked_input(x1, cells, d1)
    a._masked_input(x2, cells, d2)  # another tile in between: the buffers are reused
    a._masked_input(x1, cells, d1b)
    np.testing.assert_array_equal(d1, d1b)
    np.testing.assert_allclose(d2, d1[:, ::-1], atol=2e-6)  # its own blur: mirrored tile, mirrored overlay
    # a frame through dynamic inference: the same frame scores the same
    img = np.clip(128 + rng.normal(0, 6, (TILE, 100)), 0, 255).astype(np.uint8)
    img[30:34, 30:34] = 40
    o1 = a.infer(img)
    s1 = o1.score_map.copy()
    o1.release()
    o2 = a.infer(img)
    assert o2.stats["repaired_tiles"] >= 1 and np.isfinite(o2.score_map).all()
    np.testing.assert_array_equal(o2.score_map, s1)
    o2.release()


SHIPPED = ROOT / "deploy" / "models" / "fuzzymask-mt"


@pytest.mark.skipif(not (SHIPPED / "bundle.yaml").is_file(), reason="no shipped fuzzymask-mt bundle")
def test_shipped_bundle_still_validates_with_the_gauss0_default():
    kp = load_bundle(SHIPPED).spec.kind_params
    assert "fill" not in kp
    p = FuzzymaskParams.model_validate(kp)
    assert p.fill == "gauss0" and p.inference_fill == "zero"
