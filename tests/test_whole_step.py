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


def test_an_ignored_sigint_stays_ignored():
    # a script's background job ignores SIGINT: a Ctrl-C meant for the script's foreground
    # command stopped the training job
    r = subprocess.run([sys.executable, "-c", "import signal, runpy, sys; signal.signal(signal.SIGINT, "
                        "signal.SIG_IGN); sys.argv = ['x', 'SIGINT', '1']; exec(sys.stdin.read())"],
                       input=SCRIPT, capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "finished", (r.stdout, r.stderr)


BROKEN = textwrap.dedent("""
    import os, signal, sys
    from export.training import sigterm_as_interrupt, whole_step
    try:
        with sigterm_as_interrupt():
            with whole_step():
                os.kill(os.getpid(), signal.SIGTERM)
                raise RuntimeError("DataLoader worker (pid 1) is killed by signal: Terminated.")
    except KeyboardInterrupt as e:
        print("stopped:", e, "| cause:", type(e.__cause__).__name__, flush=True)
        sys.exit(130)
""")


def test_a_step_broken_by_the_stop_it_holds_still_stops_as_a_stop():
    # a worker or another DDP rank that stopped first breaks the held step: the trainer must
    # still get its KeyboardInterrupt (and save), not a RuntimeError and exit 1
    r = subprocess.run([sys.executable, "-c", BROKEN], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert r.returncode == 130, r.stderr
    assert r.stdout.strip() == ("stopped: signal SIGTERM (DataLoader worker (pid 1) is killed by signal: "
                                "Terminated.) | cause: RuntimeError")


def test_dataloader_workers_leave_stop_signals_to_the_main_process():
    import torch
    from torch.utils.data import DataLoader

    from export.training import quiet_worker

    class Handlers(torch.utils.data.Dataset):
        def __len__(self):
            return 1

        def __getitem__(self, i):
            return torch.tensor([int(signal.getsignal(signal.SIGINT) is signal.SIG_IGN),
                                 int(signal.getsignal(signal.SIGTERM) is signal.SIG_IGN)])

    got = next(iter(DataLoader(Handlers(), num_workers=1, worker_init_fn=quiet_worker)))
    assert got.tolist() == [[1, 1]]


def test_a_stop_held_past_the_last_step_under_torchrun_acts_when_released():
    """Under torchrun whole_step keeps its holding handler between steps (the stop is agreed at
    the next step's end). Past the last step the trainers release it before rank 0's own work
    (CLGAN's preview, fuzzy-mask's tau): the usual handlers come back and a stop that arrived in
    between is delivered to them at once, not lost and not left until that work is done."""
    import export.training as tr

    got: list[int] = []
    previous = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, lambda s, f: got.append(s))
    try:
        usual = signal.getsignal(signal.SIGTERM)
        tr._DDP_HOLD.active, tr._DDP_HOLD.held = True, [signal.SIGTERM]
        tr._DDP_HOLD.previous = {signal.SIGTERM: usual}
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # stands in for the holding handler
        tr.release_held_signals()
        assert signal.getsignal(signal.SIGTERM) is usual and got == [signal.SIGTERM]
        assert not tr._DDP_HOLD.active and tr._DDP_HOLD.held == []
        tr.release_held_signals()  # outside a torchrun job's steps: nothing
        assert got == [signal.SIGTERM]
    finally:
        signal.signal(signal.SIGTERM, previous)
