"""Review 22 of the PLC commit (496c5ee), against the real protocol servers of :mod:`plc_servers`.

* M1: an interrupted ``inspector alarms test`` (Ctrl-C, SIGTERM, a write failing part-way)
  restores the map it found; a run that could not restore it is not taken for the found state by
  the next one;
* M2: a stop while the driver waits out its reconnect backoff still makes the stop write;
* M3: ``alarms test`` stops when another writer's heartbeat appears (a daemon back from backoff);
* L1: Modbus exception codes that are not about the map, and a lost connection returned as an
  error object (pymodbus < 3.7), count as "down", not "refused";
* L2: ``DriverWorker.outage()`` never sees the outage's start without its kind;
* L4: an OPC UA connect timeout names the timeout that ran out.
"""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import tempfile
import time

import pytest

from conftest import ROOT, write_config
from inspector.alarms import AlarmEngine, RefusedError, make_drivers, make_link
from inspector.alarms import commission
from inspector.alarms.commission import run_alarm_test
from inspector.alarms.config import AlarmsConfig
from inspector.alarms.driver import DriverWorker
from inspector.alarms.layout import PlcState
from inspector.config import parse_config
from plc_servers import (CLASSES, FAST, NAMES, RULES, BlackHole, ModbusPlc, Proxy, free_port, make_plc,
                         wait_for)

pytest.importorskip("pymodbus")
pytest.importorskip("asyncua")
pytest.importorskip("snap7")

#: what a stopped daemon left on the PLC: its counters, the second alarm still on, not running
LEFT = PlcState(alarm_names=NAMES, alarms=(False, True), classes=tuple(CLASSES), counts=(5, 6, 7),
                frames=1000, defects_total=18, last_class=2, last_pos_mm=1234.0)


@pytest.fixture(autouse=True)
def _own_tempdir(tmp_path, monkeypatch):
    # the alarms test keeps what it found in the temporary folder until it restored the map
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))


def _config(plc, synthetic_cfg, **driver):
    return parse_config(synthetic_cfg(alarms={"rules": RULES, "drivers": [plc.driver_cfg(**{**FAST, **driver})]}),
                        "t.yaml")


def _leave(cfg, state: PlcState = LEFT, heartbeat: int = 77) -> None:
    link = make_link(cfg.alarms.drivers[0], cfg.camera_id)
    link.connect()
    try:
        link.write(state, heartbeat)
    finally:
        link.close()


def _as_found(r: dict) -> None:
    """The map holds LEFT, marked not running."""
    assert r["status"] & 3 == 0, r
    assert r["alarm_bits"] == 2 and r["coils"] == [False, True], r
    assert r["frames"] == 1000 and r["defects"] == 18 and list(r["counts"]) == [5, 6, 7], r


class _FlakyLink:
    """Wraps a link: write number ``fail_at`` (1-based) and, with ``stay_down``, every write and
    connect after it raise ConnectionError (the PLC gone part-way through the test)."""

    def __init__(self, link, fail_at: int, stay_down: bool = False):
        self._link, self.fail_at, self.stay_down = link, fail_at, stay_down
        self.label = link.label
        self.n = 0

    def _down(self) -> bool:
        return self.n == self.fail_at or (self.stay_down and self.n > self.fail_at)

    def connect(self):
        if self.stay_down and self.n >= self.fail_at:
            raise ConnectionError("PLC gone")
        return self._link.connect()

    def write(self, state, heartbeat):
        self.n += 1
        if self._down():
            raise ConnectionError("connection reset by peer")
        return self._link.write(state, heartbeat)

    def __getattr__(self, name):
        return getattr(self._link, name)


# -- M1: an interrupted alarms test restores the map ---------------------------------------------

@pytest.mark.parametrize("kind", ["modbus", "opcua", "s7"])
def test_alarms_test_interrupted_by_ctrl_c_restores_the_map_as_found(kind, synthetic_cfg):
    plc = make_plc(kind).start()
    try:
        cfg = _config(plc, synthetic_cfg)
        _leave(cfg)
        out: list[str] = []

        def ctrl_c_after_set(line: str) -> None:
            out.append(line)
            if " SET " in line:
                raise KeyboardInterrupt  # as Ctrl-C during the hold
        with pytest.raises(KeyboardInterrupt):
            run_alarm_test(cfg, hold_s=0, out=ctrl_c_after_set)
        r = plc.read(2)
    finally:
        plc.stop()
    _as_found(r)
    assert any("test interrupted; map left as found, marked not running" in line for line in out), out


def test_alarms_test_sigterm_exits_130_with_the_map_restored(tmp_path, synthetic_cfg):
    plc = ModbusPlc(n_classes=len(CLASSES)).start()
    proc = None
    try:
        cfg_path = write_config(tmp_path / "cam.yaml", synthetic_cfg(
            alarms={"rules": RULES, "drivers": [plc.driver_cfg(**FAST)]}))
        _leave(parse_config(synthetic_cfg(alarms={"rules": RULES, "drivers": [plc.driver_cfg(**FAST)]}), "t.yaml"))
        proc = subprocess.Popen([sys.executable, "-m", "inspector", "alarms", "test", "--config", str(cfg_path),
                                 "--hold", "30"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if " SET " in line:
                proc.send_signal(signal.SIGTERM)
                break
        out, err = proc.communicate(timeout=60)
        r = plc.read(2)
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
        plc.stop()
    assert proc.returncode == 130, (proc.returncode, err[-3000:])
    assert err.strip().splitlines() == [
        "inspector: error: alarms test stopped (signal SIGTERM); a map it had written to was restored, "
        "unless a line above says not"], err[-3000:]
    assert "map left as found, marked not running" in out, "".join(lines) + out
    _as_found(r)


def _test_with_a_failing_write(plc, synthetic_cfg, monkeypatch, **flaky):
    """`alarms test` on ``plc`` (holding a stopped daemon's map) whose third write fails; it
    must end with exit 1. Returns the config and the lines it printed."""
    cfg = _config(plc, synthetic_cfg)
    _leave(cfg)
    real_make_link = commission.make_link
    monkeypatch.setattr(commission, "make_link", lambda *a: _FlakyLink(real_make_link(*a), fail_at=3, **flaky))
    out: list[str] = []
    assert run_alarm_test(cfg, hold_s=0, out=out.append) == 1
    return cfg, out


def test_alarms_test_write_failing_part_way_restores_the_map(synthetic_cfg, monkeypatch):
    plc = ModbusPlc(n_classes=len(CLASSES)).start()
    try:
        # the third write (the clear after the first SET) fails: the connection was reset
        _, out = _test_with_a_failing_write(plc, synthetic_cfg, monkeypatch)
        r = plc.read(2)
    finally:
        plc.stop()
    text = "\n".join(out)
    assert "write failed: connection reset by peer" in text, text
    assert "test interrupted; map left as found, marked not running" in text, text
    _as_found(r)


def test_a_test_that_could_not_restore_the_map_is_not_taken_for_the_found_state(synthetic_cfg, monkeypatch):
    plc = ModbusPlc(n_classes=len(CLASSES)).start()
    try:
        real_make_link = commission.make_link
        # the PLC goes away after the first SET: nothing can restore the map
        cfg, out = _test_with_a_failing_write(plc, synthetic_cfg, monkeypatch, stay_down=True)
        assert "map NOT restored" in "\n".join(out) and "alarm any_defect may still be set" not in "\n".join(out)
        left = plc.read(2)
        assert left["status"] & 3 == 3, left   # the test's state: running, camera ok
        monkeypatch.setattr(commission, "make_link", real_make_link)
        out = []
        assert run_alarm_test(cfg, hold_s=0, out=out.append) == 0, out
        r = plc.read(2)
    finally:
        plc.stop()
    text = "\n".join(out)
    assert "still holds an interrupted alarms test's write" in text, text
    _as_found(r)                              # huge_scratch on, as before the first test
    assert "set again: huge_scratch" in text and "set again: any_defect" not in text, text


# -- M3: another writer during the test ----------------------------------------------------------

@pytest.mark.parametrize("kind", ["modbus", "opcua", "s7"])
def test_alarms_test_stops_when_another_writer_appears(kind, synthetic_cfg):
    plc = make_plc(kind).start()
    try:
        cfg = _config(plc, synthetic_cfg)
        other = make_link(cfg.alarms.drivers[0], cfg.camera_id)
        other.connect()
        theirs = PlcState(alarm_names=NAMES, alarms=(False, False), classes=tuple(CLASSES), counts=(0, 0, 0),
                          frames=1, running=True, camera_ok=True)
        out: list[str] = []

        def daemon_writes_during_the_hold(line: str) -> None:
            out.append(line)
            if " SET " in line:  # a daemon back from its backoff writes its own state
                other.write(theirs, 999)
        try:
            assert run_alarm_test(cfg, hold_s=0, out=daemon_writes_during_the_hold) == 1
        finally:
            other.close()
        r = plc.read(2)
    finally:
        plc.stop()
    text = "\n".join(out)
    assert f"FAIL alarms.drivers.0 ({other.label}): another writer is active on this map" in text, text
    assert "cleared" not in text.split("SET", 1)[1], text
    # nothing written after it: the map is the other writer's
    assert r["heartbeat"] == 999 and r["frames"] == 1 and r["status"] & 3 == 3, r


def test_alarms_test_stops_when_a_daemon_comes_back_from_backoff(synthetic_cfg):
    plc = ModbusPlc(n_classes=len(CLASSES)).start()
    try:
        cfg = _config(plc, synthetic_cfg, heartbeat_s=0.2, retry_backoff_s=[1.0, 1.0])
        engine = AlarmEngine(cfg.alarms, ["background", *CLASSES], cfg.source_file)
        [w] = make_drivers(cfg, engine)
        w.start()
        try:
            engine.set_running(True, camera_ok=True)
            wait_for(lambda: plc.read(2)["status"] & 3 == 3, what="the daemon's state")
            plc.stop()  # a PLC restart: the daemon waits out its backoff, the map comes back zeroed
            wait_for(lambda: w.outage() is not None, what="the daemon's outage")
            plc.start()
            out: list[str] = []
            assert run_alarm_test(cfg, hold_s=1.0, out=out.append) == 1, out
        finally:
            w.stop()
    finally:
        plc.stop()
    assert any("another writer is active on this map" in line for line in out), out


# -- M2: a stop during reconnect backoff ---------------------------------------------------------

def test_a_stop_during_reconnect_backoff_makes_the_stop_write():
    plc = ModbusPlc(n_classes=len(CLASSES)).start()
    proxy = Proxy(("127.0.0.1", plc.port))
    try:
        drv = AlarmsConfig.model_validate({"drivers": [{"type": "modbus", "host": "127.0.0.1", "port": proxy.port,
                                                        "heartbeat_s": 0.1, "retry_backoff_s": [5, 10]}]}).drivers[0]
        w = DriverWorker(make_link(drv, "cam"), drv, name="modbus0")
        w.submit(PlcState(alarm_names=NAMES, alarms=(True, False), classes=tuple(CLASSES), counts=(0, 0, 0),
                          frames=5, running=True, camera_ok=True))
        w.start()
        wait_for(lambda: plc.read(2)["status"] & 3 == 3, what="running on the PLC")
        proxy.cut()  # a dropped session: the PLC keeps its memory and is reachable again at once
        wait_for(lambda: w.outage() is not None, what="the outage")
        t0 = time.monotonic()
        w.stop()
        took = time.monotonic() - t0
        r = plc.read(2)
    finally:
        proxy.close()
        plc.stop()
    assert r["status"] & 3 == 0, r                     # running and camera ok cleared
    assert r["alarm_bits"] == 1 and r["coils"] == [True, False] and r["frames"] == 5, r
    assert took < 4.0, took                            # not the 5 s backoff (room for a loaded box)


@pytest.mark.parametrize("plc_kind", ["nothing_listening", "hung"])
def test_a_stop_with_the_plc_unreachable_stays_bounded(plc_kind):
    hole = BlackHole() if plc_kind == "hung" else None
    port = hole.port if hole else free_port()
    try:
        drv = AlarmsConfig.model_validate({"drivers": [{"type": "modbus", "host": "127.0.0.1", "port": port,
                                                        "timeout_s": 0.5, "retry_backoff_s": [5, 10]}]}).drivers[0]
        w = DriverWorker(make_link(drv, "cam"), drv, name="modbus0")
        w.submit(PlcState(alarm_names=NAMES, alarms=(True, False), classes=tuple(CLASSES), counts=(0, 0, 0)))
        w.start()
        wait_for(lambda: w.outage() is not None, what="the outage")
        t0 = time.monotonic()
        w.stop()
        took = time.monotonic() - t0
    finally:
        if hole is not None:
            hole.close()
    # one connect and write, each 0.5 s at most, not the 5 s backoff (room for a loaded box)
    assert not w._thread.is_alive() and took < 4.0, took


# -- L1: Modbus answers that are not about the map -----------------------------------------------

@pytest.mark.parametrize("code", [4, 6, 10, 11])
def test_modbus_busy_failure_and_gateway_exceptions_are_down_not_refused(code, caplog):
    caplog.set_level("INFO", logger="inspector.alarms.driver")
    plc = ModbusPlc(n_classes=len(CLASSES))
    plc.exception_code = code   # e.g. 11: a gateway whose PLC behind it is off
    plc.start()
    try:
        drv = AlarmsConfig.model_validate({"drivers": [plc.driver_cfg(**FAST)]}).drivers[0]
        w = DriverWorker(make_link(drv, "cam"), drv, name="modbus0")
        w.submit(PlcState(alarm_names=NAMES, alarms=(True, False), classes=tuple(CLASSES), counts=(0, 0, 0)))
        w.start()
        try:
            wait_for(lambda: w.errors >= 2, what="two failed writes")
            outage = w.outage()
        finally:
            w.stop()
    finally:
        plc.stop()
    assert outage is not None and outage.startswith("down "), outage
    failed = [r.getMessage() for r in caplog.records if "write failed" in r.getMessage()]
    assert failed and f"the PLC answered exception {code} (" in failed[0], failed
    assert "refused" not in failed[0] and "the map needs" not in failed[0], failed


def test_modbus_error_objects_are_classified(synthetic_cfg):
    """pymodbus < 3.7 returns a lost connection as a ModbusIOException (isError() True, no
    exception code) instead of raising it: a lost link, not a refusal."""
    from pymodbus.exceptions import ModbusIOException
    from pymodbus.pdu import ExceptionResponse

    drv = AlarmsConfig.model_validate({"drivers": [{"type": "modbus", "host": "127.0.0.1", "port": 1}]}).drivers[0]
    link = make_link(drv, "cam")
    with pytest.raises(ConnectionError):
        link._check(ModbusIOException("Connection unexpectedly closed"), "write coils 0..1")
    with pytest.raises(ConnectionError):
        link._check(None, "write coils 0..1")
    for code in (1, 2, 3):
        with pytest.raises(RefusedError, match=f"refused by the PLC \\(exception {code}: "):
            link._check(ExceptionResponse(0x0F, code), "write coils 0..1")
    for code in (4, 6, 10, 11):
        with pytest.raises(OSError) as e:
            link._check(ExceptionResponse(0x0F, code), "write coils 0..1")
        assert not isinstance(e.value, RefusedError) and "refused" not in str(e.value), e.value


# -- L2: outage() reads one consistent pair ------------------------------------------------------

class _Watched(DriverWorker):
    """Calls outage() after every attribute the worker sets: what a status thread could read
    between two of the worker's statements."""

    seen: list

    def __setattr__(self, name, value):
        super().__setattr__(name, value)
        try:
            self.seen.append(self.outage())
        except AttributeError:  # still in __init__
            pass


def test_outage_never_shows_a_refusal_as_down():
    plc = ModbusPlc(n_classes=3, n_registers=10).start()   # every state write is refused
    try:
        drv = AlarmsConfig.model_validate({"drivers": [plc.driver_cfg(**FAST)]}).drivers[0]
        w = _Watched(make_link(drv, "cam"), drv, name="modbus0")
        w.seen = []
        w.submit(PlcState(alarm_names=NAMES, alarms=(True, False), classes=tuple(CLASSES), counts=(0, 0, 0)))
        w.start()
        try:
            wait_for(lambda: w.errors >= 3, what="three refused writes")
        finally:
            w.stop()
    finally:
        plc.stop()
    kinds = {s.split()[0] for s in w.seen if s is not None}
    assert kinds == {"refused"}, kinds


# -- L4: OPC UA connect timeout ------------------------------------------------------------------

def test_opcua_connect_timeout_names_the_timeout_that_ran_out(caplog):
    caplog.set_level(logging.CRITICAL, logger="asyncua")
    hole = BlackHole()
    try:
        drv = AlarmsConfig.model_validate({"drivers": [{"type": "opcua", "mode": "client", "timeout_s": 0.5,
                                                        "endpoint": f"opc.tcp://127.0.0.1:{hole.port}/"}]}).drivers[0]
        link = make_link(drv, "cam")
        with pytest.raises(TimeoutError) as e:
            link.connect()
        link.close()
    finally:
        hole.close()
    assert str(e.value) == "no answer within 0.5s", e.value
