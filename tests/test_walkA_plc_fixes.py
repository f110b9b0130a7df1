"""Walk A's PLC findings, against the real protocol servers of :mod:`plc_servers`.

* B3 / C7: a write the PLC refuses is reported once as refused, with what the PLC must provide,
  and (S7 as Modbus) retried on the same connection with backoff;
* C4: a clean stop (driver stop, daemon SIGTERM) leaves "not running, camera not ok" with the
  alarm bits kept; ``inspector alarms test`` leaves the map as it found it, marked not running,
  and refuses a map a running inspector writes;
* C5: ``STATUS=`` names a PLC driver that is down.

B2 (OPC UA ``Acknowledge`` status code) is checked in test_alarms_plc.py.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading

import pytest

from conftest import ROOT, write_config
from inspector.alarms import AlarmEngine, make_drivers, make_link
from inspector.alarms.commission import run_alarm_test
from inspector.alarms.config import AlarmsConfig
from inspector.alarms.driver import DriverWorker
from inspector.alarms.layout import PlcState
from inspector.config import parse_config
from plc_servers import (CLASSES, FAST, NAMES, RULES, ModbusPlc, S7Plc, free_port, make_plc,
                         record_write_attempts, wait_for)

pytest.importorskip("pymodbus")
pytest.importorskip("asyncua")
pytest.importorskip("snap7")

DEFECT = {"class": "inclusion", "class_id": 1, "score": 0.9, "area_px": 40, "area_mm2": None,
          "strip_pos_mm": 10.0, "centroid": [5.0, 5.0]}


# -- B3 / C7: refused writes ---------------------------------------------------------------------

@pytest.mark.parametrize("db", [100, 101], ids=["db_too_small", "db_missing"])
def test_s7_refused_write_says_what_the_db_needs_once_and_keeps_the_connection(db, caplog):
    caplog.set_level("INFO", logger="inspector.alarms.driver")
    plc = S7Plc(n_classes=3, db_size=20).start()  # the map needs 32 + 2 x 3 = 38 bytes
    try:
        drv = AlarmsConfig.model_validate({"drivers": [
            plc.driver_cfg(db=db, heartbeat_s=0.1, retry_backoff_s=[0.1, 0.2], timeout_s=1.0)]}).drivers[0]
        link = make_link(drv, "cam")
        attempts = record_write_attempts(link)
        w = DriverWorker(link, drv, name="s70")
        w.submit(PlcState(alarm_names=("a",), alarms=(True,), classes=tuple(CLASSES), counts=(0, 0, 0)))
        w.start()
        try:
            wait_for(lambda: len(attempts) >= 4, what="four write attempts")
            # the CPU answered: the link is fine, so no reconnect on every backoff step
            assert w.connects == 1 and w.writes == 0, (w.connects, w.writes)
            assert w.outage().startswith("refused ")
        finally:
            w.stop()
        ours = [r.getMessage() for r in caplog.records if r.name == "inspector.alarms.driver"]
        failed = [m for m in ours if "write failed" in m]
        assert len(failed) == 1, ours
        assert "refused by the PLC" in failed[0], failed
        assert f"DB{db} must exist and hold at least 38 bytes from byte 0" in failed[0], failed
    finally:
        plc.stop()


@pytest.mark.parametrize("kind", ["modbus", "s7"])
def test_alarms_test_on_a_too_small_map_names_the_range_needed(kind, synthetic_cfg):
    plc = (ModbusPlc(n_classes=3, n_registers=10) if kind == "modbus" else S7Plc(n_classes=3, db_size=20)).start()
    try:
        cfg = parse_config(synthetic_cfg(alarms={"rules": RULES, "drivers": [
            plc.driver_cfg(register_base=0, coil_base=4) if kind == "modbus" else plc.driver_cfg(start=2)]}),
            "t.yaml")
        out: list[str] = []
        assert run_alarm_test(cfg, hold_s=0, out=out.append) == 1
    finally:
        plc.stop()
    text = "\n".join(out)
    assert "refused by the PLC" in text, text
    if kind == "modbus":  # 16 words + 3 classes from register_base, the two rules' coils
        assert "the map needs holding registers 0..18 and coils 4..5 on unit 1" in text, text
    else:
        assert "DB100 must exist and hold at least 38 bytes from byte 2 (DBB2..DBB39)" in text, text


# -- C4: what a stop leaves ----------------------------------------------------------------------

def _running_with_a_defect(plc, synthetic_cfg, **driver):
    """The camera config, an alarm engine saying "running, camera ok" with one defect seen, and
    its driver writing to ``plc``, started."""
    cfg = parse_config(synthetic_cfg(alarms={"rules": RULES, "drivers": [plc.driver_cfg(**driver)]}), "t.yaml")
    engine = AlarmEngine(cfg.alarms, ["background", *CLASSES], cfg.source_file)
    [w] = make_drivers(cfg, engine)
    w.start()
    engine.set_running(True, camera_ok=True)
    engine.on_frame({"frame_id": 0, "strip_pos_mm": 0.0, "defects": [DEFECT]})
    return cfg, engine, w


@pytest.mark.parametrize("kind", ["modbus", "opcua", "s7"])
def test_a_clean_stop_clears_running_and_camera_ok_and_keeps_the_alarm_bits(kind, synthetic_cfg):
    plc = make_plc(kind).start()
    try:
        cfg, engine, w = _running_with_a_defect(plc, synthetic_cfg, **FAST)
        try:
            engine.on_frame({"frame_id": 1, "strip_pos_mm": 100.0, "defects": []})  # latched, unacknowledged
            wait_for(lambda: (lambda r: r["status"] & 3 == 3 and r["coils"] == [True, False])(plc.read(2)),
                     what="running, camera ok and the latched alarm on the PLC")
        finally:
            # the engine still says running: the driver's own stop write must clear it
            w.stop()
        r = plc.read(2)
        assert r["status"] & 3 == 0, r          # neither running nor camera ok
        assert r["alarm_bits"] == 1 and r["coils"] == [True, False], r  # the unacknowledged alarm stays
        assert r["frames"] == 2, r
    finally:
        plc.stop()
    engine.set_running(False)
    assert not engine.state().running and not engine.state().camera_ok


# -- C4: what `alarms test` leaves ---------------------------------------------------------------

@pytest.mark.parametrize("kind", ["modbus", "opcua", "s7"])
def test_alarms_test_leaves_the_map_as_found_marked_not_running(kind, synthetic_cfg):
    plc = make_plc(kind).start()
    try:
        cfg = parse_config(synthetic_cfg(alarms={"rules": RULES, "drivers": [plc.driver_cfg(**FAST)]}), "t.yaml")
        # what a stopped daemon left: its counters, an alarm still on, not running
        link = make_link(cfg.alarms.drivers[0], cfg.camera_id)
        link.connect()
        link.write(PlcState(alarm_names=NAMES, alarms=(True, False), classes=tuple(CLASSES), counts=(5, 6, 7),
                            frames=1000, defects_total=18, last_class=2, last_pos_mm=1234.0), 77)
        link.close()
        out: list[str] = []
        assert run_alarm_test(cfg, hold_s=0, out=out.append) == 0, out
        r = plc.read(2)
    finally:
        plc.stop()
    assert r["status"] & 3 == 0, r
    assert r["frames"] == 1000 and r["defects"] == 18 and list(r["counts"]) == [5, 6, 7], r
    assert r["alarm_bits"] == 1 and r["coils"] == [True, False], r
    assert r["heartbeat"] > 77, r  # counts on from where it was: a PLC watching it sees no jump back
    assert any("set again: any_defect" in line for line in out), out


def test_alarms_test_refuses_a_map_a_running_inspector_writes(synthetic_cfg):
    plc = ModbusPlc(n_classes=len(CLASSES)).start()
    try:
        cfg, engine, w = _running_with_a_defect(plc, synthetic_cfg, heartbeat_s=0.2,
                                                retry_backoff_s=[0.05, 0.3], timeout_s=1.0)
        try:
            wait_for(lambda: plc.read(2)["frames"] == 1, what="the daemon's state on the PLC")
            n_writes = len(plc.writes)
            out: list[str] = []
            assert run_alarm_test(cfg, hold_s=0, out=out.append) == 1
            text = "\n".join(out)
            assert "a running inspector writes this map" in text and "stop it first" in text, text
            assert " SET " not in text
            # only the daemon's own writes came meanwhile: each carries frames=1
            ours = [vals for fc, addr, vals in plc.writes[n_writes:] if fc == 16 and addr == 0]
            assert ours and all(vals[5] == 1 for vals in ours), ours
        finally:
            w.stop()
    finally:
        plc.stop()


# -- the daemon process: SIGTERM (C4) and STATUS= (C5) -------------------------------------------

class _Notify:
    """A NOTIFY_SOCKET: collects the daemon's datagrams."""

    def __init__(self, path: str):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        self.sock.settimeout(0.1)
        self.address = path
        self.messages: list[str] = []
        self._stop = False
        self._t = threading.Thread(target=self._loop, daemon=True)
        self._t.start()

    def _loop(self) -> None:
        while not self._stop:
            try:
                self.messages.append(self.sock.recv(4096).decode())
            except OSError:
                continue

    def statuses(self) -> list[str]:
        return [f for m in list(self.messages) for f in m.split("\n") if f.startswith("STATUS=")]

    def close(self) -> None:
        self._stop = True
        self._t.join(2)
        self.sock.close()


def _daemon(cfg_path, notify: _Notify) -> subprocess.Popen:
    env = {**os.environ, "NOTIFY_SOCKET": notify.address}
    env.pop("WATCHDOG_USEC", None)
    return subprocess.Popen([sys.executable, "-m", "inspector", "daemon", "--config", str(cfg_path)],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _stop(proc: subprocess.Popen) -> tuple[int, str]:
    proc.send_signal(signal.SIGTERM)
    try:
        _, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
    return proc.returncode, err


def test_daemon_sigterm_leaves_not_running_camera_not_ok_and_the_alarm(tmp_path, synthetic_cfg):
    plc = ModbusPlc(n_classes=len(CLASSES)).start()
    notify = _Notify(str(tmp_path / "notify.sock"))
    proc = None
    try:
        cfg = write_config(tmp_path / "cam.yaml", synthetic_cfg(
            source={"fps": 20, "defect_rate": 1.0},
            alarms={"rules": RULES, "drivers": [plc.driver_cfg(**FAST)]}))
        proc = _daemon(cfg, notify)
        wait_for(lambda: (lambda r: r["status"] & 3 == 3 and r["alarm_bits"] & 1)(plc.read(2)), timeout=120,
                 what="the running daemon's alarm on the PLC")
        rc, err = _stop(proc)
        assert rc == 0, err[-3000:]
        r = plc.read(2)
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
        notify.close()
        plc.stop()
    assert r["status"] & 3 == 0, r
    assert r["alarm_bits"] & 1 and r["coils"][0], r


def test_status_names_a_plc_driver_that_is_down_until_it_is_back(tmp_path, synthetic_cfg):
    port = free_port()  # nothing listens there yet
    notify = _Notify(str(tmp_path / "notify.sock"))
    plc = ModbusPlc(n_classes=len(CLASSES))
    plc.port = port
    proc = None
    try:
        drv = {"type": "modbus", "host": "127.0.0.1", "port": port, **FAST}
        cfg = write_config(tmp_path / "cam.yaml", synthetic_cfg(
            source={"fps": 10}, status={"interval_s": 0.3}, alarms={"rules": RULES, "drivers": [drv]}))
        proc = _daemon(cfg, notify)
        wait_for(lambda: any(", plc: modbus down " in s for s in notify.statuses()), timeout=120,
                 what="STATUS= naming the lost PLC")
        plc.start()
        seen = len(notify.statuses())
        wait_for(lambda: any(" fps, " in s and ", plc: " not in s for s in notify.statuses()[seen + 1:]),
                 timeout=60, what="STATUS= without the PLC once it is back")
        rc, err = _stop(proc)
        assert rc == 0, err[-3000:]
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
        notify.close()
        plc.stop()
