"""Modbus TCP link (pymodbus): alarm coils plus the holding-register map of
:mod:`inspector.alarms.layout`.

* coil ``coil_base + i`` = alarm i (rule order); a rule removed by a reload gets its coil cleared;
* holding registers from ``register_base``: the word table in :mod:`inspector.alarms.layout`
  (heartbeat, alarm words, status, counters, last defect, acknowledge words, counts per class).

pymodbus is imported when the link is built, so the runtime runs without it.
"""

from __future__ import annotations

import inspect
import logging

from inspector.alarms.config import ModbusDriverConfig
from inspector.alarms.driver import RefusedError
from inspector.alarms.layout import (ACK, COUNTS, LAST_SCORE, PlcState, ack_indices, decode_words,
                                     encode_words)

log = logging.getLogger(__name__)

#: Modbus exception codes a PLC answers with, in the words of the Modbus specification
EXCEPTIONS = {1: "illegal function", 2: "illegal data address", 3: "illegal data value",
              4: "server device failure", 6: "server device busy",
              10: "gateway path unavailable", 11: "gateway target device failed to respond"}

#: The codes that say the request itself does not fit the PLC's map (a refusal: the PLC program
#: must change). The others (device failure, busy, a gateway with no PLC behind it) say the PLC
#: is not answering properly now: the link counts as down, and the map is not blamed.
MAP_REFUSALS = {1, 2, 3}

#: what an exception code that is not a refusal means for the operator
_NOT_ANSWERING = {4: "the PLC failed while handling the request",
                  6: "the PLC is busy (a long program cycle?)",
                  10: "the gateway has no path to the PLC (its routing or the unit id)",
                  11: "the PLC behind the gateway does not answer (off, or its serial line down)"}


class ModbusLink:
    def __init__(self, cfg: ModbusDriverConfig):
        from pymodbus.client import ModbusTcpClient  # ImportError handled by make_link

        self.cfg = cfg
        self.label = f"modbus {cfg.host}:{cfg.port} unit {cfg.unit_id}"
        self._client_cls = ModbusTcpClient
        # pymodbus 3.10 renamed the request keyword ``slave`` to ``device_id``.
        params = inspect.signature(ModbusTcpClient.write_registers).parameters
        self._unit_kw = {"device_id" if "device_id" in params else "slave": cfg.unit_id}
        self._client = None
        self._mask_write = True   # FC22 until the PLC says it has none
        self._coils_written = 0   # widest coil block written so far (kept across reconnects)
        self._needs = ""          # what the map needs of the PLC, for a refusal's message

    def connect(self) -> None:
        c = self.cfg
        # retries=0: the worker owns retrying (with backoff), a request must fail fast instead
        self._client = self._client_cls(c.host, port=c.port, timeout=c.timeout_s, retries=0)
        if not self._client.connect():
            raise ConnectionError(f"cannot connect to {c.host}:{c.port}")

    def _check(self, rr, what: str):
        if rr is None:
            raise ConnectionError(f"{what}: no answer from the PLC")
        if rr.isError():
            code = getattr(rr, "exception_code", None)
            if code is None:
                # pymodbus < 3.7 returns (does not raise) a ModbusIOException when the
                # connection drops or nothing answers: a lost link, not the PLC's answer.
                raise ConnectionError(f"{what}: {rr}")
            name = EXCEPTIONS.get(code, "unknown exception")
            if code in MAP_REFUSALS:
                # An answer about the request: say what the PLC must provide, so whoever sizes
                # its register area need not look up the README's table.
                raise RefusedError(f"{what} refused by the PLC (exception {code}: {name}){self._needs}")
            # Busy, failed, or a gateway without its PLC: the map is not at fault; the driver
            # treats it as down (reconnects with backoff).
            raise IOError(f"{what}: the PLC answered exception {code} ({name}): "
                          f"{_NOT_ANSWERING.get(code, 'not a map problem')}")
        return rr

    def _set_needs(self, n_words: int, n_coils: int) -> None:
        c = self.cfg
        coils = (f" and coil {c.coil_base}" if n_coils == 1 else
                 f" and coils {c.coil_base}..{c.coil_base + n_coils - 1}" if n_coils else "")
        self._needs = (f"; the map needs holding registers {c.register_base}.."
                       f"{c.register_base + n_words - 1}{coils} on unit {c.unit_id}")

    def write(self, state: PlcState, heartbeat: int) -> None:
        c, cl = self.cfg, self._client
        if cl is None:
            raise ConnectionError("not connected")
        words = encode_words(state, heartbeat)
        # The coils of this camera's rules, and of rules written earlier in this process: a rule
        # removed by a reload must not leave its coil on with nobody to switch it off. Never
        # more: the coils beyond may belong to another camera's daemon on the same PLC, or lie
        # past the end of the PLC's coil area.
        n = max(len(state.alarms), self._coils_written)
        self._set_needs(len(words), n)
        if n:
            coils = list(state.alarms) + [False] * (n - len(state.alarms))
            self._check(cl.write_coils(c.coil_base, coils, **self._unit_kw),
                        f"write coils {c.coil_base}..{c.coil_base + n - 1}")
            self._coils_written = n
        # Two blocks around the acknowledge words, which belong to the PLC. Counts first, the
        # heartbeat/frames block last: a PLC that sees a new heartbeat also sees its counts.
        if len(words) > COUNTS:
            self._check(cl.write_registers(c.register_base + COUNTS, words[COUNTS:], **self._unit_kw),
                        f"write holding registers {c.register_base + COUNTS}..{c.register_base + len(words) - 1}")
        self._check(cl.write_registers(c.register_base, words[:LAST_SCORE + 1], **self._unit_kw),
                    f"write holding registers {c.register_base}..{c.register_base + LAST_SCORE}")

    def read_acks(self) -> list[int]:
        c, cl = self.cfg, self._client
        rr = self._check(cl.read_holding_registers(c.register_base + ACK, count=2, **self._unit_kw),
                         f"read holding registers {c.register_base + ACK}..{c.register_base + ACK + 1}")
        words = list(rr.registers)
        idx = ack_indices(words)
        if idx:
            self._clear_acks(words)
        return idx

    def read_state(self, alarm_names: tuple[str, ...], classes: tuple[str, ...]) -> tuple[PlcState, int]:
        """The map as the PLC holds it now, decoded (``inspector alarms test`` restores it)."""
        c, cl = self.cfg, self._client
        n = COUNTS + len(classes)
        self._set_needs(n, len(alarm_names))
        rr = self._check(cl.read_holding_registers(c.register_base, count=n, **self._unit_kw),
                         f"read holding registers {c.register_base}..{c.register_base + n - 1}")
        return decode_words(list(rr.registers), alarm_names, classes)

    def _clear_acks(self, seen: list[int]) -> None:
        """Clear the acknowledge bits taken, and only those: with Mask Write Register (FC22) a
        bit the PLC sets between our read and this write survives for the next read. A PLC
        without FC22 gets the words written back to 0 whole (a request set in that moment is
        then lost), as before."""
        c, cl = self.cfg, self._client
        if self._mask_write:
            for k, w in enumerate(seen):
                if not w:
                    continue
                rr = cl.mask_write_register(address=c.register_base + ACK + k, and_mask=~w & 0xFFFF,
                                            or_mask=0, **self._unit_kw)
                if rr is None or rr.isError():
                    if getattr(rr, "exception_code", None) == 1:  # illegal function: no FC22
                        log.info("%s: the PLC has no Mask Write Register (FC22); acknowledge words "
                                 "are cleared whole", self.label)
                        self._mask_write = False
                        break
                    self._check(rr, f"clear acknowledge bits in holding register {c.register_base + ACK + k}")
            else:
                return
        self._check(cl.write_registers(c.register_base + ACK, [0, 0], **self._unit_kw),
                    "clear acknowledge registers")

    def close(self) -> None:
        cl, self._client = self._client, None
        if cl is not None:
            cl.close()
