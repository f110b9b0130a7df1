"""Benchmark scripts the README names refuse bad input in one line, exit 2, before measuring (they
printed tracebacks: a missing bundle, a bundle of another kind, an --out below a file)."""

from __future__ import annotations

import subprocess
import sys

from conftest import ROOT


def _script(name: str, *args: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / name), *args], capture_output=True,
                          text=True, timeout=120, cwd=cwd)


def test_square_pad_bench_names_a_missing_or_wrong_bundle(tmp_path):
    # the README's relative path run from another folder
    r = _script("square_pad_bench.py", "--bundle", "deploy/models/arcd-neu", "--out", str(tmp_path / "o"),
                cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1] == ("error: --bundle deploy/models/arcd-neu: "
                                                 "deploy/models/arcd-neu: model bundle folder not found")
    r = _script("square_pad_bench.py", "--bundle", str(ROOT / "deploy/models/clgan-mt"), "--out",
                str(tmp_path / "o"), cwd=tmp_path)
    assert r.returncode == 2 and "a bundle of kind clgan; square_pad applies to arcd bundles only" in r.stderr
    assert not (tmp_path / "o").exists()  # refused before anything was made


def test_recorder_bench_names_an_out_it_cannot_make(tmp_path):
    (tmp_path / "file").write_text("x")
    r = _script("recorder_bench.py", "--frames", "2", "--levels", "0", "--out", str(tmp_path / "file"),
                cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert f"error: --out {tmp_path / 'file'}: cannot make this folder" in r.stderr
