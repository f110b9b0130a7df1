"""OPC UA link (asyncua): variables under a project namespace, and an ``Acknowledge`` method.

Node ids are strings in the namespace ``namespace`` (default ``urn:strip-inspector``), prefixed by
``object_name`` (default: the camera id), e.g. ``ns=2;s=line1-top.Alarms.big_scratch``:

================================ ========= =====================================================
node id (after ``<object>.``)    type      meaning
================================ ========= =====================================================
Heartbeat                        UInt32    +1 on every write (at least every ``heartbeat_s``)
Running                          Boolean   the inspector is running
CameraOk                         Boolean   the camera delivers frames
FramesInspected                  UInt64    frames that reached the publish stage since start
DefectsTotal                     UInt64    defects found since start
AlarmWord                        UInt32    bit i = alarm i (rule order)
Alarms.<alarm>                   Boolean   one per rule
Ack.<alarm>                      Boolean   written True by the PLC to acknowledge; reset to False
LastDefect.Class                 String    class name of the last defect ("" = none yet)
LastDefect.PositionMm            Double    along the strip
LastDefect.AcrossPx              Double    centroid column in the frame
LastDefect.Area                  Double    mm² where the pixel size is known, else px
LastDefect.Score                 Double    0..1
Counts.<class>                   UInt32    defects of that class since start
Acknowledge(alarm: String)       method    server mode: acknowledge one alarm, "" = all
================================ ========= =====================================================

``mode: client`` writes these variables on the PLC's (or gateway's) OPC UA server, where they must
exist; ``mode: server`` hosts them, with the ``Acknowledge`` method, on ``endpoint``.
Security: anonymous, no encryption (plant-network use); asyncua is imported when the link is built.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any

from inspector.alarms.config import OpcUaDriverConfig
from inspector.alarms.driver import RefusedError
from inspector.alarms.layout import PlcState

log = logging.getLogger(__name__)


def node_names(alarm_names: tuple[str, ...] | list[str], classes: tuple[str, ...] | list[str]
               ) -> list[tuple[str, str]]:
    """``(name, variant type)`` of every variable, in write order (without the object prefix)."""
    names = [("Heartbeat", "UInt32"), ("Running", "Boolean"), ("CameraOk", "Boolean"),
             ("FramesInspected", "UInt64"), ("DefectsTotal", "UInt64"), ("AlarmWord", "UInt32"),
             ("LastDefect.Class", "String"), ("LastDefect.PositionMm", "Double"),
             ("LastDefect.AcrossPx", "Double"), ("LastDefect.Area", "Double"),
             ("LastDefect.Score", "Double")]
    names += [(f"Alarms.{a}", "Boolean") for a in alarm_names]
    names += [(f"Counts.{c}", "UInt32") for c in classes]
    return names


def node_values(state: PlcState, heartbeat: int) -> list[Any]:
    """Values in the order of :func:`node_names`."""
    cls = state.classes[state.last_class - 1] if 0 < state.last_class <= len(state.classes) else ""
    return ([heartbeat & 0xFFFFFFFF, state.running, state.camera_ok, state.frames, state.defects_total,
             state.alarm_bits, cls, float(state.last_pos_mm), float(state.last_across_px),
             float(state.last_area), float(state.last_score)]
            + list(state.alarms) + [n & 0xFFFFFFFF for n in state.counts])


class NodesMissing(RefusedError, LookupError):
    """The PLC's server lacks nodes of the map (its program must add them)."""


class _LoopThread:
    """An asyncio loop in its own thread; the link's sync methods submit coroutines to it."""

    def __init__(self, name: str, request_timeout: float):
        #: the timeout asyncua applies itself (``timeout_s``), named when it is the one that ran out
        self.request_timeout = request_timeout
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self.thread.start()

    def run(self, coro, timeout: float):
        fut = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return fut.result(timeout)
        except TimeoutError:
            # done: the coroutine's own timeout (asyncua's, timeout_s) ran out, before this bound
            within = self.request_timeout if fut.done() else timeout
            fut.cancel()
            raise TimeoutError(f"no answer within {within:g}s") from None

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        if not self.thread.is_alive():
            self.loop.close()


class OpcUaLink:
    def __init__(self, cfg: OpcUaDriverConfig, camera_id: str):
        import asyncua  # ImportError handled by make_link
        from asyncua import ua

        self.cfg = cfg
        self.obj = cfg.object_name or camera_id
        self.label = f"opcua {cfg.mode} {cfg.endpoint}"
        self._asyncua = asyncua
        self._ua = ua
        self._loop: _LoopThread | None = None
        self._client = None
        self._server = None
        self._idx = 0
        self._layout: tuple | None = None      # (alarm names, classes) the nodes were made for
        self._alarms_written: set[str] = set()  # alarm nodes written by this link, across reconnects
        self._nodes: list = []
        self._types: list = []
        self._ack_nodes: list = []
        self._method_acks: list[str] = []      # server mode: alarms named by the Acknowledge method
        self._ack_lock = threading.Lock()

    def _nid(self, name: str):
        return self._ua.NodeId(f"{self.obj}.{name}" if name else self.obj, self._idx)

    # -- connect / close -----------------------------------------------------------------------
    def connect(self) -> None:
        if self._loop is None:
            self._loop = _LoopThread(f"opcua-{self.obj}", self.cfg.timeout_s)
        coro = self._start_server() if self.cfg.mode == "server" else self._connect_client()
        # server start loads the standard address space (seconds); never bound it by the request timeout
        self._loop.run(coro, max(self.cfg.timeout_s * 4, 30.0 if self.cfg.mode == "server" else 0))
        self._layout = None

    async def _connect_client(self) -> None:
        c = self.cfg
        client = self._asyncua.Client(c.endpoint, timeout=c.timeout_s)
        await client.connect()
        self._client = client
        try:
            self._idx = await client.get_namespace_index(c.namespace)
        except ValueError:
            raise LookupError(f"namespace {c.namespace!r} is not on {c.endpoint} "
                              "(alarms.drivers: namespace)") from None

    async def _start_server(self) -> None:
        ua = self._ua
        c = self.cfg
        server = self._asyncua.Server()
        await server.init()
        server.set_endpoint(c.endpoint)
        server.set_security_policy([ua.SecurityPolicyType.NoSecurity])
        server.set_server_name(f"strip-inspector {self.obj}")
        self._idx = await server.register_namespace(c.namespace)
        obj = await server.nodes.objects.add_object(self._nid(""), ua.QualifiedName(self.obj, self._idx))
        await obj.add_method(self._nid("Acknowledge"), ua.QualifiedName("Acknowledge", self._idx),
                             self._acknowledge_method, [ua.VariantType.String], [])
        self._server_obj = obj
        await server.start()
        self._server = server
        log.info("%s: serving namespace %s, object %s", self.label, c.namespace, self.obj)

    async def _acknowledge_method(self, parent, *args) -> Any:
        ua = self._ua
        # asyncua turns an exception raised here into BadUnexpectedError (and logs a traceback);
        # a returned CallMethodResult reaches the caller with its own status code.
        if len(args) != 1:
            code = ua.StatusCodes.BadArgumentsMissing if not args else ua.StatusCodes.BadTooManyArguments
            return ua.CallMethodResult(StatusCode=ua.StatusCode(code))
        alarm = args[0]
        name = alarm.Value if hasattr(alarm, "Value") else alarm
        names = list(self._layout[0]) if self._layout else []
        if name in ("", "*"):
            asked = names
        elif isinstance(name, str) and name in names:
            asked = [name]
        else:
            log.info("%s: Acknowledge(%r) refused: no such alarm; alarms are %s", self.label, name, names)
            bad = ua.StatusCode(ua.StatusCodes.BadInvalidArgument)
            return ua.CallMethodResult(StatusCode=bad, InputArgumentResults=[bad])
        with self._ack_lock:
            # by name: a write with a reload's new order may come before the driver reads them
            self._method_acks.extend(asked)
        return []

    def close(self) -> None:
        loop = self._loop
        if loop is None:
            return
        client, self._client = self._client, None
        server, self._server = self._server, None
        try:
            if client is not None:
                loop.run(client.disconnect(), self.cfg.timeout_s + 1)
            if server is not None:
                loop.run(server.stop(), 10)
        except Exception as e:  # connection already gone
            log.debug("%s: close: %s", self.label, e)
        finally:
            self._loop = None
            loop.close()

    # -- nodes ---------------------------------------------------------------------------------
    async def _ensure_nodes(self, state: PlcState) -> None:
        layout = (state.alarm_names, state.classes)
        if layout == self._layout:
            return
        ua = self._ua
        # against the alarms written before, kept across reconnects: a rule removed by a reload
        # while the PLC was down is cleared on the first write after it is back
        removed = self._alarms_written - set(state.alarm_names)
        if removed:
            await self._clear_removed_alarms(removed)
            # cleared (or gone from the PLC too): once, not again at every reconnect while the
            # PLC program still lacks the nodes of the new layout
            self._alarms_written -= removed
        names = node_names(*layout)
        acks = [f"Ack.{a}" for a in state.alarm_names]
        if self._server is not None:
            await self._add_server_nodes(names, acks)
            get = self._server.get_node
        else:
            get = self._client.get_node
        self._nodes = [get(self._nid(n)) for n, _ in names]
        self._types = [getattr(ua.VariantType, t) for _, t in names]
        self._ack_nodes = [get(self._nid(n)) for n in acks]
        if self._client is not None:
            # Fail with the missing node's id rather than a bare BadNodeIdUnknown on write.
            res = await self._client.read_attributes(self._nodes + self._ack_nodes, ua.AttributeIds.Value)
            missing = [n.nodeid.to_string() for n, r in zip(self._nodes + self._ack_nodes, res)
                       if not r.StatusCode.is_good()]
            if missing:
                raise NodesMissing(f"{len(missing)} node(s) missing on {self.cfg.endpoint}: "
                                  f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''} "
                                  "(see README, PLC maps: OPC UA)")
        self._layout = layout
        self._alarms_written = set(state.alarm_names)

    async def _clear_removed_alarms(self, removed: set[str]) -> None:
        """A rule dropped by a reload leaves its ``Alarms.<name>`` node behind; switch it off so a
        PLC or HMI still reading it does not see an alarm nobody raises any more."""
        ua = self._ua
        for name in sorted(removed):
            node = (self._server or self._client).get_node(self._nid(f"Alarms.{name}"))
            off = ua.Variant(False, ua.VariantType.Boolean)
            try:
                if self._client is not None:
                    await self._client.write_values([node], [off])
                else:
                    await self._server.write_attribute_value(node.nodeid, ua.DataValue(off))
            except ua.UaStatusCodeError as e:  # the PLC program removed the node as well
                log.debug("%s: clearing removed alarm %s: %s", self.label, name, e)
            else:
                log.info("%s: alarm %s is no longer configured; its node is set to False", self.label, name)

    async def _add_server_nodes(self, names: list[tuple[str, str]], acks: list[str]) -> None:
        ua = self._ua
        obj = self._server_obj
        defaults = {"Boolean": False, "String": "", "Double": 0.0}
        for n, t in names + [(a, "Boolean") for a in acks]:
            nid = self._nid(n)
            try:
                await self._server.get_node(nid).read_browse_name()
                continue  # made for an earlier layout (reload)
            except ua.UaStatusCodeError:
                pass
            var = await obj.add_variable(nid, ua.QualifiedName(n, self._idx),
                                         ua.Variant(defaults.get(t, 0), getattr(ua.VariantType, t)))
            if n.startswith("Ack."):
                await var.set_writable()

    # -- write / acknowledge -------------------------------------------------------------------
    def write(self, state: PlcState, heartbeat: int) -> None:
        self._loop.run(self._write(state, heartbeat), self.cfg.timeout_s * 2)

    async def _write(self, state: PlcState, heartbeat: int) -> None:
        ua = self._ua
        await self._ensure_nodes(state)
        values = [ua.Variant(v, t) for v, t in zip(node_values(state, heartbeat), self._types)]
        if self._client is not None:
            await self._client.write_values(self._nodes, values)
        else:
            for node, v in zip(self._nodes, values):
                await self._server.write_attribute_value(node.nodeid, ua.DataValue(v))

    def read_state(self, alarm_names: tuple[str, ...], classes: tuple[str, ...]) -> tuple[PlcState, int] | None:
        """The map as the PLC's server holds it now (``inspector alarms test`` restores it);
        None in server mode, whose nodes this link has just made."""
        if self._client is None:
            return None
        return self._loop.run(self._read_state(tuple(alarm_names), tuple(classes)), self.cfg.timeout_s * 2)

    async def _read_state(self, alarm_names: tuple[str, ...], classes: tuple[str, ...]) -> tuple[PlcState, int]:
        await self._ensure_nodes(PlcState(alarm_names=alarm_names, classes=classes))
        v = await self._client.read_values(self._nodes)
        n = len(alarm_names)
        cls = v[6]
        state = PlcState(alarm_names=alarm_names, alarms=tuple(bool(a) for a in v[11:11 + n]),
                         classes=classes, counts=tuple(int(c) for c in v[11 + n:]), frames=int(v[3]),
                         defects_total=int(v[4]), running=bool(v[1]), camera_ok=bool(v[2]),
                         last_class=classes.index(cls) + 1 if cls in classes else 0,
                         last_pos_mm=float(v[7]), last_across_px=float(v[8]), last_area=float(v[9]),
                         last_score=float(v[10]))
        return state, int(v[0])

    def read_acks(self) -> list[int]:
        idx = self._loop.run(self._read_acks(), self.cfg.timeout_s * 2)
        names = list(self._layout[0]) if self._layout else []
        with self._ack_lock:
            idx += [names.index(n) for n in self._method_acks if n in names]
            self._method_acks.clear()
        return sorted(set(idx))

    async def _read_acks(self) -> list[int]:
        ua = self._ua
        if not self._ack_nodes:
            return []
        if self._client is not None:
            values = await self._client.read_values(self._ack_nodes)
        else:
            values = [await n.read_value() for n in self._ack_nodes]
        idx = [i for i, v in enumerate(values) if v]
        if idx:
            off = [self._ack_nodes[i] for i in idx]
            falses = [ua.Variant(False, ua.VariantType.Boolean) for _ in idx]
            if self._client is not None:
                await self._client.write_values(off, falses)
            else:
                for n, v in zip(off, falses):
                    await self._server.write_attribute_value(n.nodeid, ua.DataValue(v))
        return idx
