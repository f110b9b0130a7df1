"""Bad configs exit 2 with one line naming the file and the key."""

from pathlib import Path

import pytest

from conftest import run_cli, write_config


def check(path):
    return run_cli("check", "--config", str(path), timeout=60)


@pytest.mark.parametrize("mutate,key", [
    (lambda c: c["source"].update(colour="red"), "source.colour: unknown key"),
    (lambda c: c["source"].update(fps="fast"), "source.fps"),
    (lambda c: c["source"].update(type="webcam"), "source.type: unknown type 'webcam'"),
    (lambda c: c.update(publsh={}), "publsh: unknown key"),
    (lambda c: c["model"].update(bundle="no/such/bundle"), "model.bundle"),
    (lambda c: c["model"].update(postprocess={"k3": 1.0}), "model.postprocess"),
    (lambda c: c["model"].update(postprocess={"threshold": 3.0}), "model.postprocess.threshold"),
    # the toy bundle's recipe is probability: a residual key would change nothing, silently
    (lambda c: c["model"].update(postprocess={"k1": 2.5}),
     "model.postprocess.k1: the probability post-processing of toy does not read it"),
    (lambda c: c["publish"].update(endpoint="localhost:5556"), "publish.endpoint"),
    # ZeroMQ would bind a random port instead, where no subscriber looks
    (lambda c: c["publish"].update(endpoint="tcp://127.0.0.1:99999"), "publish.endpoint: port 99999 is out of range"),
    (lambda c: c.update(pipeline={"reopen_backoff_s": [30, 1]}), "pipeline.reopen_backoff_s"),
    (lambda c: c.update(pipeline={"reopen_backoff_s": [-1, -1]}), "pipeline.reopen_backoff_s"),
    (lambda c: c.update(source={"type": "genicam", "cti": "missing/producer.cti"}), "source.cti"),
    (lambda c: c.pop("camera_id"), "camera_id: required key is missing"),
])
def test_broken_config_exits_2_naming_the_key(tmp_path, synthetic_cfg, mutate, key):
    cfg = synthetic_cfg()
    mutate(cfg)
    p = write_config(tmp_path / "cam.yaml", cfg)
    r = check(p)
    assert r.returncode == 2, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert str(p) in last and key in last, last


def test_unparsable_yaml_and_missing_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("camera_id: [unclosed\n")
    r = check(p)
    assert r.returncode == 2 and "not valid YAML at line" in r.stderr
    r = check(tmp_path / "absent.yaml")
    assert r.returncode == 2 and "config file not found" in r.stderr


def test_a_key_given_twice_is_an_error_not_the_last_one_winning(tmp_path):
    # plain YAML keeps the last of two `publish:` sections without a word
    p = tmp_path / "cam.yaml"
    p.write_text("camera_id: a\npublish: {endpoint: 'tcp://127.0.0.1:6001'}\nsource: {type: synthetic}\n"
                 "publish:\n  endpoint: tcp://127.0.0.1:5556\n")
    r = check(p)
    assert r.returncode == 2, r.stderr
    assert f"{p}: not valid YAML at line 4, column 1: duplicate key 'publish' (first at line 2)" in r.stderr


def test_yaml_anchors_and_merge_keys_still_load(tmp_path):
    # the duplicate-key check must not refuse `<<: *base`, nor a merged key overridden on purpose
    from inspector.config import read_yaml_mapping
    p = tmp_path / "m.yaml"
    p.write_text("base: &b {a: 1, b: 2}\nx:\n  <<: *b\n  b: 3\ny:\n  <<: [*b]\n  c: 4\n")
    assert read_yaml_mapping(p) == {"base": {"a": 1, "b": 2}, "x": {"a": 1, "b": 3}, "y": {"a": 1, "b": 2, "c": 4}}


def test_a_config_the_service_user_cannot_read_exits_2_naming_it(tmp_path, synthetic_cfg):
    # exit 1 made systemd restart the unit every few seconds for ever
    import os
    import shutil
    import subprocess
    import sys
    import tempfile

    from conftest import ROOT
    d = Path(tempfile.mkdtemp(prefix="unreadable-"))
    try:
        os.chmod(d, 0o755)
        p = write_config(d / "cam.yaml", synthetic_cfg())
        os.chmod(p, 0o600)
        if os.geteuid() == 0:  # root reads anything: run as nobody, as a service user would be
            if shutil.which("setpriv") is None:
                pytest.skip("running as root without setpriv: cannot drop to an unprivileged user")
            cmd = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
        else:
            os.chmod(p, 0)
            cmd = []
        r = subprocess.run(cmd + [sys.executable, "-m", "inspector", "check", "--config", str(p)],
                           cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert r.returncode == 2, r.stderr
        assert f"{p}: cannot read the config file: permission denied" in r.stderr
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_corrupt_model_exits_2_naming_the_file(tmp_path, synthetic_cfg, toy_bundle):
    import shutil
    b = tmp_path / "bundle"
    shutil.copytree(toy_bundle, b)
    (b / "model.onnx").write_bytes(b"not an onnx graph")
    p = write_config(tmp_path / "cam.yaml", synthetic_cfg(model={"bundle": str(b)}))
    r = check(p)
    assert r.returncode == 2 and "model.onnx" in r.stderr and "sha256" in r.stderr


@pytest.mark.parametrize("how, says, command", [("truncated", "INVALID_PROTOBUF", "check"),
                                                 ("truncated", "INVALID_PROTOBUF", "run"),
                                                 ("opset", "Opset 99", "check")])
def test_a_graph_onnxruntime_cannot_load_exits_2_naming_it(tmp_path, synthetic_cfg, toy_bundle, how, says,
                                                            command):
    # The graph was already bad when its sha256 was recorded (an export that wrote a broken file,
    # an opset this onnxruntime lacks): the hash check passes it, onnxruntime refuses it. That
    # exited 1, and systemd restarted the unit every 5 s for ever over the same bytes.
    from conftest import unloadable_graph_bundle
    b = unloadable_graph_bundle(toy_bundle, tmp_path / "bundle", how)
    p = write_config(tmp_path / "cam.yaml", synthetic_cfg(model={"bundle": str(b)}))
    extra = ("--frames", "3") if command == "run" else ()
    r = run_cli(command, "--config", str(p), *extra, timeout=60)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert f"{b / 'model.onnx'}: onnxruntime" in last and "cannot load this graph" in last, last
    assert says in last, last


def test_check_runs_one_frame_and_reports(tmp_path, synthetic_cfg):
    p = write_config(tmp_path / "cam.yaml", synthetic_cfg())
    r = run_cli("check", "--config", str(p), "--json", timeout=60)
    assert r.returncode == 0, r.stderr
    import json
    s = json.loads(r.stdout)
    assert s["result"] == "ok" and s["frame_shape"] == [128, 512]
    assert s["engine"].startswith("onnxruntime:CPUExecutionProvider")


def test_relative_bundle_path_resolves_against_config_file(tmp_path, synthetic_cfg, toy_bundle):
    import shutil
    shutil.copytree(toy_bundle, tmp_path / "models" / "toy")
    (tmp_path / "cams").mkdir()
    p = write_config(tmp_path / "cams" / "cam.yaml", synthetic_cfg(model={"bundle": "../models/toy"}))
    r = check(p)
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("name", ["demo.yaml", "viky.yaml", "fuzzymask-mt.yaml", "clgan-mt.yaml"])
def test_shipped_camera_configs_validate_and_their_bundles_load(name):
    """Every camera config under configs/ parses, and its model bundle loads and verifies (a
    replay folder that `benchmarks/mt_frames.py` writes first is not needed to validate)."""
    from conftest import ROOT
    from inspector.bundle import load_bundle
    from inspector.config import load_config

    cfg = load_config(ROOT / "configs" / name, check_paths=False)
    b = load_bundle(ROOT / "configs" / cfg.model.bundle)  # relative to the config file
    assert b.spec.kind in ("arcd", "clgan", "fuzzymask")


TRAINERS = {"arcd": "export.arcd.train", "clgan": "export.clgan.train",
            "fuzzymask": "export.fuzzymask.train", "defectgan": "export.augment.defectgan.train",
            "anomalyalign": "export.augment.anomalyalign.train"}


@pytest.mark.parametrize("path", sorted((Path(__file__).resolve().parents[1] / "configs" / "train")
                                        .glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_training_configs_validate(path):
    """Every training config the README tells users to run parses with its trainer's loader
    (named by the file's prefix), so a typo or a renamed key fails here, not an hour into a run."""
    import importlib

    pytest.importorskip("torch")
    prefix = path.stem.split("-")[0]
    assert prefix in TRAINERS, f"{path.name}: no trainer for prefix '{prefix}'"
    cfg = importlib.import_module(TRAINERS[prefix]).load_config(path)
    assert cfg is not None


def test_an_endpoint_that_cannot_be_bound_names_the_file(tmp_path, synthetic_cfg):
    # exit 1 (the interface may come up, the port may be freed), but the line names the file
    p = write_config(tmp_path / "cam.yaml", synthetic_cfg(publish={"endpoint": "tcp://nosuchif0:5556"}))
    r = run_cli("run", "--config", str(p), "--frames", "1", timeout=60)
    assert r.returncode == 1, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert f"{p}: publish.endpoint: cannot bind tcp://nosuchif0:5556: No such device" in last, last
