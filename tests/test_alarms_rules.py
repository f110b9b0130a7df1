"""Alarm rules, debounce, latch and acknowledge, on a hand-driven clock; config errors."""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import ROOT
from inspector.alarms import AlarmEngine
from inspector.alarms.config import AlarmsConfig
from inspector.alarms.layout import PlcState, encode_words
from inspector.config import parse_config
from inspector.errors import ConfigError

CLASSES = ["background", "inclusion", "patches", "scratches"]


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def engine(rules, clock=None):
    return AlarmEngine(AlarmsConfig.model_validate({"rules": rules}), CLASSES, "cam.yaml", clock=clock or Clock())


def d(cls="scratches", score=0.9, area_px=100, area_mm2=20.0, pos=500.0):
    return {"class": cls, "class_id": CLASSES.index(cls), "score": score, "area_px": area_px,
            "area_mm2": area_mm2, "strip_pos_mm": pos, "centroid": [10.0, 5.0], "bbox": [0, 0, 5, 5]}


def frame(*defects, pos=0.0, fid=0):
    return {"frame_id": fid, "strip_pos_mm": pos, "defects": list(defects)}


def test_class_area_and_score_limits():
    e = engine([{"name": "big_scratch", "classes": ["scratches"], "min_area_mm2": 50, "min_score": 0.8,
                 "off_delay_s": 0}])
    for bad in (d(cls="inclusion", area_mm2=99), d(area_mm2=49.9), d(score=0.79, area_mm2=60)):
        e.on_frame(frame(bad))
        assert not e.active()["big_scratch"], bad
    e.on_frame(frame(d(area_mm2=50)))
    assert e.active()["big_scratch"]
    e.on_frame(frame())
    assert not e.active()["big_scratch"]  # not latched, no hold time
    assert e.raised_counts() == {"big_scratch": 1}


def test_area_in_px_and_mm2_without_geometry_warns_once(caplog):
    e = engine([{"name": "px", "min_area_px": 100, "off_delay_s": 0},
                {"name": "mm", "min_area_mm2": 1, "off_delay_s": 0}])
    e.on_frame(frame(d(area_px=99, area_mm2=None)))
    assert e.active() == {"px": False, "mm": False}
    e.on_frame(frame(d(area_px=100, area_mm2=None)))
    e.on_frame(frame(d(area_px=100, area_mm2=None)))
    assert e.active() == {"px": True, "mm": False}
    warnings = [r.message for r in caplog.records if "alarms.rules.1.min_area_mm2" in r.getMessage()]
    assert len(warnings) == 1 and "geometry.mm_per_px" in caplog.text


def test_count_per_strip_metre():
    e = engine([{"name": "inclusions", "classes": ["inclusion"], "count": 3, "per_m": 10, "off_delay_s": 0}])
    e.on_frame(frame(d("inclusion", pos=1000), d("inclusion", pos=1200), pos=1000))
    assert not e.active()["inclusions"]
    e.on_frame(frame(d("inclusion", pos=10_900), pos=10_900))  # 3 within 10 m (1.0 .. 10.9 m)
    assert e.active()["inclusions"]
    e.on_frame(frame(pos=11_100))  # 1.0 m has left the window: 2 left
    assert not e.active()["inclusions"]



def test_per_metre_window_starts_again_when_the_strip_position_goes_back(caplog):
    # A new coil or an encoder reset: the previous strip's defects must not count on the new one.
    caplog.set_level("INFO", logger="inspector.alarms.rules")
    e = engine([{"name": "inclusions", "classes": ["inclusion"], "count": 3, "per_m": 10, "off_delay_s": 0}])
    e.on_frame(frame(d("inclusion", pos=500_000), d("inclusion", pos=500_100), pos=500_000))
    e.on_frame(frame(pos=0.0))  # position reset
    for pos in (50_000, 100_000, 150_000, 200_000):  # one defect every 50 m: never 3 within 10 m
        e.on_frame(frame(d("inclusion", pos=pos), pos=pos))
        assert not e.active()["inclusions"], pos
    assert "went back from 500000 to 0 mm" in caplog.text


def test_per_metre_rule_without_positions_cannot_fire_and_keeps_no_history(caplog):
    # No pixel size: defects carry no strip position. Counting them "per frame position" kept
    # every defect since start in the window and the alarm stuck on for good.
    e = engine([{"name": "inclusions", "classes": ["inclusion"], "count": 3, "per_m": 10, "off_delay_s": 0}])
    for fid in range(40):
        e.on_frame(frame(d("inclusion", pos=None), pos=0.0, fid=fid))
        assert not e.active()["inclusions"]
    assert len(e._alarms[0].window) == 0
    warnings = [r for r in caplog.records if "alarms.rules.0.per_m" in r.getMessage()]
    assert len(warnings) == 1 and "geometry.mm_per_px_along" in caplog.text

def test_count_per_time_window_expires_on_tick():
    clk = Clock()
    e = engine([{"name": "burst", "count": 2, "window_s": 5, "off_delay_s": 0}], clk)
    e.on_frame(frame(d()))
    clk.t += 4
    e.on_frame(frame(d()))
    assert e.active()["burst"]
    clk.t += 2  # the first defect is 6 s old
    e.tick("ok")
    assert not e.active()["burst"]


def test_debounce_on_and_off_delay():
    clk = Clock()
    e = engine([{"name": "x", "on_delay_s": 1.0, "off_delay_s": 2.0}], clk)
    e.on_frame(frame(d()))
    assert not e.active()["x"]  # cause has not lasted 1 s yet
    clk.t += 0.5
    e.on_frame(frame())  # a one-frame blip never raises
    clk.t += 1.0
    e.tick("ok")
    assert not e.active()["x"]
    e.on_frame(frame(d()))
    clk.t += 1.0
    e.on_frame(frame(d()))
    assert e.active()["x"]
    e.on_frame(frame())
    clk.t += 1.9
    e.tick("ok")
    assert e.active()["x"]  # held for off_delay_s
    clk.t += 0.2
    e.tick("ok")
    assert not e.active()["x"]


def test_latch_holds_until_acknowledged_and_ack_while_cause_present():
    clk = Clock()
    e = engine([{"name": "l", "latch": True, "off_delay_s": 0}], clk)
    e.on_frame(frame(d()))
    e.on_frame(frame())
    clk.t += 60
    e.tick("ok")
    assert e.active()["l"]
    assert e.ack([0], by="test") == ["l"]
    assert not e.active()["l"]
    e.on_frame(frame(d()))  # raised again, acknowledged while the cause is still there
    e.ack_names(["l"])
    assert e.active()["l"]  # stays on until the cause goes
    e.on_frame(frame())
    assert not e.active()["l"]
    assert e.raised_counts()["l"] == 2
    with pytest.raises(KeyError, match="unknown alarm"):
        e.ack_names(["nope"])


def test_camera_down_after_configured_time():
    clk = Clock()
    e = engine([{"name": "cam", "type": "camera_down", "after_s": 5, "off_delay_s": 0}], clk)
    e.set_running(True, camera_ok=True)
    e.tick("down")
    clk.t += 4.9
    e.tick("down")
    assert not e.active()["cam"] and not e.state().camera_ok
    clk.t += 0.2
    e.tick("down")
    assert e.active()["cam"]
    e.tick("ok")
    assert not e.active()["cam"] and e.state().camera_ok


def test_overload_by_drop_fraction():
    clk = Clock()
    e = engine([{"name": "ovl", "type": "overload", "drop_fraction": 0.1, "window_s": 10, "min_frames": 20,
                 "off_delay_s": 0}], clk)

    def counters(grabbed, queue_full, slow=0):
        return {"grabbed": grabbed, "dropped": {"queue_full": queue_full, "subscriber_slow": slow}}
    e.tick("ok", counters(0, 0))
    clk.t += 5
    e.tick("ok", counters(100, 50, slow=50))  # half dropped, but only queue_full counts by default ...
    assert e.active()["ovl"]  # ... and 50 % of those is far above 10 %
    clk.t += 11
    e.tick("ok", counters(300, 52, slow=500))  # last 11 s: 200 frames, 2 queue_full = 1 %
    assert not e.active()["ovl"]



def test_overload_on_frames_the_camera_lost():
    # camera_skipped: frames the camera delivered no buffer for (the host fetched too late);
    # never grabbed, so they count in the denominator too: 100 grabbed + 25 lost = 20 % lost
    clk = Clock()
    e = engine([{"name": "lost", "type": "overload", "drop_fraction": 0.1, "window_s": 10, "min_frames": 20,
                 "reasons": ["queue_full", "camera_skipped"], "off_delay_s": 0}], clk)
    e.tick("ok", {"grabbed": 0, "dropped": {"queue_full": 0}, "camera_skipped": 0})
    clk.t += 5
    e.tick("ok", {"grabbed": 100, "dropped": {"queue_full": 0}, "camera_skipped": 25})
    assert e.active()["lost"]
    assert "25 of 125 frames dropped (queue_full/camera_skipped)" in e._alarms[0].detail

def test_drop_reasons_match_the_pipeline():
    from typing import get_args

    from inspector.alarms.config import DropReason
    from inspector.pipeline import DROP_REASONS
    assert set(get_args(DropReason)) == set(DROP_REASONS)


def test_reload_keeps_state_of_unchanged_rules():
    e = engine([{"name": "a", "latch": True}, {"name": "b"}])
    e.on_frame(frame(d()))
    e.set_rules(AlarmsConfig.model_validate({"rules": [{"name": "c"}, {"name": "a", "latch": True}]}))
    assert e.active() == {"c": False, "a": True}
    assert e.state().alarms == (False, True)



def test_reload_that_changes_a_rule_drops_what_its_window_counted():
    # per_m -> window_s under the same name: positions in mm must not be read as timestamps.
    clk = Clock()
    e = engine([{"name": "a", "count": 3, "per_m": 10, "off_delay_s": 0}], clk)
    e.on_frame(frame(d(pos=2_000_000), d(pos=2_000_000), pos=2_000_000))
    e.set_rules(AlarmsConfig.model_validate({"rules": [{"name": "a", "count": 3, "window_s": 5,
                                                         "off_delay_s": 0}]}))
    clk.t += 600
    e.on_frame(frame(d()))
    e.tick("ok")
    assert not e.active()["a"]  # one defect in the last 5 s, not three


def test_states_reach_listeners_in_order_from_two_threads():
    # on_frame (publish thread) and tick (daemon loop) both hand states to the drivers, which
    # keep the last one they get: an older snapshot must never arrive after a newer one.
    import threading
    import time
    e = engine([{"name": "a"}])
    got: list[tuple[int, bool]] = []
    stop = threading.Event()

    def listener(st):
        if threading.current_thread() is t:
            time.sleep(0.001)  # the daemon loop is slow to hand its state over
        got.append((st.frames, st.camera_ok))
    e.subscribe(listener)

    def ticker():
        ok = True
        while not stop.is_set():
            ok = not ok
            e.tick("ok" if ok else "lost")

    t = threading.Thread(target=ticker)
    t.start()
    try:
        for fid in range(300):
            e.on_frame(frame(fid=fid))
    finally:
        stop.set()
        t.join()
    frames = [f for f, _ in got]
    assert frames == sorted(frames)
    assert got[-1][0] == 300


def test_defects_total_counts_regions_beyond_the_listed_cap():
    # A frame lists at most max_defects regions; the PLC's "defects found" must count all of them.
    e = engine([{"name": "a"}])
    h = frame(d(), d())
    h["defects_total"] = 300
    e.on_frame(h)
    e.on_frame(frame(d()))  # a header without the field (older recordings): the list's length
    assert e.state().defects_total == 301

def test_word_map_encoding():
    s = PlcState(alarm_names=("a", "b"), alarms=(False, True), classes=("x", "y"), counts=(70000, 3),
                 frames=0x12345, defects_total=7, running=True, camera_ok=False, last_class=2,
                 last_pos_mm=0x10002, last_across_px=12.4, last_area=70000.0, last_score=0.5)
    w = encode_words(s, heartbeat=65537)
    assert w[:14] == [1, 2, 0, 1 | 4, 1, 0x2345, 0, 7, 2, 1, 2, 12, 65535, 500]
    assert w[14:16] == [0, 0] and w[16:] == [70000 & 0xFFFF, 3]


@pytest.mark.parametrize("alarms, key, text", [
    ({"rules": [{"name": "a", "classes": ["rust"]}]}, "alarms.rules.0.classes", "unknown class"),
    ({"rules": [{"name": "a", "min_score": 1.5}]}, "alarms.rules.0.min_score", "less than or equal"),
    ({"rules": [{"name": "a", "per_m": 1, "window_s": 1}]}, "alarms.rules.0", "not both"),
    ({"rules": [{"name": "a"}, {"name": "a"}]}, "alarms.rules", "both named 'a'"),
    ({"rules": [{"name": "1bad"}]}, "alarms.rules.0.name", "pattern"),
    ({"rules": [{"name": "o", "type": "overload", "reasons": ["coffee"]}]}, "alarms.rules.0.reasons.0", "queue_full"),
    ({"rules": [{"name": "a", "type": "nope"}]}, "alarms.rules.0.type", "unknown type 'nope'"),
    ({"rules": [{"name": f"a{i}"} for i in range(33)]}, "alarms.rules", "at most 32"),
    ({"drivers": [{"host": "x"}]}, "alarms.drivers.0.type", "required key is missing"),
    ({"drivers": [{"type": "modbus", "host": "x", "port": 70000}]}, "alarms.drivers.0.port", "less than"),
    ({"drivers": [{"type": "s7", "host": "x"}]}, "alarms.drivers.0.db", "required key is missing"),
    ({"drivers": [{"type": "opcua", "endpoint": "http://x"}]}, "alarms.drivers.0.endpoint", "pattern"),
    ({"drivers": [{"type": "modbus", "host": "x", "retry_backoff_s": [5, 1]}]}, "alarms.drivers.0",
     "retry_backoff_s"),
    ({"drivers": [{"type": "modbus", "host": "x", "colour": 1}]}, "alarms.drivers.0.colour", "unknown key"),
])
def test_config_errors_name_file_and_key(synthetic_cfg, alarms, key, text):
    with pytest.raises(ConfigError) as err:
        cfg = parse_config(synthetic_cfg(alarms=alarms), "cam.yaml")
        AlarmEngine(cfg.alarms, CLASSES, cfg.source_file)  # class names are checked against the model
    assert err.value.file == "cam.yaml" and err.value.key == key, str(err.value)
    assert text in err.value.problem


def test_missing_plc_package_names_the_key_and_the_extra(tmp_path, synthetic_cfg):
    # The runtime imports and runs without PLC packages; a config that needs one says which.
    from conftest import write_config
    cfg = write_config(tmp_path / "cam.yaml", synthetic_cfg(alarms={
        "rules": [{"name": "a"}], "drivers": [{"type": "s7", "host": "127.0.0.1", "db": 1}]}))
    script = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('snap7', 'pymodbus', 'asyncua'):\n"
        "            raise ImportError(f'{name} is not installed (blocked by the test)')\n"
        "sys.meta_path.insert(0, Block())\n"
        "from inspector.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n")
    r = subprocess.run([sys.executable, "-c", script, "alarms", "test", "--config", str(cfg)],
                       capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert r.returncode == 2, r.stderr
    assert "alarms.drivers.0.type" in r.stderr and "python-snap7" in r.stderr
    assert "strip-inspector[plc]" in r.stderr and str(cfg) in r.stderr


def test_runtime_imports_no_plc_or_metrics_package():
    code = ("import sys, inspector.daemon, inspector.cli, inspector.alarms, inspector.metrics\n"
            "bad = [m for m in sys.modules if m.split('.')[0] in "
            "('pymodbus', 'asyncua', 'snap7', 'prometheus_client', 'torch')]\n"
            "assert not bad, bad\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert r.returncode == 0, r.stderr


def test_readme_plc_maps_match_the_code():
    # The PLC programmer works from the README: every OPC UA node and every register must be there.
    from inspector.alarms import layout
    from inspector.alarms.opcua import node_names
    text = (ROOT / "README.md").read_text()
    maps = text[text.index("## PLC maps"):]
    for name, vtype in node_names(["alarm_x"], ["class_y"]):
        base = name.replace("alarm_x", "<alarm>").replace("class_y", "<class>")
        assert f"`{base}`" in maps, base
    for const, cell in ((layout.STATUS, "HR `+3`"), (layout.FRAMES, "HR `+4..5`"), (layout.ACK, "HR `+14`"),
                        (layout.LAST_SCORE, "HR `+13`"), (layout.COUNTS, "HR `+16 + k`")):
        assert cell in maps, cell
    assert (layout.ACK, layout.COUNTS) == (14, 16)
