"""Every float a user writes in a shipped config or bundle refuses .nan and .inf, naming the key.

A bound such as ``gt=0`` lets .inf through (``optim.lr: .inf`` was accepted) and
describes .nan with the wrong bound ("should be greater than 0"): each config model sets
``allow_inf_nan=False``, and these tests walk every float leaf of what we ship."""

from __future__ import annotations

import importlib
import math
import shutil
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from inspector.bundle import load_bundle
from inspector.config import load_config
from inspector.errors import InspectorError

ROOT = Path(__file__).resolve().parents[1]
TRAINERS = {"arcd": "export.arcd.train", "clgan": "export.clgan.train",
            "fuzzymask": "export.fuzzymask.train", "defectgan": "export.augment.defectgan.train",
            "anomalyalign": "export.augment.anomalyalign.train"}
#: bundle sections that record what was (history, provenance, measured figures), not settings
RECORDS = ("provenance", "metrics", "postprocess_history")


def float_leaves(node, path=()):
    if isinstance(node, dict):
        for k, v in node.items():
            yield from float_leaves(v, path + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from float_leaves(v, path + (i,))
    elif isinstance(node, float):
        yield path


def with_value(raw: dict, path: tuple, value):
    out = yaml.safe_load(yaml.safe_dump(raw))
    node = out
    for k in path[:-1]:
        node = node[k]
    node[path[-1]] = value
    return out


def dotted(path: tuple) -> str:
    return ".".join(str(p) for p in path)


@pytest.mark.parametrize("config", sorted((ROOT / "configs" / "train").glob("*.yaml")), ids=lambda p: p.name)
def test_training_configs_refuse_inf_and_nan_in_every_float(config, tmp_path):
    pytest.importorskip("torch")
    raw = yaml.safe_load(config.read_text())
    trainer = importlib.import_module(TRAINERS[raw.get("kind", "arcd")])
    paths = list(float_leaves(raw))
    assert paths, f"{config.name} has no float to check"
    for i, path in enumerate(paths):
        bad = tmp_path / "c.yaml"
        bad.write_text(yaml.safe_dump(with_value(raw, path, math.inf if i % 2 else math.nan)))
        with pytest.raises(InspectorError) as e:
            trainer.load_config(bad)
        assert dotted(path) in str(e.value) and "finite" in str(e.value), (path, str(e.value))


@pytest.mark.parametrize("config", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_camera_configs_refuse_inf_and_nan_in_every_float(config, tmp_path):
    raw = yaml.safe_load(config.read_text())
    # the alarm and PLC keys are not in every shipped config: a full section is added
    raw.setdefault("alarms", {"rules": [{"name": "any", "off_delay_s": 2.5, "min_area_mm2": 0.5}],
                              "drivers": [{"type": "modbus", "host": "127.0.0.1", "port": 5020,
                                           "timeout_s": 0.5, "retry_backoff_s": [1.0, 10.0]}]})
    paths = list(float_leaves(raw))
    assert len(paths) >= 4
    for i, path in enumerate(paths):
        bad = tmp_path / "cam.yaml"
        bad.write_text(yaml.safe_dump(with_value(raw, path, math.nan if i % 2 else math.inf)))
        with pytest.raises(InspectorError) as e:
            load_config(bad, check_paths=False)
        assert dotted(path) in str(e.value) and "finite" in str(e.value), (path, str(e.value))


@pytest.mark.parametrize("bundle", sorted(p.parent for p in (ROOT / "deploy" / "models").glob("*/bundle.yaml")),
                         ids=lambda p: p.name)
def test_bundles_refuse_inf_and_nan_in_every_setting(bundle, tmp_path):
    from inspector.models.clgan import ClganParams
    from inspector.models.fuzzymask import FuzzymaskParams

    raw = yaml.safe_load((bundle / "bundle.yaml").read_text())
    params = {"clgan": ClganParams, "fuzzymask": FuzzymaskParams}.get(raw["kind"])
    copy = tmp_path / bundle.name
    shutil.copytree(bundle, copy, ignore=shutil.ignore_patterns("*.onnx"))
    checked = 0
    for i, path in enumerate(float_leaves(raw)):
        if path[0] in RECORDS:
            continue
        checked += 1
        value = math.inf if i % 2 else math.nan
        if path[0] == "kind_params":  # read by the model's adapter, which validates them
            with pytest.raises(ValidationError, match="finite"):
                params.model_validate(with_value(raw, path, value)["kind_params"])
            continue
        (copy / "bundle.yaml").write_text(yaml.safe_dump(with_value(raw, path, value)))
        with pytest.raises(InspectorError) as e:
            load_bundle(copy, verify=False)
        assert dotted(path) in str(e.value) and "finite" in str(e.value), (path, str(e.value))
    assert checked, f"{bundle.name}: no setting to check"
