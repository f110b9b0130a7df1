"""ARCD's optional machine-region head at run time: the bundle's ``region`` key and the adapter's
stitched region map, through real onnxruntime sessions on hand-built graphs."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import yaml

from inspector.bundle import BUNDLE_FILE, load_bundle
from inspector.engines.onnxruntime import OnnxRuntimeEngine
from inspector.errors import BundleError
from inspector.models import make_adapter
from toy_models import dark_spot_bundle, fuzzymask_toy_bundle, region_bundle


def adapter_of(path: Path, max_batch: int = 0):
    b = load_bundle(path)
    return make_adapter(b, OnnxRuntimeEngine(b.graph_path()), max_batch=max_batch)


def expected_region(img: np.ndarray) -> np.ndarray:
    """What the toy graph's region output is, per pixel (no neighbourhood: tiling cannot change it)."""
    return 1.0 / (1.0 + np.exp(-40.0 * (img.astype(np.float64) / 255.0 - 0.5)))


def edit_yaml(path: Path, change) -> None:
    meta = path / BUNDLE_FILE
    data = yaml.safe_load(meta.read_text())
    change(data)
    meta.write_text(yaml.safe_dump(data, sort_keys=False))


@pytest.fixture(scope="module")
def rbundle(tmp_path_factory) -> Path:
    return region_bundle(tmp_path_factory.mktemp("region") / "toy-region")


def test_the_region_key_loads_and_old_bundles_are_written_without_it(rbundle, tmp_path):
    spec = load_bundle(rbundle).spec
    assert spec.region is not None and spec.region.name == "machine region"
    assert spec.region.threshold == 0.5 and spec.outputs["region"] == "region"
    old = dark_spot_bundle(tmp_path / "old")
    assert load_bundle(old).spec.region is None
    # a bundle without the head is written byte for byte as before the key existed
    assert "region" not in (old / BUNDLE_FILE).read_text()


@pytest.mark.parametrize("shape", [(100, 300), (64, 64), (40, 50)])
def test_region_map_is_stitched_into_frame_coordinates(rbundle, shape):
    a = adapter_of(rbundle, max_batch=2)
    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, shape, dtype=np.uint8)
    # a bright band across tile borders, so a wrong stitch offset would show
    img[:, shape[1] // 3:shape[1] // 3 + 20] = 230
    out = a.infer(img)
    assert out.region is not None and out.region.shape == shape and out.region.dtype == np.float32
    np.testing.assert_allclose(out.region, expected_region(img), atol=1e-5)
    assert out.probs.shape == (2, *shape) and out.score_map.shape == shape
    # the region is a map of the frame, not of the padded grid
    assert (out.region[:, shape[1] // 3:shape[1] // 3 + 20] > 0.99).all()


def test_region_buffers_come_back_from_the_pool(rbundle):
    a = adapter_of(rbundle)
    img = np.full((64, 200), 40, np.uint8)
    o1 = a.infer(img)
    r1 = o1.region
    o1.release()
    img[:, :50] = 250
    o2 = a.infer(img)
    assert o2.region is r1  # the pooled buffer was reused, nothing allocated
    assert (o2.region[:, :50] > 0.99).all() and (o2.region[:, 60:] < 0.01).all()


def test_old_bundles_give_no_region(toy_bundle, tmp_path):
    for b in (toy_bundle, dark_spot_bundle(tmp_path / "old")):
        out = adapter_of(b).infer(np.full((70, 130), 100, np.uint8))
        assert out.region is None and out.probs is not None


def _drop_outputs_region(d):
    del d["outputs"]["region"]


def _drop_region_key(d):
    del d["region"]


@pytest.mark.parametrize("change, says", [
    (_drop_outputs_region, r"region: set, but outputs\.region .* is missing"),
    (_drop_region_key, r"outputs\.region: set, but the region key .* is missing"),
    (lambda d: d["region"].update(threshold=0.0), r"region\.threshold: .*greater than 0"),
    (lambda d: d["region"].update(threshold=1.5), r"region\.threshold: .*less than or equal to 1"),
    (lambda d: d["region"].update(threshold=-0.2), r"region\.threshold: "),
    (lambda d: d["region"].pop("name"), r"region\.name: required key is missing"),
    (lambda d: d["region"].update(colour="red"), r"region\.colour: "),
    (lambda d: d.update(region=None), r"outputs\.region: set, but the region key"),
], ids=["no-output", "no-key", "threshold-0", "threshold-1.5", "threshold-negative", "no-name",
        "unknown-key", "null"])
def test_region_key_errors_name_the_file_and_key(rbundle, tmp_path, change, says):
    import shutil
    b = Path(shutil.copytree(rbundle, tmp_path / "b"))
    edit_yaml(b, change)
    with pytest.raises(BundleError) as err:
        load_bundle(b)
    msg = str(err.value)
    assert msg.startswith(f"{b / BUNDLE_FILE}: "), msg
    assert re.search(says, msg), msg
    assert "\n" not in msg and "Value error" not in msg, msg


def test_threshold_one_is_allowed(rbundle, tmp_path):
    import shutil
    b = Path(shutil.copytree(rbundle, tmp_path / "b"))
    edit_yaml(b, lambda d: d["region"].update(threshold=1))
    assert load_bundle(b).spec.region.threshold == 1.0


@pytest.mark.parametrize("with_output", [True, False])
def test_only_arcd_has_a_region(tmp_path, with_output):
    b = fuzzymask_toy_bundle(tmp_path / "fm")

    def add(d):
        d["region"] = {"name": "machine region", "threshold": 0.5}
        if with_output:
            d["outputs"]["region"] = "reconstruction"
    edit_yaml(b, add)
    with pytest.raises(BundleError, match=rf"^{re.escape(str(b / BUNDLE_FILE))}: region: only kind "
                                          r"arcd has a region head \(this bundle is kind fuzzymask\)"):
        load_bundle(b)

    def output_only(d):
        del d["region"]
        d["outputs"]["region"] = "reconstruction"
    edit_yaml(b, output_only)
    with pytest.raises(BundleError, match=rf"^{re.escape(str(b / BUNDLE_FILE))}: outputs\.region: "
                                          r"only kind arcd"):
        load_bundle(b)


def test_region_output_missing_from_the_graph_names_the_key(rbundle, tmp_path):
    import shutil
    b = Path(shutil.copytree(rbundle, tmp_path / "b"))
    edit_yaml(b, lambda d: d["outputs"].update(region="nope"))
    with pytest.raises(BundleError, match=rf"^{re.escape(str(b / BUNDLE_FILE))}: outputs\.region: "
                                          r"the graph has no output 'nope'"):
        adapter_of(b)


def test_a_region_output_of_two_channels_is_refused_at_load(tmp_path):
    b = region_bundle(tmp_path / "two", region_channels=2)
    with pytest.raises(BundleError) as err:
        adapter_of(b)
    msg = str(err.value)
    assert msg.startswith(f"{b / 'model.onnx'}: output 'region' (outputs.region in {b / BUNDLE_FILE}) "
                          "has 2 channels"), msg


def test_a_region_output_of_two_channels_on_the_frame_is_refused(rbundle):
    # A graph whose channel axis is dynamic shows the channels only on the first frame: the real
    # engine's outputs of that frame, with the region doubled to two channels, go to decode().
    a = adapter_of(rbundle)
    img = np.full((64, 100), 100, np.uint8)
    batch, g = a.fill_batch(img)
    raw = a.run_engine(batch)
    raw["region"] = [np.concatenate([c, c], axis=1) for c in raw["region"]]
    with pytest.raises(BundleError, match=rf"^{re.escape(str(rbundle / 'model.onnx'))}: output 'region' .*"
                                          r"has 2 channels"):
        a.decode(raw, g, img)
