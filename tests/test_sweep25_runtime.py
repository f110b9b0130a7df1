"""sweep25, runtime side: each bad input is one line naming the file, key or option, exit 2 (1
only for a runtime failure systemd may retry), no traceback, nothing left half-written."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from conftest import run_cli, write_config
from inspector.errors import ConfigError


def one_clean_line(r: subprocess.CompletedProcess, code: int = 2) -> str:
    assert r.returncode == code, (r.returncode, r.stderr[-2000:])
    assert "Traceback" not in r.stderr, r.stderr
    return r.stderr.strip().splitlines()[-1]


def check(path: Path, *extra: str) -> subprocess.CompletedProcess:
    return run_cli("check", "--config", str(path), *extra, timeout=90)


def bundle_copy(src: Path, dest: Path, edit) -> Path:
    shutil.copytree(src, dest)
    meta = dest / "bundle.yaml"
    meta.write_text(edit(meta.read_text()))
    return dest


# --- B1, C14: infinite option values --------------------------------------------------------

@pytest.mark.parametrize("args,option", [
    (["subscribe", "--endpoint", "tcp://127.0.0.1:5599", "--count", "1", "--timeout", "inf"], "--timeout"),
    (["subscribe", "--endpoint", "tcp://127.0.0.1:5599", "--count", "1", "--timeout", "1e300"], "--timeout"),
    (["reload", "--pid", "1", "--runtime-dir", "/nonexistent", "--timeout", "inf"], "--timeout"),
    (["bench", "--config", "configs/demo.yaml", "--fps", "inf", "--out", "{tmp}/b"], "--fps"),
    (["alarms", "test", "--config", "configs/demo.yaml", "--hold", "inf"], "--hold"),
    (["alarms", "test", "--config", "configs/demo.yaml", "--hold", "1e12"], "--hold"),
])
def test_infinite_option_values_are_refused_naming_the_option(tmp_path, args, option):
    r = run_cli(*[a.replace("{tmp}", str(tmp_path)) for a in args], timeout=30)
    last = one_clean_line(r)
    assert option in last, last
    assert not (tmp_path / "b").exists()


def test_argtypes_finite_variants():
    import argparse

    from inspector.argtypes import finite_float_at_most, positive_finite_float, positive_float

    assert positive_float("inf") == float("inf")  # run --seconds inf stays a valid "until stopped"
    for parse, text in [(positive_finite_float, "inf"), (positive_finite_float, "nan"),
                        (finite_float_at_most(10), "11"), (finite_float_at_most(10), "-inf")]:
        with pytest.raises(argparse.ArgumentTypeError):
            parse(text)
    assert finite_float_at_most(10, inclusive_zero=True)("0") == 0


# --- B6, C5, C14: nan / inf / negative values in configs and bundles -----------------------

@pytest.mark.parametrize("pp,key,why", [
    ({"k1": float("nan")}, "model.postprocess.k1", "finite number"),
    ({"k2": float("inf")}, "model.postprocess.k2", "finite number"),
    ({"k1": -3}, "model.postprocess.k1", "greater than or equal to 0"),
    ({"score_threshold": float("inf")}, "model.postprocess.score_threshold", "finite number"),
])
def test_postprocess_overrides_out_of_range_are_refused(tmp_path, synthetic_cfg, pp, key, why):
    cfg = synthetic_cfg()
    cfg["model"]["postprocess"] = pp
    p = write_config(tmp_path / "cam.yaml", cfg)
    last = one_clean_line(check(p))
    assert f"{p}: {key}:" in last and why in last, last


def test_postprocess_overrides_are_refused_at_load(tmp_path, synthetic_cfg):
    from inspector.config import load_config
    from inspector.errors import ConfigError

    cfg = synthetic_cfg()
    cfg["model"]["postprocess"] = {"k1": float("nan")}
    p = write_config(tmp_path / "cam.yaml", cfg)
    with pytest.raises(ConfigError) as e:  # what `daemon` and a reload read, before any model
        load_config(p)
    assert e.value.key == "model.postprocess.k1" and "finite number (got nan)" in e.value.problem


@pytest.mark.parametrize("value,why", [(".nan", "finite number"), (".inf", "finite number"),
                                       ("-1.0", "greater than or equal to 0")])
def test_bundle_k1_out_of_range_is_refused(tmp_path, toy_bundle, synthetic_cfg, value, why):
    from inspector.bundle import load_bundle
    from inspector.errors import BundleError

    def edit(text: str) -> str:
        meta = yaml.safe_load(text)
        meta["postprocess"]["k1"] = yaml.safe_load(value)
        return yaml.safe_dump(meta, sort_keys=False)

    b = bundle_copy(toy_bundle, tmp_path / "b", edit)
    with pytest.raises(BundleError) as e:
        load_bundle(b)
    assert "postprocess.k1" in str(e.value) and why in str(e.value)
    p = write_config(tmp_path / "cam.yaml", synthetic_cfg(model={"bundle": str(b)}))
    last = one_clean_line(check(p))
    assert "bundle.yaml" in last and "postprocess.k1" in last, last


def test_nan_in_a_camera_config_says_it_must_be_finite(tmp_path, synthetic_cfg):
    cfg = synthetic_cfg()
    cfg["source"]["fps"] = float("nan")
    p = write_config(tmp_path / "cam.yaml", cfg)
    last = one_clean_line(check(p))
    assert f"{p}: source.fps: must be a finite number (got nan)" in last, last


@pytest.mark.parametrize("mutate,key", [
    (lambda c: c.update(geometry={"mm_per_px_across": float("inf"), "mm_per_px_along": 1.0}),
     "geometry.mm_per_px_across"),
    (lambda c: c["source"].update(fps=float("inf")), "source.fps"),
])
def test_inf_in_a_camera_config_is_refused(tmp_path, synthetic_cfg, mutate, key):
    cfg = synthetic_cfg()
    mutate(cfg)
    p = write_config(tmp_path / "cam.yaml", cfg)
    last = one_clean_line(check(p))
    assert f"{p}: {key}: Input should be a finite number" in last, last


# --- B10: a replay source.path that is not a video ----------------------------------------

@pytest.mark.parametrize("name,content", [("garbage.bin", os.urandom(2000)), ("x.mp4", b"not a video\n" * 50)])
@pytest.mark.parametrize("command", ["check", "run", "daemon"])
def test_replay_path_not_a_video_is_bad_input(tmp_path, synthetic_cfg, name, content, command):
    f = tmp_path / name
    f.write_bytes(content)
    cfg = synthetic_cfg()
    cfg["source"] = {"type": "replay", "path": str(f), "fps": 5}
    p = write_config(tmp_path / "cam.yaml", cfg)
    extra = ["--frames", "2"] if command == "run" else []
    r = run_cli(command, "--config", str(p), *extra, timeout=90)
    last = one_clean_line(r)
    assert f"{p}: source.path:" in last and "not a video" in last, last


# --- C2: bench leaves no empty --out folder --------------------------------------------------

def test_bench_leaves_no_out_folder_when_the_bundle_fails(tmp_path, toy_bundle, synthetic_cfg):
    b = bundle_copy(toy_bundle, tmp_path / "b", lambda t: t)
    (b / "model.onnx").write_bytes((b / "model.onnx").read_bytes() + b"x")  # sha256 mismatch
    p = write_config(tmp_path / "cam.yaml", synthetic_cfg(model={"bundle": str(b)}))
    out = tmp_path / "new" / "bench_x"
    r = run_cli("bench", "--config", str(p), "--frames", "2", "--throughput-frames", "2", "--out", str(out))
    one_clean_line(r)
    assert not out.exists() and not out.parent.exists()


def test_bench_keeps_an_out_folder_that_was_there(tmp_path, toy_bundle, synthetic_cfg):
    b = bundle_copy(toy_bundle, tmp_path / "b", lambda t: t)
    (b / "model.onnx").write_bytes((b / "model.onnx").read_bytes() + b"x")
    p = write_config(tmp_path / "cam.yaml", synthetic_cfg(model={"bundle": str(b)}))
    out = tmp_path / "there"
    out.mkdir()
    one_clean_line(run_cli("bench", "--config", str(p), "--frames", "2", "--out", str(out)))
    assert out.is_dir()


def test_bench_out_that_is_a_file(tmp_path):
    f = tmp_path / "f"
    f.write_text("x")
    last = one_clean_line(run_cli("bench", "--config", "configs/demo.yaml", "--out", str(f)))
    assert f"--out {f}: cannot create the folder (it is a file, not a folder)" in last, last


# --- C7: subscribe -----------------------------------------------------------------------------

def test_subscribe_refuses_an_impossible_port():
    last = one_clean_line(run_cli("subscribe", "--endpoint", "tcp://127.0.0.1:99999", "--timeout", "2",
                                  "--count", "1", timeout=30))
    assert "--endpoint tcp://127.0.0.1:99999: port 99999 is out of range 1-65535" in last, last


def test_subscribe_save_masks_a_file(tmp_path):
    f = tmp_path / "f"
    f.write_text("x")
    last = one_clean_line(run_cli("subscribe", "--endpoint", "tcp://127.0.0.1:5599", "--timeout", "1",
                                  "--save-masks", str(f), timeout=30))
    assert f"--save-masks {f}: cannot create the folder (it is a file, not a folder)" in last, last


def test_subscribe_unwritable_save_masks_folder_is_found_at_start(tmp_path, monkeypatch, capsys):
    import tempfile

    from inspector import cli

    def refuse(*a, **kw):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "TemporaryFile", refuse)
    code = cli.main(["subscribe", "--endpoint", "tcp://127.0.0.1:5599", "--timeout", "30",
                     "--save-masks", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and f"--save-masks {tmp_path}: cannot write into the folder (Permission denied)" in err


# --- C8, C4: daemon and reload --runtime-dir ---------------------------------------------------

def test_daemon_runtime_dir_that_is_a_file_exits_2(tmp_path):
    f = tmp_path / "garbage.bin"
    f.write_bytes(b"x")
    for rd in (f, f / "x"):
        last = one_clean_line(run_cli("daemon", "--config", "configs/demo.yaml", "--runtime-dir", str(rd),
                                      timeout=60))
        assert "--runtime-dir" in last and str(rd) in last, last


def test_reload_with_a_bad_record_or_runtime_dir(tmp_path):
    (tmp_path / "reload.json").write_text("[1, 2]\n")
    last = one_clean_line(run_cli("reload", "--pid", "1", "--runtime-dir", str(tmp_path), timeout=30), 1)
    assert "not a reload record (expected a JSON object" in last and "argument after" not in last, last
    (tmp_path / "reload.json").write_text('{"pid": "x"}\n')
    last = one_clean_line(run_cli("reload", "--pid", "1", "--runtime-dir", str(tmp_path), timeout=30), 1)
    assert "pid: 'x' is not a int" in last, last
    f = tmp_path / "garbage.bin"
    f.write_bytes(b"x")
    last = one_clean_line(run_cli("reload", "--pid", "1", "--runtime-dir", str(f), timeout=30))
    assert f"--runtime-dir {f}: is not a folder" in last, last


# --- C13: duplicate keys in bundle.yaml -----------------------------------------------------------

def test_bundle_yaml_duplicate_key_is_refused(tmp_path, toy_bundle, synthetic_cfg):
    b = bundle_copy(toy_bundle, tmp_path / "b",
                    lambda t: t.replace("postprocess:\n", "postprocess:\n  min_area_px: 16\n  min_area_px: 5000\n", 1))
    p = write_config(tmp_path / "cam.yaml", synthetic_cfg(model={"bundle": str(b)}))
    last = one_clean_line(check(p))
    assert str(b / "bundle.yaml") in last and "duplicate key 'min_area_px'" in last, last


# --- C16: metrics.address --------------------------------------------------------------------------

def test_unresolvable_metrics_address_is_refused_by_check(tmp_path, synthetic_cfg):
    p = write_config(tmp_path / "cam.yaml",
                     synthetic_cfg(metrics={"enabled": True, "address": "not.an.addr.invalid", "port": 9199}))
    last = one_clean_line(check(p))
    assert f"{p}: metrics.address:" in last and "does not resolve" in last, last


def test_metrics_start_names_the_address():
    from inspector.errors import ConfigError
    from inspector.metrics import Metrics, MetricsConfig

    m = Metrics(MetricsConfig.model_construct(enabled=True, address="not.an.addr.invalid", port=0,
                                              buckets_ms=[1.0]), "cam", "cam.yaml")
    with pytest.raises(ConfigError) as e:
        m.start()
    assert e.value.key == "metrics.address"


def test_a_config_load_never_waits_on_dns_and_a_name_dns_cannot_answer_yet_is_retried(tmp_path, synthetic_cfg,
                                                                                        monkeypatch):
    # review 25c H1: the lookup at every config load made a line PC that boots before its DNS
    # exit 2, which the unit never restarts: the camera stayed down for good
    import socket

    from inspector.config import load_config
    from inspector.metrics import Metrics

    def no_dns(*a, **k):
        raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    p = write_config(tmp_path / "cam.yaml",
                     synthetic_cfg(metrics={"enabled": True, "address": "metrics-host.plant", "port": 0}))
    cfg = load_config(p)  # the form only
    with pytest.raises(OSError, match=r"cam.yaml: metrics.address: 'metrics-host.plant' does not resolve "
                                      r"\(Temporary failure in name resolution\)") as e:
        Metrics(cfg.metrics, "cam", str(p)).start()
    assert not isinstance(e.value, ConfigError)  # exit 1: systemd retries
    bad = write_config(tmp_path / "bad.yaml", synthetic_cfg(metrics={"enabled": True, "address": "not a host"}))
    with pytest.raises(ConfigError, match="metrics.address: 'not a host' is neither an IP address nor a host name"):
        load_config(bad)


# --- C17: check --user -----------------------------------------------------------------------------

def test_check_user_empty_is_refused():
    last = one_clean_line(run_cli("check", "--config", "configs/demo.yaml", "--user", "", timeout=60))
    assert "--user: empty" in last, last


def test_user_ids_take_a_numeric_uid():
    import pwd

    from inspector.access_check import user_ids
    from inspector.errors import InspectorError

    me = pwd.getpwuid(os.getuid())
    assert user_ids(str(me.pw_uid))[:2] == (me.pw_uid, me.pw_gid)
    free = next(u for u in range(4_000_000, 4_100_000) if not _uid_exists(u))
    with pytest.raises(InspectorError, match=f"no user with UID {free}"):
        user_ids(str(free))


def _uid_exists(uid: int) -> bool:
    import pwd
    try:
        pwd.getpwuid(uid)
        return True
    except KeyError:
        return False


# --- C1: a path of the wrong type ----------------------------------------------------------------

def test_config_that_is_a_folder(tmp_path):
    last = one_clean_line(check(tmp_path))
    assert "is a folder" in last and "not found" not in last, last


def test_bundle_that_is_a_file(tmp_path, synthetic_cfg):
    f = tmp_path / "garbage.bin"
    f.write_bytes(b"x")
    p = write_config(tmp_path / "cam.yaml", synthetic_cfg(model={"bundle": str(f)}))
    last = one_clean_line(check(p))
    assert f"{p}: model.bundle: {f} is a file, not a model bundle folder" in last, last

    from inspector.bundle import load_bundle
    from inspector.errors import BundleError
    with pytest.raises(BundleError, match="is a file, not a model bundle folder"):
        load_bundle(f)


def test_flat_field_that_is_a_folder(tmp_path, synthetic_cfg):
    p = write_config(tmp_path / "cam.yaml", synthetic_cfg(preprocess={"flat_field": str(tmp_path)}))
    last = one_clean_line(check(p))
    assert "preprocess.flat_field" in last and "is a folder" in last, last
