"""The PLC libraries do not flood the log: their INFO lines (asyncua logs every heartbeat write,
snap7 every connect) are held back unless the log level is DEBUG."""

from __future__ import annotations

import pytest

from conftest import run_cli, write_config
from plc_servers import OpcUaPlc, S7Plc

pytest.importorskip("asyncua")
pytest.importorskip("snap7")

RULES = [{"name": "big_defect", "min_area_mm2": 100}, {"name": "scratches", "classes": ["scratches"]}]


def test_alarms_test_logs_no_library_info_lines_unless_debug(tmp_path, synthetic_cfg):
    opc = OpcUaPlc("line1", [r["name"] for r in RULES], ["inclusion", "patches", "scratches"]).start()
    s7 = S7Plc(n_classes=3).start()
    try:
        cfg = write_config(tmp_path / "cam.yaml", synthetic_cfg(alarms={
            "rules": RULES, "drivers": [opc.driver_cfg(object_name="line1"), s7.driver_cfg()]}))
        quiet = run_cli("alarms", "test", "--config", str(cfg), "--hold", "0.05", timeout=120)
    finally:
        opc.stop()
        s7.stop()
    assert quiet.returncode == 0, quiet.stdout + quiet.stderr
    # (a library's WARNING stays: asyncua says so when a server shortens the session timeout)
    lib = [ln for ln in quiet.stderr.splitlines()
           if (" asyncua." in ln or " snap7." in ln) and " WARNING " not in ln and " ERROR " not in ln]
    assert lib == [], lib[:5]


def test_debug_lets_the_library_lines_through_and_a_later_level_holds_them_again():
    import logging

    from inspector.logs import set_level

    before = logging.getLogger().level
    try:
        set_level("DEBUG")  # `inspector daemon --log-level DEBUG`, or a reload to it
        assert logging.getLogger("asyncua.client.ua_session").isEnabledFor(logging.INFO)
        set_level("INFO")
        assert not logging.getLogger("asyncua.client.ua_session").isEnabledFor(logging.INFO)
        assert logging.getLogger("snap7.client").isEnabledFor(logging.WARNING)
        assert not logging.getLogger("pymodbus.logging").isEnabledFor(logging.ERROR)
        # a stricter level holds them there too (a logger's own level is not filtered by the root's)
        set_level("ERROR")
        assert not logging.getLogger("asyncua.client.ua_client").isEnabledFor(logging.WARNING)
        assert not logging.getLogger("snap7.client").isEnabledFor(logging.WARNING)
    finally:
        set_level(before)
