"""The frame recorder on the real pipeline: what it keeps, how it fails, what it never loses silently."""

import json
import logging
import os
import shutil
import stat
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from conftest import run_cli, subscribed, write_config
from inspector.config import parse_config
from inspector.errors import ConfigError
from inspector.frame import Frame
from inspector.pipeline import Pipeline
from inspector.recorder import GB, Recorder, RecordConfig, record_stem
from inspector.sources import make_source

CLASSES = ["background", "inclusion", "patches", "scratches"]


def _records(root: Path, kind: str) -> dict[int, str]:
    """frame id -> stem of the complete records (those with an image) of one kind."""
    return {int(p.stem.rsplit("-f", 1)[1]): p.stem for p in sorted((root / kind / "images").glob("*.png"))}


def test_records_defect_frames_and_every_nth_normal_frame_as_published(synthetic_cfg, tmp_path):
    cfg = parse_config(synthetic_cfg(pipeline={"backpressure": True},
                                     source={"defect_rate": 0.5},
                                     record={"enabled": True, "dir": str(tmp_path / "rec"),
                                             "normal_every": 2},
                                     # frame 0 waits for the subscription: one sent before it is
                                     # dropped by ZeroMQ yet counted as published
                                     publish={"wait_for_subscribers": 1, "wait_timeout_s": 60}), "t.yaml")
    got, t = subscribed(cfg.publish.endpoint, 24)
    with Pipeline(cfg) as p:
        counters = p.run(frames=24)
    t.join()
    assert counters["published"] == 24 and len(got) == 24
    root = tmp_path / "rec" / "test"
    with_defects = [m for m in got if m.header["defects"]]
    without = [m.header["frame_id"] for m in got if not m.header["defects"]]
    assert with_defects and len(without) >= 2, "the synthetic strip should give both kinds of frame"
    defects = _records(root, "defects")
    normal = _records(root, "normal")
    assert sorted(defects) == [m.header["frame_id"] for m in with_defects]
    assert sorted(normal) == without[1::2]  # the 2nd, 4th, ... frame without a defect
    # the frame as grabbed (the synthetic strip is deterministic under its seed)
    src = make_source(cfg.source, "test")
    with src:
        frames = {f.frame_id: f.image for f in (src.read() for _ in range(24))}
    for m in with_defects:
        fid = m.header["frame_id"]
        stem = defects[fid]
        image = cv2.imread(str(root / "defects" / "images" / f"{stem}.png"), cv2.IMREAD_UNCHANGED)
        np.testing.assert_array_equal(image, frames[fid])
        mask = cv2.imread(str(root / "defects" / "masks" / f"{stem}.png"), cv2.IMREAD_UNCHANGED)
        np.testing.assert_array_equal(mask, m.mask())  # the mask subscribers got
        meta = json.loads((root / "defects" / "meta" / f"{stem}.json").read_text())
        assert meta["defects"] == m.header["defects"] and meta["recorded_as"] == "defects"
        assert stem == record_stem(m.header["t_capture_ns"], fid)
    for fid, stem in normal.items():
        assert not (root / "normal" / "masks").exists()
        np.testing.assert_array_equal(
            cv2.imread(str(root / "normal" / "images" / f"{stem}.png"), cv2.IMREAD_UNCHANGED), frames[fid])
    snap = p.recorder.snapshot()
    assert snap["recorded"] == {"defects": len(defects), "normal": len(normal)}
    assert sum(snap["skipped"].values()) == 0
    assert snap["bytes"] == sum(f.stat().st_size for f in root.rglob("*")
                                if f.is_file() and f.name != ".lock")


def test_recorded_defect_frames_replay_through_the_pipeline(synthetic_cfg, tmp_path):
    rec = tmp_path / "rec"
    cfg = parse_config(synthetic_cfg(pipeline={"backpressure": True}, source={"defect_rate": 0.8},
                                     record={"enabled": True, "dir": str(rec)}), "t.yaml")
    with Pipeline(cfg) as p:
        p.run(frames=8)
    n = p.recorder.snapshot()["recorded"]["defects"]
    assert n > 0
    raw = synthetic_cfg(pipeline={"backpressure": True})
    raw["source"] = {"type": "replay", "path": str(rec / "test" / "defects" / "images"),
                     "pattern": "*.png", "fps": 0, "loop": False}
    replay = parse_config(raw, "r.yaml")
    with Pipeline(replay) as p:
        counters = p.run()
    assert counters["grabbed"] == counters["published"] == n


def test_classes_narrow_what_is_recorded(tmp_path):
    rec = Recorder(RecordConfig(enabled=True, dir=str(tmp_path), classes=["scratches"]), "c", CLASSES)
    assert rec.wants([{"class_id": 3}]) == "defects"
    assert rec.wants([{"class_id": 1}, {"class_id": 2}]) is None
    assert rec.wants([]) is None


def test_unknown_class_and_unwritable_folder_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"cam\.yaml: record\.classes: unknown class\(es\) \['rust'\]"):
        Recorder(RecordConfig(enabled=True, dir=str(tmp_path), classes=["rust"]), "c", CLASSES,
                 config_file="cam.yaml")
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match=r"cam\.yaml: record\.dir: cannot write recordings into "
                                          r".*a-file/c"):
        Recorder(RecordConfig(enabled=True, dir=str(blocker)), "c", CLASSES, config_file="cam.yaml")


def test_run_exits_2_naming_record_dir(synthetic_cfg, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    f = write_config(tmp_path / "cam.yaml", synthetic_cfg(record={"enabled": True, "dir": str(blocker)}))
    r = run_cli("run", "--config", str(f), "--frames", "2", "--quiet")
    assert r.returncode == 2, r.stderr
    assert "record.dir: cannot write recordings into" in r.stderr


def test_check_reports_what_would_be_recorded(synthetic_cfg, tmp_path):
    f = write_config(tmp_path / "cam.yaml", synthetic_cfg(record={"enabled": True, "dir": "rec",
                                                                   "normal_every": 50}))
    r = run_cli("check", "--config", str(f), "--json")
    assert r.returncode == 0, r.stderr
    line = json.loads(r.stdout)["record"]
    assert line.startswith("frames with defects and every 50th frame without into ")
    assert str(tmp_path / "rec" / "test") in line  # relative to the config file
    # check creates nothing: a folder root made here would be one the service could not write
    assert "created at the daemon's start" in line and not (tmp_path / "rec").exists()
    if os.geteuid() == 0:
        assert "checked as root: the service user must be able to write" in line


def _frame(fid: int, value: int = 0) -> Frame:
    return Frame("c", fid, 1_795_000_000_000_000_000 + fid * 1_000_000, np.full((16, 24), value, np.uint8))


def _header(fid: int) -> dict:
    return {"frame_id": fid, "defects": [{"class_id": 1, "class": "inclusion"}]}


def test_queue_full_and_stop_are_counted_not_silent(tmp_path, caplog):
    rec = Recorder(RecordConfig(enabled=True, dir=str(tmp_path), queue_size=1), "c", CLASSES)
    label = np.zeros((16, 24), np.uint8)
    with caplog.at_level(logging.WARNING, logger="inspector.recorder"):
        assert rec.offer(_frame(0), label, _header(0)) == "defects"  # no writer yet: it waits
        assert rec.offer(_frame(1), label, _header(1)) is None
        assert rec.offer(_frame(2), label, _header(2)) is None
        assert rec.close() == 1  # the one still waiting: a writer never started
    s = rec.snapshot()
    assert s["skipped"]["queue_full"] == 2 and s["skipped"]["shutdown"] == 1
    assert s["recorded"] == {"defects": 0, "normal": 0}
    lines = [r.getMessage() for r in caplog.records]
    assert sum("not recorded: the writer is behind" in m for m in lines) == 1  # once per burst
    assert any("1 frame(s) not recorded" in m for m in lines)


def test_low_disk_skips_and_says_so(tmp_path, caplog):
    rec = Recorder(RecordConfig(enabled=True, dir=str(tmp_path), min_free_gb=1e6), "c", CLASSES)
    rec.start()
    with caplog.at_level(logging.WARNING, logger="inspector.recorder"):
        for i in range(3):
            rec.offer(_frame(i), np.zeros((16, 24), np.uint8), _header(i))
        rec.close()
    assert rec.snapshot()["skipped"]["disk_low"] == 3
    assert not list((tmp_path / "c").rglob("*.png"))
    assert sum("below record.min_free_gb" in r.getMessage() for r in caplog.records) == 1


def test_budget_removes_the_oldest_records_first(tmp_path):
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (64, 64), np.uint8) for _ in range(12)]  # ~4 KB each as PNG
    cfg = RecordConfig(enabled=True, dir=str(tmp_path), max_gb=20_000 / GB)
    rec = Recorder(cfg, "c", CLASSES)
    rec.start()
    for i, img in enumerate(images):
        f = Frame("c", i, 1_795_000_000_000_000_000 + i * 1_000_000, img)
        rec.offer(f, np.ones((64, 64), np.uint8), _header(i))
    rec.close()
    s = rec.snapshot()
    root = tmp_path / "c"
    kept = sorted(_records(root, "defects"))
    on_disk = sum(p.stat().st_size for p in root.rglob("*") if p.is_file() and p.name != ".lock")
    assert s["recorded"]["defects"] == 12 and s["removed"] == 12 - len(kept) > 0
    assert kept == list(range(12 - len(kept), 12))  # the newest survive
    assert on_disk == s["bytes"] <= 20_000
    for sub in ("masks", "meta"):  # no orphans left by the removal
        assert sorted(int(p.stem.rsplit("-f", 1)[1]) for p in (root / "defects" / sub).iterdir()) == kept
    # a restart takes stock of what is there and keeps to the same budget
    again = Recorder(cfg, "c", CLASSES)
    assert again.used == on_disk and len(again._heap) == len(kept)


def test_a_write_cut_short_is_cleaned_up_at_start(tmp_path):
    images = tmp_path / "c" / "defects" / "images"
    images.mkdir(parents=True)
    (images / ".20261128T000000000Z-f000000001.png.part").write_bytes(b"half")
    rec = Recorder(RecordConfig(enabled=True, dir=str(tmp_path)), "c", CLASSES)
    assert not list(images.iterdir()) and rec.used == 0


def test_rgb_frames_are_written_in_rgb_order(tmp_path):
    rec = Recorder(RecordConfig(enabled=True, dir=str(tmp_path)), "c", CLASSES)
    rec.start()
    img = np.zeros((8, 8, 3), np.uint8)
    img[..., 0] = 200  # red
    rec.offer(Frame("c", 0, 1_795_000_000_000_000_000, img), np.zeros((8, 8), np.uint8), _header(0))
    rec.close()
    (png,) = (tmp_path / "c" / "defects" / "images").glob("*.png")
    back = cv2.cvtColor(cv2.imread(str(png)), cv2.COLOR_BGR2RGB)
    np.testing.assert_array_equal(back, img)


def test_recorder_benchmark_writes_json_and_png(tmp_path):
    import importlib.util

    from conftest import ROOT
    spec = importlib.util.spec_from_file_location("recorder_bench", ROOT / "benchmarks" / "recorder_bench.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--frames", "3", "--levels", "0", "1", "--width", "160", "--height", "64",
                       "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "recorder-bench.json").read_text())
    assert [r["png_compression"] for r in result["levels"]] == [0, 1]
    assert all(r["frames"] == 3 and r["writer_fps"] > 0 and r["kib_per_record"] > 0 for r in result["levels"])
    assert result["frame_shape"] == [64, 160]
    assert (tmp_path / "recorder-bench.png").stat().st_size > 0


def _offer_all(rec: Recorder, ids, t0_ns: int = 1_795_000_000_000_000_000) -> None:
    for i in ids:
        f = Frame("c", i, t0_ns + i * 1_000_000, np.full((32, 32), i % 256, np.uint8))
        rec.offer(f, np.ones((32, 32), np.uint8), _header(i))


def test_a_clock_set_back_does_not_make_new_records_the_oldest(tmp_path, caplog):
    cfg = RecordConfig(enabled=True, dir=str(tmp_path), max_gb=2_000 / GB)  # a few records
    rec = Recorder(cfg, "c", CLASSES)
    rec.start()
    _offer_all(rec, range(0, 10))
    rec.close()
    day_ns = 86_400 * 10**9
    rec = Recorder(cfg, "c", CLASSES)  # restarted, its clock now a day behind
    rec.start()
    with caplog.at_level(logging.WARNING, logger="inspector.recorder"):
        _offer_all(rec, range(10, 20), t0_ns=1_795_000_000_000_000_000 - day_ns)
        rec.close()
    kept = sorted(_records(tmp_path / "c", "defects"))
    assert kept and kept[-1] == 19 and all(i >= 10 for i in kept)  # the newest written survive
    assert sum("the clock was set back" in r.getMessage() for r in caplog.records) == 1


def test_a_second_recorder_on_one_folder_is_refused(tmp_path):
    cfg = RecordConfig(enabled=True, dir=str(tmp_path))
    first = Recorder(cfg, "c", CLASSES)
    with pytest.raises(ConfigError, match=rf"record\.dir: {tmp_path / 'c'} is in use by another recorder "
                                          rf"\(pid {os.getpid()}\): two cameras with one camera_id"):
        Recorder(cfg, "c", CLASSES)
    first.close()
    Recorder(cfg, "c", CLASSES).close()  # free again once closed


def test_a_start_removes_what_a_killed_process_left(tmp_path, caplog):
    cfg = RecordConfig(enabled=True, dir=str(tmp_path))
    rec = Recorder(cfg, "c", CLASSES)
    rec.start()
    _offer_all(rec, range(3))
    rec.close()
    d = tmp_path / "c" / "defects"
    (d / "meta" / "x-f000000099.json").write_text("{}")      # killed before its image
    (d / "masks" / "x-f000000099.png").write_bytes(b"png")
    (d / "images" / "y-f000000098.png").write_bytes(b"")      # empty after a power cut
    (d / "meta" / "y-f000000098.json").write_text("{}")
    with caplog.at_level(logging.WARNING, logger="inspector.recorder"):
        again = Recorder(cfg, "c", CLASSES)
    assert sorted(_records(tmp_path / "c", "defects")) == [0, 1, 2]
    assert not list(d.rglob("x-*")) and not list(d.rglob("y-*"))
    assert again.used == sum(p.stat().st_size for p in d.rglob("*") if p.is_file())
    assert any("removed 2 incomplete record(s)" in r.getMessage() for r in caplog.records)


def test_low_free_space_removes_the_oldest_records_first(tmp_path, caplog):
    cfg = RecordConfig(enabled=True, dir=str(tmp_path), min_free_gb=0)
    rec = Recorder(cfg, "c", CLASSES)
    rec.start()
    _offer_all(rec, range(4))
    rec.close()
    # more free space wanted than the disk has: the camera's old records go first (all but the
    # newest), then the frame is skipped, counted, instead of recording stopping for good
    free = shutil.disk_usage(tmp_path).free
    low = RecordConfig(enabled=True, dir=str(tmp_path), min_free_gb=(free + GB) / GB)
    rec = Recorder(low, "c", CLASSES)
    rec.start()
    with caplog.at_level(logging.WARNING, logger="inspector.recorder"):
        _offer_all(rec, [4])
        rec.close()
    s = rec.snapshot()
    assert s["removed"] == 3 and s["skipped"]["disk_low"] == 1
    assert sorted(_records(tmp_path / "c", "defects")) == [3]
    msgs = [r.getMessage() for r in caplog.records]
    assert any("removed 3 old record(s) to keep record.min_free_gb" in m for m in msgs)
    assert any("less than record.max_gb" in m for m in msgs)  # said at start


def test_every_frame_offered_is_recorded_or_counted_after_a_stop_that_runs_out_of_time(tmp_path):
    rng = np.random.default_rng(0)
    rec = Recorder(RecordConfig(enabled=True, dir=str(tmp_path), png_compression=9, queue_size=8),
                   "c", CLASSES)
    rec.start()
    offered = 0
    for i in range(6):  # large noisy frames at level 9: slow to encode
        f = Frame("c", i, 1_795_000_000_000_000_000 + i * 1_000_000,
                  rng.integers(0, 256, (1500, 1500), np.uint8))
        offered += rec.offer(f, np.ones((1500, 1500), np.uint8), _header(i)) is not None
    rec.close(timeout_s=0.01)
    s = rec.snapshot()
    assert offered == 6
    assert s["skipped"]["shutdown"] >= 1  # the stop came while the writer was busy
    assert sum(s["recorded"].values()) + s["skipped"]["shutdown"] == offered
    # the writer ends after the frame in hand, which it drops at its last rename: the figures said
    # at the stop are what is on disk, with nothing half-written left behind
    rec._thread.join(timeout=30)
    assert not rec._thread.is_alive()
    assert rec.snapshot() == s
    on_disk = [p for p in (tmp_path / "c").rglob("*") if p.is_file() and p.name != ".lock"]
    images = [p for p in on_disk if p.parent.name == "images"]
    assert len(images) == sum(s["recorded"].values())
    assert not [p for p in on_disk if p.name.startswith(".")]
    assert {p.stem for p in on_disk} == {p.stem for p in images}  # no meta or mask without its image
    Recorder(RecordConfig(enabled=True, dir=str(tmp_path)), "c", CLASSES).close()  # the lock is free
    assert rec.offer(_frame(7), np.zeros((16, 24), np.uint8), _header(7)) is None  # closed: counted
    assert rec.snapshot()["skipped"]["shutdown"] == s["skipped"]["shutdown"] + 1


def test_fsync_flushes_each_file_before_its_rename_and_the_folders_after(tmp_path, monkeypatch):
    """A power cut cannot be pulled here, so what ``fsync: true`` promises is checked on the calls
    it makes: every file's data while it still has its hidden name (before the rename), then the
    folders holding the renamed files; an fsync the disk refuses is a counted write error that
    leaves no file behind. Without the option nothing is flushed (the default's cost is nil)."""
    real_fsync = os.fsync
    flushed: list[str] = []

    def spy(fd: int) -> None:
        flushed.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", spy)
    label = np.zeros((16, 24), np.uint8)
    label[2:5, 3:9] = 2
    rec = Recorder(RecordConfig(enabled=True, dir=str(tmp_path), min_free_gb=0, fsync=True), "c", CLASSES)
    rec.start()
    rec.offer(_frame(0), label, _header(0))
    rec.close()
    assert rec.snapshot()["recorded"]["defects"] == 1
    root = tmp_path / "c" / "defects"
    files = sorted(root.glob("*/*"))
    assert [p.parent.name for p in files] == ["images", "masks", "meta"]
    for p in files:
        hidden = str(p.with_name("." + p.name + ".part"))
        assert hidden in flushed, (p, flushed)  # the data went to the disk under the hidden name
        assert flushed.index(hidden) < flushed.index(str(p.parent))  # and before its folder
    # the image is renamed last, so its folder is flushed after the image's data
    assert flushed[-1] == str(root / "images")

    flushed.clear()
    off = Recorder(RecordConfig(enabled=True, dir=str(tmp_path / "off"), min_free_gb=0), "c", CLASSES)
    off.start()
    off.offer(_frame(1), label, _header(1))
    off.close()
    assert off.snapshot()["recorded"]["defects"] == 1 and flushed == []

    def refuse(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fsync", refuse)
    bad = Recorder(RecordConfig(enabled=True, dir=str(tmp_path / "bad"), min_free_gb=0, fsync=True), "c", CLASSES)
    bad.start()
    bad.offer(_frame(2), label, _header(2))
    bad.close()
    s = bad.snapshot()
    assert s["skipped"]["write_error"] == 1 and s["recorded"]["defects"] == 0
    assert not [p for p in (tmp_path / "bad" / "c").rglob("*") if p.is_file() and p.name != ".lock"]


def _thread_nice(tid: int) -> int:
    """A thread's nice value as the kernel reports it (/proc/<pid>/task/<tid>/stat, field 19)."""
    stat = Path(f"/proc/self/task/{tid}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[16])


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux /proc")
def test_the_writer_thread_alone_yields_the_cpu_to_inspection(tmp_path):
    base = os.getpriority(os.PRIO_PROCESS, 0)
    for nice, expected in ((10, min(19, base + 10)), (0, base)):
        rec = Recorder(RecordConfig(enabled=True, dir=str(tmp_path / str(nice)), writer_nice=nice,
                                    min_free_gb=0), "c", CLASSES)
        rec.start()
        try:
            # the thread lowers itself first thing, before its first frame: once a frame is
            # recorded that is done (nice 0 included, where nothing may change), however slowly
            # a loaded box ran the thread
            rec.offer(*_tiny(0))
            deadline = time.monotonic() + 30
            while rec.snapshot()["recorded"]["defects"] == 0:
                assert time.monotonic() < deadline, rec.snapshot()
                time.sleep(0.01)
            assert _thread_nice(rec._thread.native_id) == expected
            assert _thread_nice(threading.get_native_id()) == base  # the caller's is untouched
        finally:
            rec.close()
    with pytest.raises(ConfigError, match="record.writer_nice: Input should be less than or equal to 19"):
        parse_config({"camera_id": "c", "source": {"type": "synthetic"}, "model": {"bundle": "x"},
                      "record": {"writer_nice": 20}}, check_paths=False)


# -- a stop that runs out of time, at the writer's worst moments (each window widened by a sleep
# -- where a real thread could be preempted) ------------------------------------------------------
def _tiny(i: int) -> tuple[Frame, np.ndarray, dict]:
    f = Frame("c", i, 1_795_000_000_000_000_000 + i, np.zeros((16, 24), np.uint8))
    return f, np.zeros((16, 24), np.uint8), {"frame_id": i, "defects": [{"class_id": 1, "class": "inclusion"}]}


def _lock_is_free(folder: Path) -> bool:
    try:
        Recorder(RecordConfig(enabled=True, dir=str(folder)), "c", CLASSES).close()
        return True
    except ConfigError:
        return False


def test_a_frame_the_writer_skipped_is_not_counted_again_by_the_stop(tmp_path, monkeypatch):
    rec = Recorder(RecordConfig(enabled=True, dir=str(tmp_path), min_free_gb=1e6), "c", CLASSES)
    real = rec._skip
    counted, stop_gave_up = threading.Event(), threading.Event()

    def preempted_after_counting(*a, **k):
        real(*a, **k)
        if k.get("writer"):
            counted.set()
            stop_gave_up.wait(30)  # preempted until the stop below has given up on it
    monkeypatch.setattr(rec, "_skip", preempted_after_counting)
    rec.start()
    assert rec.offer(*_tiny(0)) == "defects"
    assert counted.wait(30)  # the writer has counted disk_low and is held
    rec.close(timeout_s=0.1)
    stop_gave_up.set()
    rec._thread.join(30)
    assert not rec._thread.is_alive()
    s = rec.snapshot()
    assert s["skipped"] == {"queue_full": 0, "disk_low": 1, "write_error": 0, "shutdown": 0}
    assert sum(s["recorded"].values()) == 0


def test_the_folder_lock_is_freed_when_the_writer_ends_just_after_the_stop_gave_up(tmp_path):
    from inspector import recorder as module

    rec = Recorder(RecordConfig(enabled=True, dir=str(tmp_path), min_free_gb=0), "c", CLASSES)
    real_write = rec._write
    rec._write = lambda item: (time.sleep(0.3), real_write(item))  # a slow write
    real_get = rec._queue.get
    took_mark, stop_returned = threading.Event(), threading.Event()

    def get(*a, **k):
        item = real_get(*a, **k)
        if item is module._END:
            took_mark.set()
            # the writer, done, is preempted between the end mark and its exit until the stop
            # has given up on it and returned
            stop_returned.wait(30)
        return item
    rec._queue.get = get
    rec.start()
    real_join = rec._thread.join

    def join(timeout=None):
        real_join(timeout)
        if timeout is not None and timeout < 1:
            # close() preempted after its join timed out: the writer finishes and takes the mark
            assert took_mark.wait(30)
    rec._thread.join = join
    rec.offer(*_tiny(0))
    rec.close(timeout_s=0.2)
    stop_returned.set()
    real_join(30)
    assert not rec._thread.is_alive()
    assert rec.snapshot()["recorded"]["defects"] == 1
    assert _lock_is_free(tmp_path)


def test_a_writer_that_emptied_a_full_queue_before_the_end_mark_still_ends(tmp_path):
    rec = Recorder(RecordConfig(enabled=True, dir=str(tmp_path), min_free_gb=0, queue_size=1), "c", CLASSES)
    real_write = rec._write
    writing_0, finish_0 = threading.Event(), threading.Event()

    def write(item):
        if item.header["frame_id"] == 0:
            writing_0.set()
            finish_0.wait(30)  # a slow write, until the stop has found the queue full
        real_write(item)
    rec._write = write
    real_get = rec._queue.get
    gets = []
    waits_again = threading.Event()

    def get(*a, **k):
        gets.append(1)
        if len(gets) == 3:  # both frames taken: the writer waits for what comes next
            waits_again.set()
        return real_get(*a, **k)
    rec._queue.get = get
    rec.start()
    assert rec.offer(*_tiny(0)) == "defects"
    assert writing_0.wait(30)  # the writer has taken frame 0: the queue has room for frame 1
    assert rec.offer(*_tiny(1)) == "defects"  # ... and is full with it, while frame 0 is written
    real_join = rec._thread.join

    def join(timeout=None):
        real_join(timeout)
        if timeout is not None and timeout < 1:
            # the queue was full for the end mark; the writer empties it meanwhile
            finish_0.set()
            assert waits_again.wait(30)
    rec._thread.join = join
    rec.close(timeout_s=0.2)
    real_join(30)
    assert not rec._thread.is_alive()  # it used to wait in get() for good
    assert rec.snapshot()["recorded"]["defects"] == 2
    assert _lock_is_free(tmp_path)


def test_the_figures_said_at_the_stop_stay_when_a_late_folder_flush_fails(tmp_path, monkeypatch):
    real_fsync = os.fsync
    flushing, stop_said = threading.Event(), threading.Event()

    def slow_failing_dir_fsync(fd: int) -> None:
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            # only after the image's rename: slow until the stop has said its figures, then failing
            flushing.set()
            stop_said.wait(30)
            raise OSError(5, "Input/output error")
        real_fsync(fd)
    monkeypatch.setattr(os, "fsync", slow_failing_dir_fsync)
    rec = Recorder(RecordConfig(enabled=True, dir=str(tmp_path), min_free_gb=0, fsync=True), "c", CLASSES)
    rec.start()
    rec.offer(*_tiny(0))
    assert flushing.wait(30)  # the image has landed; its folders' flush is under way
    rec.close(timeout_s=0.1)
    said = rec.snapshot()
    stop_said.set()
    rec._thread.join(30)
    assert not rec._thread.is_alive()
    assert said["recorded"]["defects"] == 1
    assert rec.snapshot()["recorded"] == said["recorded"] and rec.snapshot()["skipped"] == said["skipped"]
    assert sorted(_records(tmp_path / "c", "defects")) == [0]  # on disk, as the figures say


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux /proc")
def test_a_process_already_niced_gets_a_smaller_gap_and_is_told(tmp_path):
    """nice stops at 19: a service started at nice 15 keeps its writer 4 steps below, not 10."""
    import subprocess
    import sys

    script = (
        "import logging, os, time, threading; os.nice(15 - os.nice(0))\n"
        "logging.basicConfig(level=logging.WARNING)\n"
        "from inspector.recorder import Recorder, RecordConfig\n"
        f"rec = Recorder(RecordConfig(enabled=True, dir={str(tmp_path)!r}), 'c', "
        "['background', 'x'])\n"
        "rec.start()\n"
        # the thread lowers itself when it runs: polled, as a niced process on a loaded box may
        # not run it for a while
        "deadline = time.monotonic() + 30\n"
        "while True:\n"
        "    stat = open(f'/proc/self/task/{rec._thread.native_id}/stat').read()\n"
        "    nice = int(stat.rsplit(')', 1)[1].split()[16])\n"
        "    if nice != 15 or time.monotonic() > deadline:\n"
        "        break\n"
        "    time.sleep(0.01)\n"
        "print(nice); rec.close(timeout_s=60)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["19"]
    assert "the writer runs at nice 19, 4 step(s) below inspection's 15, not record.writer_nice 10" \
        in done.stderr
