"""benchmarks/gpu_check.sh in its CPU mode: the script a GPU machine runs unattended must work.

On a machine without a GPU and TensorRT it still runs what it can (environment facts, the ORT CPU
baseline) and records every backend it skipped with the reason.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT


# a CPU rehearsal of GPU-machine tooling (12-18 s): `make test-slow`, before a device run
@pytest.mark.slow
def test_gpu_check_dry_run_records_what_ran_and_why_the_rest_did_not(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable}
    env.pop("OUT", None)
    r = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--dry-run", "--out", str(tmp_path)],
                       cwd=ROOT, capture_output=True, text=True, timeout=240, env=env)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpu_check.json", "gpu_check.log", "gpu_check.png"]
    res = json.loads((tmp_path / "gpu_check.json").read_text())
    assert res["mode"] == "dry-run"
    assert "CPUExecutionProvider" in res["env"]["onnxruntime_providers"]
    assert res["pycuda_plumbing"] == {"status": "skipped", "reason": "dry run"}
    assert res["bundles"], "no bundle was benchmarked"
    skipped = {s["backend"]: s["reason"] for s in res["skipped"]}
    for bundle in res["bundles"].values():  # every shipped bundle (or the toy graph where none is)
        cpu = bundle["backends"]["ort-cpu"]
        assert cpu["status"] == "ok" and cpu["backend"] == "onnxruntime:CPUExecutionProvider"
        assert set(cpu["shapes"]) == {"256x256", "256x1600"}
        assert cpu["shapes"]["256x1600"]["tiles"] >= 7 and cpu["shapes"]["256x1600"]["infer_ms"]["n"] >= 1
        for name in ("trt-fp32", "trt-fp16", "trt-int8"):
            if bundle["backends"][name]["status"] != "ok":
                assert name in skipped and skipped[name]
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        assert "`gpu` extra" in skipped["trt-fp16"]
    assert all(s["status"] in ("ok", "skipped") for s in res["steps"].values()), res["steps"]


def test_gpu_check_rejects_unknown_arguments():
    r = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--frobnicate"], cwd=ROOT,
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "unknown argument" in r.stderr
