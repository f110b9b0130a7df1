"""Bad-input sweep 25, the ``inspector calibrate`` findings: every bad value is one line naming the
option or file, exit 2, no traceback, before any work, and nothing written (B3, B6, B9, C3, C4,
C9, C10, C11, C14, R1)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

from test_calibration import local_mean_clgan_bundle, make_sets, texture
from toy_models import fuzzymask_toy_bundle

from inspector.bundle import load_bundle, write_bundle


def cli(capsys, *args: str) -> tuple[int, str]:
    """``inspector *args`` in this process: (exit status, stderr). A traceback is an exception."""
    from inspector.cli import main

    capsys.readouterr()
    try:
        rc = main([str(a) for a in args])
    except SystemExit as e:  # argparse
        rc = e.code
    return rc, capsys.readouterr().err


def one_error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if "error:" in ln]
    assert len(lines) == 1 and "Traceback" not in err and "Errno" not in err, err
    return lines[0]


def _frames(folder: Path, n: int = 4, size: int = 64, seed: int = 0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        cv2.imwrite(str(folder / f"n{i:03d}.png"), np.clip(texture(rng, size, size), 0, 255).astype(np.uint8))
    return folder


@pytest.fixture
def clgan(tmp_path):
    """A clgan-kind bundle with a min_residual floor, and a few normal frames."""
    bundle = local_mean_clgan_bundle(tmp_path / "b")
    spec = load_bundle(bundle).spec
    write_bundle(bundle, spec.model_copy(update={"postprocess": spec.postprocess.model_copy(
        update={"min_residual": 20.0})}))
    return bundle, _frames(tmp_path / "normal", 12)


# -- B3, C11, C14: flat-field numbers ------------------------------------------------------------
@pytest.mark.parametrize("opt, value", [("--smooth-px", "1e9"), ("--smooth-px", "-1"), ("--smooth-px", "nan"),
                                        ("--max-gain", "nan"), ("--max-gain", "inf"),
                                        ("--target-level", "inf")])
def test_flat_field_refuses_a_number_it_cannot_mean(opt, value, tmp_path, capsys):
    normal = _frames(tmp_path / "normal", 3)
    out = tmp_path / "ff" / "f.npz"
    rc, err = cli(capsys, "calibrate", "flat-field", "--normal", normal, "--out", out, f"{opt}={value}")
    assert rc == 2, err
    assert one_error_line(err).startswith(f"inspector: error: {opt}: "), err
    assert not out.exists() and not out.parent.exists()


def test_flat_field_out_where_no_file_can_be_made_is_refused_naming_out(tmp_path, capsys):
    if not Path("/proc/self").is_dir():
        pytest.skip("no /proc")
    rc, err = cli(capsys, "calibrate", "flat-field", "--normal", _frames(tmp_path / "n", 3), "--out", "/proc/x.npz")
    assert rc == 2, err
    assert one_error_line(err).startswith("inspector: error: --out /proc/x.npz: "), err


# -- B6: values a threshold search can write ------------------------------------------------------
@pytest.mark.parametrize("opt, value", [("--k1", "nan"), ("--k1", "-1"), ("--k1", "inf"), ("--k1", "-0.5"),
                                        ("--k2", "3,nan"), ("--kernel-size", "1e20"),
                                        ("--min-area-px", "inf"), ("--min-threshold", "nan")])
def test_thresholds_refuse_a_search_value_that_cannot_be_written(opt, value, clgan, tmp_path, capsys):
    bundle, normal = clgan
    before = (bundle / "bundle.yaml").read_text()
    rc, err = cli(capsys, "calibrate", "thresholds", "--bundle", bundle, "--normal", normal, "--target-fpr", "0.2",
                  "--threads", "1", "--out", tmp_path / "rep", f"{opt}={value}")
    assert rc == 2, err
    assert one_error_line(err).startswith(f"inspector: error: {opt}: "), err
    assert (bundle / "bundle.yaml").read_text() == before
    assert not (tmp_path / "rep").exists()


# -- B9, B6: dual-threshold --range --------------------------------------------------------------
def test_a_range_of_too_many_values_is_refused_with_the_count():
    """2:100000:0.0001 is 10^9 values: it filled the memory before anything was printed."""
    from calibration.dual_threshold import MAX_RANGE_VALUES, parse_range

    for text, count in (("2:100000:0.0001", "1e+09"), ("2:4:1e-320", "inf")):
        with pytest.raises(ValueError) as ei:
            parse_range(text)
        assert str(ei.value).startswith(f"--range {text!r}: {count} values; at most {MAX_RANGE_VALUES}")
    assert len(parse_range(f"1:{MAX_RANGE_VALUES}:1")) == MAX_RANGE_VALUES


@pytest.fixture
def mt(clgan, tmp_path):
    _, mt = make_sets(tmp_path / "d", normals=4, defects=6, seed=4)
    return mt


@pytest.mark.parametrize("rng", ["nan,3", "2,3,-1", "-1:2:0.5", "2:100000:0.0001"])
def test_dual_threshold_refuses_a_range_value_before_the_sweep(rng, clgan, mt, tmp_path, capsys):
    bundle, _ = clgan
    before = (bundle / "bundle.yaml").read_text()
    rc, err = cli(capsys, "calibrate", "dual-threshold", "--bundle", bundle, "--data", mt, "--format",
                  "magnetic-tile", "--split", "all", f"--range={rng}", "--out", tmp_path / "dt", "--write")
    assert rc == 2, err
    assert one_error_line(err).startswith(f"inspector: error: --range {rng!r}: "), err
    assert (bundle / "bundle.yaml").read_text() == before and not (tmp_path / "dt").exists()


# -- C4: residual-window --windows ---------------------------------------------------------------
@pytest.mark.parametrize("windows", ["nan", "inf", "15,nan", "0,99999"])
def test_residual_window_names_windows_not_a_python_error(windows, clgan, mt, tmp_path, capsys):
    bundle, _ = clgan
    rc, err = cli(capsys, "calibrate", "residual-window", "--bundle", bundle, "--data", mt, "--format",
                  "magnetic-tile", "--split", "all", f"--windows={windows}", "--out", tmp_path / "rw")
    assert rc == 2, err
    line = one_error_line(err)
    assert line.startswith("inspector: error: --windows") and "convert" not in line, line


# -- C3: an out folder or a bundle that exists but cannot be written -----------------------------
@pytest.fixture
def deny_writes(monkeypatch):
    """os.access says "not writable" for the folders added to the returned set (the tests run as
    root, who may write anywhere)."""
    denied: set[Path] = set()
    real = os.access

    def access(path, mode, *a, **kw):
        if mode & os.W_OK and Path(path).resolve() in denied:
            return False
        return real(path, mode, *a, **kw)

    monkeypatch.setattr(os, "access", access)
    return lambda p: denied.add(Path(p).resolve())


def test_thresholds_refuse_a_bundle_that_cannot_be_written_before_the_work(clgan, tmp_path, capsys, deny_writes):
    bundle, normal = clgan
    before = (bundle / "bundle.yaml").read_text()
    deny_writes(bundle)
    rc, err = cli(capsys, "calibrate", "thresholds", "--bundle", bundle, "--normal", normal, "--target-fpr", "0.2",
                  "--threads", "1", "--out", tmp_path / "rep")
    assert rc == 2, err
    line = one_error_line(err)
    assert line.startswith(f"inspector: error: --bundle {bundle}: cannot write bundle.yaml"), line
    assert "--dry-run" in line
    assert (bundle / "bundle.yaml").read_text() == before and not (tmp_path / "rep").exists()
    # a dry run writes no bundle: it is not refused
    rc, err = cli(capsys, "calibrate", "thresholds", "--bundle", bundle, "--normal", normal, "--target-fpr", "0.2",
                  "--threads", "1", "--out", tmp_path / "rep", "--dry-run")
    assert rc == 0, err


def test_convergence_refuses_a_bundle_that_cannot_be_written(tmp_path, capsys, deny_writes):
    bundle = fuzzymask_toy_bundle(tmp_path / "fm", tile=64, m=1e-12)
    before = (bundle / "bundle.yaml").read_text()
    deny_writes(bundle)
    rc, err = cli(capsys, "calibrate", "convergence", "--bundle", bundle, "--normal", _frames(tmp_path / "n", 6),
                  "--threads", "1", "--out", tmp_path / "rep")
    assert rc == 2, err
    assert one_error_line(err).startswith(f"inspector: error: --bundle {bundle}: cannot write bundle.yaml"), err
    assert (bundle / "bundle.yaml").read_text() == before and not (tmp_path / "rep").exists()


@pytest.mark.parametrize("action, extra", [("dual-threshold", ["--range", "2.5,3"]),
                                           ("residual-window", ["--windows", "0,15"])])
def test_sweeps_refuse_an_unwritable_bundle_or_out_before_the_sweep(action, extra, clgan, mt, tmp_path, capsys,
                                                                    deny_writes, caplog):
    bundle, _ = clgan
    before = (bundle / "bundle.yaml").read_text()
    base = ["calibrate", action, "--bundle", bundle, "--data", mt, "--format", "magnetic-tile", "--split", "all",
            *extra]
    deny_writes(bundle)
    with caplog.at_level(logging.INFO):
        rc, err = cli(capsys, *base, "--out", tmp_path / "o", "--write")
    assert rc == 2, err
    line = one_error_line(err)
    assert line.startswith(f"inspector: error: --bundle {bundle}: cannot write bundle.yaml"), line
    assert (bundle / "bundle.yaml").read_text() == before and not (tmp_path / "o").exists()
    assert "reset to 0" not in caplog.text  # it said it reset the floor, and nothing was written
    # an --out folder that exists but cannot be written: refused before the sweep, naming --out
    ro = tmp_path / "ro"
    ro.mkdir()
    deny_writes(ro)
    rc, err = cli(capsys, *base, "--out", ro)
    assert rc == 2, err
    assert one_error_line(err).startswith(f"inspector: error: --out {ro}: "), err
    assert list(ro.iterdir()) == []


def test_the_floor_reset_is_only_reported_once_the_bundle_is_written(clgan, monkeypatch, caplog):
    import calibration.dual_threshold as dt
    import calibration.residual_window as rw

    bundle, _ = clgan

    def fail(*a, **kw):
        raise PermissionError(13, "Permission denied")

    for mod, write in ((rw, lambda: rw.write_window(bundle, 15, {})), (dt, lambda: dt.write_k(bundle, "k1", 2.5, {}))):
        with monkeypatch.context() as m, caplog.at_level(logging.WARNING):
            caplog.clear()
            m.setattr(mod, "write_bundle", fail)
            with pytest.raises(PermissionError):
                write()
            assert "reset to 0" not in caplog.text, mod
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        rw.write_window(bundle, 15, {})
    assert "min_residual 20 reset to 0" in caplog.text
    assert load_bundle(bundle).spec.postprocess.min_residual == 0


# -- C9: a value of 0, the option it belongs to ---------------------------------------------------
def test_zero_counts_are_refused_as_values_naming_their_option(synthetic_cfg, tmp_path, capsys):
    cfg = tmp_path / "cam.yaml"
    cfg.write_text(yaml.safe_dump(synthetic_cfg()))
    cases = [
        (["int8-set", "--config", cfg, "--pool", "-1", "--count", "2", "--out", tmp_path / "i8"],
         "--pool: must be >= 1, got -1"),
        (["int8-set", "--config", cfg, "--pool", "0", "--count", "2", "--out", tmp_path / "i8"],
         "--pool: must be >= 1, got 0"),
        (["thresholds", "--config", cfg, "--frames", "0", "--target-fpr", "0.1", "--out", tmp_path / "t"],
         "--frames: must be >= 1, got 0"),
        (["flat-field", "--config", cfg, "--frames", "0", "--out", tmp_path / "f.npz"],
         "--frames: must be >= 1, got 0"),
        (["geometry", "--strip-width-mm", "1600", "--strip-width-px", "1600", "--line-speed-m-min", "30",
          "--frame-rate", "5", "--frame-height", "0"], "--frame-height: must be >= 1, got 0"),
    ]
    for args, says in cases:
        rc, err = cli(capsys, "calibrate", *args)
        assert rc == 2, (args, err)
        assert one_error_line(err) == f"inspector: error: {says}", (args, err)
    assert not (tmp_path / "i8").exists() and not (tmp_path / "t").exists()


# -- C10: convergence --passes -------------------------------------------------------------------
@pytest.mark.parametrize("passes, within", [("0", "2"), ("-1", "2"), ("2", "3")])
def test_convergence_passes_below_within_are_refused(passes, within, tmp_path, capsys):
    bundle = fuzzymask_toy_bundle(tmp_path / "fm", tile=64)
    rc, err = cli(capsys, "calibrate", "convergence", "--bundle", bundle, "--normal", _frames(tmp_path / "n", 4),
                  "--threads", "1", "--dry-run", "--out", tmp_path / "rep", "--passes", passes, "--within", within)
    assert rc == 2, err
    assert one_error_line(err) == f"inspector: error: --passes: must be >= --within ({within}), got {passes}"


# -- C14: geometry -------------------------------------------------------------------------------
@pytest.mark.parametrize("args, says", [
    (["--strip-width-mm", "inf", "--strip-width-px", "1600", "--square-pixels"], "--strip-width-mm: "),
    (["--strip-width-mm", "1600", "--strip-width-px", "inf", "--square-pixels"], "--strip-width-px: "),
    (["--strip-width-mm", "1e308", "--strip-width-px", "1e-300", "--square-pixels"], "mm_per_px_across comes out as inf"),
    (["--strip-width-mm", "1e-300", "--strip-width-px", "1e300", "--square-pixels"], "mm_per_px_across comes out as 0"),
    (["--target-mm", "10x-5", "--target-px", "100"], "--target-mm: "),
    (["--strip-width-mm", "1600", "--strip-width-px", "1600", "--line-speed-m-min", "inf", "--line-rate", "1000"],
     "--line-speed-m-min: "),
])
def test_geometry_refuses_infinite_sizes(args, says, tmp_path, capsys):
    out = tmp_path / "geo.yaml"
    rc, err = cli(capsys, "calibrate", "geometry", *args, "--json", "--out", out)
    assert rc == 2, err
    assert one_error_line(err).startswith(f"inspector: error: {says}"), err
    assert not out.exists()


# -- R1: unreadable images are refused by name ---------------------------------------------------
@pytest.mark.parametrize("how", ["garbage", "truncated", "empty"])
def test_thresholds_refuse_an_unreadable_normal_image_by_name(how, clgan, tmp_path, capsys):
    bundle, normal = clgan
    before = (bundle / "bundle.yaml").read_text()
    bad = normal / "n005.png"
    data = bad.read_bytes()
    bad.write_bytes({"garbage": os.urandom(3000), "truncated": data[: len(data) // 2], "empty": b""}[how])
    rc, err = cli(capsys, "calibrate", "thresholds", "--bundle", bundle, "--normal", normal, "--target-fpr", "0.2",
                  "--threads", "1", "--out", tmp_path / "rep")
    assert rc == 2, err
    assert one_error_line(err).startswith(f"inspector: error: --normal {bad}: "), err
    assert (bundle / "bundle.yaml").read_text() == before and not (tmp_path / "rep").exists()


def test_thresholds_refuse_an_unreadable_defect_image_by_name(clgan, mt, tmp_path, capsys):
    bundle, normal = clgan
    before = (bundle / "bundle.yaml").read_text()
    images = sorted((mt / "MT_Spot" / "Imgs").glob("*.jpg"))
    for p in images:  # every one: whichever falls in a part that is read
        p.write_bytes(b"\xff\xd8\xff not a jpeg")
    rc, err = cli(capsys, "calibrate", "thresholds", "--bundle", bundle, "--normal", normal, "--target-fpr", "0.2",
                  "--defects", mt, "--format", "magnetic-tile", "--threads", "1", "--out", tmp_path / "rep")
    assert rc == 2, err
    line = one_error_line(err)
    assert line.startswith(f"inspector: error: --defects {mt / 'MT_Spot' / 'Imgs'}"), line
    assert (bundle / "bundle.yaml").read_text() == before


def test_convergence_refuses_an_unreadable_normal_image_by_name(tmp_path, capsys):
    bundle = fuzzymask_toy_bundle(tmp_path / "fm", tile=64, m=1e-12)
    before = (bundle / "bundle.yaml").read_text()
    normal = _frames(tmp_path / "n", 12)
    bad = normal / "n003.png"
    bad.write_bytes(bad.read_bytes()[:40])
    rc, err = cli(capsys, "calibrate", "convergence", "--bundle", bundle, "--normal", normal, "--threads", "1",
                  "--out", tmp_path / "rep")
    assert rc == 2, err
    assert one_error_line(err).startswith(f"inspector: error: --normal {bad}: "), err
    assert (bundle / "bundle.yaml").read_text() == before and not (tmp_path / "rep").exists()
