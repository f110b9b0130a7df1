"""SIGTERM as Ctrl-C, for commands that must finish a step or restore something when stopped."""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from typing import Iterator


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
