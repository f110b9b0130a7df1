"""``inspector alarms test``: set and clear every alarm once on every configured PLC driver, so
commissioning can check the wiring bit by bit.

Each driver is connected directly (no queue, no retry: a wiring test must say at once what is
wrong), first written all-clear, then for every alarm in rule order: set alone, hold, clear, hold.

The map is read first: a heartbeat still counting means a daemon writes it, and the test refuses
(it would overwrite that daemon's alarms and counters). Otherwise the test writes the counters and
last defect it found, and its last write leaves the map as found, marked not running (running and
camera ok cleared), the alarm bits as they were.

* That last write is made on every way out once the test has written: a write failing part-way,
  Ctrl-C, SIGTERM (:func:`sigterm_as_interrupt`); one attempt, bounded by the link's timeouts.
* Before each write the heartbeat is read back: the test knows the one it wrote last, so another
  value means another writer (a daemon that reconnected after its backoff, whose map the first
  read found not running): the test stops there and writes nothing more.
* What the test found is kept in a small file until its last write got through: a run that could
  not restore the map (PLC gone, the process killed) is recognised by the next one, which then
  leaves the map as the interrupted run found it, not with the test's own alarm "found" on.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

from inspector.alarms import make_link
from inspector.alarms.config import ModbusDriverConfig, OpcUaDriverConfig, S7DriverConfig
from inspector.alarms.driver import RefusedError, stopped_state
from inspector.alarms.layout import ALARMS, PlcState
from inspector.bundle import load_bundle
from inspector.errors import ConfigError, first_line

log = logging.getLogger(__name__)


def alarm_address(driver_cfg, index: int, name: str, object_name: str) -> str:
    """Where alarm ``index`` appears on the PLC side, in the PLC programmer's terms."""
    word, bit = ALARMS + index // 16, index % 16
    if isinstance(driver_cfg, ModbusDriverConfig):
        return (f"coil {driver_cfg.coil_base + index}, holding register "
                f"{driver_cfg.register_base + word} bit {bit}")
    if isinstance(driver_cfg, S7DriverConfig):
        # big-endian WORD: bits 0-7 live in the second byte
        byte = driver_cfg.start + 2 * word + (1 if bit < 8 else 0)
        return f"DB{driver_cfg.db}.DBX{byte}.{bit % 8}"
    if isinstance(driver_cfg, OpcUaDriverConfig):
        return f"{driver_cfg.object_name or object_name}.Alarms.{name}"
    return "?"


def run_alarm_test(cfg, hold_s: float = 1.0, out: Callable[[str], None] = print) -> int:
    """Returns the number of drivers that failed (0 = all wiring written). ``KeyboardInterrupt``
    (Ctrl-C, SIGTERM under :func:`sigterm_as_interrupt`) passes through once the map it
    interrupted was restored (or said not to be)."""
    file = cfg.source_file
    if not cfg.alarms.drivers:
        raise ConfigError(file, "alarms.drivers", "no PLC driver configured; nothing to test")
    if not cfg.alarms.rules:
        raise ConfigError(file, "alarms.rules", "no alarm rules configured; nothing to set")
    # The class list sets the length of the register map; the bundle's yaml is enough (no engine).
    classes = tuple(load_bundle(cfg.resolve(cfg.model.bundle), verify=False).spec.classes[1:])
    names = tuple(r.name for r in cfg.alarms.rules)
    failed = 0
    for i, d in enumerate(cfg.alarms.drivers):
        link = make_link(d, cfg.camera_id, file, i)
        test = _DriverTest(link, d, f"alarms.drivers.{i} ({link.label})", names, classes,
                           cfg.camera_id, out)
        try:
            failed += not test.run(hold_s)
        finally:
            _close(link)
    return failed


class _MapInUse(Exception):
    """A running inspector writes the map the test would overwrite."""


class _OtherWriter(Exception):
    """The heartbeat read back is not the test's own: someone else writes the map."""


class _DriverTest:
    """The test of one driver: connect, read what is found, the write sequence, the restore."""

    def __init__(self, link, driver_cfg, where: str, names: tuple[str, ...], classes: tuple[str, ...],
                 camera_id: str, out: Callable[[str], None]):
        self.link, self.cfg, self.where, self.out = link, driver_cfg, where, out
        self.names, self.classes, self.camera_id = names, classes, camera_id
        self.hb = 0                 # the heartbeat of the test's last write
        self.written = False        # a write may have reached the PLC: the restore is owed
        self.on: str | None = None  # the alarm the test set last (what a failed restore leaves)
        self.record = _record_path(link.label, camera_id)

    def run(self, hold_s: float) -> bool:
        where, out, names = self.where, self.out, self.names
        try:
            self.link.connect()
        except Exception as e:
            out(f"FAIL {where}: cannot connect: {first_line(e)}")
            return False
        try:
            found, self.hb = self._found_state()
        except _MapInUse as e:
            out(f"FAIL {where}: {e}")
            return False
        except Exception as e:
            out(f"FAIL {where}: read failed: {first_line(e)}")
            return False
        # The found counters, not zeros: a PLC program working with differences sees no jump.
        clear = replace(found, alarms=(False,) * len(names), running=True, camera_ok=True)
        leave = stopped_state(found)
        _save_record(self.record, found, self.hb, 1 + 2 * len(names))
        restored = False
        reconnect = False  # the restore needs a fresh connection (the stream may be out of step)
        try:
            self._write(clear)
            out(f"{where}: connected, all {len(names)} alarm(s) cleared")
            for k, name in enumerate(names):
                self._own_heartbeat()
                self._write(clear.with_alarms(tuple(j == k for j in range(len(names)))), on=name)
                out(f"  {name:<24} SET     {alarm_address(self.cfg, k, name, self.camera_id)}")
                time.sleep(hold_s)
                self._own_heartbeat()
                # the last clear is also the write that leaves the map as found, not running
                last = k == len(names) - 1
                self._write(leave if last else clear)
                restored = last
                out(f"  {name:<24} cleared")
                time.sleep(hold_s / 2)
            _drop_record(self.record)
            kept = [n for n, a in zip(names, leave.alarms) if a]
            out(f"{where}: ok; map left as found, marked not running"
                + (f" (alarms that were on before the test set again: {' '.join(kept)})" if kept else ""))
            return True
        except _OtherWriter as e:
            # Its writes replaced the test's: the map is that writer's now; writing the found
            # state back would overwrite it, so nothing more is written (and nothing is owed).
            restored = True
            _drop_record(self.record)
            out(f"FAIL {where}: {e}")
            return False
        except Exception as e:
            reconnect = not isinstance(e, RefusedError)
            out(f"FAIL {where}: write failed: {first_line(e)}")
            return False
        except BaseException:  # Ctrl-C, SIGTERM: restore below, then let it end the command
            reconnect = True
            raise
        finally:
            if self.written and not restored:
                self._restore(leave, reconnect)

    def _write(self, state: PlcState, on: str | None = None) -> None:
        self.hb += 1
        self.written = True  # before the write: an interrupted one may have landed in part
        self.on = on
        self.link.write(state, self.hb)

    def _read(self) -> tuple[PlcState, int] | None:
        # OPC UA server mode hosts the test's own nodes: nothing to read back (None)
        return self.link.read_state(self.names, self.classes) if hasattr(self.link, "read_state") else None

    def _own_heartbeat(self) -> None:
        """Raise :class:`_OtherWriter` when the map's heartbeat is not the test's last one."""
        got = self._read()
        if got is None:
            return
        hb = got[1]
        # the map keeps 16 bits (Modbus, S7) or 32 bits (OPC UA) of it
        if hb not in (self.hb & 0xFFFF, self.hb & 0xFFFFFFFF):
            raise _OtherWriter(
                f"another writer is active on this map: heartbeat {hb}, the test wrote {self.hb & 0xFFFF} "
                "(a running inspector that reconnected?); the test stopped and wrote nothing more, "
                "the map is that writer's: stop it (systemctl stop inspector@<camera>) and test again")

    def _restore(self, leave: PlcState, reconnect: bool) -> None:
        """The last write, on a way out of the sequence: best effort, once, bounded by the
        link's own timeouts."""
        try:
            if reconnect:
                _close(self.link)
                self.link.connect()
            self.hb += 1
            self.link.write(leave, self.hb)
        except BaseException as e:  # a second Ctrl-C too: say what is left, then give up
            left = f"alarm {self.on} may still be set" if self.on else "all alarms may still be off"
            self.out(f"{self.where}: map NOT restored ({first_line(e) or type(e).__name__}): {left}, "
                     "with running and camera ok set; `inspector alarms test` again restores what "
                     "this run found")
            if not isinstance(e, Exception):
                raise
            return
        _drop_record(self.record)
        self.out(f"{self.where}: test interrupted; map left as found, marked not running")

    def _found_state(self) -> tuple[PlcState, int]:
        """The map as the PLC holds it, and its heartbeat; all clear where the link cannot read
        one (OPC UA server mode hosts new nodes). Raises :class:`_MapInUse` while a daemon
        writes it."""
        names, classes = self.names, self.classes
        got = self._read()
        if got is None:
            return PlcState(alarm_names=names, alarms=(False,) * len(names), classes=classes,
                            counts=(0,) * len(classes)), 0
        found, hb = got
        if found.running:
            # A daemon writes at least every heartbeat_s (the same config's); one killed without
            # its stop write leaves "running" set too, and a heartbeat that stands still.
            wait = 2 * self.cfg.heartbeat_s + 0.5
            self.out(f"{self.where}: the map says running; watching its heartbeat for {wait:g}s")
            time.sleep(wait)
            again, hb2 = self._read()
            if hb2 != hb:
                raise _MapInUse(f"a running inspector writes this map (heartbeat {hb} -> {hb2} in {wait:g}s); "
                                "the test would overwrite its alarms and counters: stop it first "
                                "(systemctl stop inspector@<camera>)")
            found, hb = again, hb2
            earlier = _interrupted_run(self.record, found, hb)
            if earlier is not None:
                self.out(f"{self.where}: the map still holds an interrupted alarms test's write "
                         f"(heartbeat {hb}); leaving it as that test found it")
                found = earlier
        return found, hb


# -- what an unfinished test found ----------------------------------------------------------------
# A file per driver (label and camera) in the temporary folder, written before the test's first
# write and removed once its last write got through. The map then holding one of that test's
# states (its heartbeats, running, at most one alarm, the found counters) means the test never
# got to restore it.

def _record_path(label: str, camera_id: str) -> Path:
    key = hashlib.sha256(f"{label}|{camera_id}".encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"inspector-alarms-test-{key}.json"


def _save_record(path: Path, found: PlcState, hb: int, n_writes: int) -> None:
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".")
        with os.fdopen(fd, "w") as f:
            json.dump({"found": dataclasses.asdict(found), "heartbeat": hb, "writes": n_writes}, f)
        os.replace(tmp, path)  # a rename: never follows a link planted at that name
    except OSError as e:  # best effort: only the next run's recognition depends on it
        log.warning("cannot keep what the test found in %s (%s): an interrupted test may be "
                    "taken for the found state by the next one", path, e)


def _drop_record(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.unlink()


def _interrupted_run(path: Path, now: PlcState, hb: int) -> PlcState | None:
    """What an unfinished earlier test found, if the map still holds one of its writes."""
    try:
        rec = json.loads(path.read_text())
        found = PlcState(**{k: tuple(v) if isinstance(v, list) else v for k, v in rec["found"].items()})
        start, n = int(rec["heartbeat"]), int(rec["writes"]) + 1  # + its restore attempt
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if (found.alarm_names, found.classes) != (now.alarm_names, now.classes):
        return None
    ours = {(start + j) & 0xFFFF for j in range(1, n + 1)} | {(start + j) & 0xFFFFFFFF for j in range(1, n + 1)}
    test_state = replace(found, alarms=now.alarms, running=True, camera_ok=True)
    if hb in ours and sum(now.alarms) <= 1 and now == test_state:
        return found
    return None


def _close(link) -> None:
    try:
        link.close()
    except Exception as e:  # a link that never connected may have nothing to close
        log.debug("close: %s", e)
