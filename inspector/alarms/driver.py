"""The part of every PLC driver that keeps inspection independent of the PLC.

A protocol :class:`Link` only knows how to connect, write one :class:`PlcState`, read acknowledge
requests and close; it may block (up to its timeout). :class:`DriverWorker` runs a link in its own
thread behind a bounded queue:

* :meth:`DriverWorker.submit` never blocks: when the queue is full the oldest state is dropped
  (each state is complete, so only the newest matters: latest state wins);
* the worker writes the newest state, and again every ``heartbeat_s`` (the heartbeat counter);
* a failed connect or write closes the link and retries with exponential backoff (reset only
  once a state reached the PLC, so a PLC that accepts connections but refuses writes is not
  hammered); after every (re)connect the current state is written first; an outage is logged
  once when it starts and once when a state gets through again;
* a write the PLC answers with a refusal (:class:`RefusedError`: area too small or missing, a
  node missing) keeps the connection and retries the write with the same backoff: the link is
  fine, only the PLC program must change;
* the last write of a stop clears "running" and "camera ok" (a stopped inspector vouches
  for neither) and keeps the alarm bits: an alarm the PLC has not acknowledged stays visible. A
  stop that finds the link down (in backoff after a failure) makes one connect and that write,
  bounded by ``timeout_s``: a PLC reachable again must not keep "running" like after a crash.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import replace
from typing import Callable, Protocol

from inspector.alarms.layout import PlcState
from inspector.errors import first_line

log = logging.getLogger(__name__)


class RefusedError(IOError):
    """The PLC answered and refused the request (its area too small or missing, a node missing):
    the connection itself is fine. The message says what the PLC must provide."""


def stopped_state(state: PlcState) -> PlcState:
    """What a stop leaves on the PLC: not running, camera not vouched for; the alarm bits,
    counters and last defect as they were."""
    return replace(state, running=False, camera_ok=False)


class Link(Protocol):
    """One PLC connection, used from one thread at a time."""

    #: "modbus 10.0.0.5:502 unit 1", for logs and metrics
    label: str

    def connect(self) -> None: ...

    def write(self, state: PlcState, heartbeat: int) -> None: ...

    def read_acks(self) -> list[int]:
        """Alarm indices the PLC asked to acknowledge since the last call (request then cleared),
        in the order of the alarms the link wrote last."""
        ...

    def close(self) -> None: ...


class DriverWorker:
    """Runs one :class:`Link` in a thread (see module docs)."""

    def __init__(self, link: Link, cfg, on_ack: Callable[[list[str], str], object] | None = None,
                 name: str = "plc"):
        self.link = link
        self.cfg = cfg
        self.on_ack = on_ack
        self.name = name
        self.label = link.label
        self._q: deque[PlcState] = deque()
        self._cv = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.connected = False
        self.writes = 0
        self.errors = 0
        self.skipped = 0          # states dropped because the queue was full (PLC slow or down)
        self.connects = 0
        self.heartbeat = 0
        self.last_written: PlcState | None = None
        self._latest: PlcState | None = None
        self._open = False        # the link is connected (it may be refusing writes)
        # (monotonic time the outage began, the PLC refuses the writes) while states do not get
        # through, else None. One attribute, assigned whole: the status thread reads it while this
        # worker's thread changes it, and two fields could be seen half updated ("down" for a
        # refusal).
        self._outage: tuple[float, bool] | None = None

    # -- called from the pipeline side: never blocks ---------------------------------------------
    def submit(self, state: PlcState) -> None:
        with self._cv:
            if len(self._q) >= self.cfg.queue_size:
                self._q.popleft()
                self.skipped += 1
            self._q.append(state)
            self._cv.notify()

    @property
    def state_name(self) -> str:
        return "connected" if self.connected else "down"

    @property
    def down_since(self) -> float | None:
        """Monotonic time the current outage began (first failed connect or write), None while
        states get through."""
        o = self._outage
        return None if o is None else o[0]

    @property
    def refused(self) -> bool:
        """The current outage is the PLC refusing writes (reachable, but its map is wrong)."""
        o = self._outage
        return o is not None and o[1]

    def outage(self, now: float | None = None) -> str | None:
        """``"down 25s"`` (not reachable) or ``"refused 25s"`` (writes refused) while states do
        not get through, else None; for status lines."""
        o = self._outage  # read once: since and kind from the same moment
        if o is None:
            return None
        since, refused = o
        now = time.monotonic() if now is None else now
        return f"{'refused' if refused else 'down'} {max(0.0, now - since):.0f}s"

    def _set_outage(self, refused: bool) -> None:
        """Record a failure: the outage keeps its start, and takes the latest failure's kind."""
        o = self._outage
        self._outage = (time.monotonic() if o is None else o[0], refused)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"plc-{self.name}", daemon=True)
        self._thread.start()

    def request_stop(self) -> None:
        """Ask the thread to write the last submitted state as stopped (:func:`stopped_state`;
        one connect first if the link is down), close and end; does not wait (several drivers
        stop side by side, :meth:`stop` waits)."""
        with self._cv:
            self._stopping = True
            self._cv.notify()

    def stop(self, timeout: float | None = None) -> None:
        """Write the last submitted state as stopped (one attempt), close the link, end the
        thread; waits at most ``timeout`` (default 2 x ``timeout_s`` + 2 s)."""
        self.request_stop()
        if self._thread is not None:
            self._thread.join(timeout if timeout is not None else 2 * self.cfg.timeout_s + 2)
            if self._thread.is_alive():
                log.warning("%s: still busy after stop (PLC slow); leaving it behind", self.label)

    # -- worker thread ----------------------------------------------------------------------------
    def _take_latest(self) -> bool:
        """Move the newest queued state into ``_latest``; True when there was one."""
        with self._cv:
            if not self._q:
                return False
            self._latest = self._q[-1]
            self._q.clear()
            return True

    def _wait(self, seconds: float, for_states: bool) -> None:
        with self._cv:
            self._cv.wait_for(lambda: self._stopping or (for_states and bool(self._q)), timeout=seconds)

    def _run(self) -> None:
        first, longest = self.cfg.retry_backoff_s
        backoff = first
        # True from the first failure of an outage until a state reaches the PLC again: the
        # outage is logged once, and "back" once, however many attempts it takes.
        outage = False
        outage_failures = 0
        # The stop write is tried once: a stop must end within a connect and a write, however
        # the PLC answers.
        stop_tried = False
        while True:
            with self._cv:
                stopping = self._stopping
            if not self.connected:
                if stopping:
                    # Down or in backoff at the stop: the PLC may be reachable again (a switch
                    # reboot, a dropped session) and would keep "running" like after a crash,
                    # so one connect and stop write, unless there is nothing to write.
                    with self._cv:
                        pending = self._latest is not None or bool(self._q)
                    if stop_tried or not pending:
                        break
                    stop_tried = True
                if not self._open:
                    try:
                        self.link.connect()
                    except Exception as e:
                        self.errors += 1
                        outage_failures += 1
                        if stopping:
                            log.warning("%s: stop write not made, PLC not reachable: %s; running and "
                                        "camera ok stay as last written", self.label, first_line(e))
                            break
                        if not outage:
                            log.error("%s: PLC not reachable: %s; retrying with backoff up to %gs",
                                      self.label, first_line(e), longest)
                            outage = True
                        self._set_outage(False)
                        self._close_link()
                        self._wait(backoff, for_states=False)
                        backoff = min(longest, backoff * 2)
                        continue
                    self._open = True
                    self.connects += 1
                    if self.connects == 1:
                        log.info("%s: connected", self.label)
                self.connected = True
            else:
                if not stopping:
                    self._wait(self.cfg.heartbeat_s, for_states=True)
            self._take_latest()
            with self._cv:
                stopping = self._stopping
            if self._latest is not None:
                stop_tried = stop_tried or stopping
                try:
                    shown = self.last_written
                    if (self.cfg.acknowledge and self.on_ack is not None and not stopping
                            and shown is not None):
                        # before this write: the PLC set its requests against the alarms it shows
                        # (the last write); read after a write with the rules of a reload, they
                        # would name other alarms. Passed on by name, for the same reason.
                        acks = self.link.read_acks()
                        names = [shown.alarm_names[i] for i in acks if i < len(shown.alarm_names)]
                        if names:
                            self.on_ack(names, self.label)
                            self._take_latest()  # the state with those alarms released
                    state = stopped_state(self._latest) if stopping else self._latest
                    self.heartbeat += 1
                    self.link.write(state, self.heartbeat)
                    self.writes += 1
                    self.last_written = state
                except Exception as e:
                    # A PLC that takes the connection but refuses the write (register area too
                    # small, wrong unit id, a node missing) must not be hammered: the same
                    # backoff as a refused connection, and one log line per outage. A refusal
                    # keeps the connection (reconnecting would not change the PLC's answer);
                    # anything else may have left the stream out of step, so it reconnects.
                    refused = isinstance(e, RefusedError)
                    self.errors += 1
                    outage_failures += 1
                    self.connected = False
                    if stopping:
                        # not "write failed": that line is logged once per outage
                        log.warning("%s: stop write not made: %s; running and camera ok stay as "
                                    "last written", self.label, first_line(e))
                    elif not outage:
                        log.error("%s: write failed: %s; %s with backoff up to %gs", self.label,
                                  first_line(e), "retrying" if refused else "reconnecting", longest)
                        outage = True
                    self._set_outage(refused)
                    if not refused:
                        self._close_link()
                    if not stopping:
                        self._wait(backoff, for_states=False)
                        backoff = min(longest, backoff * 2)
                    continue
            if outage and self.connected:
                log.info("%s: PLC back after %d failed attempt(s)%s", self.label, outage_failures,
                         "; current alarm state written" if self._latest is not None else "")
                outage = False
                outage_failures = 0
                self._outage = None
            backoff = first
            if stopping:
                break
        self._close_link()
        self.connected = False

    def _close_link(self) -> None:
        self._open = False
        try:
            self.link.close()
        except Exception as e:  # already broken: nothing left to release
            log.debug("%s: close: %s", self.label, e)
