"""The pipeline end to end on the synthetic strip with real ZeroMQ sockets."""

import threading
import time

import numpy as np
import pytest
import zmq

from conftest import collect
from inspector.config import parse_config
from inspector.frame import Frame
from inspector.pipeline import Pipeline
from inspector.publish import SCHEMA
from inspector.sources.base import Source
from inspector.sources.synthetic import SyntheticConfig, SyntheticSource


def test_subscriber_started_first_gets_every_frame(synthetic_cfg):
    cfg = parse_config(synthetic_cfg(pipeline={"backpressure": True}), "t.yaml")
    got: list = []
    ready = threading.Event()
    t = threading.Thread(target=collect, args=(cfg.publish.endpoint, 40, got),
                         kwargs={"ready": ready, "timeout_s": 30.0})
    t.start()
    ready.wait()
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


def test_wrong_shape_or_dtype_mid_stream_is_dropped_and_loop_goes_on(synthetic_cfg):
    cfg = parse_config(synthetic_cfg(pipeline={"backpressure": True}), "t.yaml")
    good = np.full((128, 512), 120, np.uint8)
    imgs = [good, good, np.zeros((100, 512), np.uint8), good, good.astype(np.float32), good,
            np.zeros((128, 512, 4), np.uint8), good]
    got = []
    with Pipeline(cfg, on_report=got.append, source=ScriptedSource(imgs)) as p:
        c = p.run()
    assert c["grabbed"] == 8 and c["published"] == 5 and c["dropped"]["bad_frame"] == 3
    assert [h["frame_id"] for h in got] == [0, 1, 3, 5, 7]
    assert p.counters.balanced


def test_engine_error_is_counted_and_loop_goes_on(synthetic_cfg):
    cfg = parse_config(synthetic_cfg(pipeline={"backpressure": True}), "t.yaml")
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


def test_slow_subscriber_never_stalls_the_pipeline(synthetic_cfg):
    # raw masks are 64 KB each, so a subscriber that never reads fills its queues quickly
    cfg = parse_config(synthetic_cfg(pipeline={"backpressure": True},
                                     publish={"sndhwm": 2, "mask_encoding": "raw"}), "t.yaml")
    ctx = zmq.Context.instance()
    stuck = ctx.socket(zmq.SUB)
    stuck.setsockopt(zmq.RCVHWM, 2)
    stuck.setsockopt(zmq.RCVBUF, 4096)
    stuck.setsockopt(zmq.SUBSCRIBE, b"")
    stuck.connect(cfg.publish.endpoint)
    try:
        with Pipeline(cfg) as p:
            t0 = time.monotonic()
            c = p.run(frames=200)
            took = time.monotonic() - t0
    finally:
        stuck.close(0)
    assert c["grabbed"] == 200 and p.counters.balanced
    assert c["dropped"]["subscriber_slow"] > 0
    assert took < 60


def test_subscriber_that_goes_away_mid_stream(synthetic_cfg):
    cfg = parse_config(synthetic_cfg(source={"fps": 50}), "t.yaml")
    got: list = []
    t = threading.Thread(target=collect, args=(cfg.publish.endpoint, 10, got), kwargs={"timeout_s": 30.0})
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
        synthetic_cfg, backpressure):
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
    assert c["grabbed"] == 12 and p.counters.balanced, c
    assert c["published"] + sum(c["dropped"].values()) == 12


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
        src.read()  # late: delivered at once
        t0 = time.monotonic()
        src.read()
        src.read()
        assert time.monotonic() - t0 >= 0.08  # two periods, not a burst
    finally:
        src.close()
