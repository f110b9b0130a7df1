"""Walk B fixes (/work/notes/walkB.md): B4, C1, C4, C5, C6, C7, C10, C11, C12.

Real parts throughout: the viky.cti simulated camera through harvesters, onnxruntime on the shipped
demo bundle, the CLI as a subprocess.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml
from pydantic import ValidationError

from conftest import ROOT, free_endpoint, run_cli, write_config
from inspector.engines import OnnxRuntimeConfig, TensorRTConfig, make_engine
from inspector.errors import ConfigError, EngineError, MissingPackageError, SourceError
from inspector.sources.genicam import GenicamConfig, GenicamSource
from test_source_genicam import needs_viky, viky_cfg

DEMO = ROOT / "deploy" / "models" / "demo-arcd"


def _error_lines(stderr: str) -> list[str]:
    """stderr without the log lines (timestamped)."""
    return [ln for ln in stderr.splitlines() if ln.strip() and not ln[:4].isdigit()]


def _viky_config(tmp_path: Path, name: str = "cam.yaml", **source) -> Path:
    raw = yaml.safe_load((ROOT / "configs" / "viky.yaml").read_text())
    raw["model"]["bundle"] = str(DEMO)
    raw["publish"]["endpoint"] = free_endpoint()
    raw["source"].update(source)
    for k in [k for k, v in source.items() if v is None]:
        raw["source"].pop(k)
    return write_config(tmp_path / name, raw)


def _demo_config(tmp_path: Path, engine: dict) -> Path:
    raw = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    raw["model"]["bundle"] = str(DEMO)
    raw["model"]["engine"] = engine
    raw["publish"]["endpoint"] = free_endpoint()
    return write_config(tmp_path / "cam.yaml", raw)


def _has_cuda() -> bool:
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers()


def _has_tensorrt() -> bool:
    import importlib.util

    return importlib.util.find_spec("tensorrt") is not None


# -- B4: bench --fps beyond the camera's range ----------------------------------------------------
@needs_viky
def test_bench_fps_the_camera_refuses_names_the_option_and_leaves_nothing_open(tmp_path):
    cfg = _viky_config(tmp_path)
    # ResourceWarnings are hidden by default; shown here so that an unclosed socket would print
    r = run_cli("bench", "--config", str(cfg), "--frames", "5", "--fps", "300", "--out",
                str(tmp_path / "out"), env={**os.environ, "PYTHONWARNINGS": "always::ResourceWarning"})
    assert r.returncode == 2, r.stderr
    lines = _error_lines(r.stderr)
    assert len(lines) == 1, r.stderr  # one line, nothing after it
    assert lines[0].startswith("inspector: error: --fps: ")
    assert "rejected AcquisitionFrameRate=300.0 (allowed: 1.0..200.0)" in lines[0]
    assert str(cfg) not in lines[0] and "source.fps" not in lines[0]
    assert "ResourceWarning" not in r.stderr


# -- C1: GPU providers only, none available -------------------------------------------------------
@pytest.mark.skipif(_has_cuda(), reason="this onnxruntime has CUDA: nothing missing to show")
def test_gpu_only_providers_none_available_fail_naming_file_and_key():
    with pytest.raises(EngineError) as e:
        make_engine(OnnxRuntimeConfig(providers=["tensorrt", "cuda"]), DEMO / "model.onnx",
                    config_file="cam.yaml")
    msg = str(e.value)
    assert msg.startswith("cam.yaml: model.engine.providers: none of the requested providers "
                          "(TensorrtExecutionProvider, CUDAExecutionProvider)")
    assert "CPUExecutionProvider" in msg  # what the build has
    # exit 1 (README: a provider that fails stays exit 1), not a config error
    assert not isinstance(e.value, (ConfigError, MissingPackageError))


@pytest.mark.filterwarnings("ignore:Specified provider 'CUDAExecutionProvider'")
def test_gpu_provider_in_the_build_that_does_not_start_fails_too(monkeypatch):
    import onnxruntime as ort

    if _has_cuda():
        pytest.skip("CUDA may really start here")
    # a build that lists CUDA (onnxruntime-gpu) on a machine whose CUDA does not load: onnxruntime
    # itself goes on with the CPU alone
    real = ort.get_available_providers()
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", *real])
    with pytest.raises(EngineError, match=r"^cam.yaml: model.engine.providers: onnxruntime could not "
                                          r"start CUDAExecutionProvider"):
        make_engine(OnnxRuntimeConfig(providers=["cuda"]), DEMO / "model.onnx", config_file="cam.yaml")


@pytest.mark.skipif(_has_cuda(), reason="this onnxruntime has CUDA: nothing missing to show")
def test_check_with_gpu_only_providers_exits_1_and_with_cpu_listed_warns(tmp_path, caplog):
    r = run_cli("check", "--config", str(_demo_config(tmp_path, {"type": "onnxruntime",
                                                                 "providers": ["cuda"]})))
    assert r.returncode == 1, r.stderr
    line = _error_lines(r.stderr)[-1]
    assert "model.engine.providers: none of the requested providers (CUDAExecutionProvider)" in line
    # cpu listed: falls back, and the engine says what it skipped (check's warning lines)
    with caplog.at_level(logging.WARNING):
        eng = make_engine(OnnxRuntimeConfig(providers=["cuda", "cpu"]), DEMO / "model.onnx")
    assert eng.backend == "onnxruntime:CPUExecutionProvider"
    assert len(eng.warnings) == 1
    assert eng.warnings[0].startswith("model.engine.providers: CUDAExecutionProvider requested but "
                                      "not in this onnxruntime build")
    assert make_engine(OnnxRuntimeConfig(providers=["cpu"]), DEMO / "model.onnx").warnings == ()


# -- C4 and C5c: TensorRT missing -----------------------------------------------------------------
@pytest.mark.skipif(_has_tensorrt(), reason="TensorRT is installed here")
def test_tensorrt_missing_advice_avoids_the_side_by_side_onnxruntime_trap(tmp_path):
    r = run_cli("export", "tensorrt", "--bundle", str(DEMO), "--precision", "fp32")
    assert r.returncode == 2
    line = _error_lines(r.stderr)[-1]
    assert "TensorRT is not importable" in line and "`gpu` extra" in line
    assert "EXTRAS=plc,gpu deploy/install.sh" in line
    assert "pip install 'tensorrt>=10' 'pycuda>=2024.1'" in line
    assert ".[gpu]" not in line  # installs onnxruntime-gpu beside the CPU build: providers hidden


@pytest.mark.skipif(_has_tensorrt(), reason="TensorRT is installed here")
def test_tensorrt_missing_names_config_file_and_engine_type(tmp_path):
    with pytest.raises(ConfigError) as e:
        make_engine(TensorRTConfig(precision="fp16"), DEMO / "model.onnx", config_file="cam.yaml")
    assert isinstance(e.value, MissingPackageError)  # exit 2 whichever handler sees it
    assert str(e.value).startswith("cam.yaml: model.engine.type: tensorrt, but TensorRT is not importable")
    assert "model.engine.fallback: onnxruntime" in str(e.value)
    r = run_cli("check", "--config", str(_demo_config(tmp_path, {"type": "tensorrt"})))
    assert r.returncode == 2 and "model.engine.type: tensorrt, but TensorRT" in r.stderr
    # with the fallback it runs, and says so among the engine's warnings (check's warning lines)
    eng = make_engine(TensorRTConfig(fallback="onnxruntime"), DEMO / "model.onnx", config_file="cam.yaml")
    assert eng.warnings[0].startswith("TensorRT engine unavailable (TensorRT is not importable")


# -- C5a: a .cti that is not a GenTL producer -----------------------------------------------------
def test_cti_that_is_no_producer_is_a_config_error_naming_file_and_key(tmp_path):
    not_elf = ROOT / "README.md"
    with pytest.raises(ConfigError, match=r"^cam.yaml: source.cti: .*README.md is not a loadable "
                                          r"GenTL producer \(.*invalid ELF header\)") as e:
        GenicamSource(GenicamConfig(cti=str(not_elf)), "cam1", config_file="cam.yaml").open()
    assert isinstance(e.value, SourceError)
    # a shared library, but no GenTL entry points
    import _ctypes

    lib = Path(_ctypes.__file__)
    with pytest.raises(ConfigError, match=r"^cam.yaml: source.cti: .* is a shared library but not a "
                                          r"GenTL producer \(it has no GCInitLib\)"):
        GenicamSource(GenicamConfig(cti=str(lib)), "cam1", config_file="cam.yaml").open()


@needs_viky
def test_check_with_a_non_producer_cti_exits_2_in_one_line(tmp_path):
    cfg = _viky_config(tmp_path, cti=str(ROOT / "README.md"))
    r = run_cli("check", "--config", str(cfg))
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr  # harvesters' own validity check logged one
    assert _error_lines(r.stderr) == [_error_lines(r.stderr)[-1]]
    assert f"{cfg}: source.cti: " in r.stderr


# -- C5b: index past the list, serial matching nothing --------------------------------------------
@needs_viky
def test_index_past_the_device_list_names_file_and_key_and_stays_exit_1(tmp_path):
    # on a line of several cameras one may still be booting: a restart finds it (exit 1)
    with pytest.raises(SourceError, match=r"^cam.yaml: source.index: no device at source.index=5 "
                                          r"\(the producer lists 3: indices 0..2; a typo, or that camera "
                                          r"is not up yet\)") as e:
        GenicamSource(viky_cfg(index=5), "cam1", config_file="cam.yaml").open()
    assert not isinstance(e.value, ConfigError)
    r = run_cli("check", "--config", str(_viky_config(tmp_path, serial=None, index=5)))
    assert r.returncode == 1 and "cam.yaml: source.index: no device at" in r.stderr


@needs_viky
def test_serial_matching_nothing_names_file_and_key_and_stays_exit_1():
    with pytest.raises(SourceError) as e:
        GenicamSource(viky_cfg(serial="nope"), "cam1", config_file="cam.yaml").open()
    # a typo, or a camera not plugged in yet: a restart may find it
    assert not isinstance(e.value, ConfigError)
    assert str(e.value).startswith("cam.yaml: source.serial: no device matches source.serial='nope'")
    assert "quote it" not in str(e.value)
    with pytest.raises(SourceError, match=r"cam.yaml: source.device_id: no device matches"):
        GenicamSource(viky_cfg(device_id="VikyTL_DEV_nope"), "cam1", config_file="cam.yaml").open()


# -- C6: builtin:<typo> ---------------------------------------------------------------------------
def test_unknown_builtin_producer_is_named(tmp_path):
    with pytest.raises(ValidationError, match=r"unknown built-in producer 'foo' \(known: viky\)"):
        GenicamConfig(cti="builtin:foo")
    cfg = _viky_config(tmp_path, "builtinfoo.yaml", cti="builtin:foo")
    r = run_cli("check", "--config", str(cfg))
    assert r.returncode == 2
    assert ("builtinfoo.yaml: source.cti: unknown built-in producer 'foo' (known: viky)"
            in _error_lines(r.stderr)[-1])


# -- C7: serial written as a number ---------------------------------------------------------------
def test_numeric_serial_is_taken_as_its_decimal_text():
    assert GenicamConfig(cti="x.cti", serial=12345678).serial == "12345678"
    assert GenicamConfig(cti="x.cti", serial=0).serial == "0"
    assert GenicamConfig(cti="x.cti", device_id=7).device_id == "7"
    # `serial: yes` / `serial: 1.5`: no text to trust
    for bad in (True, 1.5):
        with pytest.raises(ValidationError, match=r'quote it \(serial: "..."\)'):
            GenicamConfig(cti="x.cti", serial=bad)


@needs_viky
def test_unquoted_serial_in_yaml_opens_the_camera_and_a_miss_says_to_quote(tmp_path):
    p = _viky_config(tmp_path)
    p.write_text(p.read_text().replace("serial: '0'", "serial: 0"))
    assert "serial: 0\n" in p.read_text()
    r = run_cli("check", "--config", str(p))
    assert r.returncode == 0, r.stderr
    with pytest.raises(SourceError, match=r"quote it as printed on the camera"):
        GenicamSource(viky_cfg(serial=12345678), "cam1", config_file="cam.yaml").open()


# -- C10: a file that is no flat-field .npz -------------------------------------------------------
def test_flat_field_that_is_not_an_npz_gets_no_pickle_advice(tmp_path):
    from inspector.flatfield import FlatField

    obj = tmp_path / "objects.npz"
    np.savez(obj, gain=np.array([object()], dtype=object), offset=np.zeros(1))
    for path in (ROOT / "README.md", obj):
        with pytest.raises(ValueError) as e:
            FlatField.load(path)
        msg = str(e.value)
        assert f"{path}: not a flat-field .npz written by `inspector calibrate flat-field`" in msg
        assert "allow_pickle" not in msg and "trust" not in msg
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(obj.read_bytes()[:40])
    with pytest.raises(ValueError, match="not a flat-field .npz written by"):
        FlatField.load(truncated)


# -- C11: a flat-field that makes the spread worse ------------------------------------------------
def test_calibrate_flat_field_warns_when_the_correction_makes_the_spread_worse(tmp_path):
    # the median (3 frames: left half brighter) is taken for the lighting, but the other frames
    # are brighter on the right, so the frames' mean ends up less flat after correction
    folder = tmp_path / "normal"
    folder.mkdir()
    for i, (left, right) in enumerate([(150, 100)] * 3 + [(50, 250)] * 2):
        img = np.full((32, 96), right, np.uint8)
        img[:, :48] = left
        cv2.imwrite(str(folder / f"f{i}.png"), img)
    out = tmp_path / "ff.npz"
    r = run_cli("calibrate", "flat-field", "--normal", str(folder), "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert out.is_file()  # written all the same
    assert "increases the column brightness spread" in r.stderr
    assert "uniform or moving surface" in r.stderr


def test_spread_warning_only_when_worse():
    from inspector.flatfield import FlatField

    ones, zeros = np.ones((1, 4), np.float32), np.zeros((1, 4), np.float32)
    worse = FlatField(ones, zeros, {"column_spread_before_pct": 7.83, "column_spread_after_pct": 8.75})
    assert "(7.83 % -> 8.75 %)" in worse.spread_warning()
    better = FlatField(ones, zeros, {"column_spread_before_pct": 7.83, "column_spread_after_pct": 1.2})
    assert better.spread_warning() is None
    assert FlatField(ones, zeros).spread_warning() is None


# -- C12: a misspelt top-level bundle key ---------------------------------------------------------
def test_misspelt_bundle_key_is_reported_as_unknown_with_a_suggestion(tmp_path):
    import shutil

    from inspector.bundle import load_bundle
    from inspector.errors import BundleError

    bundle = tmp_path / "typo"
    shutil.copytree(DEMO, bundle)
    meta = bundle / "bundle.yaml"
    meta.write_text(meta.read_text().replace("\nkind: arcd", "\nkidn: arcd"))
    with pytest.raises(BundleError) as e:
        load_bundle(bundle)
    assert str(e.value) == (f"{meta}: kidn: unknown key (did you mean kind?); "
                            "kind: required key is missing")
    # nested sections too; a key like nothing known gets no guess
    meta.write_text(meta.read_text().replace("kidn: arcd", "kind: arcd")
                    .replace("tiling:\n  overlap:", "tiling:\n  overlpa:"))
    with pytest.raises(BundleError, match=r"tiling.overlpa: unknown key \(did you mean overlap\?\)$"):
        load_bundle(bundle)
    meta.write_text(meta.read_text().replace("overlpa:", "zzz:"))
    with pytest.raises(BundleError, match=r"tiling.zzz: unknown key$"):
        load_bundle(bundle)


def test_an_empty_provider_list_is_a_config_error():
    """`providers: []` ran on the CPU before GPU-only lists were refused; now it is refused at
    load (exit 2 naming the key) instead of failing at run time with an empty list named."""
    from inspector.engines.onnxruntime import OnnxRuntimeConfig

    with pytest.raises(ValidationError, match="at least 1 item"):
        OnnxRuntimeConfig(providers=[])
