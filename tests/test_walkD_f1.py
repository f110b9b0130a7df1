"""Walkthrough D, F1: a bundle the service user may not read is exit 2 with one clear line (B6);
OpenCV prints nothing of its own for a missing replay image (B7); onnxruntime prints no telemetry
warning under a user without a writable home (C6c)."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from conftest import DEMO_BUNDLE, ROOT, write_config
from inspector.bundle import load_bundle
from inspector.errors import BundleError

DENIED = ("cannot read: permission denied (the service runs as its own user: make the bundle "
          "readable to it)")


def _refuse(monkeypatch, cls, name: str, target: Path) -> None:
    """``cls.name`` raises EACCES for ``target``, as the kernel does for the service user (the
    tests run as root, whom chmod does not stop)."""
    real = getattr(cls, name)

    def refused(self, *a, **k):
        if Path(self) == target:
            raise PermissionError(13, "Permission denied", str(self))
        return real(self, *a, **k)
    monkeypatch.setattr(cls, name, refused)


def _refuse_open(monkeypatch, target: Path) -> None:
    """``open(target)`` raises EACCES (the graph's sha256 is read with the builtin open)."""
    import builtins
    real = builtins.open

    def refused(file, *a, **k):
        if isinstance(file, (str, os.PathLike)) and Path(file) == target:
            raise PermissionError(13, "Permission denied", str(file))
        return real(file, *a, **k)
    monkeypatch.setattr(builtins, "open", refused)


@pytest.fixture
def bundle_copy(toy_bundle, tmp_path) -> Path:
    return Path(shutil.copytree(toy_bundle, tmp_path / "b"))


@pytest.mark.parametrize("what", ["graph", "bundle.yaml", "graph stat"])
def test_a_bundle_file_the_service_user_cannot_read_is_a_bundle_error_naming_it(
        bundle_copy, monkeypatch, what):
    graph, meta = bundle_copy / "model.onnx", bundle_copy / "bundle.yaml"
    if what == "graph":
        _refuse_open(monkeypatch, graph)
        target = graph
    elif what == "bundle.yaml":
        _refuse(monkeypatch, Path, "read_text", meta)
        target = meta
    else:  # a folder on the way not searchable: Python 3.11's is_file() raises, not says False
        _refuse(monkeypatch, Path, "stat", graph)
        target = graph
    with pytest.raises(BundleError) as err:
        load_bundle(bundle_copy)
    # the daemon's reload prints this text after "reload failed, the running model and rules stay: "
    assert str(err.value) == f"{target}: {DENIED}"


def test_inspector_check_on_an_unreadable_graph_exits_2_with_one_line(
        bundle_copy, synthetic_cfg, tmp_path, monkeypatch, capsys, cv2_log_level):
    # was: "inspector: error: [Errno 13] Permission denied: '.../model.onnx'", exit 1, and
    # systemd restarting the unit every few seconds for ever
    from inspector.cli import main

    cfg = write_config(tmp_path / "cam.yaml", synthetic_cfg(model={"bundle": str(bundle_copy)}))
    _refuse_open(monkeypatch, bundle_copy / "model.onnx")
    assert main(["check", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    # and names the config and its key, which the engineer edits to point at another bundle
    assert err[-1] == f"inspector: error: {cfg}: model.bundle: {bundle_copy / 'model.onnx'}: {DENIED}", err


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a chmod 000 file; the tests above stand in")
def test_a_real_unreadable_graph(bundle_copy):
    (bundle_copy / "model.onnx").chmod(0)
    with pytest.raises(BundleError, match="cannot read: permission denied"):
        load_bundle(bundle_copy)


@pytest.fixture
def cv2_log_level():
    """OpenCV's level as a fresh process has it (WARNING) and the root logger's, restored after."""
    lv = cv2.utils.logging
    before, root = lv.getLogLevel(), logging.getLogger().level
    lv.setLogLevel(lv.LOG_LEVEL_WARNING)
    yield
    lv.setLogLevel(before)
    from inspector.logs import set_level
    set_level(root)


def _replay_with_a_file_gone(folder: Path):
    from inspector.sources.replay import ReplayConfig, ReplaySource

    folder.mkdir()
    for i in range(2):
        cv2.imwrite(str(folder / f"f{i}.png"), np.full((256, 448), 60 * i, np.uint8))
    src = ReplaySource(ReplayConfig(path=str(folder), fps=0, loop=True), camera_id="t")
    src.open()
    (folder / "f1.png").unlink()
    return src


def test_a_missing_replay_image_prints_no_opencv_line_once_logging_is_set(tmp_path, capfd, cv2_log_level):
    # was: OpenCV's own "[ WARN:..] global loadsave.cpp:278 findDecoder imread_(...)" on stderr
    # for every frame, beside the inspector's one line per burst of dropped frames
    from inspector.errors import FrameError
    from inspector.logs import set_level

    set_level("INFO")  # what `inspector run` and `inspector daemon` do at start
    src = _replay_with_a_file_gone(tmp_path / "frames")
    try:
        capfd.readouterr()
        assert src.read() is not None
        for _ in range(3):
            with pytest.raises(FrameError, match="cannot read image"):
                src.read()
            assert src.read() is not None
        err = capfd.readouterr().err
        assert "findDecoder" not in err and "WARN" not in err, err
        # the reason is the inspector's own line now, at every level (OpenCV is not asked to open
        # a file that is not there, so it has nothing to say)
        with pytest.raises(FrameError, match="No such file or directory"):
            src.read()
    finally:
        src.close()


def _python(code: str, home: Path, **env: str) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k != "ORT_DISABLE_TELEMETRY"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          cwd=ROOT, env={**base, "HOME": str(home), **env})


def test_no_onnxruntime_telemetry_warning_without_a_writable_home(tmp_path):
    # HOME a plain file: no folder can be made under it, even by root (the tests' user), as for
    # the unit's `inspector` user, whose home does not exist
    home = tmp_path / "home"
    home.write_text("")
    code = ("from inspector.engines.onnxruntime import OnnxRuntimeEngine\n"
            f"print(OnnxRuntimeEngine({str(DEMO_BUNDLE / 'model.onnx')!r}).backend)\n")
    r = _python(code, home)
    assert r.returncode == 0, r.stderr
    assert "onnxruntime:" in r.stdout
    assert "telemetry" not in r.stderr.lower() and "\x1b[" not in r.stderr, r.stderr


def test_an_operators_own_telemetry_setting_is_kept(tmp_path):
    code = ("import os, inspector.engines.onnxruntime\n"
            "print(os.environ['ORT_DISABLE_TELEMETRY'])\n")
    assert _python(code, tmp_path, ORT_DISABLE_TELEMETRY="0").stdout.strip() == "0"
    assert _python(code, tmp_path).stdout.strip() == "1"


def test_a_bundle_folder_the_service_user_cannot_search_is_a_config_error(bundle_copy, synthetic_cfg, monkeypatch):
    # Python 3.11's is_dir() raises EACCES for a folder on the way this user may not search
    from inspector.config import parse_config
    from inspector.errors import ConfigError

    _refuse(monkeypatch, Path, "is_dir", bundle_copy)
    with pytest.raises(ConfigError) as e:
        parse_config(synthetic_cfg(model={"bundle": str(bundle_copy)}), "cam.yaml")
    assert str(e.value) == f"cam.yaml: model.bundle: {bundle_copy}: {DENIED}"
