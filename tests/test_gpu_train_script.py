"""export/gpu_train.sh: the time-boxed GPU training script (runs on a lent GPU machine only, so
here: its shell syntax and the probe arithmetic that sizes the runs)."""

from __future__ import annotations

import re
import subprocess
import sys

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

