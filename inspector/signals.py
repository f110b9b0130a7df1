"""SIGTERM as Ctrl-C, for commands that must finish a step or restore something when stopped;
signals relayed to a thread, for the long-running commands whose stop sets events."""

from __future__ import annotations

import os
import signal
import threading
from contextlib import contextmanager
from typing import Callable, Iterator


def relay_signals(actions: dict[int, Callable[[], None]]) -> None:
    """Run ``actions[signum]`` in a thread of its own when that signal comes (main thread only;
    elsewhere nothing changes). A Python handler runs in the main thread between two bytecodes:
    setting an Event there waits for that Event's lock, which the main thread may hold at that
    moment (in its own wait on it), and the loop would hang for good. The kernel's wakeup byte
    carries the signal over a pipe instead, and the handlers themselves do nothing."""
    if threading.current_thread() is not threading.main_thread():
        return
    r, w = os.pipe()
    os.set_blocking(w, False)  # set_wakeup_fd's requirement: a full pipe drops, never blocks

    def relay() -> None:
        while True:
            try:
                got = os.read(r, 64)
            except InterruptedError:
                continue
            if not got:
                return
            for num in got:
                act = actions.get(num)
                if act is not None:
                    act()
    threading.Thread(target=relay, name="signals", daemon=True).start()
    signal.set_wakeup_fd(w, warn_on_full_buffer=False)
    for num in actions:
        signal.signal(num, lambda *_: None)  # replaces the default (exit, KeyboardInterrupt)


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM stops the command the way Ctrl-C does (``KeyboardInterrupt``,
    with the signal's name as its text).

    SIGTERM is how ``kill``, ``timeout``, systemd and batch schedulers stop a job, and a job
    started in the background of a script ignores SIGINT: without this a stopped training run
    lost everything since its last checkpoint, and a stopped ``alarms test`` left its test alarm
    on the PLC. The first SIGTERM puts the previous handler back, so a second one ends the
    process at once. Outside the main thread signals cannot be handled; nothing changes.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGTERM)

    def interrupt(signum: int, frame: object) -> None:
        signal.signal(signal.SIGTERM, previous)
        raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")

    signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextmanager
def signals_held() -> Iterator[None]:
    """Ctrl-C or SIGTERM arriving inside the block take effect when it ends: for a few steps
    that must happen together (a bundle's graph moved in and its ``bundle.yaml`` written, so a
    stopped ``export --replace`` never leaves one without the other). A second signal gives up
    waiting and stops at once. Outside the main thread nothing changes; an ignored signal stays
    ignored."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) or signal.SIG_DFL for s in (signal.SIGINT, signal.SIGTERM)}
    previous = {s: h for s, h in previous.items() if h is not signal.SIG_IGN}
    held: list[int] = []

    def restore() -> None:
        for s, h in previous.items():
            signal.signal(s, h)

    def hold(signum: int, frame: object) -> None:
        if held:  # asked twice: at once
            restore()
            raise _interrupt(signum)
        held.append(signum)

    for s in previous:
        signal.signal(s, hold)
    try:
        yield
    finally:
        restore()
    if held:
        raise _interrupt(held[0])


def _interrupt(signum: int) -> KeyboardInterrupt:
    # Ctrl-C reads as a bare KeyboardInterrupt, as Python raises it; SIGTERM names itself
    return KeyboardInterrupt() if signum == signal.SIGINT else \
        KeyboardInterrupt(f"signal {signal.Signals(signum).name}")
