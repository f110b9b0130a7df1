"""The arcd adapter: tiling a wide frame through a real onnxruntime session and stitching back."""

import cv2
import numpy as np
import pytest

from inspector.bundle import load_bundle
from inspector.engines.onnxruntime import OnnxRuntimeEngine
from inspector.models import make_adapter


def whole_frame_dark_prob(img: np.ndarray) -> np.ndarray:
    """What the toy graph computes, on the whole frame at once (AvgPool without padding counts)."""
    x = img.astype(np.float32)
    s = cv2.boxFilter(x, -1, (9, 9), normalize=False, borderType=cv2.BORDER_CONSTANT)
    n = cv2.boxFilter(np.ones_like(x), -1, (9, 9), normalize=False, borderType=cv2.BORDER_CONSTANT)
    logit = 40.0 * (s / n - x) - 4.0
    # softmax over [0, logit, -50, -50]
    e0, e1 = np.exp(-np.maximum(logit, 0)), np.exp(logit - np.maximum(logit, 0))
    em = 2 * np.exp(-50.0 - np.maximum(logit, 0))
    return 1.0 - e0 / (e0 + e1 + em)


@pytest.mark.parametrize("shape", [(128, 700), (300, 333), (64, 90)])
def test_stitched_tiles_equal_whole_frame(toy_bundle, shape):
    b = load_bundle(toy_bundle)
    a = make_adapter(b, OnnxRuntimeEngine(b.graph_path()), max_batch=3)
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, shape, dtype=np.uint8)
    out = a.infer(img)
    assert out.score_map.shape == shape and out.probs.shape == (4, *shape)
    expected = whole_frame_dark_prob(img / 255.0)
    if shape[0] < 128 or shape[1] < 128:
        # a frame smaller than one tile is reflect-padded: only pixels whose 9x9 window lies
        # inside the frame can equal the unpadded computation
        out_map, expected = out.score_map[:-4, :-4], expected[:-4, :-4]
    else:
        out_map = out.score_map
    np.testing.assert_allclose(out_map, expected, atol=2e-5)
    assert set(out.timings_ms) >= {"preprocess", "engine", "decode"}


def test_rgb_frame_on_grey_model_and_buffer_reuse(toy_bundle):
    b = load_bundle(toy_bundle)
    a = make_adapter(b, OnnxRuntimeEngine(b.graph_path()))
    img = np.full((128, 256, 3), 200, np.uint8)
    img[60:64, 100:104] = 10
    o1 = a.infer(img)
    assert o1.score_map[61, 101] > 0.9 and o1.score_map[10, 10] < 0.1
    o1.release()
    o2 = a.infer(img)
    assert o2.score_map is o1.score_map  # the pooled buffer came back


@pytest.mark.parametrize("key, value, message", [
    ("tile", [224, 224], r"input\.tile: \[224, 224\], but model\.onnx takes 256x256 \(HxW\) tiles"),
    ("channels", 3, r"input\.channels: 3, but model\.onnx takes 1 channel"),
])
def test_bundle_input_that_disagrees_with_the_graph_names_the_key(tmp_path, demo_bundle, key, value, message):
    # Used to load fine and fail on the first frame with onnxruntime's "invalid dimensions",
    # an engine error (exit 1, restarted by systemd for ever) naming neither file nor key.
    import shutil

    import yaml

    from inspector.errors import BundleError
    b = tmp_path / "b"
    shutil.copytree(demo_bundle, b)
    meta = yaml.safe_load((b / "bundle.yaml").read_text())
    meta["input"][key] = value
    (b / "bundle.yaml").write_text(yaml.safe_dump(meta, sort_keys=False))
    bundle = load_bundle(b)
    with pytest.raises(BundleError, match=str(b / "bundle.yaml").replace(".", r"\.") + ": " + message):
        make_adapter(bundle, OnnxRuntimeEngine(bundle.graph_path()))


def test_buffers_of_many_frame_sizes_are_not_all_kept(toy_bundle):
    # Offline evaluation over images that all differ in size (magnetic tile) used to keep every
    # size's tile batch, grid and output buffers: ~7 MB more per new size, gigabytes per data set.
    b = load_bundle(toy_bundle)
    a = make_adapter(b, OnnxRuntimeEngine(b.graph_path()))
    rng = np.random.default_rng(1)
    first = rng.integers(0, 256, (130, 150), dtype=np.uint8)
    want = a.infer(first).score_map.copy()
    for k in range(12):
        out = a.infer(rng.integers(0, 256, (140 + k, 160 + 3 * k), dtype=np.uint8))
        if out.release:
            out.release()
    caches = {"grids": a._grids, "batches": a._batches, "pools": a._pools}
    assert all(len(c) <= 4 for c in caches.values()), {k: len(c) for k, c in caches.items()}
    np.testing.assert_array_equal(a.infer(first).score_map, want)  # an evicted size comes back right


def test_a_grey_content_rgb_frame_is_inferred_as_its_grey_levels(toy_bundle):
    # NEU-Seg's JPEGs and many colour-coded mono cameras carry grey content in three channels.
    # The luma used to be truncated, turning grey level x into x - 1 for 65 of the 256 levels.
    b = load_bundle(toy_bundle)
    a = make_adapter(b, OnnxRuntimeEngine(b.graph_path()))
    grey = np.tile(np.arange(256, dtype=np.uint8), (130, 1))
    rgb = np.repeat(grey[:, :, None], 3, axis=2)
    np.testing.assert_array_equal(a.to_model_channels(rgb)[:, :, 0], grey)
    np.testing.assert_array_equal(a.infer(rgb).score_map, a.infer(grey).score_map)
