"""signals_held: a stop inside the block waits for its end; a second one acts at once."""

from __future__ import annotations

import os
import signal

import pytest

from inspector.signals import signals_held


def test_a_signal_inside_the_block_takes_effect_when_it_ends():
    done = []
    with pytest.raises(KeyboardInterrupt) as e:
        with signals_held():
            os.kill(os.getpid(), signal.SIGINT)
            done.append("after the signal")  # the block went on
    assert done == ["after the signal"] and str(e.value) == ""
    previous = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt, match="signal SIGTERM"):
        with signals_held():
            signal.signal(signal.SIGTERM, signal.getsignal(signal.SIGTERM))  # still the holder
            os.kill(os.getpid(), signal.SIGTERM)
    assert signal.getsignal(signal.SIGTERM) == previous  # put back


def test_a_second_signal_stops_at_once_and_a_quiet_block_raises_nothing():
    done = []
    with pytest.raises(KeyboardInterrupt):
        with signals_held():
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
            done.append("not reached")
    assert done == []
    with signals_held():
        pass


def test_a_ctrl_c_to_the_terminals_group_does_not_cost_the_held_export_its_commit(tmp_path):
    # Ctrl-C goes to the whole foreground process group: it used to kill the exporter's git child
    # inside the held block, and a bundle reported whole recorded commit: null
    import subprocess
    import sys
    import time

    fake = tmp_path / "bin"
    fake.mkdir()
    started = tmp_path / "git-started"
    (fake / "git").write_text(f"#!/bin/sh\ntouch {started}\nsleep 1\necho 0123abcd\n")
    (fake / "git").chmod(0o755)
    script = ("import signal, sys\n"
              "from pathlib import Path\n"
              "from inspector.signals import signals_held\n"
              "from export.training import git_commit\n"
              "try:\n"
              "    with signals_held():\n"
              "        print('held', flush=True)\n"
              "        got = git_commit(Path('.'))\n"
              "except KeyboardInterrupt:\n"
              "    print('commit', got, flush=True)\n")
    env = {**os.environ, "PATH": f"{fake}:{os.environ['PATH']}"}
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=env,
                             cwd=os.path.dirname(os.path.dirname(__file__)), start_new_session=True)
    assert child.stdout.readline().strip() == "held"
    deadline = time.monotonic() + 20
    while not started.exists():  # the first git is running
        assert time.monotonic() < deadline, "git never started"
        time.sleep(0.01)
    os.killpg(child.pid, signal.SIGINT)
    out, _ = child.communicate(timeout=30)
    # (the fake git answers `status` with a line, so the checkout reads as changed: True)
    assert out.strip() == "commit ('0123abcd', True)", out
