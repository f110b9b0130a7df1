"""export/gpu_train.sh: the time-boxed GPU training script. Its real runs need a lent GPU
machine; here: its shell syntax, the probe arithmetic that sizes the runs, and a CPU rehearsal
(``--dry-run``, fixed steps) that trains, exports, scores and packs two tiny jobs."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from conftest import ROOT

SCRIPT = ROOT / "export" / "gpu_train.sh"


def test_script_parses():
    r = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def probe_program() -> str:
    text = SCRIPT.read_text()
    m = re.search(r'STEPS="\$\(\$PY - "\$WORK/probe" "\$BUDGET" <<\'EOF\'\n(.*?)\nEOF\n', text, re.S)
    assert m, "the probe's rate program is not where the test expects it"
    return m.group(1)


def log_lines(stage: int, steps_per_s: float, last: int, t0: float = 0.0) -> list[str]:
    out = []
    for step in range(20, last + 1, 20):
        t = t0 + step / steps_per_s
        out.append(f"2026-11-26 06:{int(t // 60):02d}:{t % 60:06.3f}".replace(".", ",")
                   + f" INFO    export.arcd.train: stage {stage} step {step}/{last} loss 0.1")
    return out


def test_probe_sizes_every_job_to_fit_the_budget(tmp_path):
    probe = tmp_path / "probe"
    probe.mkdir()
    # ARCD: stage 1 at 40 it/s, stage 2 at 50 it/s; U-Net: stage 2 only, at 30 it/s
    (probe / "arcd.log").write_text("\n".join(log_lines(1, 40, 100) + log_lines(2, 50, 100, 10)))
    (probe / "unet.log").write_text("\n".join(log_lines(2, 30, 100)))
    r = subprocess.run([sys.executable, "-c", probe_program(), str(probe), "330"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    s1, s2 = (int(v) for v in r.stdout.split())
    t = 330 - 45
    assert s1 == int(0.25 * t * 40 * 0.85) // 100 * 100
    assert s2 == int(min(0.75 * t * 50, t * 30) * 0.85) // 100 * 100
    # every job ends inside the budget at the measured rates
    assert s1 / 40 + s2 / 50 <= 330 and s2 / 30 <= 330
    assert "rates it/s" in r.stderr


def test_probe_with_too_few_log_lines_says_so(tmp_path):
    """One step line per stage gives no rate: a clear message, not a ZeroDivisionError."""
    probe = tmp_path / "probe"
    probe.mkdir()
    (probe / "arcd.log").write_text("\n".join(log_lines(1, 40, 20) + log_lines(2, 50, 20, 10)))
    r = subprocess.run([sys.executable, "-c", probe_program(), str(probe), "330"],
                       capture_output=True, text=True)
    assert r.returncode != 0
    assert "arcd.log: stage 1 logged 1 step line(s)" in r.stderr and "ZeroDivision" not in r.stderr



# a CPU rehearsal of GPU-machine tooling (12-18 s): `make test-slow`, before a device run
@pytest.mark.slow
def test_cpu_rehearsal_trains_exports_and_scores_each_job(tmp_path):
    """``--dry-run`` on the CPU with fixed steps: an ARCD job and its U-Net twin are trained,
    exported (parity-checked), scored by ``inspector evaluate --engine torch`` into
    OUT/<name>.eval.json and packed; the run's logs come back as logs.tar.gz."""
    pytest.importorskip("torch")
    pytest.importorskip("onnx")
    import json
    import os
    import tarfile

    from test_arcd_neu import neu_folder

    data = tmp_path / "gpudata"
    neu_folder(data / "neu_seg", n=24, size=200)
    out = tmp_path / "out"
    env = dict(os.environ, PYTHON=sys.executable, GPUDATA=str(data), OUT=str(out),
               WORK=str(tmp_path / "work"), DEVICE="cpu", STAGE1_STEPS="3", STAGE2_STEPS="3",
               R_WIDTH="2", D_WIDTH="2", CALIB_IMAGES="2", VAL_IMAGES="2", DATA_WORKERS="0",
               FUZZYMASK="0",
               JOBS="arcd-t:configs/train/arcd-neu.yaml:1.0:1:0:5 unet-t:configs/train/arcd-neu.yaml:1.0:0:0")
    r = subprocess.run(["bash", str(SCRIPT), "--dry-run"], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=280)
    assert r.returncode == 0, (r.stderr[-3000:], (out / "gpu_train.log").read_text()[-3000:])
    for name in ("arcd-t", "unet-t"):
        res = json.loads((out / f"{name}.eval.json").read_text())
        assert res["engine"].startswith("torch-eager:cpu:fp32") and res["data"]["split"] == "val"
        assert 0 <= res["miou"] <= 1 and res["images"] >= 1
        with tarfile.open(out / f"{name}.tar.gz") as t:
            names = t.getnames()
        assert f"{name}/model.onnx" in names and f"{name}/eval-val.json" in names
    assert (out / "logs.tar.gz").is_file()
    assert "main: stage1 3 steps, stage2 3 steps" in (out / "gpu_train.log").read_text()
    # the ARCD job's own stage-1 steps (its sixth field) replace the schedule's 3
    import yaml

    cfg = yaml.safe_load((tmp_path / "work" / "main" / "arcd-t" / "config.yaml").read_text())
    assert cfg["stage1"]["steps"] == 5 and cfg["stage2"]["steps"] == 3
    assert json.loads((tmp_path / "work" / "main" / "arcd-t" / "metrics.json").read_text())


def test_missing_data_folder_is_named(tmp_path):
    env = dict(__import__("os").environ, PYTHON=sys.executable, GPUDATA=str(tmp_path / "nowhere"),
               OUT=str(tmp_path / "out"), WORK=str(tmp_path / "work"), DEVICE="cpu")
    r = subprocess.run(["bash", str(SCRIPT), "--dry-run"], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and f"missing {tmp_path / 'nowhere'}/neu_seg" in r.stderr


@pytest.mark.parametrize("entry, why", [
    ("a:configs/train/arcd-neu.yaml:0.3", "expected name:base:fraction:recon"),
    ("a:configs/train/nope.yaml:0.3:1", "base config 'configs/train/nope.yaml' not found"),
    ("a:configs/train/arcd-neu.yaml:30:1", "fraction '30' is not in (0, 1]"),
    ("a:configs/train/arcd-neu.yaml:0:1", "fraction '0' is not in (0, 1]"),
    ("a:configs/train/arcd-neu.yaml:0.3:yes", "reconstruction 'yes' is not 1 (ARCD) or 0 (plain)"),
    ("a:configs/train/arcd-neu.yaml:0.3:1:x", "seed 'x' is not a whole number"),
    ("a:configs/train/arcd-neu.yaml:0.3:1:0:3.5e3", "stage-1 steps '3.5e3' is not a positive"),
    ("a:configs/train/arcd-neu.yaml:0.3:1:0:100:7", "expected name:base:fraction:recon"),
    ("a/b:configs/train/arcd-neu.yaml:0.3:1", "name 'a/b': use letters, digits"),
    ("b:configs/train/arcd-neu.yaml:0.3:1", "name 'b' is used twice"),
])
def test_malformed_jobs_entry_is_named_before_training(tmp_path, entry, why):
    """A typo in one JOBS entry stops the script with exit 2 and one line naming the entry,
    before the probe or any training starts (on a lent GPU every minute counts)."""
    import os

    from test_arcd_neu import neu_folder

    data = tmp_path / "gpudata"
    neu_folder(data / "neu_seg", n=2, size=200)
    good = "b:configs/train/arcd-neu.yaml:1.0:0"
    env = dict(os.environ, PYTHON=sys.executable, GPUDATA=str(data), OUT=str(tmp_path / "out"),
               WORK=str(tmp_path / "work"), DEVICE="cpu", JOBS=f"{good} {entry}")
    r = subprocess.run(["bash", str(SCRIPT), "--dry-run"], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2, r.stderr[-2000:]
    assert f"JOBS entry '{entry}': {why}" in r.stderr
    assert not (tmp_path / "work" / "probe").exists()
