"""`inspector alarms test --config F` against real PLC servers: each alarm set and cleared once."""

from __future__ import annotations

import re

import pytest

from conftest import run_cli, write_config
from plc_servers import ModbusPlc, S7Plc, free_port

pytest.importorskip("pymodbus")
pytest.importorskip("snap7")

RULES = [{"name": "big_defect", "min_area_mm2": 100}, {"name": "scratches", "classes": ["scratches"]},
         {"name": "camera_down", "type": "camera_down"}]


def test_sets_and_clears_each_alarm_once_on_every_driver(tmp_path, synthetic_cfg):
    mb, s7 = ModbusPlc(n_classes=3).start(), S7Plc(n_classes=3).start()
    try:
        cfg = write_config(tmp_path / "cam.yaml", synthetic_cfg(alarms={
            "rules": RULES, "drivers": [mb.driver_cfg(coil_base=8, register_base=100), s7.driver_cfg(start=4)]}))
        r = run_cli("alarms", "test", "--config", str(cfg), "--hold", "0.05", timeout=120)
        final_s7 = bytes(s7.db[:40])
    finally:
        mb.stop()
        s7.stop()
    assert r.returncode == 0, r.stdout + r.stderr
    # The PLC saw exactly: all clear, then each alarm alone on and off again, in rule order.
    coil_writes = [vals for fc, addr, vals in mb.writes if fc == 15 and addr == 8]
    assert coil_writes == [[False] * 3, [True, False, False], [False] * 3, [False, True, False], [False] * 3,
                           [False, False, True], [False] * 3]
    alarm_words = [vals[1] for fc, addr, vals in mb.writes if fc == 16 and addr == 100]
    assert alarm_words == [0, 1, 0, 2, 0, 4, 0]
    assert final_s7[4 + 2:4 + 6] == bytes(4)  # S7 alarm words cleared at the end
    out = r.stdout
    assert "big_defect               SET     coil 8, holding register 101 bit 0" in out
    assert "camera_down              SET     coil 10, holding register 101 bit 2" in out
    assert "scratches                SET     DB100.DBX7.1" in out  # start 4: word 1 low byte = byte 7
    assert out.count(" SET ") == 6 and len(re.findall(r"^  \w+ +cleared$", out, re.M)) == 6
    assert out.count(": ok") == 2


def test_unreachable_plc_fails_with_the_driver_named(tmp_path, synthetic_cfg):
    port = free_port()
    cfg = write_config(tmp_path / "cam.yaml", synthetic_cfg(alarms={
        "rules": RULES, "drivers": [{"type": "modbus", "host": "127.0.0.1", "port": port, "timeout_s": 1}]}))
    r = run_cli("alarms", "test", "--config", str(cfg), "--hold", "0", timeout=60)
    assert r.returncode == 1
    assert f"FAIL alarms.drivers.0 (modbus 127.0.0.1:{port} unit 1): cannot connect" in r.stdout


def test_nothing_to_test_names_the_key(tmp_path, synthetic_cfg):
    cfg = write_config(tmp_path / "cam.yaml", synthetic_cfg(alarms={"rules": RULES}))
    r = run_cli("alarms", "test", "--config", str(cfg), timeout=60)
    assert r.returncode == 2 and f"{cfg}: alarms.drivers: no PLC driver configured" in r.stderr
