"""The pipeline end to end on the synthetic strip with real ZeroMQ sockets."""

import logging
import threading
import time

import numpy as np
import pytest
import zmq

from conftest import collect, run_cli, subscribed, write_config
from inspector.config import parse_config
from inspector.frame import Frame
from inspector.pipeline import Pipeline
from inspector.publish import SCHEMA
from inspector.sources.base import Source
from inspector.sources.synthetic import SyntheticConfig, SyntheticSource

#: the first frame waits until the test's subscriber is subscribed (the product's own option): a
#: SUB that connects before the bind retries 100-200 ms later, and the XPUB drops what it sends
#: before the subscription arrives while still counting it as published
WAIT_FOR_SUBSCRIBER = {"wait_for_subscribers": 1, "wait_timeout_s": 60}


def test_subscriber_started_first_gets_every_frame(synthetic_cfg):
    cfg = parse_config(synthetic_cfg(pipeline={"backpressure": True}, publish=WAIT_FOR_SUBSCRIBER), "t.yaml")
    got, t = subscribed(cfg.publish.endpoint, 40, timeout_s=60.0)
    with Pipeline(cfg) as p:
        counters = p.run(frames=40)
    t.join()
    assert counters["grabbed"] == 40 and counters["published"] == 40
    assert [m.header["frame_id"] for m in got] == list(range(40))
    h = got[-1].header
    assert h["schema"] == SCHEMA and h["camera_id"] == "test" and h["shape"] == [128, 512]
    for key in ("t_capture_ns", "t_publish_ns", "strip_pos_mm", "mask_encoding", "defects",
                "timings_ms", "counters"):
        assert key in h
    assert h["t_publish_ns"] >= h["t_capture_ns"]
    assert {"queue", "preprocess", "engine", "postprocess", "encode", "e2e"} <= set(h["timings_ms"])
    for m in got:
        mask = m.mask()
        assert mask.shape == (128, 512) and mask.dtype == np.uint8
        assert int((mask > 0).sum()) == sum(d["area_px"] for d in m.header["defects"]) or \
            m.header["defects_total"] > len(m.header["defects"])


class ScriptedSource(Source):
    """Replays given images through the real pipeline (to inject bad frames mid-stream)."""

    def __init__(self, images):
        self.camera_id = "scripted"
        self.images = list(images)
        self.i = 0

    def open(self):
        pass

    def read(self):
        if self.i >= len(self.images):
            return None
        img = self.images[self.i]
        self.i += 1
        return Frame("scripted", self.i - 1, time.time_ns(), img)

    def close(self):
        pass


def dropped_frame_logs(caplog, what: str) -> list[str]:
    """The ERROR lines of the pipeline's BurstLog ``what`` (e.g. "frame dropped")."""
    return [r.getMessage() for r in caplog.records
            if r.name == "inspector.pipeline" and r.levelno == logging.ERROR
            and r.getMessage().startswith(what + ": ")]


def test_wrong_shape_or_dtype_mid_stream_is_dropped_and_loop_goes_on(synthetic_cfg, caplog):
    cfg = parse_config(synthetic_cfg(pipeline={"backpressure": True}), "t.yaml")
    good = np.full((128, 512), 120, np.uint8)
    imgs = [good, good, np.zeros((100, 512), np.uint8), good, good.astype(np.float32), good,
            np.zeros((128, 512, 4), np.uint8), good]
    got = []
    caplog.set_level(logging.ERROR, logger="inspector.pipeline")
    with Pipeline(cfg, on_report=got.append, source=ScriptedSource(imgs)) as p:
        c = p.run()
    assert c["grabbed"] == 8 and c["published"] == 5 and c["dropped"]["bad_frame"] == 3
    assert [h["frame_id"] for h in got] == [0, 1, 3, 5, 7]
    assert p.counters.balanced
    # one line for the burst (frames 4 and 6 are counted, not logged), naming the frame, the
    # shape it had and the shape expected; the burst's count when the run ends (it is shorter
    # than a report's 10 s, so no later failure would have said it)
    assert dropped_frame_logs(caplog, "frame dropped") == [
        "frame dropped: frame 2: shape (100, 512), expected (128, 512) (set by frame 0)",
        "frame dropped: +2 more since last report"]
    # the other two kinds of bad frame, as the grab stage's check words them
    from inspector.errors import FrameError
    with pytest.raises(FrameError, match=r"^frame 9: dtype float32, expected uint8$"):
        p._check_frame(Frame("scripted", 9, 0, good.astype(np.float32)))
    with pytest.raises(FrameError, match=r"^frame 9: shape \(128, 512, 4\), expected HxW or HxWx3$"):
        p._check_frame(Frame("scripted", 9, 0, np.zeros((128, 512, 4), np.uint8)))


def test_a_burst_of_failures_is_logged_once_then_as_a_count(monkeypatch, caplog):
    # A failing camera or engine at line rate must not flood journald: the first failure of a
    # burst is logged naming its frame, the rest are counted into the next report.
    import types

    import inspector.pipeline as pipeline_module
    from inspector.pipeline import BurstLog
    now = [1000.0]
    monkeypatch.setattr(pipeline_module, "time", types.SimpleNamespace(monotonic=lambda: now[0]))
    caplog.set_level(logging.ERROR, logger="inspector.pipeline")
    log = BurstLog("frame dropped", every_s=10.0)
    for fid in range(50):  # 50 bad frames within 5 s
        log(fid, ValueError("bad"))
        now[0] += 0.1
    assert dropped_frame_logs(caplog, "frame dropped") == ["frame dropped: frame 0: bad"]
    now[0] = 1010.0  # every_s after the first report: the next failure is reported with the count
    log(50, ValueError("bad"))
    log(51, ValueError("bad"))
    now[0] = 1100.0  # a new burst long after
    log(None, ValueError("source gave an incomplete frame 77"))  # no frame id: the message names it
    assert dropped_frame_logs(caplog, "frame dropped") == [
        "frame dropped: frame 0: bad",
        "frame dropped: frame 50: bad (+49 more since last report)",
        "frame dropped: source gave an incomplete frame 77 (+1 more since last report)"]


def test_engine_error_is_counted_and_loop_goes_on(synthetic_cfg, caplog):
    cfg = parse_config(synthetic_cfg(pipeline={"backpressure": True}), "t.yaml")
    caplog.set_level(logging.ERROR, logger="inspector.pipeline")
    with Pipeline(cfg) as p:
        real = p.model.adapter.infer
        calls = {"n": 0}

        def flaky(img):
            calls["n"] += 1
            if calls["n"] in (3, 4):
                raise RuntimeError("simulated engine fault")
            return real(img)
        p.model.adapter.infer = flaky
        c = p.run(frames=10)
    assert c["dropped"]["engine_error"] == 2 and c["published"] == 8 and p.counters.balanced
    # frames 2 and 3 fail in one burst: one line, naming the first, and its count at the end
    assert dropped_frame_logs(caplog, "engine error, frame dropped") == [
        "engine error, frame dropped: frame 2: simulated engine fault",
        "engine error, frame dropped: +1 more since last report"]


def test_slow_subscriber_never_stalls_the_pipeline(synthetic_cfg):
    # raw masks are 64 KB each, so a subscriber that never reads fills its queues quickly
    cfg = parse_config(synthetic_cfg(pipeline={"backpressure": True},
                                     publish={"sndhwm": 2, "mask_encoding": "raw", **WAIT_FOR_SUBSCRIBER}),
                       "t.yaml")
    ctx = zmq.Context.instance()
    stuck = ctx.socket(zmq.SUB)
    stuck.setsockopt(zmq.RCVHWM, 2)
    stuck.setsockopt(zmq.RCVBUF, 4096)
    stuck.setsockopt(zmq.SUBSCRIBE, b"")
    stuck.connect(cfg.publish.endpoint)
    try:
        with Pipeline(cfg) as p:
            c = p.run(frames=200)
    finally:
        stuck.close(0)
    # every frame went through: the ones the stuck subscriber could not take are counted, not
    # waited for (a pipeline that waited would never end: the subscriber never reads)
    assert c["grabbed"] == 200 and p.counters.balanced
    assert c["dropped"]["subscriber_slow"] > 0 and c["published"] + c["dropped"]["subscriber_slow"] == 200, c


def test_subscriber_that_goes_away_mid_stream(synthetic_cfg):
    cfg = parse_config(synthetic_cfg(source={"fps": 50}, publish=WAIT_FOR_SUBSCRIBER), "t.yaml")
    got: list = []
    t = threading.Thread(target=collect, args=(cfg.publish.endpoint, 10, got), kwargs={"timeout_s": 60.0})
    t.start()
    with Pipeline(cfg) as p:
        c = p.run(frames=60)
    t.join()
    assert len(got) == 10
    assert c["grabbed"] == 60 and p.counters.balanced


def test_queue_full_drops_are_counted_when_engine_is_slower_than_camera(synthetic_cfg):
    cfg = parse_config(synthetic_cfg(pipeline={"queue_size": 1}), "t.yaml")
    with Pipeline(cfg) as p:
        real = p.model.adapter.infer

        def slow(img):
            time.sleep(0.02)
            return real(img)
        p.model.adapter.infer = slow
        c = p.run(frames=80)
    assert c["dropped"]["queue_full"] > 0 and p.counters.balanced


def test_stop_drains_queued_frames(synthetic_cfg):
    cfg = parse_config(synthetic_cfg(source={"fps": 100}), "t.yaml")
    with Pipeline(cfg) as p:
        c = p.run(seconds=1.0)
    assert c["grabbed"] > 10 and c["grabbed"] == c["published"] + sum(c["dropped"].values())


class DyingSource(SyntheticSource):
    """A synthetic camera that 'disconnects' once, like a pulled cable."""

    def __init__(self):
        super().__init__(SyntheticConfig(width=256, height=128, fps=0), "dying")
        self.reads = 0
        self.opens = 0

    def open(self):
        self.opens += 1
        super().open()

    def read(self):
        from inspector.errors import SourceError
        self.reads += 1
        if self.reads == 5:
            raise SourceError("camera dying: cable pulled")
        return super().read()


def test_lost_camera_is_reopened_and_reported(synthetic_cfg):
    cfg = parse_config(synthetic_cfg(pipeline={"reopen_backoff_s": [0.05, 0.2]}), "t.yaml")
    src = DyingSource()
    with Pipeline(cfg, source=src) as p:
        c = p.run(frames=20)
    assert c["source_errors"] == 1 and c["reopens"] == 1 and src.opens == 2
    assert c["published"] + sum(c["dropped"].values()) == 20


def test_a_replayed_frame_of_another_size_names_its_file_and_what_set_the_shape(synthetic_cfg, tmp_path, caplog):
    import cv2

    for name, h in (("a.png", 100), ("b.png", 128), ("c.png", 100)):
        cv2.imwrite(str(tmp_path / name), np.full((h, 512), 120, np.uint8))
    raw = synthetic_cfg(pipeline={"backpressure": True})
    raw["source"] = {"type": "replay", "path": str(tmp_path), "fps": 0, "color": "gray"}
    cfg = parse_config(raw, "t.yaml")
    caplog.set_level(logging.INFO, logger="inspector.pipeline")
    with Pipeline(cfg, on_report=lambda r: None) as p:
        c = p.run()
    assert c["dropped"]["bad_frame"] == 1
    text = caplog.text
    assert "frame shape locked to (100, 512) by a.png (frame 0) (pipeline.frame sets it instead)" in text
    assert "frame 1 (b.png): shape (128, 512), expected (100, 512) (set by a.png (frame 0))" in text


class SilentAfterOpenSource(ScriptedSource):
    """Opens every time but sends nothing for a while (a stopped trigger or encoder)."""

    def __init__(self, images, silent_reads: int):
        super().__init__(images)
        self.silent = silent_reads
        self.states: list[str] = []   # the pipeline's camera state at each read
        self.pipeline: Pipeline | None = None

    def read(self):
        self.states.append(self.pipeline.camera_state)
        if self.silent > 0:
            self.silent -= 1
            from inspector.errors import SourceError
            raise SourceError("timed out without a frame")
        return super().read()


def test_a_reopened_camera_is_back_only_once_it_delivers_a_frame(synthetic_cfg):
    cfg = parse_config(synthetic_cfg(pipeline={"reopen_backoff_s": [0.01, 0.02]}), "t.yaml")
    src = SilentAfterOpenSource([np.full((128, 512), 128, np.uint8)] * 3, silent_reads=5)
    p = Pipeline(cfg, source=src)
    src.pipeline = p
    with p:
        c = p.run()
    # ok at the first read, then down through all five reopens (no flapping), ok once frames come
    assert src.states[:7] == ["ok"] + ["down"] * 5 + ["ok"]
    assert c["source_errors"] == 5 and c["reopens"] == 5 and c["published"] == 3


def test_pipeline_on_the_viky_genicam_camera(synthetic_cfg):
    from inspector.sources.genicam import default_viky_cti
    if default_viky_cti() is None:
        pytest.skip("viky.cti not found in the installed genicam package")
    raw = synthetic_cfg()
    raw["source"] = {"type": "genicam", "cti": "builtin:viky", "serial": "1", "pixel_format": "Mono8",
                     "width": 320, "height": 160, "fps": 20}
    raw["pipeline"] = {"queue_size": 16}
    cfg = parse_config(raw, "t.yaml")
    got = []
    with Pipeline(cfg, on_report=got.append) as p:
        c = p.run(frames=20)
    assert c["grabbed"] == 20 and p.counters.balanced
    assert c["published"] >= 10  # a loaded 2-core box may drop some; they are counted
    assert all(h["shape"] == [160, 320] for h in got)
    ids = [h["frame_id"] for h in got]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)


class DeadSource(DyingSource):
    """A camera that dies for good after a few frames: no reopen asked for."""

    def read(self):
        from inspector.errors import SourceError
        self.reads += 1
        if self.reads > 12:
            raise SourceError("camera dying: cable pulled")
        return SyntheticSource.read(self)


@pytest.mark.parametrize("backpressure", [True, False])
def test_camera_lost_without_reopen_still_publishes_or_counts_every_grabbed_frame(
        synthetic_cfg, backpressure, caplog):
    caplog.set_level(logging.ERROR, logger="inspector.pipeline")
    cfg = parse_config(synthetic_cfg(pipeline={"reopen_source": False, "queue_size": 8,
                                               "backpressure": backpressure}), "t.yaml")
    with Pipeline(cfg, source=DeadSource()) as p:
        real = p.model.adapter.infer

        def slow(img):  # frames still queued when the camera dies
            time.sleep(0.03)
            return real(img)
        p.model.adapter.infer = slow
        with pytest.raises(Exception, match="cable pulled"):
            p.run(frames=100)
        c = p.counters.snapshot()
        state = p.camera_state  # what the last status line says
    assert c["grabbed"] == 12 and p.counters.balanced, c
    assert c["published"] + sum(c["dropped"].values()) == 12
    # the documented end of a run without reopening: one line, no traceback, camera down
    assert "camera test lost, not reopened (pipeline.reopen_source is off): " in caplog.text
    assert not any(r.exc_info for r in caplog.records) and state == "down"


class StageDeath(BaseException):
    """Not an Exception: escapes the per-frame handlers and kills the stage thread."""


@pytest.mark.parametrize("stage", ["infer", "publish"])
def test_a_dying_stage_ends_the_run_and_counts_every_frame_it_could_not_carry(
        synthetic_cfg, stage):
    cfg = parse_config(synthetic_cfg(pipeline={"queue_size": 8, "backpressure": True}), "t.yaml")
    with Pipeline(cfg) as p:
        calls = {"n": 0}
        if stage == "infer":
            real = p.model.adapter.infer

            def infer(img):
                calls["n"] += 1
                if calls["n"] == 6:
                    raise StageDeath("engine thread killed")
                time.sleep(0.01)
                return real(img)
            p.model.adapter.infer = infer
        else:
            real_send = p.publisher.send

            def send(header, mask):
                calls["n"] += 1
                if calls["n"] == 6:
                    raise zmq.ZMQError(zmq.ENOTSOCK, "publisher socket gone")
                return real_send(header, mask)
            p.publisher.send = send
        with pytest.raises((StageDeath, zmq.ZMQError)):
            p.run(frames=200)  # returns (does not hang) once the stage has died
        c = p.counters.snapshot()
    assert c["published"] == 5 and c["dropped"]["stage_failed"] >= 1, c
    assert p.counters.balanced, c


def test_synthetic_source_keeps_its_cadence_after_a_stall():
    # After a late read the next frame is due one period later, not at once: the demo's own
    # source must not burst frames into the queue after the consumer hiccups.
    src = SyntheticSource(SyntheticConfig(fps=20.0, height=64, width=64), camera_id="cam")
    src.open()
    try:
        src.read()
        time.sleep(0.3)  # consumer stalls for 6 frame periods
        # t0 before the late read: the next frames are due one and two periods after that read's
        # own clock reading, so this bound holds however long the render or a preemption takes
        t0 = time.monotonic()
        src.read()  # late: delivered at once
        src.read()
        src.read()
        assert time.monotonic() - t0 >= 2 * 0.05 - 1e-6  # two periods, not a burst (1e-6: float rounding)
    finally:
        src.close()


class OpenTimedSource(ScriptedSource):
    """Notes when it is opened and read, in one list of events with the publisher's waits."""

    def __init__(self, images, events: list):
        super().__init__(images)
        self.events = events
        self.t_open: float | None = None

    def open(self):
        self.t_open = time.monotonic()
        self.events.append("open")

    def read(self):
        self.events.append("read")
        return super().read()


def test_camera_opens_after_the_subscriber_grace_so_no_stale_frames_pile_up(synthetic_cfg, monkeypatch):
    # A streaming camera buffers (or, past its buffers, loses) what it captures between open()
    # and the first read; the publisher's connect grace used to sit right there.
    from inspector.publish import Publisher
    events: list = []
    real_wait, real_poll = Publisher.wait_ready, Publisher.poll_subscriptions

    def wait_ready(self, stop=None):
        events.append("wait_ready")
        n = real_wait(self, stop)
        events.append("ready")
        return n

    def poll_subscriptions(self, timeout_s=0.0):
        if timeout_s > 0:
            events.append("subscriber wait")
        return real_poll(self, timeout_s)
    monkeypatch.setattr(Publisher, "wait_ready", wait_ready)
    monkeypatch.setattr(Publisher, "poll_subscriptions", poll_subscriptions)
    cfg = parse_config(synthetic_cfg(publish={"connect_grace_s": 1.0}), "t.yaml")
    src = OpenTimedSource([np.full((128, 512), 120, np.uint8)] * 3, events)
    t0 = time.monotonic()
    with Pipeline(cfg, source=src) as p:
        c = p.run()
    assert c["published"] == 3
    assert src.t_open - t0 >= 1.0  # the grace was given, before the camera opened
    # the grace (a wait on subscribers) ends before the camera opens, and nothing waits for
    # subscribers between the open and the first read
    first_read = events.index("read")
    assert events[:first_read] == ["wait_ready", "subscriber wait", "ready", "open"], events


def _viky_cfg(synthetic_cfg, **pipeline):
    from inspector.sources.genicam import default_viky_cti
    if default_viky_cti() is None:
        pytest.skip("viky.cti not found in the installed genicam package")
    raw = synthetic_cfg(pipeline={"queue_size": 16, **pipeline},
                        geometry={"mm_per_px_across": 1.0, "mm_per_px_along": 0.5})
    raw["source"] = {"type": "genicam", "cti": "builtin:viky", "serial": "1", "pixel_format": "Mono8",
                     "width": 256, "height": 128, "fps": 20}
    return parse_config(raw, "t.yaml")


def _wait_for(p: Pipeline, pred, what: str, timeout: float = 15.0) -> None:
    end = time.monotonic() + timeout
    while not pred(p.counters.snapshot()):
        assert p.error is None, f"pipeline died waiting for {what}: {p.error!r}"
        assert time.monotonic() < end, f"timed out waiting for {what}: {p.counters.snapshot()}"
        time.sleep(0.02)


def _wait_producer_buffers_full(src, timeout: float = 30.0) -> None:
    """Until every buffer announced to the GenTL producer holds a frame nobody has fetched."""
    ds = src._ia.data_streams[0]
    end = time.monotonic() + timeout
    while ds.num_awaiting_delivery < ds.num_announced:
        assert time.monotonic() < end, (ds.num_awaiting_delivery, ds.num_announced)
        time.sleep(0.01)


def test_frames_the_camera_lost_are_counted_and_placed_on_the_strip(synthetic_cfg, caplog):
    # The grab stage stalls until viky's buffers are full, then 1 s more (20 frame periods at
    # 20 fps): the producer drops what it makes meanwhile. Those frames were never grabbed, so
    # they are camera_skipped, not a drop reason, and the positions (from
    # geometry.mm_per_px_along) leave room for them.
    from inspector.metrics import Metrics, MetricsConfig

    cfg = _viky_cfg(synthetic_cfg)
    got: list = []
    with caplog.at_level(logging.ERROR, logger="inspector.pipeline"):
        with Pipeline(cfg, on_report=got.append) as p:
            p.start(frames=30)
            _wait_for(p, lambda c: c["published"] >= 4, "first frames")
            with p.source._lock:  # what a long GC pause or a blocked grab thread does
                # the producer's buffers fill first (seen, not guessed); each frame it makes
                # after that, for the next second, is lost
                _wait_producer_buffers_full(p.source)
                time.sleep(1.0)
            assert p.wait(20)
            c = p.counters.snapshot()
            metrics = Metrics(MetricsConfig(), "test")
            metrics.bind(pipeline=p)
            text = metrics.text()
    assert p.error is None and c["grabbed"] == 30 and p.counters.balanced, c
    # at least one: how many the producer thread makes in that second depends on the box's load
    assert c["camera_skipped"] > 0, c
    assert got[-1]["counters"]["camera_skipped"] == c["camera_skipped"]
    assert f'inspector_camera_skipped_frames_total{{camera="test"}} {float(c["camera_skipped"])}' in text
    assert "frames lost in the camera" in caplog.text
    # every frame id step and every frame the camera lost is one frame length (128 rows x 0.5 mm)
    first, last = got[0], got[-1]
    span = (last["strip_pos_mm"] - first["strip_pos_mm"]) / 64.0
    assert span == last["frame_id"] - first["frame_id"] + c["camera_skipped"], [h["strip_pos_mm"] for h in got]


def test_reopen_that_fails_while_configuring_the_camera_is_retried(synthetic_cfg):
    # A reopen whose node write fails with something other than a GenApi error (here a TypeError
    # from the bindings) used to escape the reopen loop, which only catches SourceError, and kill
    # the grab stage for good.
    cfg = _viky_cfg(synthetic_cfg, reopen_backoff_s=[0.05, 0.1])
    with Pipeline(cfg) as p:
        p.start()
        _wait_for(p, lambda c: c["published"] >= 3, "first frames")
        src = p.source
        good = src.cfg
        with src._lock:  # between two fetches: the safe way to pull the device away
            src.cfg = good.model_copy(update={"width": 256.5})
            src._ia.stop()
            src._ia.destroy()
        _wait_for(p, lambda c: c["source_errors"] >= 3, "failed reopens")
        assert all(t.is_alive() for t in p._threads) and p.camera_state == "down"
        src.cfg = good
        before = p.counters.snapshot()["published"]
        _wait_for(p, lambda c: c["reopens"] >= 1 and c["published"] >= before + 3, "frames after the reopen")
        p.stop()
        assert p.wait(10)
    assert p.error is None and p.counters.balanced


def test_fps_falls_to_zero_when_frames_stop():
    # The rate of the last frames alone stayed at 20 fps for ever after the camera went down:
    # the status line and inspector_fps must show the stream has stopped.
    from inspector.pipeline import Stats
    st = Stats(window=20)
    for i in range(20):
        st.add(100.0 + i * 0.05, 10.0, 0)  # 20 fps, last frame at t = 100.95
    assert st.summary(now=100.96)["fps"] == pytest.approx(20.0)
    assert 0 < st.summary(now=101.5)["fps"] < 20.0   # a few intervals late: falling
    assert st.summary(now=108.0)["fps"] == 0.0       # seconds without a frame: stopped
    assert st.summary(now=108.0)["p50_ms"] == 10.0   # the last frames' latency stays readable


def test_a_configured_frame_shape_the_source_never_delivers_stops_with_a_config_error(synthetic_cfg):
    """pipeline.frame 1200 wide, a source 512 wide: ten frames are dropped, counted, then the run
    ends naming the key; `check` refuses it at once; the daemon exits 2 (not restarted)."""
    from inspector.errors import ConfigError
    from inspector.pipeline import SHAPE_MISSES_FATAL

    raw = synthetic_cfg(pipeline={"backpressure": True, "frame": {"height": 128, "width": 1200}})
    cfg = parse_config(raw, "t.yaml")
    with Pipeline(cfg, on_report=lambda r: None) as p:
        with pytest.raises(ConfigError, match=r"t.yaml: pipeline.frame: the first 10 frames are "
                                              r"\[128, 512\], not \[128, 1200\]"):
            p.run()
        c = p.counters.snapshot()
    assert c["grabbed"] == SHAPE_MISSES_FATAL == c["dropped"]["bad_frame"] and c["published"] == 0


def test_a_shape_change_after_matching_frames_is_a_counted_drop_not_a_stop(synthetic_cfg):
    cfg = parse_config(synthetic_cfg(pipeline={"backpressure": True, "frame": {"height": 128, "width": 512}}),
                       "t.yaml")
    good, other = np.full((128, 512), 120, np.uint8), np.zeros((128, 640), np.uint8)
    with Pipeline(cfg, on_report=lambda r: None, source=ScriptedSource([good] + [other] * 15 + [good])) as p:
        c = p.run()
    assert c["grabbed"] == 17 and c["published"] == 2 and c["dropped"]["bad_frame"] == 15


def test_check_and_daemon_refuse_a_frame_shape_the_source_never_delivers(synthetic_cfg, tmp_path):
    cfg = write_config(tmp_path / "frame.yaml",
                       synthetic_cfg(pipeline={"frame": {"height": 128, "width": 1200}}))
    done = run_cli("check", "--config", str(cfg))
    assert done.returncode == 2
    assert (f"{cfg}: pipeline.frame: the source delivers [128, 512] frames, not [128, 1200]"
            in done.stderr)
    done = run_cli("daemon", "--config", str(cfg), timeout=180)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "pipeline.frame: the first 10 frames are [128, 512], not [128, 1200]" in done.stderr


def test_an_unreadable_frame_is_named_even_inside_a_burst_of_wrong_shapes(synthetic_cfg, caplog):
    """Each kind of drop has its own burst: a file that cannot be read is named, not hidden behind
    the frames of another shape logged just before it."""
    from inspector.errors import FrameError

    class Mixed(ScriptedSource):
        def read(self):
            if self.i == 2:
                self.i += 1
                raise FrameError("cannot read image /data/zzz.jpg: not an image")
            return super().read()

    cfg = parse_config(synthetic_cfg(pipeline={"backpressure": True}), "t.yaml")
    good, odd = np.full((128, 512), 120, np.uint8), np.zeros((100, 512), np.uint8)
    caplog.set_level(logging.ERROR, logger="inspector.pipeline")
    with Pipeline(cfg, on_report=lambda r: None, source=Mixed([good, odd, good, odd, good])) as p:
        c = p.run()
    assert c["dropped"]["bad_frame"] == 2 and c["dropped"]["incomplete_frame"] == 1
    assert dropped_frame_logs(caplog, "frame dropped") == [
        "frame dropped: frame 1: shape (100, 512), expected (128, 512) (set by frame 0)",
        "frame dropped: cannot read image /data/zzz.jpg: not an image",
        "frame dropped: +1 more since last report"]
