"""Alarms: rules over the defect stream and pipeline health, and PLC drivers that carry them.

* :mod:`inspector.alarms.config` — the ``alarms:`` config section (rules, drivers);
* :mod:`inspector.alarms.rules` — :class:`AlarmEngine` (debounce, latch, acknowledge);
* :mod:`inspector.alarms.layout` — the PLC-visible state and its word map;
* :mod:`inspector.alarms.driver` — :class:`DriverWorker`: bounded queue, backoff, reconnect;
* :mod:`inspector.alarms.modbus`, :mod:`~inspector.alarms.opcua`, :mod:`~inspector.alarms.s7` —
  one protocol each; their packages (the ``plc`` extra) are imported only when a config names them.

Example::

    engine = AlarmEngine(cfg.alarms, classes, cfg.source_file)
    workers = start_drivers(cfg, engine)     # connect in the background, never block
    pipeline = Pipeline(cfg, on_report=engine.on_frame)
"""

from __future__ import annotations

import logging

from inspector.alarms.config import (AlarmsConfig, CameraDownRule, DefectRule, ModbusDriverConfig,
                                     OpcUaDriverConfig, OverloadRule, S7DriverConfig)
from inspector.alarms.driver import DriverWorker, Link, RefusedError
from inspector.alarms.layout import PlcState
from inspector.alarms.rules import AlarmEngine
from inspector.errors import ConfigError

log = logging.getLogger(__name__)

#: driver type -> (python module, pip package)
PACKAGES = {"modbus": ("pymodbus", "pymodbus"), "opcua": ("asyncua", "asyncua"),
            "s7": ("snap7", "python-snap7")}
EXTRA_HINT = "pip install 'strip-inspector[plc]'"


def make_link(driver_cfg, camera_id: str, file: str = "<memory>", index: int = 0) -> Link:
    """The protocol link for one ``alarms.drivers[index]`` entry; a missing package is a
    :class:`ConfigError` naming the key and the extra to install."""
    kind = driver_cfg.type
    module, package = PACKAGES[kind]
    try:
        if isinstance(driver_cfg, ModbusDriverConfig):
            from inspector.alarms.modbus import ModbusLink
            return ModbusLink(driver_cfg)
        if isinstance(driver_cfg, OpcUaDriverConfig):
            from inspector.alarms.opcua import OpcUaLink
            return OpcUaLink(driver_cfg, camera_id)
        if isinstance(driver_cfg, S7DriverConfig):
            from inspector.alarms.s7 import S7Link
            return S7Link(driver_cfg)
    except ImportError as e:
        raise ConfigError(file, f"alarms.drivers.{index}.type",
                          f"driver {kind!r} needs the {package} package, which is not installed "
                          f"({e}); {EXTRA_HINT}") from None
    raise ConfigError(file, f"alarms.drivers.{index}.type", f"unknown driver type {kind!r}")


def make_drivers(cfg, engine: AlarmEngine | None) -> list[DriverWorker]:
    """A (not started) worker per ``alarms.drivers`` entry of the camera config ``cfg``, fed by
    ``engine`` and passing PLC acknowledge requests back to it."""
    workers = []
    for i, d in enumerate(cfg.alarms.drivers):
        link = make_link(d, cfg.camera_id, cfg.source_file, i)
        on_ack = ((lambda names, by, e=engine: e.ack_names(names, by, unknown_ok=True))
                  if engine is not None else None)
        w = DriverWorker(link, d, on_ack=on_ack, name=f"{d.type}{i}")
        if engine is not None:
            engine.subscribe(w.submit)
            engine.drivers.append(w)
            w.submit(engine.state())  # so the first connect writes a full map, not nothing
        workers.append(w)
    return workers


__all__ = ["AlarmsConfig", "AlarmEngine", "CameraDownRule", "DefectRule", "DriverWorker", "Link",
           "ModbusDriverConfig", "OpcUaDriverConfig", "OverloadRule", "PlcState", "RefusedError", "S7DriverConfig",
           "make_drivers", "make_link"]
