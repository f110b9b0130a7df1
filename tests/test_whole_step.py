"""export.training.whole_step: a stop signal inside a training step takes effect after it.

A Ctrl-C or SIGTERM raised in the middle of a step (after one network's update, before the step
counter moved on) made the trainers save weights one update ahead of their step count; the
resumed run then repeated that update.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap

import pytest

from conftest import ROOT

pytest.importorskip("torch")

SCRIPT = textwrap.dedent("""
    import os, signal, sys
    from export.training import sigterm_as_interrupt, whole_step
    sig = getattr(signal, sys.argv[1])
    times = int(sys.argv[2])
    done = []
    try:
        with sigterm_as_interrupt():
            for step in range(3):
                with whole_step():
                    done.append(f"update-a {step}")
                    for _ in range(times):
                        os.kill(os.getpid(), sig)   # arrives mid-step
                    done.append(f"update-b {step}")
    except KeyboardInterrupt as e:
        print("interrupted after", done[-1], "|", e, flush=True)
        sys.exit(130)
    print("finished", flush=True)
""")


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_a_signal_in_the_middle_of_a_step_stops_after_the_step(sig):
    r = subprocess.run([sys.executable, "-c", SCRIPT, sig, "1"], capture_output=True, text=True, cwd=ROOT,
                       timeout=60)
    assert r.returncode == 130, r.stderr
    assert r.stdout.strip() == f"interrupted after update-b 0 | signal {sig}"
    assert f"{sig}: stopping after this step" in r.stderr


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_a_second_signal_in_the_same_step_ends_the_process_at_once(sig):
    r = subprocess.run([sys.executable, "-c", SCRIPT, sig, "2"], capture_output=True, text=True, cwd=ROOT,
                       timeout=60)
    assert r.returncode == -getattr(signal, sig), (r.returncode, r.stdout, r.stderr)
    assert "interrupted after" not in r.stdout  # no handler ran: nothing saved
