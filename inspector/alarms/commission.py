"""``inspector alarms test``: set and clear every alarm once on every configured PLC driver, so
commissioning can check the wiring bit by bit.

Each driver is connected directly (no queue, no retry: a wiring test must say at once what is
wrong), first written all-clear, then for every alarm in rule order: set alone, hold, clear, hold.

The map is read first: a heartbeat still counting means a daemon writes it, and the test refuses
(it would overwrite that daemon's alarms and counters). Otherwise the test writes the counters and
last defect it found, and its last write leaves the map as found, marked not running (running and
camera ok cleared), the alarm bits as they were.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from typing import Callable

from inspector.alarms import make_link
from inspector.alarms.config import ModbusDriverConfig, OpcUaDriverConfig, S7DriverConfig
from inspector.alarms.driver import stopped_state
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
    """Returns the number of drivers that failed (0 = all wiring written)."""
    file = cfg.source_file
    if not cfg.alarms.drivers:
        raise ConfigError(file, "alarms.drivers", "no PLC driver configured; nothing to test")
    if not cfg.alarms.rules:
        raise ConfigError(file, "alarms.rules", "no alarm rules configured; nothing to set")
    # The class list sets the length of the register map; the bundle's yaml is enough (no engine).
    classes = tuple(load_bundle(cfg.resolve(cfg.model.bundle), verify=False).spec.classes[1:])
    names = tuple(r.name for r in cfg.alarms.rules)
    fresh = PlcState(alarm_names=names, alarms=(False,) * len(names), classes=classes,
                     counts=(0,) * len(classes))
    failed = 0
    for i, d in enumerate(cfg.alarms.drivers):
        link = make_link(d, cfg.camera_id, file, i)
        where = f"alarms.drivers.{i} ({link.label})"
        try:
            link.connect()
        except Exception as e:
            out(f"FAIL {where}: cannot connect: {first_line(e)}")
            failed += 1
            _close(link)
            continue
        try:
            found, hb = _found_state(link, d, names, classes, fresh)
        except _MapInUse as e:
            out(f"FAIL {where}: {e}")
            failed += 1
            _close(link)
            continue
        except Exception as e:
            out(f"FAIL {where}: read failed: {first_line(e)}")
            failed += 1
            _close(link)
            continue
        # The found counters, not zeros: a PLC program working with differences sees no jump.
        clear = replace(found, alarms=(False,) * len(names), running=True, camera_ok=True)
        leave = stopped_state(found)
        try:
            hb += 1
            link.write(clear, hb)
            out(f"{where}: connected, all {len(names)} alarm(s) cleared")
            for k, name in enumerate(names):
                on = tuple(j == k for j in range(len(names)))
                hb += 1
                link.write(clear.with_alarms(on), hb)
                out(f"  {name:<24} SET     {alarm_address(d, k, name, cfg.camera_id)}")
                time.sleep(hold_s)
                hb += 1
                # the last clear is also the write that leaves the map as found, not running
                link.write(leave if k == len(names) - 1 else clear, hb)
                out(f"  {name:<24} cleared")
                time.sleep(hold_s / 2)
            kept = [n for n, a in zip(names, leave.alarms) if a]
            out(f"{where}: ok; map left as found, marked not running"
                + (f" (alarms that were on before the test set again: {' '.join(kept)})" if kept else ""))
        except Exception as e:
            out(f"FAIL {where}: write failed: {first_line(e)}")
            failed += 1
        finally:
            _close(link)
    return failed


class _MapInUse(Exception):
    """A running inspector writes the map the test would overwrite."""


def _found_state(link, driver_cfg, names: tuple[str, ...], classes: tuple[str, ...],
                 fresh: PlcState) -> tuple[PlcState, int]:
    """The map as the PLC holds it, and its heartbeat; ``fresh`` where the link cannot read one
    (OPC UA server mode hosts new nodes). Raises :class:`_MapInUse` while a daemon writes it."""
    got = link.read_state(names, classes) if hasattr(link, "read_state") else None
    if got is None:
        return fresh, 0
    found, hb = got
    if found.running:
        # A daemon writes at least every heartbeat_s (the same config's); one killed without
        # its stop write leaves "running" set too, and a heartbeat that stands still.
        wait = 2 * driver_cfg.heartbeat_s + 0.5
        time.sleep(wait)
        again, hb2 = link.read_state(names, classes)
        if hb2 != hb:
            raise _MapInUse(f"a running inspector writes this map (heartbeat {hb} -> {hb2} in {wait:g}s); "
                            "the test would overwrite its alarms and counters: stop it first "
                            "(systemctl stop inspector@<camera>)")
        found, hb = again, hb2
    return found, hb


def _close(link) -> None:
    try:
        link.close()
    except Exception as e:  # a link that never connected may have nothing to close
        log.debug("close: %s", e)
