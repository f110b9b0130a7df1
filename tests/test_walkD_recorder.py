"""Walkthrough D, recorder: a start refuses a sub-folder it cannot write (B5), a burst of skips
is closed with its full count when recording works again (C1), and the stop says its skips as
the STATUS line says drops."""

from __future__ import annotations

import builtins
import errno
import logging
import os
import re
import time
from pathlib import Path

import numpy as np
import pytest

import inspector.recorder as recorder_mod
from inspector.errors import ConfigError
from inspector.frame import Frame
from inspector.recorder import Recorder, RecordConfig, preflight

CLASSES = ["background", "inclusion", "patches", "scratches"]
LABEL = np.zeros((16, 24), np.uint8)


def _frame(fid: int) -> Frame:
    return Frame("c", fid, 1_795_000_000_000_000_000 + fid * 1_000_000, np.zeros((16, 24), np.uint8))


def _header(fid: int) -> dict:
    return {"frame_id": fid, "defects": [{"class_id": 1, "class": "inclusion"}]}


def _refuse_writes_to(monkeypatch: pytest.MonkeyPatch, refused: Path) -> list[Path]:
    """``os.access`` as the service user would answer it for a folder root left root's (tests run
    as root, whom chmod does not stop); returns the folders asked about."""
    real = os.access
    asked: list[Path] = []

    def access(path, mode, *a, **kw) -> bool:
        asked.append(Path(path))
        if Path(path) == refused and mode & os.W_OK:
            return False
        return real(path, mode, *a, **kw)

    monkeypatch.setattr(os, "access", access)
    return asked


# -- B5: every folder the recorder writes into is checked at start ---------------------------------

@pytest.mark.parametrize("sub", ["defects/images", "defects/masks", "normal/meta", "defects",
                                 "defects/regions"])
def test_a_start_refuses_a_sub_folder_it_cannot_write(tmp_path, monkeypatch, sub):
    cfg = RecordConfig(enabled=True, dir=str(tmp_path / "rec"))
    Recorder(cfg, "cam1", CLASSES)._release()  # a first run made the layout
    root = tmp_path / "rec" / "cam1"
    (root / "defects" / "regions").mkdir(exist_ok=True)  # a region head's, made at its first record
    _refuse_writes_to(monkeypatch, root / sub)
    with pytest.raises(ConfigError) as e:
        Recorder(cfg, "cam1", CLASSES, config_file="cam.yaml")
    msg = str(e.value)
    assert msg.startswith(f"cam.yaml: record.dir: cannot write recordings into {root}: ")
    assert f"sub-folder {root / sub} is not writable" in msg and "owned by " in msg
    assert "\n" not in msg
    # what check and a reload run says the same
    with pytest.raises(ConfigError, match=re.escape(f"sub-folder {root / sub} is not writable")):
        preflight(cfg, "cam1", CLASSES, config_file="cam.yaml")
    # the refused start left the folder's lock free for the next one
    monkeypatch.undo()
    Recorder(cfg, "cam1", CLASSES)._release()


def test_a_writable_layout_passes_and_every_folder_is_asked(tmp_path, monkeypatch):
    cfg = RecordConfig(enabled=True, dir=str(tmp_path / "rec"))
    Recorder(cfg, "cam1", CLASSES)._release()
    root = tmp_path / "rec" / "cam1"
    (root / "normal" / "regions").mkdir()
    asked = _refuse_writes_to(monkeypatch, tmp_path / "elsewhere")
    rec = Recorder(cfg, "cam1", CLASSES)
    rec._release()
    expected = {root / "defects", root / "normal"} | {
        root / kind / sub for kind, subs in recorder_mod.KINDS.items() for sub in subs
        if (root / kind / sub).is_dir()}
    assert expected <= set(asked)
    assert root / "normal" / "regions" in asked and root / "defects" / "regions" not in asked
    preflight(cfg, "cam1", CLASSES)


# -- C1: a burst of skips is closed with its count when a record is written again -------------------

class _Clock:
    """The recorder's ``time`` with a monotonic clock the test moves (the rest is the real one)."""

    def __init__(self) -> None:
        self.t = 1000.0

    def monotonic(self) -> float:
        return self.t

    def __getattr__(self, name: str):
        return getattr(time, name)


def _fail_meta_writes(monkeypatch: pytest.MonkeyPatch, n: int) -> None:
    """The next ``n`` records fail at their first file, as on a full disk."""
    left = [n]
    real_open = builtins.open

    def fake_open(file, mode="r", *a, **kw):
        if str(file).endswith(".json.part") and left[0] > 0:
            left[0] -= 1
            raise OSError(errno.ENOSPC, "No space left on device", str(file))
        return real_open(file, mode, *a, **kw)

    monkeypatch.setattr(recorder_mod, "open", fake_open, raising=False)


def _count_writes(rec: Recorder) -> list[int]:
    """Count the writer's finished writes: a write's log lines are out once it is counted (the
    figures in ``snapshot`` move before the line is logged)."""
    done = [0]
    write = rec._write

    def counted(item) -> None:
        try:
            write(item)
        finally:
            done[0] += 1

    rec._write = counted  # type: ignore[method-assign]
    return done


def _offer(rec: Recorder, done: list[int], ids, total: int) -> None:
    """Offer frames and wait until the writer has finished ``total`` writes in all."""
    for i in ids:
        assert rec.offer(_frame(i), LABEL, _header(i)) == "defects"
    deadline = time.monotonic() + 5
    while done[0] < total:
        assert time.monotonic() < deadline, (done, rec.snapshot())
        time.sleep(0.002)


def _counts(lines: list[str]) -> tuple[int, int | None]:
    """(skips the per-skip lines account for, the recovery line's total or None)."""
    said, recovered = 0, None
    for m in lines:
        if " not recorded: " in m:
            more = re.search(r"\(\+(\d+) more since last report\)", m)
            said += 1 + (int(more.group(1)) if more else 0)
        got = re.match(r"recorder: recording again after (\d+) frame\(s\) not recorded \((.*)\)$", m)
        if got:
            recovered = int(got.group(1))
    return said, recovered


def test_a_burst_of_write_errors_is_closed_with_its_full_count(tmp_path, monkeypatch, caplog):
    clock = _Clock()
    monkeypatch.setattr(recorder_mod, "time", clock)
    rec = Recorder(RecordConfig(enabled=True, dir=str(tmp_path), min_free_gb=0, queue_size=64), "c",
                   CLASSES)
    _fail_meta_writes(monkeypatch, 26)
    done = _count_writes(rec)
    rec.start()
    with caplog.at_level(logging.INFO, logger="inspector.recorder"):
        _offer(rec, done, range(16), 16)  # the first said, 15 quiet
        clock.t += 11
        _offer(rec, done, range(16, 26), 26)  # "+15 more" said, 9 quiet
        lines = [r.getMessage() for r in caplog.records]
        assert _counts(lines) == (17, None)  # what the log said before the fix, and no more
        _offer(rec, done, [26], 27)  # written, but within the interval of the last line
        assert _counts([r.getMessage() for r in caplog.records]) == (17, None)
        clock.t += 11
        _offer(rec, done, [27], 28)  # written once the interval has passed
        lines = [r.getMessage() for r in caplog.records]
        s = rec.snapshot()
        assert s["skipped"]["write_error"] == 26 and s["recorded"]["defects"] == 2
        assert _counts(lines) == (17, 26)
        assert "recorder: recording again after 26 frame(s) not recorded (write_error 26)" in lines
        assert sum("recording again" in m for m in lines) == 1
        # a new burst is said at once, with no count left over from the last one
        _fail_meta_writes(monkeypatch, 1)
        _offer(rec, done, [28], 29)
        new = [r.getMessage() for r in caplog.records][len(lines):]
        assert len(new) == 1 and "f000000028 not recorded: " in new[0]
        assert "No space left on device" in new[0] and "more since last report" not in new[0]
        rec.close()
    stop = caplog.records[-1].getMessage()
    assert stop.endswith("2 defect frame(s) and 0 normal frame(s) recorded, 0 old record(s) removed, "
                         "skipped 27 (write_error 27)"), stop


def test_records_between_skips_that_go_on_are_no_recovery(tmp_path, monkeypatch, caplog):
    clock = _Clock()
    monkeypatch.setattr(recorder_mod, "time", clock)
    rec = Recorder(RecordConfig(enabled=True, dir=str(tmp_path), min_free_gb=0, queue_size=64), "c",
                   CLASSES)
    done = _count_writes(rec)
    rec.start()
    with caplog.at_level(logging.INFO, logger="inspector.recorder"):
        _fail_meta_writes(monkeypatch, 1)
        _offer(rec, done, [0], 1)           # the burst's first skip, said
        clock.t += 9.5
        _fail_meta_writes(monkeypatch, 1)
        _offer(rec, done, [1], 2)           # skipped again, quietly: still failing
        clock.t += 0.7
        _offer(rec, done, [2], 3)           # 10.2 s after the line but 0.7 s after a skip: no recovery
        assert not any("recording again" in r.getMessage() for r in caplog.records)
        clock.t += 11
        _offer(rec, done, [3], 4)           # no skip for 11 s: now it is
        lines = [r.getMessage() for r in caplog.records]
        rec.close()
    assert sum("recording again after" in m for m in lines) == 1


def test_recovery_line_with_a_shortened_interval_on_the_real_clock(tmp_path, monkeypatch, caplog):
    rec = Recorder(RecordConfig(enabled=True, dir=str(tmp_path), min_free_gb=0, queue_size=64), "c",
                   CLASSES)
    rec.report_every_s = 0.2
    _fail_meta_writes(monkeypatch, 20)
    done = _count_writes(rec)
    rec.start()
    with caplog.at_level(logging.WARNING, logger="inspector.recorder"):
        _offer(rec, done, range(20), 20)
        time.sleep(0.25)
        _offer(rec, done, [20], 21)
        lines = [r.getMessage() for r in caplog.records]
        rec.close()
    s = rec.snapshot()
    said, recovered = _counts(lines)
    assert recovered == s["skipped"]["write_error"] == 20 and said <= 20
    assert s["recorded"]["defects"] == 1


def test_the_stop_summary_says_skips_as_the_status_line_says_drops(tmp_path, caplog):
    rec = Recorder(RecordConfig(enabled=True, dir=str(tmp_path), queue_size=1), "c", CLASSES)
    rec.offer(_frame(0), LABEL, _header(0))
    rec.offer(_frame(1), LABEL, _header(1))  # queue full: no writer yet
    with caplog.at_level(logging.INFO, logger="inspector.recorder"):
        rec.close()
    assert caplog.records[-1].getMessage().endswith("skipped 2 (queue_full 1, shutdown 1)")
    clean = Recorder(RecordConfig(enabled=True, dir=str(tmp_path / "clean")), "c", CLASSES)
    clean.start()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="inspector.recorder"):
        clean.close()
    assert caplog.records[-1].getMessage().endswith("removed, skipped 0")
