"""The ``alarms:`` section of a camera config: rules and PLC drivers.

Only pydantic here, so that :mod:`inspector.config` can embed it without importing any PLC
package. The drivers import pymodbus / asyncua / snap7 when they are built (see
:func:`inspector.alarms.make_link`).

Example::

    alarms:
      rules:
        - {name: big_scratch, classes: [scratches], min_area_mm2: 50, min_score: 0.8, latch: true}
        - {name: inclusions, classes: [inclusion], count: 3, per_m: 10}
        - {name: camera_down, type: camera_down, after_s: 5}
        - {name: overload, type: overload, drop_fraction: 0.1, window_s: 10}
      drivers:
        - {type: modbus, host: 192.168.0.10, port: 502, unit_id: 1}
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, field_validator, model_validator

#: Alarms travel as bits of two 16-bit words (Modbus registers, S7 DB words), so at most 32.
MAX_ALARMS = 32
#: Per-class defect counters have one word each in the PLC map.
MAX_CLASSES = 48

# Kept equal to inspector.pipeline.DROP_REASONS by a test; importing the pipeline here would make
# the config module import the whole hot path.
DropReason = Literal["queue_full", "incomplete_frame", "bad_frame", "engine_error",
                     "postprocess_error", "subscriber_slow", "stage_failed"]

# Alarm names become OPC UA node names and appear in PLC documentation: keep them plain.
_NAME = r"^[A-Za-z][A-Za-z0-9_]{0,31}$"


class _Rule(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    name: str = Field(..., pattern=_NAME, description="alarm name (letters, digits, _)")
    latch: bool = Field(False, description="stays on until acknowledged, even after the cause is gone")
    off_delay_s: float = Field(1.0, ge=0, description="the cause must be gone this long before the "
                                                      "alarm clears; also the shortest pulse a PLC sees")


class DefectRule(_Rule):
    """Raised by defects of the given classes that pass the size and score limits.

    Without ``per_m``/``window_s`` the rule looks at one frame at a time (``count`` matching
    defects in one frame); with one of them it counts matching defects over the last metres of
    strip or the last seconds.
    """

    type: Literal["defect"] = "defect"
    classes: list[str] = Field(default_factory=list, description="defect class names; empty = any")
    min_area_mm2: float | None = Field(None, ge=0)
    min_area_px: int | None = Field(None, ge=0)
    min_score: float = Field(0.0, ge=0, le=1)
    count: int = Field(1, ge=1, description="matching defects needed")
    per_m: float | None = Field(None, gt=0, description="... within this many metres of strip")
    window_s: float | None = Field(None, gt=0, description="... within this many seconds")
    on_delay_s: float = Field(0.0, ge=0, description="the cause must last this long to raise")

    @model_validator(mode="after")
    def _one_window(self) -> "DefectRule":
        if self.per_m is not None and self.window_s is not None:
            raise ValueError("give per_m or window_s, not both")
        return self


class CameraDownRule(_Rule):
    """Raised when the camera has been down (lost, timing out, being reopened) for ``after_s``."""

    type: Literal["camera_down"]
    after_s: float = Field(5.0, ge=0)


class OverloadRule(_Rule):
    """Raised when at least ``drop_fraction`` of the frames grabbed in ``window_s`` were dropped
    for one of ``reasons`` (by default: the engine cannot keep up with the camera).

    ``camera_skipped`` is a reason too: frames the camera or its producer lost before the grab
    (the host did not fetch them in time); they count in the denominator as well, since they
    were never grabbed."""

    type: Literal["overload"]
    drop_fraction: float = Field(0.05, gt=0, le=1)
    window_s: float = Field(10.0, gt=0)
    min_frames: int = Field(10, ge=1, description="judge only windows with at least this many frames")
    reasons: list[Literal[DropReason, "camera_skipped"]] = Field(default_factory=lambda: ["queue_full"])
    on_delay_s: float = Field(0.0, ge=0)


def _rule_tag(v: Any) -> str | None:
    # A rule without ``type`` is a defect rule: that is what most of them are.
    if isinstance(v, dict):
        return v.get("type", "defect")
    return getattr(v, "type", None)


Rule = Annotated[Union[Annotated[DefectRule, Tag("defect")], Annotated[CameraDownRule, Tag("camera_down")],
                       Annotated[OverloadRule, Tag("overload")]], Discriminator(_rule_tag)]


class _Driver(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    queue_size: int = Field(16, ge=1, le=1024, description="alarm states waiting for the PLC; "
                                                           "beyond that the oldest is dropped")
    timeout_s: float = Field(1.0, gt=0, description="connect and request timeout")
    retry_backoff_s: tuple[float, float] = Field((0.5, 10.0), description="first and longest wait "
                                                                          "between reconnects")
    heartbeat_s: float = Field(1.0, gt=0, description="write at least this often (heartbeat counter)")
    acknowledge: bool = Field(True, description="read acknowledge requests from the PLC")

    @model_validator(mode="after")
    def _backoff_order(self) -> "_Driver":
        first, longest = self.retry_backoff_s
        if first <= 0 or longest < first:
            raise ValueError(f"retry_backoff_s must be [first, longest] with 0 < first <= longest, "
                             f"got {list(self.retry_backoff_s)}")
        return self


class ModbusDriverConfig(_Driver):
    """Modbus TCP: alarm coils plus a block of holding registers (see README, PLC maps)."""

    type: Literal["modbus"]
    host: str
    port: int = Field(502, ge=1, le=65535)
    unit_id: int = Field(1, ge=0, le=255)
    coil_base: int = Field(0, ge=0, le=65535 - MAX_ALARMS)
    register_base: int = Field(0, ge=0, le=65535 - 16 - MAX_CLASSES)


class OpcUaDriverConfig(_Driver):
    """OPC UA: ``client`` writes into variables on the PLC's server; ``server`` hosts them (with an
    ``Acknowledge`` method) for the PLC or SCADA to read."""

    type: Literal["opcua"]
    mode: Literal["client", "server"] = "client"
    endpoint: str = Field(..., pattern=r"^opc\.tcp://.+", description="server URL (client: to "
                                                                     "connect to; server: to bind)")
    namespace: str = Field("urn:strip-inspector", min_length=1, description="namespace URI of the nodes")
    object_name: str | None = Field(None, pattern=r"^[A-Za-z0-9_.-]+$",
                                    description="prefix of the node ids; default: the camera id")


class S7DriverConfig(_Driver):
    """Siemens S7 (put/get): the register map written into one data block."""

    type: Literal["s7"]
    host: str
    port: int = Field(102, ge=1, le=65535)
    rack: int = Field(0, ge=0, le=7)
    slot: int = Field(1, ge=0, le=31)
    db: int = Field(..., ge=1, le=65535, description="data block number")
    start: int = Field(0, ge=0, description="byte offset of the map inside the DB")


Driver = Annotated[Union[ModbusDriverConfig, OpcUaDriverConfig, S7DriverConfig], Field(discriminator="type")]

#: union tags pydantic puts into error locations; inspector.config strips them from dotted keys
UNION_TAGS = frozenset({"defect", "camera_down", "overload", "modbus", "opcua", "s7"})


class AlarmsConfig(BaseModel):
    """``alarms:`` — rules (order = bit order in the PLC maps) and the drivers that carry them."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    rules: list[Rule] = Field(default_factory=list)
    drivers: list[Driver] = Field(default_factory=list)
    latch_file: str | None = Field(
        None, description="where latched alarms are kept across a restart (relative to the config "
                          "file); default $INSPECTOR_STATE/alarms/<camera_id>.json, which the unit sets")

    @field_validator("rules")
    @classmethod
    def _names(cls, rules: list) -> list:
        if len(rules) > MAX_ALARMS:
            raise ValueError(f"{len(rules)} rules; the PLC maps carry at most {MAX_ALARMS}")
        seen: dict[str, int] = {}
        for i, r in enumerate(rules):
            if r.name in seen:
                raise ValueError(f"rules {seen[r.name]} and {i} are both named {r.name!r}; "
                                 "names must be unique")
            seen[r.name] = i
        return rules
