"""Free loopback ports for the tests' servers and daemons.

A port is picked, checked free, and bound later by the server under test. Picked from the
kernel's own range (port 0), two test processes (pytest-xdist) could be handed one port in that
gap, and any outgoing connection could take it too. So each test process picks from a slice of
its own below the kernel's ephemeral range, which the kernel never hands out by itself."""

from __future__ import annotations

import itertools
import os
import random
import socket

LOW = 20000


def _ephemeral_low() -> int:
    """Where the kernel's own range starts (ip_local_port_range; Linux's default 32768)."""
    try:
        return int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _slice() -> range:
    high = max(LOW + 1000, min(32000, _ephemeral_low()))
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    count = min(max(1, int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))), 100)
    # a worker that replaces a crashed one is numbered past the count: it takes the slot the
    # crashed one left
    index = (int(worker[2:]) if worker[2:].isdigit() else 0) % count
    size = (high - LOW) // count
    return range(LOW + index * size, LOW + (index + 1) * size)


_ports = _slice()
_start = random.randrange(len(_ports))  # a run right after another should not meet its lingering sockets
_next = itertools.cycle(list(_ports[_start:]) + list(_ports[:_start]))


def free_port() -> int:
    """A port no socket on 127.0.0.1 holds now, from this test process's slice."""
    for _ in range(len(_ports)):
        port = next(_next)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {_ports.start}-{_ports.stop - 1}")
