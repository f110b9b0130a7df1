import shutil

import pytest
import yaml

from inspector.bundle import load_bundle
from inspector.errors import BundleError


def copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_corrupt_graph_is_refused(toy_bundle, tmp_path):
    b = copy(toy_bundle, tmp_path / "b")
    with open(b / "model.onnx", "r+b") as f:
        f.seek(100)
        f.write(b"\x00\x01\x02")
    with pytest.raises(BundleError, match="sha256 .* does not match"):
        load_bundle(b)


def test_missing_graph_and_missing_yaml(toy_bundle, tmp_path):
    b = copy(toy_bundle, tmp_path / "b")
    (b / "model.onnx").unlink()
    with pytest.raises(BundleError, match="model.onnx.*missing"):
        load_bundle(b)
    (b / "bundle.yaml").unlink()
    with pytest.raises(BundleError, match="bundle.yaml: missing"):
        load_bundle(b)
    with pytest.raises(BundleError, match="not found"):
        load_bundle(tmp_path / "nowhere")


def test_bad_key_in_bundle_yaml_is_named(toy_bundle, tmp_path):
    b = copy(toy_bundle, tmp_path / "b")
    meta = yaml.safe_load((b / "bundle.yaml").read_text())
    meta["input"]["channels"] = 2
    (b / "bundle.yaml").write_text(yaml.safe_dump(meta))
    with pytest.raises(BundleError, match="input.channels"):
        load_bundle(b)
