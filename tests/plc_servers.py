"""Real PLC protocol servers on 127.0.0.1 for the alarm tests (the "PLC" side).

Each server can be stopped and started again on the same port; a start always begins with fresh
memory (all zero), like a PLC after a power cycle, so a test can tell whether the inspector wrote
the current state after reconnecting. ``read()`` decodes the PLC map the way a PLC program would,
written from the README's tables, not from the inspector's encoder.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time

from ports import free_port


#: the alarm set the PLC tests share: three NEU classes, a latched rule that fires on any defect
#: and one that never fires (no defect is that large: its bit must stay 0 on the PLC)
CLASSES = ["inclusion", "patches", "scratches"]
RULES = [{"name": "any_defect", "latch": True, "off_delay_s": 0},
         {"name": "huge_scratch", "classes": ["scratches"], "min_area_px": 10 ** 9}]
NAMES = tuple(r["name"] for r in RULES)
#: driver timings that keep the tests quick
FAST = {"heartbeat_s": 0.1, "retry_backoff_s": [0.05, 0.3], "timeout_s": 1.0}




def wait_for(pred, timeout: float = 30.0, what: str = "condition", every: float = 0.05):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = pred()
        except Exception as e:  # the server may be between states
            last = e
        if last and not isinstance(last, Exception):
            return last
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


def decode_words(w: list[int]) -> dict:
    """The README's register table, read by hand."""
    return {"heartbeat": w[0], "alarm_bits": w[1] | (w[2] << 16), "status": w[3],
            "frames": (w[4] << 16) | w[5], "defects": (w[6] << 16) | w[7], "last_class": w[8],
            "last_pos_mm": (w[9] << 16) | w[10], "ack": w[14] | (w[15] << 16), "counts": w[16:]}


class _Loop:
    def __init__(self):
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()

    def run(self, coro, timeout: float = 30):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)


class ModbusPlc:
    kind = "modbus"

    def __init__(self, n_classes: int = 3, n_registers: int = 256):
        self.port = free_port()
        self.n_classes = n_classes
        self.n_registers = n_registers   # fewer than 16 + classes: every state write is refused
        #: a Modbus exception code to answer every request with (a gateway whose PLC is off: 11),
        #: None for normal answers; may be changed while the server runs
        self.exception_code: int | None = None
        self._loop = _Loop()
        self.server = None
        self.writes: list[tuple[int, int, list]] = []   # (function code, address, values)

    def start(self) -> "ModbusPlc":
        from pymodbus.server import ModbusTcpServer
        from pymodbus.simulator import DataType, SimData, SimDevice

        from pymodbus.constants import ExcCodes

        async def record(fc, start, address, count, regs, set_values):
            if self.exception_code is not None:
                return ExcCodes(self.exception_code)
            if set_values is not None:
                self.writes.append((fc, address, list(set_values)))
            return None

        async def go():
            dev = SimDevice(id=1, action=record, simdata=(
                [SimData(0, count=256, values=False, datatype=DataType.BITS)],
                [SimData(0, count=16, values=False, datatype=DataType.BITS)],
                [SimData(0, count=self.n_registers, values=0, datatype=DataType.REGISTERS)],
                [SimData(0, count=16, values=0, datatype=DataType.REGISTERS)]))
            self.server = ModbusTcpServer(dev, address=("127.0.0.1", self.port))
            await self.server.serve_forever(background=True)
        self._loop.run(go())
        return self

    def stop(self) -> None:
        if self.server is not None:
            self._loop.run(self.server.shutdown())
            self.server = None

    def driver_cfg(self, **kw) -> dict:
        return {"type": "modbus", "host": "127.0.0.1", "port": self.port, "unit_id": 1, **kw}

    def _client(self):
        from pymodbus.client import ModbusTcpClient
        c = ModbusTcpClient("127.0.0.1", port=self.port, timeout=2, retries=0)
        assert c.connect(), "test client cannot reach the modbus server"
        return c

    def read(self, n_alarms: int = 4) -> dict:
        c = self._client()
        try:
            w = c.read_holding_registers(0, count=16 + self.n_classes, device_id=1).registers
            coils = c.read_coils(0, count=n_alarms, device_id=1).bits[:n_alarms]
        finally:
            c.close()
        out = decode_words(list(w))
        out["coils"] = list(coils)
        return out

    def request_ack(self, index: int) -> None:
        c = self._client()
        try:
            c.write_registers(14 + index // 16, [1 << (index % 16)], device_id=1)
        finally:
            c.close()


class S7Plc:
    kind = "s7"
    DB = 100

    def __init__(self, n_classes: int = 3, db_size: int = 256):
        self.port = free_port()
        self.n_classes = n_classes
        self.db_size = db_size   # under 32 + 2 x classes: the CPU refuses the map's writes
        self.server = None
        self.db = bytearray(db_size)

    def start(self) -> "S7Plc":
        import snap7
        self.db = bytearray(self.db_size)
        self.server = snap7.Server(log=False)
        self.server.register_area(snap7.SrvArea.DB, self.DB, self.db)
        self.server.start_to("127.0.0.1", self.port)
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None

    def driver_cfg(self, **kw) -> dict:
        return {"type": "s7", "host": "127.0.0.1", "port": self.port, "rack": 0, "slot": 1,
                "db": self.DB, "start": 0, **kw}

    def read(self, n_alarms: int = 4) -> dict:
        raw = bytes(self.db)
        w = [int.from_bytes(raw[2 * i:2 * i + 2], "big") for i in range(16 + self.n_classes)]
        out = decode_words(w)
        # DBX bit addressing as a PLC programmer writes it: alarm k of word 1 is DBX3.k (k < 8)
        out["coils"] = [bool(raw[3 - k // 8] >> (k % 8) & 1) for k in range(n_alarms)]
        return out

    def request_ack(self, index: int) -> None:
        word = 14 + index // 16
        bit = index % 16
        byte = 2 * word + (1 if bit < 8 else 0)
        self.db[byte] |= 1 << (bit % 8)


class OpcUaPlc:
    """An OPC UA server holding the inspector's nodes, as a PLC programmer sets them up from the
    README table (names spelled out here, not taken from the inspector's code)."""

    kind = "opcua"
    NS = "urn:strip-inspector"

    def __init__(self, obj: str, alarms: list[str], classes: list[str]):
        self.port = free_port()
        self.obj = obj
        self.alarms = alarms
        self.classes = classes
        self._loop = _Loop()
        self.server = None
        self.vars: dict = {}

    def start(self) -> "OpcUaPlc":
        self._loop.run(self._start(), 60)
        return self

    async def _start(self):
        from asyncua import Server, ua
        srv = Server()
        await srv.init()
        srv.set_endpoint(f"opc.tcp://127.0.0.1:{self.port}/")
        srv.set_security_policy([ua.SecurityPolicyType.NoSecurity])
        idx = await srv.register_namespace(self.NS)
        obj = await srv.nodes.objects.add_object(ua.NodeId(self.obj, idx), ua.QualifiedName(self.obj, idx))
        spec = [("Heartbeat", ua.VariantType.UInt32, 0), ("Running", ua.VariantType.Boolean, False),
                ("CameraOk", ua.VariantType.Boolean, False), ("FramesInspected", ua.VariantType.UInt64, 0),
                ("DefectsTotal", ua.VariantType.UInt64, 0), ("AlarmWord", ua.VariantType.UInt32, 0),
                ("LastDefect.Class", ua.VariantType.String, ""),
                ("LastDefect.PositionMm", ua.VariantType.Double, 0.0),
                ("LastDefect.AcrossPx", ua.VariantType.Double, 0.0),
                ("LastDefect.Area", ua.VariantType.Double, 0.0), ("LastDefect.Score", ua.VariantType.Double, 0.0)]
        spec += [(f"Alarms.{a}", ua.VariantType.Boolean, False) for a in self.alarms]
        spec += [(f"Ack.{a}", ua.VariantType.Boolean, False) for a in self.alarms]
        spec += [(f"Counts.{c}", ua.VariantType.UInt32, 0) for c in self.classes]
        self.vars = {}
        for name, vt, v0 in spec:
            var = await obj.add_variable(ua.NodeId(f"{self.obj}.{name}", idx), ua.QualifiedName(name, idx),
                                         ua.Variant(v0, vt))
            await var.set_writable()
            self.vars[name] = var
        await srv.start()
        self.server = srv

    def stop(self) -> None:
        if self.server is not None:
            self._loop.run(self._stop())
            self.server = None

    async def _stop(self) -> None:
        # asyncua's stop() closes the open client transports and only then the listening socket,
        # and asyncio's wait_closed() (3.11.5+) waits for every connection to drop. A client that
        # reconnects in between (the inspector's driver retries fast in these tests) holds that
        # wait open until it gives up itself: seen once as a 30 s timeout here. So stop listening
        # first, and abort whatever is still connected after a bounded wait.
        bs = self.server.bserver
        listener = getattr(bs, "_server", None) if bs is not None else None
        if listener is not None:
            listener.close()
        try:
            await asyncio.wait_for(self.server.stop(), 10)
        except asyncio.TimeoutError:
            for t in list(getattr(self.server.iserver, "asyncio_transports", [])):
                t.abort()

    def driver_cfg(self, **kw) -> dict:
        return {"type": "opcua", "mode": "client", "endpoint": f"opc.tcp://127.0.0.1:{self.port}/",
                "namespace": self.NS, **kw}

    def read(self, n_alarms: int = 4) -> dict:
        async def go():
            return {k: await v.read_value() for k, v in self.vars.items()}
        v = self._loop.run(go())
        return {"heartbeat": v["Heartbeat"], "alarm_bits": v["AlarmWord"],
                "status": (1 if v["Running"] else 0) | (2 if v["CameraOk"] else 0),
                "frames": v["FramesInspected"], "defects": v["DefectsTotal"],
                "counts": [v[f"Counts.{c}"] for c in self.classes],
                "coils": [v[f"Alarms.{a}"] for a in self.alarms][:n_alarms],
                "ack": sum(1 << i for i, a in enumerate(self.alarms) if v[f"Ack.{a}"])}

    def request_ack(self, index: int) -> None:
        from asyncua import ua

        async def go():
            await self.vars[f"Ack.{self.alarms[index]}"].write_value(ua.Variant(True, ua.VariantType.Boolean))
        self._loop.run(go())


class Proxy:
    """A TCP relay 127.0.0.1:``port`` -> ``target``; :meth:`cut` drops every connection through
    it while the PLC behind keeps running with its memory (a switch reboot, a dropped session)."""

    def __init__(self, target: tuple[str, int]):
        self.target = target
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self._stop = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        self.sock.settimeout(0.2)
        while not self._stop:
            try:
                c, _ = self.sock.accept()
            except OSError:
                continue
            try:
                u = socket.create_connection(self.target, timeout=2)
            except OSError:
                c.close()
                continue
            with self._lock:
                self._conns += [c, u]
            for a, b in ((c, u), (u, c)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(a: socket.socket, b: socket.socket) -> None:
        try:
            while data := a.recv(4096):
                b.sendall(data)
        except OSError:
            pass
        for s in (a, b):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        a.close()  # each direction's thread closes its reading end: both get closed

    def cut(self) -> None:
        with self._lock:
            conns, self._conns = self._conns, []
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self) -> None:
        self._stop = True
        self.cut()
        self.sock.close()


class BlackHole:
    """Accepts TCP connections and never answers: a PLC that hangs."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.conns: list[socket.socket] = []
        self._stop = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        self.sock.settimeout(0.2)
        while not self._stop:
            try:
                c, _ = self.sock.accept()
                self.conns.append(c)
            except OSError:
                continue

    def close(self):
        self._stop = True
        for c in self.conns:
            c.close()
        self.sock.close()


def make_plc(kind: str):
    """A server of ``kind`` (modbus, s7, opcua) holding the map of :data:`RULES` and
    :data:`CLASSES`, not started."""
    if kind == "modbus":
        return ModbusPlc(n_classes=len(CLASSES))
    if kind == "s7":
        return S7Plc(n_classes=len(CLASSES))
    return OpcUaPlc("test", list(NAMES), CLASSES)


def record_write_attempts(link) -> list[float]:
    """Wrap ``link.write`` so that each attempt's time is appended to the returned list (the
    real link still does the work)."""
    import time as _time

    attempts: list[float] = []
    real_write = link.write

    def write(*a):
        attempts.append(_time.monotonic())
        return real_write(*a)
    link.write = write
    return attempts
