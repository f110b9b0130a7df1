"""PLC drivers against real protocol servers on 127.0.0.1 (pymodbus, asyncua, python-snap7).

The pipeline runs on the synthetic strip with a real ONNX model; defects raise the mapped alarm on
the PLC; a PLC stopped and restarted mid-run gets the current state after reconnect while the
pipeline publishes every frame; a hanging PLC never slows inspection down.
"""

from __future__ import annotations

import threading
import time

import pytest

from inspector.alarms import AlarmEngine, make_drivers
from inspector.config import parse_config
from inspector.pipeline import Pipeline
from plc_servers import (CLASSES, FAST, RULES, BlackHole, ModbusPlc, OpcUaPlc, free_port, make_plc,
                         record_write_attempts, wait_for)

pytest.importorskip("pymodbus")
pytest.importorskip("asyncua")
pytest.importorskip("snap7")



@pytest.fixture(params=["modbus", "opcua", "s7"])
def plc(request):
    p = make_plc(request.param).start()
    yield p
    p.stop()


def alarm_setup(cfg):
    engine = AlarmEngine(cfg.alarms, ["background", *CLASSES], cfg.source_file)
    workers = make_drivers(cfg, engine)
    return engine, workers


def test_defects_raise_the_mapped_alarm_and_a_restarted_plc_gets_the_current_state(plc, synthetic_cfg):
    # backpressure: the test's own PLC server starts in this process and competes for the 2 CPU
    # cores; frames must not be lost to that. A PLC that blocks is the next test's business.
    cfg = parse_config(synthetic_cfg(source={"fps": 25, "defect_rate": 1.0}, pipeline={"backpressure": True},
                                     alarms={"rules": RULES, "drivers": [plc.driver_cfg(**FAST)]}), "t.yaml")
    engine, workers = alarm_setup(cfg)
    [w] = workers
    with Pipeline(cfg, on_report=engine.on_frame) as p:
        w.start()
        engine.set_running(True, camera_ok=True)
        p.start()
        s = wait_for(lambda: (lambda r: r if r["alarm_bits"] & 1 and r["frames"] > 0 else None)(plc.read(2)),
                     what="alarm any_defect on the PLC")
        assert s["coils"] == [True, False] and s["alarm_bits"] == 0b01
        assert s["heartbeat"] > 0 and s["status"] & 1 and s["status"] & 2  # running, camera ok
        assert sum(s["counts"]) > 0

        plc.stop()
        wait_for(lambda: not w.connected, what="the driver to notice the PLC is gone")
        frames_at_outage = engine.state().frames
        wait_for(lambda: engine.state().frames >= frames_at_outage + 10, what="frames during the outage")
        plc.start()  # fresh memory: everything the PLC shows now was written after reconnect
        frames_at_restart = engine.state().frames
        # the words around the PLC-owned acknowledge words arrive in two writes (S7: two DB
        # writes), so wait for both halves of the state rather than reading between them
        s = wait_for(lambda: (lambda r: r if r["frames"] >= frames_at_restart and sum(r["counts"]) > 0
                              else None)(plc.read(2)),
                     what="the current state on the restarted PLC")
        assert s["alarm_bits"] == 0b01 and s["coils"] == [True, False]  # latched alarm still on
        assert s["heartbeat"] > 0 and sum(s["counts"]) > 0
        assert w.connects >= 2
        p.stop()
        assert p.wait(30)
    w.stop()
    c = p.counters.snapshot()
    # With backpressure, stop() may catch one grabbed frame waiting for a queue slot (counted as
    # queue_full); every other frame was published, through the outage too.
    assert c["grabbed"] == c["published"] + c["dropped"]["queue_full"], c
    assert c["dropped"]["queue_full"] <= 1 and sum(c["dropped"].values()) == c["dropped"]["queue_full"], c


def test_plc_acknowledge_releases_a_latched_alarm(plc, synthetic_cfg):
    cfg = parse_config(synthetic_cfg(alarms={"rules": RULES, "drivers": [plc.driver_cfg(**FAST)]}), "t.yaml")
    engine, [w] = alarm_setup(cfg)
    w.start()
    try:
        engine.set_running(True, camera_ok=True)
        defect = {"class": "inclusion", "class_id": 1, "score": 0.9, "area_px": 40, "area_mm2": None,
                  "strip_pos_mm": 10.0, "centroid": [5.0, 5.0]}
        engine.on_frame({"frame_id": 0, "strip_pos_mm": 0.0, "defects": [defect]})
        engine.on_frame({"frame_id": 1, "strip_pos_mm": 100.0, "defects": []})  # cause gone, latch holds
        wait_for(lambda: plc.read(2)["coils"] == [True, False], what="latched alarm on the PLC")
        assert engine.active()["any_defect"]
        plc.request_ack(0)
        wait_for(lambda: not engine.active()["any_defect"], what="the acknowledge to reach the engine")
        s = wait_for(lambda: (lambda r: r if r["coils"] == [False, False] else None)(plc.read(2)),
                     what="the alarm to clear on the PLC")
        assert s["ack"] == 0  # the request was taken and reset
    finally:
        w.stop()


def test_a_plc_that_hangs_never_slows_inspection(synthetic_cfg):
    hole = BlackHole()
    try:
        drv = {"type": "modbus", "host": "127.0.0.1", "port": hole.port, "timeout_s": 3.0,
               "heartbeat_s": 0.05, "queue_size": 4}
        cfg = parse_config(synthetic_cfg(pipeline={"backpressure": True},
                                         alarms={"rules": RULES, "drivers": [drv]}), "t.yaml")
        engine, [w] = alarm_setup(cfg)
        w.start()
        with Pipeline(cfg, on_report=engine.on_frame) as p:
            engine.set_running(True, camera_ok=True)
            c = p.run(frames=80)
        # Every frame published while the one write in flight waits for its 3 s timeout (a blocking
        # design would need 80 x 3 s): the bounded queue dropped old states instead of growing or
        # holding up the frames, and no write ever got through.
        assert c["published"] == 80
        assert w.skipped > 0 and w.writes == 0
        w.stop(timeout=10)
    finally:
        hole.close()


def test_plc_down_from_the_start_is_retried_and_never_blocks(synthetic_cfg):
    port = free_port()  # nothing listens there
    drv = {"type": "s7", "host": "127.0.0.1", "port": port, "db": 1, **FAST}
    cfg = parse_config(synthetic_cfg(pipeline={"backpressure": True},
                                     alarms={"rules": RULES, "drivers": [drv]}), "t.yaml")
    engine, [w] = alarm_setup(cfg)
    w.start()
    with Pipeline(cfg, on_report=engine.on_frame) as p:
        engine.set_running(True, camera_ok=True)
        c = p.run(frames=30)
    assert c["published"] == 30
    wait_for(lambda: w.errors >= 2, what="repeated connect attempts")
    assert not w.connected and w.writes == 0
    w.stop()



def test_a_plc_that_refuses_writes_is_retried_with_backoff_and_logged_once(caplog):
    # The PLC takes the connection but its register area is too small for the map (a wrong
    # register_base, a small gateway): every write is refused. The driver used to reconnect at
    # once, thousands of times a second, logging each time. A refusal is the PLC's answer, not a
    # broken link: the connection stays, the write is retried with backoff.
    from inspector.alarms import make_link
    from inspector.alarms.config import AlarmsConfig
    from inspector.alarms.driver import DriverWorker
    from inspector.alarms.layout import PlcState

    caplog.set_level("INFO", logger="inspector.alarms.driver")
    plc = ModbusPlc(n_classes=2, n_registers=10).start()
    try:
        drv = AlarmsConfig.model_validate({"rules": [{"name": "a"}], "drivers": [
            plc.driver_cfg(heartbeat_s=0.1, retry_backoff_s=[0.2, 0.4], timeout_s=1.0)]}).drivers[0]
        link = make_link(drv, "cam")
        attempts = record_write_attempts(link)  # when each write was tried
        w = DriverWorker(link, drv, name="modbus0")
        w.submit(PlcState(alarm_names=("a",), alarms=(True,), classes=("x", "y"), counts=(0, 0)))
        w.start()
        wait_for(lambda: len(attempts) >= 5, what="five attempts")
        # every attempt is refused; the next waits retry_backoff_s, doubling up to its cap:
        # 0.2, 0.4, 0.4, ... apart at least, not at once; on the one connection
        assert w.connects == 1 and w.writes == 0, (w.connects, w.writes)
        assert w.refused and w.outage() is not None and w.outage().startswith("refused ")
        gaps = [b - a for a, b in zip(attempts, attempts[1:5])]
        assert all(gap >= 0.95 * want for gap, want in zip(gaps, [0.2, 0.4, 0.4, 0.4])), gaps
        ours = [r.getMessage() for r in caplog.records if r.name == "inspector.alarms.driver"]
        assert sum("write failed" in m for m in ours) == 1, ours
        # what the PLC must provide: 16 words + 2 classes from register_base 0, one coil
        assert "refused by the PLC (exception 2: illegal data address)" in caplog.text
        assert "the map needs holding registers 0..17 and coil 0 on unit 1" in caplog.text

        plc.stop()
        plc.n_registers = 256  # the PLC program fixed: the next attempt gets through
        plc.start()
        wait_for(lambda: w.writes > 0 and plc.read(1)["alarm_bits"] == 1, what="the state on the fixed PLC")
        # the worker says so and ends the outage just after counting the write
        wait_for(lambda: w.outage() is None and not w.refused, what="the outage to end")
        wait_for(lambda: any("PLC back after" in r.getMessage() for r in caplog.records), what="PLC back")
        assert sum("PLC back after" in r.getMessage() for r in caplog.records) == 1
        w.stop()
    finally:
        plc.stop()


@pytest.mark.parametrize("kind", ["modbus", "opcua"])
def test_a_rule_removed_by_a_reload_switches_its_alarm_off(kind, synthetic_cfg):
    # Modbus: the coil; OPC UA: the Alarms.<name> node. S7 carries alarms only in the alarm
    # words, which are always written whole.
    from inspector.alarms.config import AlarmsConfig

    plc = (ModbusPlc(n_classes=len(CLASSES)) if kind == "modbus" else OpcUaPlc("test", ["a", "b"], CLASSES)).start()
    try:
        rules = [{"name": "a", "latch": True}, {"name": "b", "latch": True}]
        cfg = parse_config(synthetic_cfg(alarms={"rules": rules, "drivers": [plc.driver_cfg(**FAST)]}), "t.yaml")
        engine, [w] = alarm_setup(cfg)
        w.start()
        defect = {"class": "scratches", "class_id": 3, "score": 0.9, "area_px": 50}
        engine.on_frame({"frame_id": 1, "strip_pos_mm": 0.0, "defects": [defect]})
        wait_for(lambda: plc.read(2)["coils"] == [True, True], what="both alarms on the PLC")
        engine.set_rules(AlarmsConfig.model_validate({"rules": [rules[0]]}))
        wait_for(lambda: (lambda r: r["coils"] == [True, False] and r["alarm_bits"] == 1)(plc.read(2)),
                 what="the removed rule's alarm to go off")
        w.stop()
    finally:
        plc.stop()

def test_opcua_server_mode_hosts_nodes_and_the_acknowledge_method(synthetic_cfg, caplog):
    from asyncua import Client, ua

    caplog.set_level("INFO", logger="asyncua.server.address_space")

    port = free_port()
    drv = {"type": "opcua", "mode": "server", "endpoint": f"opc.tcp://127.0.0.1:{port}/", **FAST}
    cfg = parse_config(synthetic_cfg(alarms={"rules": RULES, "drivers": [drv]}), "t.yaml")
    engine, [w] = alarm_setup(cfg)
    w.start()
    loop_q = __import__("asyncio").new_event_loop()
    try:
        wait_for(lambda: w.connected and w.writes > 0, timeout=60, what="the OPC UA server to start")
        defect = {"class": "scratches", "class_id": 3, "score": 0.75, "area_px": 12, "area_mm2": 3.5,
                  "strip_pos_mm": 1234.5, "centroid": [100.0, 7.0]}
        engine.set_running(True, camera_ok=True)
        engine.on_frame({"frame_id": 7, "strip_pos_mm": 1200.0, "defects": [defect]})
        engine.on_frame({"frame_id": 8, "strip_pos_mm": 1300.0, "defects": []})

        async def session():
            async with Client(f"opc.tcp://127.0.0.1:{port}/", timeout=5) as c:
                ns = await c.get_namespace_index("urn:strip-inspector")

                def node(name):
                    return c.get_node(ua.NodeId(f"test.{name}", ns))
                deadline = time.monotonic() + 20
                while not await node("Alarms.any_defect").read_value():
                    assert time.monotonic() < deadline, "alarm never showed up on the served node"
                    await __import__("asyncio").sleep(0.05)
                seen = {n: await node(n).read_value() for n in
                        ("LastDefect.Class", "LastDefect.PositionMm", "LastDefect.Area",
                         "Counts.scratches", "FramesInspected", "AlarmWord", "Alarms.huge_scratch")}
                obj = c.get_node(ua.NodeId("test", ns))
                # the README's promise, exactly: not asyncua's BadUnexpectedError for a raise
                with pytest.raises(ua.UaStatusCodeError) as unknown:
                    await obj.call_method(ua.NodeId("test.Acknowledge", ns), "no_such_alarm")
                assert unknown.value.code == ua.StatusCodes.BadInvalidArgument, unknown.value
                await obj.call_method(ua.NodeId("test.Acknowledge", ns), "any_defect")
                while await node("Alarms.any_defect").read_value():
                    assert time.monotonic() < deadline + 10, "acknowledge never cleared the alarm"
                    await __import__("asyncio").sleep(0.05)
                return seen
        seen = loop_q.run_until_complete(session())
        assert seen == {"LastDefect.Class": "scratches", "LastDefect.PositionMm": 1234.5,
                        "LastDefect.Area": 3.5, "Counts.scratches": 1, "FramesInspected": 2,
                        "AlarmWord": 1, "Alarms.huge_scratch": False}
        assert not engine.active()["any_defect"]
        # a refused call is an answer, not a server fault: no traceback in the journal
        assert not [r for r in caplog.records if r.exc_info], caplog.text
    finally:
        loop_q.close()
        w.stop()


def test_opcua_client_names_missing_nodes(synthetic_cfg):
    # A PLC server that lacks the inspector's nodes: the driver says which ones and keeps retrying.
    srv = OpcUaPlc("other_object", ["x"], []).start()
    try:
        drv = srv.driver_cfg(**FAST)
        cfg = parse_config(synthetic_cfg(alarms={"rules": RULES, "drivers": [drv]}), "t.yaml")
        engine, [w] = alarm_setup(cfg)
        from inspector.alarms import make_link
        link = make_link(cfg.alarms.drivers[0], "test")
        link.connect()
        with pytest.raises(LookupError, match=r"missing on opc\.tcp://127\.0\.0\.1:\d+/: .*test\.Heartbeat"):
            link.write(engine.state(), 1)
        link.close()
    finally:
        srv.stop()


def test_a_modbus_acknowledge_set_while_another_is_taken_is_not_lost():
    # The inspector read the acknowledge words, then wrote them back to 0 whole: a bit the PLC
    # set between the two (another operator's button) was wiped unseen. Mask Write Register
    # clears only the bits taken. The interleaving is forced at the read, on a real server.
    from inspector.alarms import make_link
    from inspector.alarms.config import AlarmsConfig

    plc = ModbusPlc(n_classes=1).start()
    try:
        drv = AlarmsConfig.model_validate({"drivers": [plc.driver_cfg()]}).drivers[0]
        link = make_link(drv, "cam")
        link.connect()
        plc.request_ack(0)
        read = link._client.read_holding_registers

        def read_then_the_plc_acknowledges_alarm_1(*a, **kw):
            rr = read(*a, **kw)
            plc.request_ack(1)
            return rr
        link._client.read_holding_registers = read_then_the_plc_acknowledges_alarm_1
        assert link.read_acks() == [0]
        link._client.read_holding_registers = read
        assert link.read_acks() == [1]
        assert plc.read(2)["ack"] == 0
        link.close()
    finally:
        plc.stop()



def test_a_camera_writes_only_its_own_coils_on_a_shared_plc():
    # Two daemons on one PLC: cam1 at coil_base 0 (2 rules), cam2 at coil_base 4. Writing a
    # fixed 32-coil block made every cam1 heartbeat clear cam2's alarms.
    from inspector.alarms import make_link
    from inspector.alarms.config import AlarmsConfig
    from inspector.alarms.layout import PlcState

    plc = ModbusPlc(n_classes=1).start()
    try:
        c = plc._client()
        c.write_coils(4, [True, True], device_id=1)  # cam2's alarms are on
        c.close()
        drv = AlarmsConfig.model_validate({"drivers": [plc.driver_cfg(coil_base=0)]}).drivers[0]
        link = make_link(drv, "cam1")
        link.connect()
        link.write(PlcState(alarm_names=("a", "b"), alarms=(True, False), classes=("x",), counts=(0,)), 1)
        link.close()
        assert plc.read(6)["coils"] == [True, False, False, False, True, True]
    finally:
        plc.stop()


def test_opcua_clears_a_removed_rule_also_when_the_link_reconnected_in_between():
    from inspector.alarms.config import OpcUaDriverConfig
    from inspector.alarms.layout import PlcState
    from inspector.alarms.opcua import OpcUaLink

    plc = OpcUaPlc("cam1", ["a", "b"], ["c"]).start()
    try:
        def state(names, alarms):
            return PlcState(alarm_names=names, alarms=alarms, classes=("c",), counts=(0,))
        link = OpcUaLink(OpcUaDriverConfig(**plc.driver_cfg()), "cam1")
        link.connect()
        link.write(state(("a", "b"), (False, True)), 1)
        assert plc.read(2)["coils"] == [False, True]
        link.close()  # the PLC blinked; the reload removing b comes while it is away
        link.connect()
        link.write(state(("a",), (False,)), 2)
        assert plc.read(2)["coils"] == [False, False]
        link.close()
    finally:
        plc.stop()


def test_opcua_says_a_removed_rule_is_cleared_once_while_the_plc_lacks_the_new_nodes(caplog):
    # a reload renamed b to z; the PLC program has no z yet: every reconnect fails on the missing
    # node, and the "no longer configured" line came again with each (every 10 s, for ever)
    from inspector.alarms.config import OpcUaDriverConfig
    from inspector.alarms.layout import PlcState
    from inspector.alarms.opcua import NodesMissing, OpcUaLink

    caplog.set_level("INFO", logger="inspector.alarms.opcua")
    plc = OpcUaPlc("cam1", ["a", "b"], ["c"]).start()
    try:
        def state(names, alarms):
            return PlcState(alarm_names=names, alarms=alarms, classes=("c",), counts=(0,))
        link = OpcUaLink(OpcUaDriverConfig(**plc.driver_cfg()), "cam1")
        link.connect()
        link.write(state(("a", "b"), (False, True)), 1)
        for hb in (2, 3, 4):
            with pytest.raises(NodesMissing):
                link.write(state(("a", "z"), (False, False)), hb)
            link.close()
            link.connect()
        link.close()
        assert plc.read(2)["coils"] == [False, False]  # b was switched off
        assert caplog.text.count("alarm b is no longer configured") == 1
    finally:
        plc.stop()


class _ShownLink:
    """A link that keeps what it wrote and hands out the acknowledge indices the test sets: the
    interleaving of a PLC request and a reload is forced, not waited for."""

    label = "stub"

    def __init__(self):
        self.written: list = []
        self.acks: list[int] = []
        self.lock = threading.Lock()

    def connect(self) -> None:
        pass

    def write(self, state, heartbeat: int) -> None:
        with self.lock:
            self.written.append(state)

    def read_acks(self) -> list[int]:
        with self.lock:
            out, self.acks = self.acks, []
        return out

    def close(self) -> None:
        pass


def test_a_plc_acknowledge_made_before_a_reload_reordered_the_rules_releases_the_alarm_it_named():
    # the PLC's request is an index into the alarms it shows; read after the write of a reload's
    # new order it released the alarm now at that index: "small" went, "big" stayed latched
    from test_alarms_rules import Clock

    from inspector.alarms.config import AlarmsConfig, ModbusDriverConfig
    from inspector.alarms.driver import DriverWorker

    classes = ["background", "inclusion", "patches", "scratches"]

    big = {"name": "big", "classes": ["inclusion"], "latch": True, "off_delay_s": 0}
    small = {"name": "small", "classes": ["scratches"], "latch": True, "off_delay_s": 0}
    engine = AlarmEngine(AlarmsConfig.model_validate({"rules": [big, small]}), classes, "cam.yaml",
                         clock=Clock())
    d = {"score": 0.9, "area_px": 40, "area_mm2": None, "strip_pos_mm": 1.0, "centroid": [1.0, 1.0]}
    engine.on_frame({"frame_id": 1, "strip_pos_mm": 0.0, "defects": [
        {**d, "class": "inclusion", "class_id": 1}, {**d, "class": "scratches", "class_id": 3}]})
    engine.on_frame({"frame_id": 2, "strip_pos_mm": 1.0, "defects": []})
    assert engine.latched_names() == ["big", "small"]
    link = _ShownLink()
    cfg = ModbusDriverConfig(type="modbus", host="127.0.0.1", port=1, heartbeat_s=30, retry_backoff_s=[0.1, 0.1])
    w = DriverWorker(link, cfg, on_ack=lambda names, by: engine.ack_names(names, by, unknown_ok=True),
                     name="stub")
    engine.subscribe(w.submit)
    w.submit(engine.state())
    w.start()
    try:
        wait_for(lambda: link.written and link.written[-1].alarm_names == ("big", "small"), what="the layout")
        with link.lock:
            link.acks = [0]  # the operator acknowledges "big", first on the PLC's screen
        engine.set_rules(AlarmsConfig.model_validate({"rules": [small, big]}))  # the reload
        wait_for(lambda: len(engine.latched_names()) < 2, what="the acknowledge")
        assert engine.latched_names() == ["small"]
        wait_for(lambda: link.written[-1].alarm_names == ("small", "big")
                 and link.written[-1].alarms == (True, False), what="the new layout, big released")
    finally:
        w.stop()


def test_a_plc_acknowledge_of_an_alarm_a_reload_removed_is_ignored_and_said(caplog):
    from test_alarms_rules import Clock

    from inspector.alarms.config import AlarmsConfig

    rules = [{"name": "a", "latch": True, "off_delay_s": 0}]
    engine = AlarmEngine(AlarmsConfig.model_validate({"rules": rules}), CLASSES, "cam.yaml", clock=Clock())
    caplog.set_level("INFO", logger="inspector.alarms.rules")
    assert engine.ack_names(["gone"], by="modbus0", unknown_ok=True) == []
    assert "acknowledge of gone by modbus0 ignored: no such alarm since the last reload" in caplog.text
    with pytest.raises(KeyError):
        engine.ack_names(["gone"])
