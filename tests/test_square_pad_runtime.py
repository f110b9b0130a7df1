"""The ARCD thesis's squaring at run time (spec §2.2, bundle ``input.fit: square_pad``): a frame is
zero-padded to a square, resized to the model input and run as one item; the outputs come back in
frame coordinates. Real onnxruntime sessions on the hand-built graphs of ``toy_models``."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import cv2
import numpy as np
import onnxruntime as ort
import pytest
import yaml

from inspector.bundle import BUNDLE_FILE, Bundle, load_bundle
from inspector.engines.onnxruntime import OnnxRuntimeEngine
from inspector.errors import BundleError
from inspector.models import make_adapter
from inspector.models.tiling import SquareFit
from toy_models import dark_spot_bundle, fuzzymask_toy_bundle, square_pad_bundle

TILE = 64


def adapter_of(path: Path, max_batch: int = 0):
    b = load_bundle(path)
    return make_adapter(b, OnnxRuntimeEngine(b.graph_path()), max_batch=max_batch)


def edit_yaml(path: Path, change) -> None:
    meta = path / BUNDLE_FILE
    data = yaml.safe_load(meta.read_text())
    change(data)
    meta.write_text(yaml.safe_dump(data, sort_keys=False))


@pytest.fixture(scope="module", params=["top", "center"])
def sq(request, tmp_path_factory) -> tuple[str, Path]:
    """A square_pad arcd bundle with the region head, per alignment."""
    align = request.param
    return align, square_pad_bundle(tmp_path_factory.mktemp("sq") / f"sq-{align}", tile=TILE,
                                    align=align, region=True)


def reference(path: Path, grey: np.ndarray, align: str) -> dict[str, np.ndarray]:
    """The spec's recipe written out independently of the runtime: pad, resize, run the graph
    on the one square, resize each output plane back to the square, crop the frame out of it."""
    h, w = grey.shape
    s = max(h, w)
    top, left = (0, 0) if align == "top" else ((s - h) // 2, (s - w) // 2)
    canvas = np.zeros((s, s), np.uint8)
    canvas[top:top + h, left:left + w] = grey
    x = cv2.resize(canvas, (TILE, TILE), interpolation=cv2.INTER_LINEAR).astype(np.float32) / 255.0
    sess = ort.InferenceSession(str(path / "model.onnx"), providers=["CPUExecutionProvider"])
    probs, region = sess.run(["probs", "region"], {"image": x[None, None]})

    def back(plane: np.ndarray) -> np.ndarray:
        big = cv2.resize(plane, (s, s), interpolation=cv2.INTER_LINEAR)
        return big[top:top + h, left:left + w]

    p = np.stack([back(c) for c in probs[0]])
    return {"probs": p, "score": 1.0 - p[0], "region": back(region[0, 0])}


# ----------------------------------------------------------------------------- the bundle keys

def test_old_bundles_stay_tiled_and_are_written_as_before(tmp_path):
    old = dark_spot_bundle(tmp_path / "old")
    spec = load_bundle(old).spec
    assert spec.input.fit == "tile" and spec.input.pad_align == "top"
    text = (old / BUNDLE_FILE).read_text()
    # written byte for byte as before the keys existed
    assert "fit" not in text and "pad_align" not in text
    assert not isinstance(adapter_of(old).grid(100, 300), SquareFit)


def test_square_pad_keys_round_trip(tmp_path):
    for align in ("top", "center"):
        p = square_pad_bundle(tmp_path / align, align=align)
        inp = yaml.safe_load((p / BUNDLE_FILE).read_text())["input"]
        assert inp["fit"] == "square_pad" and inp["pad_align"] == align
        spec = load_bundle(p).spec
        assert (spec.input.fit, spec.input.pad_align) == ("square_pad", align)


@pytest.mark.parametrize("kind", ["clgan", "fuzzymask"])
def test_square_pad_on_another_kind_is_refused_naming_the_key(tmp_path, kind):
    if kind == "fuzzymask":
        p = fuzzymask_toy_bundle(tmp_path / kind)
    else:
        p = dark_spot_bundle(tmp_path / kind)
        edit_yaml(p, lambda d: d.update(kind="clgan", outputs={"reconstruction": "reconstruction"}))
    load_bundle(p)  # tiled, the bundle is fine
    edit_yaml(p, lambda d: d["input"].update(fit="square_pad"))
    with pytest.raises(BundleError, match=rf"bundle\.yaml: input\.fit: square_pad is only for kind "
                                          rf"arcd \(this bundle is kind {kind}"):
        load_bundle(p)


def test_an_adapter_refuses_square_pad_that_skipped_validation(tmp_path):
    # model_copy does not validate: the adapter checks again rather than tile-decode a square
    p = fuzzymask_toy_bundle(tmp_path / "fm")
    b = load_bundle(p)
    spec = b.spec.model_copy(update={"input": b.spec.input.model_copy(update={"fit": "square_pad"})})
    with pytest.raises(BundleError, match=r"bundle\.yaml: input\.fit: square_pad is only for kind arcd"):
        make_adapter(Bundle(p, spec), OnnxRuntimeEngine(b.graph_path()))


def test_a_non_square_tile_is_refused_naming_the_key(tmp_path):
    p = square_pad_bundle(tmp_path / "rect")
    edit_yaml(p, lambda d: d["input"].update(tile=[64, 32]))
    with pytest.raises(BundleError, match=r"bundle\.yaml: input\.fit: square_pad .* input\.tile, "
                                          r"which must be square \(got \[64, 32\]\)"):
        load_bundle(p)


@pytest.mark.parametrize("key, value", [("fit", "square-pad"), ("pad_align", "bottom")])
def test_a_misspelt_value_names_its_key(tmp_path, key, value):
    p = square_pad_bundle(tmp_path / "typo")
    edit_yaml(p, lambda d: d["input"].update({key: value}))
    with pytest.raises(BundleError, match=rf"bundle\.yaml: input\.{key}: "):
        load_bundle(p)


# ----------------------------------------------------------------------------- the runtime

@pytest.mark.parametrize("shape, spot", [((100, 300), (40, 200)), ((300, 100), (200, 40))])
def test_a_dark_spot_comes_back_where_it_is_in_the_frame(sq, shape, spot):
    align, path = sq
    a = adapter_of(path)
    img = np.full(shape, 50, np.uint8)
    y, x = spot
    img[y:y + 16, x:x + 16] = 0
    out = a.infer(img)
    assert out.score_map.shape == shape and out.score_map.dtype == np.float32
    assert out.probs.shape == (2, *shape) and out.region.shape == shape
    np.testing.assert_allclose(out.score_map, 1.0 - out.probs[0], atol=1e-6)
    mask = out.probs[1] > 0.5
    ys, xs = np.nonzero(mask)
    # one tile pixel is 300/64 = 4.7 frame pixels: the class mask lies on the spot within two
    assert len(ys) > 100
    assert abs(ys.min() - y) <= 2 and abs(ys.max() - (y + 15)) <= 2
    assert abs(xs.min() - x) <= 2 and abs(xs.max() - (x + 15)) <= 2
    assert not mask[:max(0, y - 3)].any() and not mask[y + 19:].any()
    assert not mask[:, :max(0, x - 3)].any() and not mask[:, x + 19:].any()


@pytest.mark.parametrize("shape", [(100, 300), (300, 100), (101, 300), (300, 97), (128, 128),
                                   (40, 50), (64, 200)])
def test_outputs_are_the_resized_back_crop_of_the_square(sq, shape):
    align, path = sq
    a = adapter_of(path)
    rng = np.random.default_rng(3)
    img = rng.integers(0, 256, shape, dtype=np.uint8)
    img[:, shape[1] // 3:shape[1] // 3 + 20] = 230
    out = a.infer(img)
    ref = reference(path, img, align)
    np.testing.assert_allclose(out.probs, ref["probs"], atol=1e-5)
    np.testing.assert_allclose(out.score_map, ref["score"], atol=1e-5)
    np.testing.assert_allclose(out.region, ref["region"], atol=1e-5)
    assert a.grid(*shape).count == 1  # one batch item per frame, whatever its size


def test_the_two_alignments_place_the_frame_in_the_square(tmp_path):
    # a 100x300 frame in the 300x300 square resized to 64: 21.3 rows of frame, at the top or
    # in the middle (rows 100..199 -> 21.3..42.7), zeros elsewhere
    top = adapter_of(square_pad_bundle(tmp_path / "t", align="top"))
    mid = adapter_of(square_pad_bundle(tmp_path / "c", align="center"))
    img = np.full((100, 300), 120, np.uint8)
    sq_top, g_top = top.square_input(img)
    sq_mid, g_mid = mid.square_input(img)
    assert (g_top.top, g_top.left) == (0, 0) and (g_mid.top, g_mid.left) == (100, 0)
    assert sq_top[:21].min() == 120 and sq_top[23:].max() == 0
    assert sq_mid[:21].max() == 0 and sq_mid[22:42].min() == 120 and sq_mid[44:].max() == 0


def test_an_rgb_frame_on_the_grey_model_is_squared_as_its_grey_levels(sq):
    align, path = sq
    a = adapter_of(path)
    grey = np.random.default_rng(4).integers(0, 256, (90, 250), dtype=np.uint8)
    rgb = np.repeat(grey[:, :, None], 3, axis=2)
    np.testing.assert_array_equal(a.square_input(rgb)[0], a.square_input(grey)[0])
    np.testing.assert_allclose(a.infer(rgb).probs, reference(path, grey, align)["probs"], atol=1e-5)


def test_a_fixed_batch_graph_gets_its_frame_in_item_zero(tmp_path):
    p = square_pad_bundle(tmp_path / "fixed", region=True)
    edit_yaml(p, lambda d: d["input"].update(batch=2))
    a = adapter_of(p)
    img = np.random.default_rng(5).integers(0, 256, (100, 300), dtype=np.uint8)
    batch, g = a.fill_batch(img)
    assert batch.shape == (2, 1, TILE, TILE) and not batch[1].any()
    np.testing.assert_allclose(a.infer(img).probs, reference(p, img, "top")["probs"], atol=1e-5)


def test_repeated_frames_reuse_the_buffers(sq):
    _, path = sq
    a = adapter_of(path)
    shape = (100, 300)
    img = np.full(shape, 50, np.uint8)
    o1 = a.infer(img)
    bufs = (o1.probs, o1.score_map, o1.region)
    o1.release()
    batch1 = a.fill_batch(img)[0]
    square1 = a.square_input(img)[0]
    img[40:56, 200:216] = 0
    for _ in range(3):
        o = a.infer(img)
        assert all(x is y for x, y in zip((o.probs, o.score_map, o.region), bufs))
        o.release()
    assert a.fill_batch(img)[0] is batch1 and a.square_input(img)[0] is square1
    assert a._pools.get(shape).allocated == 1
    # steady state: no frame-sized (let alone square-sized) array is allocated per frame
    tracemalloc.start()
    try:
        o = a.infer(img)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    o.release()
    assert peak < shape[0] * shape[1] * 4 / 2, peak
    assert (o.probs[1][44:52, 204:212] > 0.5).all()


def test_warmup_and_frames_in_flight(sq):
    _, path = sq
    a = adapter_of(path)
    assert a.warmup((100, 300)) > 0
    img = np.full((100, 300), 50, np.uint8)
    held = [a.infer(img) for _ in range(3)]  # three frames in flight: three buffer sets
    assert len({id(o.probs) for o in held}) == 3
    for o in held:
        o.release()


# ----------------------------------------------------------------------------- training parity

@pytest.mark.parametrize("shape", [(100, 300), (300, 100), (101, 300), (300, 97), (40, 50),
                                   (128, 128), (1440 // 8, 2560 // 8)])
@pytest.mark.parametrize("align", ["top", "center"])
def test_the_runtime_squares_frames_as_training_does(tmp_path, shape, align):
    pytest.importorskip("torch")
    from export.arcd.simulation import square_pad_resize

    a = adapter_of(square_pad_bundle(tmp_path / "p", align=align))
    img = np.random.default_rng(6).integers(0, 256, shape, dtype=np.uint8)
    got, _ = a.square_input(img)
    want, _ = square_pad_resize(img, TILE, align)
    np.testing.assert_array_equal(got[:, :, 0], want)
    # and what the engine is fed is that, normalised as in tile mode (mean 0, std 1 here)
    batch, _ = a.fill_batch(img)
    np.testing.assert_allclose(batch[0, 0], want.astype(np.float32) / 255.0, atol=1e-7)


def test_check_says_how_the_model_sees_a_frame_and_what_region_it_found(tmp_path, synthetic_cfg):
    """``inspector check`` names the input mode (tiles and how many, or the square pad) and, for
    a bundle with a region head, the region's name, threshold and share of the checked frame."""
    import json

    from conftest import run_cli, write_config
    from toy_models import dark_spot_bundle, square_pad_bundle

    sq = square_pad_bundle(tmp_path / "sq", tile=64, align="center", region=True)
    tiled = dark_spot_bundle(tmp_path / "tiled", tile=64)
    got = {}
    for name, bundle in (("sq", sq), ("tiled", tiled)):
        cfg = write_config(tmp_path / f"{name}.yaml", synthetic_cfg(model={"bundle": str(bundle)},
                                                                  source={"width": 256, "height": 128}))
        r = run_cli("check", "--config", str(cfg), "--json")
        assert r.returncode == 0, r.stderr
        got[name] = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["sq"]["input"] == "square_pad (center) to 64x64: 1 input per frame"
    assert got["sq"]["region"].startswith("machine region (threshold 0.5): ")
    assert got["sq"]["region"].endswith("% of this frame")
    # 128x256 in 64-pixel tiles overlapping by 32: 3 rows of 7
    assert got["tiled"]["input"] == "tiles 64x64, overlap 32: 21 per frame"
    assert "region" not in got["tiled"]
