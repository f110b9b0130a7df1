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


def test_relayed_signals_run_their_action_in_a_thread_of_their_own(tmp_path):
    # a handler that sets an Event runs in the main thread between two bytecodes; the main thread
    # may hold that Event's lock just then (in its own wait on it) and would wait on itself for
    # ever (review 26b L1). The relay runs the action elsewhere, however the signals fall.
    import subprocess
    import sys

    script = tmp_path / "relay.py"
    script.write_text(
        "import os, signal, threading, time\n"
        "from inspector.signals import relay_signals\n"
        "ev = threading.Event()\n"
        "where = []\n"
        "def act():\n"
        "    where.append(threading.current_thread() is threading.main_thread())\n"
        "    ev.set()\n"
        "relay_signals({signal.SIGUSR1: act})\n"
        "pid = os.getpid()\n"
        "def storm():\n"
        "    for _ in range(2000):\n"
        "        os.kill(pid, signal.SIGUSR1)\n"
        "t = threading.Thread(target=storm); t.start()\n"
        "end = time.monotonic() + 2\n"
        "while time.monotonic() < end:  # the main thread busy in the Event's own lock\n"
        "    ev.wait(0.0001); ev.clear()\n"
        "t.join()\n"
        "os.kill(pid, signal.SIGUSR1)\n"
        "assert ev.wait(10)\n"
        "print('ok', len(where) > 0 and not any(where))\n")
    from conftest import ROOT
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ["ok", "True"]
