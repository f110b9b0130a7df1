"""Latched alarms survive a restart of the inspector until they are acknowledged.

Engine level on a hand-driven clock with a real file; daemon level against a real Modbus server on
127.0.0.1: a latched alarm raised by one run is set on the PLC by the next run's first write, and a
PLC acknowledge clears it for the runs after.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import time

import pytest

from conftest import write_config
from test_alarms_rules import Clock
from inspector.alarms import AlarmEngine
from inspector.alarms import latch_store as latch_mod
from inspector.alarms.config import AlarmsConfig
from inspector.alarms.latch_store import LatchStore, latch_path
from inspector.daemon import Daemon, Notifier
from inspector.errors import ConfigError

CLASSES = ["background", "inclusion", "patches", "scratches"]
RULES = [{"name": "any_defect", "latch": True, "off_delay_s": 0},
         {"name": "scratch", "classes": ["scratches"], "off_delay_s": 0}]


def engine(path, rules=RULES):
    store = LatchStore(path, "cam.yaml")
    store.open()
    e = AlarmEngine(AlarmsConfig.model_validate({"rules": rules}), CLASSES, "cam.yaml", clock=Clock(), store=store)
    return e, store


def defect(cls="inclusion"):
    return {"class": cls, "class_id": CLASSES.index(cls), "score": 0.9, "area_px": 40, "area_mm2": None,
            "strip_pos_mm": 10.0, "centroid": [5.0, 5.0]}


def wait_file(path, pred, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            data = json.loads(path.read_text())
            if pred(data):
                return data
        except (FileNotFoundError, ValueError):
            pass
        time.sleep(0.02)
    raise AssertionError(f"{path} never matched; it holds {path.read_text() if path.exists() else 'nothing'}")


def test_a_latched_alarm_is_raised_again_by_the_next_engine_until_acknowledged(tmp_path, caplog):
    path = tmp_path / "alarms" / "cam.json"
    e, store = engine(path)
    assert e.restore() == [] and not path.exists()  # nothing latched: no file at all
    e.on_frame({"frame_id": 7, "strip_pos_mm": 0.0, "defects": [defect("scratches")]})
    e.on_frame({"frame_id": 8, "strip_pos_mm": 0.0, "defects": []})
    assert e.active() == {"any_defect": True, "scratch": False}  # latched; the other one went
    data = wait_file(path, lambda d: d["latched"])
    [rec] = data["latched"]
    assert rec["name"] == "any_defect" and rec["type"] == "defect" and "frame 7" in rec["detail"]
    assert rec["since"]
    assert store.close()

    # the next run: raised before anything is seen, with what raised it
    caplog.set_level(logging.WARNING, logger="inspector.alarms.rules")
    e2, store2 = engine(path)
    assert e2.restore() == ["any_defect"]
    assert e2.active() == {"any_defect": True, "scratch": False}
    assert e2.state().alarms == (True, False)
    assert e2.raised_counts() == {"any_defect": 1, "scratch": 0}
    assert "alarm any_defect RAISED again: latched before the restart, since " in caplog.text
    assert "frame 7" in caplog.text and "not acknowledged yet" in caplog.text
    # a frame without defects does not clear it: the latch holds as before the restart
    e2.on_frame({"frame_id": 0, "strip_pos_mm": 0.0, "defects": []})
    assert e2.active()["any_defect"]
    assert e2.ack_names(["any_defect"], by="test") == ["any_defect"]
    assert not e2.active()["any_defect"]
    wait_file(path, lambda d: d["latched"] == [])
    assert store2.close()

    e3, store3 = engine(path)
    assert e3.restore() == [] and e3.active() == {"any_defect": False, "scratch": False}
    store3.close()


def test_records_whose_rule_went_or_stopped_latching_are_dropped_with_a_reason(tmp_path, caplog):
    path = tmp_path / "cam.json"
    path.write_text(json.dumps({"version": 1, "latched": [
        {"name": "any_defect", "type": "defect", "since": "2026-11-28T10:00:00+0000", "detail": "d1"},
        {"name": "gone", "type": "defect", "since": "t", "detail": ""},
        {"name": "scratch", "type": "defect", "since": "t", "detail": ""},
        {"name": "cam", "type": "defect", "since": "t", "detail": ""}]}))
    rules = RULES + [{"name": "cam", "type": "camera_down", "after_s": 1, "latch": True}]
    e, store = engine(path, rules)
    assert e.restore() == ["any_defect"]
    assert e.active() == {"any_defect": True, "scratch": False, "cam": False}
    text = caplog.text
    assert "alarm gone was latched before the restart (since t) but no rule has that name now: dropped" in text
    assert "alarm scratch was latched before the restart (since t) but the rule no longer latches: dropped" in text
    assert "alarm cam was latched before the restart (since t) but the rule is of type camera_down now" in text
    # the file is rewritten to what is latched now, keeping the original time
    data = wait_file(path, lambda d: len(d["latched"]) == 1)
    assert data["latched"][0]["since"] == "2026-11-28T10:00:00+0000"
    store.close()


@pytest.mark.parametrize("content", ["{not json", '{"version": 99, "latched": []}', '{"latched": [{"x": 1}], "version": 1}'])
def test_a_corrupt_file_is_reported_kept_aside_and_the_engine_starts(tmp_path, caplog, content):
    path = tmp_path / "cam.json"
    path.write_text(content)
    e, store = engine(path)
    assert e.restore() == []
    [bad] = tmp_path.glob("cam.json.*.bad")  # timestamped: an earlier .bad is not overwritten
    assert not path.exists() and bad.read_text() == content
    assert f"{path} is not a latched-alarm file" in caplog.text
    assert "kept as" in caplog.text and "Alarms latched before the restart are unknown" in caplog.text
    # and the engine keeps latching into a fresh file
    e.on_frame({"frame_id": 1, "strip_pos_mm": 0.0, "defects": [defect()]})
    wait_file(path, lambda d: [r["name"] for r in d["latched"]] == ["any_defect"])
    store.close()


def test_a_write_that_fails_is_said_once_and_retried_until_it_works(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(latch_mod, "RETRY_S", 0.05)
    caplog.set_level(logging.INFO, logger="inspector.alarms.latch_store")
    folder = tmp_path / "alarms"
    path = folder / "cam.json"
    e, store = engine(path)
    (folder / "cam.json.lock").unlink()
    folder.rmdir()
    folder.write_text("a file where the folder was")  # the disk says no (ENOTDIR), as root too
    e.on_frame({"frame_id": 1, "strip_pos_mm": 0.0, "defects": [defect()]})
    deadline = time.monotonic() + 10
    while "cannot write" not in caplog.text and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.3)  # several retries fail meanwhile
    assert caplog.text.count("cannot write") == 1
    # what the file holds and what a restart would then do, not a guess
    assert ("retrying every 0.05s: the file holds none, latched now ['any_defect']: a restart now would "
            "not raise any_defect, latched and not acknowledged") in caplog.text
    folder.unlink()
    folder.mkdir()
    # nothing changes in the engine: the retry alone brings the file up to date
    wait_file(path, lambda d: [r["name"] for r in d["latched"]] == ["any_defect"])
    deadline = time.monotonic() + 5
    while "written again" not in caplog.text and time.monotonic() < deadline:
        time.sleep(0.02)
    assert "written again" in caplog.text
    store.close()


def test_the_default_path_comes_from_the_units_state_folder(tmp_path, monkeypatch):
    monkeypatch.delenv(latch_mod.STATE_ENV, raising=False)
    assert latch_path(None, "line1-top", tmp_path) is None
    monkeypatch.setenv(latch_mod.STATE_ENV, "/var/lib/inspector")
    assert str(latch_path(None, "line1-top", tmp_path)) == "/var/lib/inspector/alarms/line1-top.json"
    assert latch_path("state/l.json", "x", tmp_path) == tmp_path / "state/l.json"  # beside the config
    assert str(latch_path("/srv/l.json", "x", tmp_path)) == "/srv/l.json"


def test_a_folder_that_cannot_be_made_stops_the_start_naming_the_key(tmp_path, synthetic_cfg):
    (tmp_path / "blocker").write_text("a file, not a folder")
    cfg = write_config(tmp_path / "cam.yaml", synthetic_cfg(
        alarms={"rules": RULES, "latch_file": "blocker/cam.json"}))
    d = Daemon(cfg, notifier=Notifier(None))
    with pytest.raises(ConfigError) as err:
        d.run()
    msg = str(err.value)
    assert f"{cfg}: alarms.latch_file:" in msg and str(tmp_path / "blocker") in msg
    assert "latched alarms would be lost at a restart" in msg


def test_without_a_place_a_latching_rule_is_said_at_start(tmp_path, synthetic_cfg, monkeypatch, caplog):
    from inspector.daemon import latch_store_for
    from inspector.config import load_config

    monkeypatch.delenv(latch_mod.STATE_ENV, raising=False)
    cfg = load_config(write_config(tmp_path / "cam.yaml", synthetic_cfg(alarms={"rules": RULES})))
    assert latch_store_for(cfg) is None
    assert ("alarms any_defect latch, but latched alarms are not kept across a restart: set "
            "alarms.latch_file (or INSPECTOR_STATE, which the unit sets)") in caplog.text


def test_check_says_where_latched_alarms_are_kept_or_that_they_are_not(tmp_path, synthetic_cfg, monkeypatch):
    from conftest import run_cli

    cam = write_config(tmp_path / "cam.yaml", synthetic_cfg(alarms={"rules": RULES}))
    monkeypatch.delenv(latch_mod.STATE_ENV, raising=False)
    done = run_cli("check", "--config", str(cam), "--json")
    assert done.returncode == 0, done.stderr
    assert "latched alarms NOT kept across a restart when run like this" in json.loads(done.stdout)["alarms"]
    monkeypatch.setenv(latch_mod.STATE_ENV, str(tmp_path / "state"))
    done = run_cli("check", "--config", str(cam), "--json")
    assert (f"latched alarms kept in {tmp_path / 'state' / 'alarms' / 'test.json'}"
            in json.loads(done.stdout)["alarms"])
    assert not (tmp_path / "state").exists()


def run_daemon(cfg, until, timeout=60.0, then=None):
    """Run the daemon in a thread until ``until(daemon)`` holds, call ``then(daemon)`` (a reload,
    say) where given, then stop it; the daemon, after checking it exited 0."""
    d = Daemon(cfg, notifier=Notifier(None))
    rc: list[int] = []
    t = threading.Thread(target=lambda: rc.append(d.run()), daemon=True)
    t.start()
    try:
        deadline = time.monotonic() + timeout
        while not until(d):
            assert time.monotonic() < deadline and t.is_alive(), "daemon never got there"
            time.sleep(0.05)
        if then is not None:
            then(d)
    finally:
        d.request_stop()
        t.join(60)
    assert rc == [0]
    return d


def test_a_restarted_daemon_sets_the_unacknowledged_alarm_on_the_plc_first_thing(tmp_path, synthetic_cfg,
                                                                                 monkeypatch):
    pytest.importorskip("pymodbus")
    from plc_servers import FAST, make_plc

    monkeypatch.setenv(latch_mod.STATE_ENV, str(tmp_path / "state"))
    plc = make_plc("modbus").start()
    try:
        driver = plc.driver_cfg(**FAST)
        cam = tmp_path / "cam.yaml"
        write_config(cam, synthetic_cfg(source={"fps": 20, "defect_rate": 1.0},
                                        alarms={"rules": RULES, "drivers": [driver]}))
        kept = tmp_path / "state" / "alarms" / "test.json"
        run_daemon(cam, lambda d: plc.read(2)["coils"][0] and kept.exists())
        assert [r["name"] for r in json.loads(kept.read_text())["latched"]] == ["any_defect"]

        plc.stop()
        plc.start()  # the PLC's memory is fresh: whatever it shows now the next run wrote
        assert plc.read(2)["coils"] == [False, False]
        # no defects at all this time: only the kept latch can set the bit
        write_config(cam, synthetic_cfg(source={"fps": 20, "defect_rate": 0.0},
                                        alarms={"rules": RULES, "drivers": [driver]}))
        seen = {}

        def latched_on_plc(d):
            s = plc.read(2)
            if s["frames"] > 0 and s["status"] & 1:
                seen.update(s)
                return True
            return False
        d = run_daemon(cam, latched_on_plc)
        assert seen["coils"][0] and seen["alarm_bits"] & 1, seen
        assert d.engine.raised_counts()["any_defect"] == 1

        # acknowledged by the PLC while the inspector is away: the next run takes the request
        # (after its first write, which raises the kept alarm) and the file is emptied
        plc.request_ack(0)
        d = run_daemon(cam, lambda d: json.loads(kept.read_text())["latched"] == [])
        assert not d.engine.active()["any_defect"]
        plc.stop()
        plc.start()
        run_daemon(cam, lambda d: (lambda s: s["frames"] > 0 and s["status"] & 1)(plc.read(2)))
        assert plc.read(2)["coils"] == [False, False]
    finally:
        plc.stop()


# -- review 24 and walkthrough I ------------------------------------------------------------------

def latch_one(path, rules=RULES):
    e, store = engine(path, rules)
    e.restore()
    e.on_frame({"frame_id": 7, "strip_pos_mm": 0.0, "defects": [defect()]})
    wait_file(path, lambda d: d["latched"])
    assert store.close()


def test_restarts_keep_the_detail_as_it_was_and_leave_the_file_alone(tmp_path):
    path = tmp_path / "cam.json"
    latch_one(path)
    first = path.read_text()
    for _ in range(3):  # a crash loop: the file and the line must not grow
        e, store = engine(path)
        assert e.restore() == ["any_defect"]
        assert store.close()
        assert path.read_text() == first  # not even rewritten
    [rec] = json.loads(first)["latched"]
    assert rec["detail"].startswith("1 defect(s) in one frame") and "latched before" not in rec["detail"]


def test_a_start_that_drops_every_kept_alarm_empties_the_file(tmp_path, caplog):
    path = tmp_path / "cam.json"
    latch_one(path)
    not_latching = [{"name": "any_defect", "off_delay_s": 0}]
    e, store = engine(path, not_latching)
    assert e.restore() == []
    assert "but the rule no longer latches: dropped" in caplog.text
    wait_file(path, lambda d: d["latched"] == [])
    store.close()
    caplog.clear()
    e, store = engine(path)  # latching again later: the old alarm does not come back
    assert e.restore() == [] and "dropped" not in caplog.text
    store.close()


def test_a_hand_edited_file_is_read_or_refused_with_what_is_wrong(tmp_path, caplog):
    path = tmp_path / "cam.json"
    path.write_text(json.dumps({"version": 1, "latched": [
        {"name": "any_defect", "since": "yesterday", "detail": "by hand"},
        {"name": "any_defect", "since": None, "detail": None}]}))
    e, store = engine(path)
    assert e.restore() == ["any_defect"]
    assert "alarm any_defect is listed more than once; the first entry is kept" in caplog.text
    assert "since yesterday: by hand" in caplog.text
    data = wait_file(path, lambda d: len(d["latched"]) == 1)  # rewritten without the duplicate
    assert data["latched"][0]["since"] == "yesterday"
    store.close()
    for text, says in (('{"version": 1, "latched": {"name": "x"}}', "'latched' is not a list"),
                       ('[1, 2]', "not a JSON object"),
                       ('{"version": 2, "latched": []}', "version 2; this inspector reads version 1")):
        path.write_text(text)
        e, store = engine(path)
        caplog.clear()
        assert e.restore() == []
        assert f"is not a latched-alarm file ({says})" in caplog.text, caplog.text
        store.close()
    assert len(list(tmp_path.glob("cam.json.*.bad"))) >= 1


def test_a_reload_that_drops_a_latched_alarm_says_so(tmp_path, caplog):
    path = tmp_path / "cam.json"
    e, store = engine(path)
    e.restore()
    e.on_frame({"frame_id": 7, "strip_pos_mm": 0.0, "defects": [defect()]})
    e.set_rules(AlarmsConfig.model_validate({"rules": [{"name": "any_defect", "type": "camera_down",
                                                        "latch": True}]}))
    assert "alarm any_defect was latched and not acknowledged (since " in caplog.text
    assert "but the rule is of type camera_down now: dropped by the reload" in caplog.text
    e.on_frame({"frame_id": 8, "strip_pos_mm": 0.0, "defects": [defect()]})
    e.set_rules(AlarmsConfig.model_validate({"rules": RULES}))
    e.on_frame({"frame_id": 9, "strip_pos_mm": 0.0, "defects": [defect()]})
    caplog.clear()
    e.set_rules(AlarmsConfig.model_validate({"rules": RULES[1:]}))
    assert "alarm any_defect was latched and not acknowledged" in caplog.text
    assert "no rule has that name now: dropped by the reload" in caplog.text
    assert store.close()
    # the newest set wins: the file holds no alarm (or was never written, the set being empty by then)
    assert not path.exists() or json.loads(path.read_text())["latched"] == []


def test_one_file_is_one_daemons_and_a_folder_is_not_a_file(tmp_path):
    path = tmp_path / "cam.json"
    first = LatchStore(path, "a.yaml")
    first.open()
    with pytest.raises(ConfigError) as err:
        LatchStore(path, "b.yaml").open()
    assert f"{path} is in use by another running daemon (pid {os.getpid()}): two cameras with one " \
           "camera_id?" in str(err.value) and str(err.value).startswith("b.yaml: alarms.latch_file")
    first.close()
    LatchStore(path, "b.yaml").open()  # free again once the first let go
    (tmp_path / "dir").mkdir()
    with pytest.raises(ConfigError, match=r"dir is a folder: name a file in it"):
        LatchStore(tmp_path / "dir", "c.yaml", "dir").open()


def test_a_link_to_another_cameras_file_is_that_file(tmp_path):
    # the lock went by the path's spelling: a link to the other camera's file opened in both
    # daemons, and each would raise the other's alarms after a restart
    a = LatchStore(tmp_path / "a" / "cam.json", "a.yaml")
    a.open()
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "cam.json").symlink_to(tmp_path / "a" / "cam.json")
    with pytest.raises(ConfigError, match="is in use by another running daemon"):
        LatchStore(tmp_path / "b" / "cam.json", "b.yaml").open()
    a.close()


def test_a_stop_with_the_file_behind_says_what_a_restart_would_do(tmp_path, caplog):
    folder = tmp_path / "alarms"
    path = folder / "cam.json"
    latch_one(path)
    e, store = engine(path)
    e.restore()
    (folder / "cam.json.lock").unlink()
    shutil.rmtree(folder)
    folder.write_text("not a folder")
    assert e.ack_names(["any_defect"]) == ["any_defect"]
    assert not store.close()
    assert ("latched alarms NOT written at stop: the file holds ['any_defect'], latched now none: a "
            "restart now would raise any_defect again, although acknowledged") in caplog.text


@pytest.mark.skipif(os.geteuid() != 0, reason="giving files to another user needs root")
def test_a_root_run_leaves_the_service_users_folder_writable_to_it(tmp_path):
    import pwd

    nobody = pwd.getpwnam("nobody")
    state = tmp_path / "state"
    state.mkdir()
    os.chown(state, nobody.pw_uid, nobody.pw_gid)
    latch_one(state / "alarms" / "cam.json")  # as root, "just to try"
    for p in (state / "alarms", state / "alarms" / "cam.json", state / "alarms" / "cam.json.lock"):
        assert (p.stat().st_uid, p.stat().st_gid) == (nobody.pw_uid, nobody.pw_gid), p


def test_without_a_latching_rule_an_unusable_folder_does_not_stop_the_start(tmp_path, synthetic_cfg, monkeypatch,
                                                                          caplog):
    from inspector.config import load_config
    from inspector.daemon import latch_store_for

    (tmp_path / "blocker").write_text("a file")
    monkeypatch.setenv(latch_mod.STATE_ENV, str(tmp_path / "blocker"))
    cfg = load_config(write_config(tmp_path / "cam.yaml", synthetic_cfg(alarms={"rules": RULES[1:]})))
    assert latch_store_for(cfg) is None
    cfg = load_config(write_config(tmp_path / "cam.yaml", synthetic_cfg(alarms={"rules": RULES})))
    with pytest.raises(ConfigError, match="cannot write the latched-alarm file's folder"):
        latch_store_for(cfg)


def test_check_user_takes_the_state_folder_from_the_installed_unit(tmp_path, synthetic_cfg, monkeypatch):
    from conftest import run_cli

    unit = tmp_path / "inspector@.service"
    unit.write_text(f"[Service]\nEnvironment=PYTHONUNBUFFERED=1\nEnvironment=INSPECTOR_STATE={tmp_path / 'st'}\n")
    monkeypatch.setenv("INSPECTOR_UNIT", str(unit))
    monkeypatch.delenv(latch_mod.STATE_ENV, raising=False)
    cam = write_config(tmp_path / "cam.yaml", synthetic_cfg(alarms={"rules": RULES}))
    done = run_cli("check", "--config", str(cam), "--user", "root", "--json")
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert f"latched alarms kept in {tmp_path / 'st' / 'alarms' / 'test.json'}" in out["alarms"]
    assert out["unit_environment"] == f"INSPECTOR_STATE={tmp_path / 'st'}"


def _reload_with(d, cam, raw):
    import yaml

    cam.write_text(yaml.safe_dump(raw))
    n = d.reloads["ok"] + d.reloads["failed"]
    d.request_reload()
    deadline = time.monotonic() + 60
    while d.reloads["ok"] + d.reloads["failed"] == n:
        assert time.monotonic() < deadline, "no reload"
        time.sleep(0.05)


def test_a_reload_that_moves_the_file_carries_the_latched_alarms_over(tmp_path, synthetic_cfg, caplog):
    # it used to take effect at the next start only, which read the new (empty) file: the alarm
    # latched now did not come back after a restart
    caplog.set_level(logging.INFO, logger="inspector.daemon")
    cam = tmp_path / "cam.yaml"
    raw = synthetic_cfg(source={"fps": 20, "defect_rate": 1.0},
                        alarms={"rules": RULES, "latch_file": "st/test.json"})
    write_config(cam, raw)
    old, new = tmp_path / "st" / "test.json", tmp_path / "st2" / "test.json"
    (tmp_path / "st2").mkdir()
    new.write_text(json.dumps({"version": 1, "latched": [{"name": "scratch", "type": "defect",
                                                          "since": None, "detail": "old"}]}))

    def move(d):
        wait_file(old, lambda data: [r["name"] for r in data["latched"]] == ["any_defect"])
        _reload_with(d, cam, {**raw, "alarms": {**raw["alarms"], "latch_file": "st2/test.json"}})
        assert d.reloads == {"ok": 1, "failed": 0}
        assert [r["name"] for r in json.loads(new.read_text())["latched"]] == ["any_defect"]
        assert not old.exists() and not old.with_name("test.json.lock").exists()
        # from now on the new file follows the latched set: a reload dropping the rule empties it
        _reload_with(d, cam, {**raw, "alarms": {"rules": RULES[1:], "latch_file": "st2/test.json"}})
        assert d.reloads == {"ok": 2, "failed": 0}
        wait_file(new, lambda data: data["latched"] == [])
        assert not old.exists()
    run_daemon(cam, lambda d: d.engine is not None and d.engine.latched_names(), then=move)
    assert f"reload: latched alarms (any_defect) moved from {old} to {new}" in caplog.text
    assert f"reload: {new} held scratch, not latched in this run: replaced by what is latched now" in caplog.text
    assert "alarms.latch_file changed; that takes effect after a restart" not in caplog.text


def moved_during_a_held_write(tmp_path, monkeypatch):
    """An engine latching into st/cam.json whose write to it is held (a disk that answers only
    when the test sets the returned event), moved to st2/cam.json and retired meanwhile: (engine,
    old path, new path, new store, the event that lets the held write go on)."""
    old, new = tmp_path / "st" / "cam.json", tmp_path / "st2" / "cam.json"
    e, _ = engine(old)
    slow, go_on = threading.Event(), threading.Event()
    real = latch_mod.atomic_write_text

    def write(path, text):
        if path == old:
            slow.set()
            assert go_on.wait(10)
        real(path, text)
    monkeypatch.setattr(latch_mod, "atomic_write_text", write)
    e.on_frame({"frame_id": 1, "strip_pos_mm": 0.0, "defects": [defect()]})
    assert slow.wait(5)  # the old writer is inside its write
    to = LatchStore(new, "cam.yaml")
    to.open()
    assert to.write_now(e.latched_records()) is None
    e.move_store(to).retire()  # returns with the old write still blocked: the reload does not wait
    return e, old, new, to, go_on


def test_a_move_while_the_old_file_is_still_being_written_leaves_nothing_of_it(tmp_path, monkeypatch):
    # retiring the old file while its writer sits in a slow write: used to raise "remove before
    # close" after the swap (a reload reported failed that had taken effect), and the old writer
    # then put the file back
    e, old, new, to, go_on = moved_during_a_held_write(tmp_path, monkeypatch)
    assert not go_on.is_set()
    # a reload back to the old file meanwhile is refused, and not as "another running daemon"
    back = LatchStore(old, "cam.yaml")
    with pytest.raises(ConfigError, match="still being written and removed by this daemon's previous move"):
        back.open()
    go_on.set()
    deadline = time.monotonic() + 5
    while (old.exists() or old.with_name("cam.json.lock").exists()) and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.2)
    assert not old.exists() and not old.with_name("cam.json.lock").exists()
    assert [r["name"] for r in json.loads(new.read_text())["latched"]] == ["any_defect"]
    e.ack_names(["any_defect"], by="test")
    wait_file(new, lambda data: data["latched"] == [])
    assert not old.exists()
    to.close()


def test_a_stop_waits_for_the_write_still_ending_on_a_file_moved_off(tmp_path, monkeypatch):
    # without the wait, a stop during that write left the old file holding the moved alarms:
    # a config naming it again raised them, though acknowledged meanwhile (review 26 L2)
    e, old, new, to, go_on = moved_during_a_held_write(tmp_path, monkeypatch)
    assert latch_mod.wait_for_retired(0.1) == [old]  # the write has not ended: named
    threading.Timer(0.2, go_on.set).start()
    assert latch_mod.wait_for_retired(10) == []  # ended within the time given: removed
    assert not old.exists() and not old.with_name("cam.json.lock").exists()
    assert not latch_mod._RETIRING
    to.close()


def test_retiring_a_file_whose_writer_is_idle_removes_it_before_returning(tmp_path):
    # the usual reload: the writer waits for the next set. The files used to be removed by that
    # thread after it woke, so a reload had returned with the old file still there (CI saw it)
    old, new = tmp_path / "st" / "cam.json", tmp_path / "st2" / "cam.json"
    for _ in range(20):
        e, store = engine(old)
        e.on_frame({"frame_id": 1, "strip_pos_mm": 0.0, "defects": [defect()]})
        wait_file(old, lambda data: [r["name"] for r in data["latched"]] == ["any_defect"])
        # the file is in place before its folder's flush ends: wait for the writer to be idle
        deadline = time.monotonic() + 10
        while store._writing:
            assert time.monotonic() < deadline, "the writer never finished"
            time.sleep(0.005)
        to = LatchStore(new, "cam.yaml")
        to.open()
        assert to.write_now(e.latched_records()) is None
        e.move_store(to).retire()
        assert not old.exists() and not old.with_name("cam.json.lock").exists()
        to.retire()
        assert not new.exists()


def test_a_reload_onto_a_corrupt_file_says_it_is_replaced_not_that_a_restart_lost_alarms(
        tmp_path, synthetic_cfg, caplog):
    # the start's wording ("latched before the restart are unknown: check the line") sent the
    # engineer looking for alarms that a reload never lost
    cam = tmp_path / "cam.yaml"
    raw = synthetic_cfg(source={"fps": 20, "defect_rate": 1.0},
                        alarms={"rules": RULES, "latch_file": "st/test.json"})
    write_config(cam, raw)
    old, new = tmp_path / "st" / "test.json", tmp_path / "st2" / "test.json"
    new.parent.mkdir()
    new.write_text("{not json")

    def move(d):
        wait_file(old, lambda data: [r["name"] for r in data["latched"]] == ["any_defect"])
        _reload_with(d, cam, {**raw, "alarms": {**raw["alarms"], "latch_file": "st2/test.json"}})
        assert d.reloads == {"ok": 1, "failed": 0}
        assert [r["name"] for r in json.loads(new.read_text())["latched"]] == ["any_defect"]
    run_daemon(cam, lambda d: d.engine is not None and d.engine.latched_names(), then=move)
    assert f"{new} is not a latched-alarm file" in caplog.text
    assert "What it held is set aside; the alarms latched now are to be written in its place" in caplog.text
    assert "before the restart" not in caplog.text
    assert list(new.parent.glob("test.json.*.bad"))  # kept aside, as at a start


def test_a_reload_that_renames_the_camera_moves_its_default_file(tmp_path, synthetic_cfg, monkeypatch, caplog):
    # the default file is named by camera_id: the restart a rename asks for read the new id's
    # (empty) file and the unacknowledged alarm was gone, without a word
    caplog.set_level(logging.INFO, logger="inspector.daemon")
    monkeypatch.setenv(latch_mod.STATE_ENV, str(tmp_path / "state"))
    cam = tmp_path / "cam.yaml"
    raw = synthetic_cfg(source={"fps": 20, "defect_rate": 1.0}, alarms={"rules": RULES})
    write_config(cam, raw)
    old, new = tmp_path / "state" / "alarms" / "test.json", tmp_path / "state" / "alarms" / "line2.json"

    def rename(d):
        wait_file(old, lambda data: [r["name"] for r in data["latched"]] == ["any_defect"])
        _reload_with(d, cam, {**raw, "camera_id": "line2"})
        assert d.reloads == {"ok": 1, "failed": 0}
        assert [r["name"] for r in json.loads(new.read_text())["latched"]] == ["any_defect"]
        assert not old.exists()
    run_daemon(cam, lambda d: d.engine is not None and d.engine.latched_names(), then=rename)
    assert f"reload: latched alarms (any_defect) moved from {old} to {new}" in caplog.text
    assert "reload: camera_id changed; that takes effect after a restart" in caplog.text


def test_a_reload_that_moves_the_file_to_one_it_cannot_keep_fails_and_keeps_the_old(tmp_path, synthetic_cfg,
                                                                                   caplog):
    cam = tmp_path / "cam.yaml"
    raw = synthetic_cfg(source={"fps": 20, "defect_rate": 1.0},
                        alarms={"rules": RULES, "latch_file": "st/test.json"})
    write_config(cam, raw)
    old = tmp_path / "st" / "test.json"
    other = LatchStore(tmp_path / "st2" / "test.json", "other.yaml")
    other.open()  # another running daemon holds it

    def move(d):
        wait_file(old, lambda data: [r["name"] for r in data["latched"]] == ["any_defect"])
        _reload_with(d, cam, {**raw, "alarms": {**raw["alarms"], "latch_file": "st2/test.json"}})
        assert d.reloads == {"ok": 0, "failed": 1}
        assert d.engine.store.path == old and old.exists()
        # the running value stays what it was: the same reload again is compared against it
        assert d.cfg.alarms.latch_file == "st/test.json"
    try:
        run_daemon(cam, lambda d: d.engine is not None and d.engine.latched_names(), then=move)
    finally:
        other.close()
    assert (f"reload failed, the running model and rules stay: {cam}: alarms.latch_file: "
            f"{tmp_path / 'st2' / 'test.json'} is in use by another running daemon") in caplog.text


def test_a_reload_that_fails_after_taking_a_new_file_leaves_nothing_of_it(tmp_path, synthetic_cfg, caplog):
    # it left the folders it made and a .lock beside a file that never was
    cam = tmp_path / "cam.yaml"
    raw = synthetic_cfg(source={"fps": 20, "defect_rate": 1.0},
                        alarms={"rules": RULES, "latch_file": "st/test.json"})
    write_config(cam, raw)
    old = tmp_path / "st" / "test.json"
    kept = tmp_path / "kept"
    kept.mkdir()  # a folder that was there before stays

    def move(d):
        wait_file(old, lambda data: [r["name"] for r in data["latched"]] == ["any_defect"])
        bad_rules = RULES + [{"name": "nothing", "classes": ["no_such_class"]}]
        _reload_with(d, cam, {**raw, "alarms": {"rules": bad_rules, "latch_file": "kept/a/b/test.json"}})
        assert d.reloads == {"ok": 0, "failed": 1}
        assert d.engine.store.path == old and old.exists()
        assert list(kept.iterdir()) == []
    run_daemon(cam, lambda d: d.engine is not None and d.engine.latched_names(), then=move)
    assert "no_such_class" in caplog.text


def test_a_stop_during_a_reload_applies_nothing_of_it_and_leaves_nothing_of_its_new_file(
        tmp_path, synthetic_cfg, monkeypatch, caplog):
    # the stop neither waited for nor told the reload: the new file's .lock and folders stayed,
    # or the reload went on to swap rules and files under the stop (review 26b L2)
    import inspector.daemon as daemon_module

    cam = tmp_path / "cam.yaml"
    raw = synthetic_cfg(source={"fps": 20, "defect_rate": 1.0},
                        alarms={"rules": RULES, "latch_file": "st/test.json"})
    write_config(cam, raw)
    old = tmp_path / "st" / "test.json"
    loading, go_on = threading.Event(), threading.Event()
    real_load = daemon_module.load_model

    def slow_load(cfg):
        if cfg.alarms.latch_file == "new/deep/test.json":
            loading.set()
            assert go_on.wait(30)  # an engine build that takes its time
        return real_load(cfg)
    monkeypatch.setattr(daemon_module, "load_model", slow_load)
    seen = {}

    def stop_during_the_reload(d):
        wait_file(old, lambda data: [r["name"] for r in data["latched"]] == ["any_defect"])
        import yaml

        cam.write_text(yaml.safe_dump({**raw, "alarms": {**raw["alarms"], "latch_file": "new/deep/test.json"}}))
        d.request_reload()
        assert loading.wait(30)
        assert (tmp_path / "new" / "deep" / "test.json.lock").exists()  # taken before the load
        threading.Timer(0.3, go_on.set).start()  # the load ends while the stop waits for it
        seen["d"] = d
    run_daemon(cam, lambda d: d.engine is not None and d.engine.latched_names(), then=stop_during_the_reload)
    d = seen["d"]
    assert d.reloads == {"ok": 0, "failed": 1}
    assert "a stop came while the new model loaded: nothing of this reload is applied" in caplog.text
    assert not (tmp_path / "new").exists()
    assert [r["name"] for r in json.loads(old.read_text())["latched"]] == ["any_defect"]


def test_a_reload_that_turns_a_latch_on_is_checked_as_the_next_start_would_be(tmp_path, synthetic_cfg,
                                                                             monkeypatch, caplog):
    # started without a latching rule and with no usable state folder: a reload turning the latch
    # on was accepted, the alarm was never kept, and the next start exited 2 (the unit stayed down)
    monkeypatch.delenv(latch_mod.STATE_ENV, raising=False)
    caplog.set_level(logging.INFO, logger="inspector.daemon")
    (tmp_path / "blocker").write_text("a file")
    cam = tmp_path / "cam.yaml"
    raw = synthetic_cfg(source={"fps": 20, "defect_rate": 1.0},
                        alarms={"rules": RULES[1:], "latch_file": "blocker/test.json"})
    write_config(cam, raw)

    def reloads(d):
        _reload_with(d, cam, {**raw, "alarms": {**raw["alarms"], "rules": RULES}})
        assert d.reloads == {"ok": 0, "failed": 1}
        assert "reload failed, the running model and rules stay: " in caplog.text
        assert (f"alarms.latch_file: cannot write the latched-alarm file's folder {tmp_path / 'blocker'} "
                f"({tmp_path / 'blocker'} is a file, not a folder)") in caplog.text
        # a file it can keep: taken from this reload on; what an earlier run left in it is
        # replaced at once (it was neither raised now nor meant to come back at the next start)
        st = tmp_path / "st" / "test.json"
        st.parent.mkdir()
        st.write_text(json.dumps({"version": 1, "latched": [
            {"name": "scratch", "type": "defect", "since": "2026-10-01T00:00:00+0000", "detail": "old run"}]}))
        _reload_with(d, cam, {**raw, "alarms": {"rules": RULES, "latch_file": "st/test.json"}})
        assert d.reloads == {"ok": 1, "failed": 1}
        assert "scratch" not in [r["name"] for r in json.loads(st.read_text())["latched"]]
        wait_file(st, lambda data: [r["name"] for r in data["latched"]] == ["any_defect"])
        assert d.cfg.alarms.latch_file == "st/test.json"  # what runs, for the next reload to compare
        _reload_with(d, cam, {**raw, "alarms": {"rules": RULES, "latch_file": "st/test.json"}})
        assert d.reloads == {"ok": 2, "failed": 1}
    run_daemon(cam, lambda d: d.pipeline is not None and d.pipeline.counters.snapshot()["published"] >= 2,
               then=reloads)
    st = tmp_path / "st" / "test.json"
    assert f"reload: latched alarms are kept in {st} from now on" in caplog.text
    assert f"reload: {st} held scratch, not latched in this run: replaced by what is latched now" in caplog.text
    assert "alarms.latch_file changed" not in caplog.text


def test_the_units_environment_is_read_as_systemd_reads_it(tmp_path, monkeypatch):
    from inspector.cli import _take_unit_environment, _unit_environment

    unit = tmp_path / "inspector@.service"
    unit.write_text("[Unit]\nEnvironment=INSPECTOR_STATE=/not/service\n"
                    "[Service]\n# Environment=INSPECTOR_STATE=/commented\n"
                    "Environment=INSPECTOR_STATE=/first\n"
                    'Environment="INSPECTOR_STATE=/srv/st" PYTHONUNBUFFERED=1\n'
                    "Environment='INSPECTOR_RECORDINGS=/srv/rec dir'\n"
                    "[Install]\nEnvironment=INSPECTOR_ENGINE_CACHE=/not/service\n")
    template, camera = tmp_path / "inspector@.service.d", tmp_path / "inspector@line1.service.d"
    template.mkdir()
    camera.mkdir()
    (template / "10-site.conf").write_text("[Service]\nEnvironment=INSPECTOR_ENGINE_CACHE=%S/inspector/engines\n")
    (camera / "50-camera.conf").write_text("[Service]\nEnvironment=INSPECTOR_STATE=/srv/line1\n")
    monkeypatch.setenv("INSPECTOR_UNIT", str(unit))
    assert _unit_environment("/etc/inspector/cameras/line1.yaml")[0] == {
        "INSPECTOR_STATE": "/srv/line1", "INSPECTOR_RECORDINGS": "/srv/rec dir",
        "INSPECTOR_ENGINE_CACHE": "/var/lib/inspector/engines"}
    # systemd sorts the drop-ins of both folders together by name: the template's 90-site.conf
    # comes after the camera's 50-camera.conf, and a name in the camera's folder hides the template's
    (template / "90-site.conf").write_text("[Service]\nEnvironment=INSPECTOR_STATE=/srv/site/%i-%%x\n")
    (template / "20-rec.conf").write_text("[Service]\nEnvironment=INSPECTOR_RECORDINGS=/srv/template-rec\n")
    (camera / "20-rec.conf").write_text("[Service]\n")
    env, read = _unit_environment("/etc/inspector/cameras/line1.yaml")
    assert env == {"INSPECTOR_STATE": "/srv/site/line1-%x", "INSPECTOR_RECORDINGS": "/srv/rec dir",
                   "INSPECTOR_ENGINE_CACHE": "/var/lib/inspector/engines"}
    assert read == [unit, template / "10-site.conf", camera / "20-rec.conf", camera / "50-camera.conf",
                    template / "90-site.conf"]
    # another camera reads the template's folder only
    assert _unit_environment("other.yaml")[0]["INSPECTOR_RECORDINGS"] == "/srv/template-rec"
    # a specifier this check cannot fill in is not guessed at: the assignment is skipped, as
    # systemd skips one it cannot resolve; %I is the unescaped instance name
    (template / "95-odd.conf").write_text("[Service]\nEnvironment=INSPECTOR_STATE=%H/st\n")
    assert _unit_environment("line1-top.yaml")[0]["INSPECTOR_STATE"] == "/srv/site/line1-top-%x"
    (template / "95-odd.conf").write_text("[Service]\nEnvironment=INSPECTOR_STATE=/srv/%I\n")
    assert _unit_environment("line1-top.yaml")[0]["INSPECTOR_STATE"] == "/srv/line1/top"
    # EnvironmentFile= is read after every Environment=, and wins; "-": a missing file is no error
    (tmp_path / "site.env").write_text("# site paths\nINSPECTOR_STATE='/srv/from file'\n")
    (template / "96-file.conf").write_text(f"[Service]\nEnvironmentFile=-{tmp_path / 'none.env'}\n"
                                           f"EnvironmentFile={tmp_path / 'site.env'}\n")
    env, read = _unit_environment("line1-top.yaml")
    assert env["INSPECTOR_STATE"] == "/srv/from file" and read[-1] == tmp_path / "site.env"

    # what check --user takes: only what the shell does not set; the shell's own value stays
    (template / "95-odd.conf").unlink()
    (template / "96-file.conf").unlink()
    for k in ("INSPECTOR_STATE", "INSPECTOR_RECORDINGS", "INSPECTOR_ENGINE_CACHE"):
        monkeypatch.setenv(k, "x")  # so that monkeypatch restores the variables check --user sets
        monkeypatch.delenv(k)
    monkeypatch.setenv("INSPECTOR_STATE", "/from/shell")
    assert _take_unit_environment("other.yaml") == [
        "INSPECTOR_RECORDINGS=/srv/template-rec", "INSPECTOR_ENGINE_CACHE=/var/lib/inspector/engines"]
    assert os.environ["INSPECTOR_STATE"] == "/from/shell"
