"""What the commands say on the edges a first-time user walks into (from a README walkthrough):
options that would be ignored are refused, messages point at the likely cause, sizes are HxW."""

from __future__ import annotations

import json
import threading
import time

import cv2
import numpy as np
import pytest

from conftest import DEMO_BUNDLE, run_cli, write_config
from inspector.recorder import RecordConfig, Recorder, _ordinal, describe


@pytest.mark.parametrize("n, said", [(2, "2nd"), (3, "3rd"), (4, "4th"), (11, "11th"), (12, "12th"),
                                     (13, "13th"), (21, "21st"), (22, "22nd"), (111, "111th"),
                                     (500, "500th")])
def test_ordinals(n, said):
    assert _ordinal(n) == said
    assert f"every {said} frame without" in describe(RecordConfig(enabled=True, normal_every=n))


def test_check_json_says_the_error_on_stdout_too(tmp_path):
    bad = write_config(tmp_path / "cam.yaml", {"camera_id": "x", "source": {"type": "synthetic"},
                                              "model": {"bundle": str(tmp_path / "none")}})
    r = run_cli("check", "--config", str(bad), "--json")
    assert r.returncode == 2
    out = json.loads(r.stdout)
    assert out["result"] == "error" and out["config"] == str(bad)
    assert out["error"].startswith(f"{bad}: model.bundle: model bundle folder") and out["error"] in r.stderr


def test_check_warns_of_a_folder_another_recorder_holds_and_normalises_the_bundle_path(synthetic_cfg,
                                                                                       tmp_path):
    cfg = synthetic_cfg(record={"enabled": True, "dir": str(tmp_path / "rec")})
    cfg["model"]["bundle"] = str(DEMO_BUNDLE.parent / ".." / DEMO_BUNDLE.parent.name / DEMO_BUNDLE.name)
    f = write_config(tmp_path / "cam.yaml", cfg)
    rec = Recorder(RecordConfig(enabled=True, dir=str(tmp_path / "rec")), "test", ["background", "a"])
    try:
        r = run_cli("check", "--config", str(f), "--json")
    finally:
        rec.close()
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["bundle"] == str(DEMO_BUNDLE)
    held = [w for w in out["warnings"] if w.startswith("record.dir: a running recorder holds")]
    assert len(held) == 1 and "would exit 2" in held[0]
    assert "a running recorder holds" not in out["record"]


def test_evaluate_overlays_without_a_folder_is_refused(tmp_path):
    r = run_cli("evaluate", "--bundle", str(DEMO_BUNDLE), "--data", str(tmp_path), "--format", "neu-seg",
                "--overlays", "3")
    assert r.returncode == 2
    assert "--overlays: needs --out" in r.stderr


def test_calibrate_thresholds_format_without_defects_is_refused(tmp_path):
    normal = tmp_path / "normal"
    normal.mkdir()
    cv2.imwrite(str(normal / "a.png"), np.full((64, 64), 120, np.uint8))
    r = run_cli("calibrate", "thresholds", "--bundle", str(DEMO_BUNDLE), "--normal", str(normal),
                "--target-fpr", "0.1", "--format", "neu-seg", "--out", str(tmp_path / "o"))
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "--format: the layout of --defects, which is not given" in r.stderr


def test_subscribe_timeout_names_the_topic(tmp_path):
    from conftest import free_endpoint

    ep = free_endpoint()
    r = run_cli("subscribe", "--endpoint", ep, "--topic", "defects.cam1", "--count", "1", "--timeout", "0.5")
    assert r.returncode == 1
    assert f"no message from {ep} on topic prefix 'defects.cam1' within 0.5s (0 received;" in r.stderr


def test_flat_field_sizes_are_height_by_width(tmp_path):
    frames = tmp_path / "normal"
    frames.mkdir()
    for i in range(3):
        cv2.imwrite(str(frames / f"{i}.png"), np.full((32, 96), 100 + i, np.uint8))
    r = run_cli("calibrate", "flat-field", "--normal", str(frames), "--out", str(tmp_path / "ff.npz"))
    assert r.returncode == 0, r.stderr
    assert "flat-field 32x96 (HxW;" in r.stdout
    cv2.imwrite(str(frames / "9.png"), np.full((40, 96), 100, np.uint8))
    r = run_cli("calibrate", "flat-field", "--normal", str(frames), "--out", str(tmp_path / "ff2.npz"))
    assert r.returncode == 2
    assert "normal: 9 is 40x96 (HxW) but 0 is 32x96" in r.stderr


def test_subscribe_without_timeout_says_once_what_it_waits_for(tmp_path):
    import subprocess
    import sys

    from conftest import ROOT, free_endpoint

    ep = free_endpoint()
    p = subprocess.Popen([sys.executable, "-m", "inspector", "subscribe", "--endpoint", ep, "--topic",
                          "defects.cam1"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # read until the line comes (5 s after the process has started, however slow its start
    # on a loaded box), then a little longer: it must come once
    want = "nothing from"
    err_lines: list[str] = []
    reader = threading.Thread(target=lambda: err_lines.extend(p.stderr), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 60
        while not any(want in ln for ln in err_lines) and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(2.0)  # room for a second line, which must not come
    finally:
        p.terminate()
        p.wait(10)
        reader.join(10)
    err = "".join(err_lines)
    assert (f"inspector subscribe: nothing from {ep} on topic prefix 'defects.cam1' after 5 s; still "
            "waiting (Ctrl-C stops; --timeout S gives up)") in err
    assert err.count("nothing from") == 1


def test_a_typo_in_bundle_yaml_reads_as_in_a_camera_config(tmp_path):
    import shutil

    import yaml

    from inspector.bundle import load_bundle
    from inspector.errors import BundleError

    b = tmp_path / "b"
    shutil.copytree(DEMO_BUNDLE, b)
    raw = yaml.safe_load((b / "bundle.yaml").read_text())
    raw["tilling"] = raw.pop("tiling")
    (b / "bundle.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(BundleError, match=r"bundle.yaml: tilling: unknown key"):
        load_bundle(b)


def test_the_trained_on_warning_is_only_for_the_training_data_sets_layout():
    from inspector.cli import _trained_on_note

    prov = {"training_config": {"data": {"source": "neu-seg", "root": "../shared/data/neu_seg",
                                         "train_splits": ["train", "test"]}}}
    assert "this model was trained on" in _trained_on_note(prov, "test", "hash", "neu-seg")
    assert _trained_on_note(prov, "test", "hash", "magnetic-tile") is None
    assert _trained_on_note(prov, "val", "hash", "neu-seg") is None


def test_check_warns_of_a_bundle_from_an_unfinished_run(synthetic_cfg, tmp_path):
    """The shipped fuzzy-mask bundle was cut by its time limit (as planned, recorded); an ARCD run
    exported before it finished records where it stood. Either way `check` says so."""
    from types import SimpleNamespace

    from inspector.cli import _unfinished_training

    fm = DEMO_BUNDLE.parent / "fuzzymask-mt"
    cfg = synthetic_cfg(model={"bundle": str(fm)},
                        source={"type": "synthetic", "width": 256, "height": 256, "fps": 0, "seed": 3})
    r = run_cli("check", "--config", str(write_config(tmp_path / "fm.yaml", cfg)), "--json")
    assert r.returncode == 0, r.stderr
    (w,) = [w for w in json.loads(r.stdout)["warnings"] if "had not finished" in w]
    assert w.startswith(f"model.bundle: {fm} was exported from a training run that had not finished "
                        "(stopped by max_minutes at iteration 6278 of 10600)")
    arcd = SimpleNamespace(path=tmp_path / "b", spec=SimpleNamespace(provenance={
        "training_complete": False, "checkpoint_at": {"stage": 1, "step": 4}}))
    assert "(at stage 1 step 4)" in _unfinished_training(arcd)[0]
    done = SimpleNamespace(path=tmp_path / "b", spec=SimpleNamespace(provenance={"training_complete": True}))
    assert _unfinished_training(done) == []
    assert _unfinished_training(SimpleNamespace(path=DEMO_BUNDLE, spec=SimpleNamespace(provenance=None))) == []


def test_training_config_errors_name_the_users_key_and_the_right_command(tmp_path):
    from export.arcd.train import TrainConfig
    from export.training import read_config, validate_config
    from inspector.errors import ConfigError

    for raw, said in [({"data": {"source": "neu-seg", "root": "x", "hflp": True}}, "t.yaml: data.hflp: unknown key"),
                      ({"data": {"source": "magnetic-tile", "root": "x", "sqare_pad": "top"}},
                       "t.yaml: data.sqare_pad: unknown key")]:
        with pytest.raises(ConfigError) as e:
            validate_config(TrainConfig, raw, "t.yaml")
        assert str(e.value) == said
    with pytest.raises(ConfigError) as e:
        validate_config(TrainConfig, {"data": {"source": "neu-seg", "root": "x", "train_crop": [999, 999]}},
                        "t.yaml")
    assert str(e.value).startswith("t.yaml: data.train_crop [999, 999] must be a multiple of")
    cfg = tmp_path / "g.yaml"
    cfg.write_text("kind: clgan\nname: g\n")
    with pytest.raises(ConfigError, match=r"g.yaml: kind: a clgan training config, not arcd "
                                          r"\(`inspector train clgan` is its trainer\)"):
        read_config(cfg, TrainConfig, set_base_dir=False)
    cfg.write_text("kind: anomalyalign\nname: g\n")
    with pytest.raises(ConfigError, match=r"kind: an anomalyalign training config, not arcd "
                                          r"\(`inspector augment anomalyalign train` is its trainer\)"):
        read_config(cfg, TrainConfig, set_base_dir=False)
    cfg.write_text("kind: clgan\nname: g\n")
    r = run_cli("train", "arcd", "--config", str(cfg), "--run-dir", str(tmp_path / "run"))
    assert r.returncode == 2 and not (tmp_path / "run").exists()
    # ARCD's configs have no `kind`: their stage sections name them for the other trainers
    from export.clgan.train import ClganTrainConfig
    cfg.write_text("name: a\nstage1: {steps: 3}\nmodel: {tile: 64}\n")
    with pytest.raises(ConfigError, match=r"a.yaml: stage1: an arcd training config, not clgan "
                                          r"\(`inspector train arcd` is its trainer\)"):
        read_config(cfg.rename(tmp_path / "a.yaml"), ClganTrainConfig, set_base_dir=False)


def test_check_no_source_leaves_the_camera_alone_and_still_refuses_what_the_next_start_would(
        synthetic_cfg, tmp_path):
    # after an upgrade the daemon still runs and holds the camera: `check --no-source` says whether
    # the new version will start on this config, before the restart that would find out
    cfg = synthetic_cfg(alarms={"rules": [{"name": "any", "off_delay_s": 2.0}]})
    cfg["source"] = {"type": "genicam", "cti": "builtin:viky", "serial": "NO-SUCH-CAMERA"}
    f = write_config(tmp_path / "cam.yaml", cfg)
    r = run_cli("check", "--config", str(f))
    assert r.returncode != 0 and "NO-SUCH-CAMERA" in r.stderr, r.stderr  # the camera is not there
    r = run_cli("check", "--no-source", "--config", str(f), "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["result"] == "ok" and out["source"] == "genicam: not opened (--no-source)"
    assert out["model"] == "toy (arcd)" and out["alarms"].startswith("1 rule(s)")
    assert "infer_ms" not in out and "frame_shape" not in out
    # what a stricter version refuses (here .inf, which a bound such as "above 0" let through)
    cfg["alarms"]["rules"][0]["off_delay_s"] = float("inf")
    write_config(f, cfg)
    r = run_cli("check", "--no-source", "--config", str(f))
    assert r.returncode == 2 and "alarms.rules.0.off_delay_s" in r.stderr and "finite" in r.stderr, r.stderr
