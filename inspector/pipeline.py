"""The hot path: grab -> infer -> post-process and publish, as three threads.

Stages are joined by bounded queues, so throughput is set by the slowest stage. Frames are only
ever dropped at the entrance (queue full), where a stage fails on one frame, or, when a stage
itself dies, as the frames it can no longer carry (``stage_failed``); every grabbed frame ends
either published or counted as dropped with a reason, so at every stop
``grabbed == published + sum(dropped.values())``, including after a camera that is not to be
reopened is lost: the frames already grabbed are still published.

Frames the camera or its producer lost before the grab stage fetched them (a GenICam device frame
id that jumps) were never grabbed, so they are not a drop reason: counting them as grabbed and
dropped would make ``grabbed`` disagree with the frame ids and the frames the source delivered.
They are ``camera_skipped``, a counter of their own beside ``source_errors``, in every header's
counters and in Prometheus, and each burst of them is logged.

Example::

    cfg = load_config("configs/demo.yaml")
    with Pipeline(cfg) as p:          # loads model, binds publisher, opens source, warms up
        p.run(frames=100)             # returns once 100 frames are grabbed and drained
        print(p.counters.snapshot())
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from inspector.bundle import Bundle, load_bundle
from inspector.config import InspectorConfig
from inspector.engines import make_engine
from inspector.errors import BundleError, ConfigError, FrameError, SourceError
from inspector.flatfield import FlatField
from inspector.frame import Frame
from inspector.models import ModelAdapter, ModelOutput, make_adapter
from inspector.postprocess import (RECIPE_KEYS, Geometry, PostprocessConfig, Postprocessor, keys_unused_by,
                                   recipe_misfit, shadowed_threshold)
from inspector.publish import SCHEMA, Publisher, encode_mask, region_summary
from inspector.recorder import Recorder
from inspector.sources import Source, make_source

log = logging.getLogger(__name__)

#: frames of another shape than ``pipeline.frame`` at the start, none matching, before the
#: pipeline stops with a config error (a few: a camera's first frames may still be settling)
SHAPE_MISSES_FATAL = 10

DROP_REASONS = ("queue_full", "incomplete_frame", "bad_frame", "engine_error", "postprocess_error",
                "subscriber_slow", "stage_failed")
_END = object()


class Counters:
    """Frame accounting shared by the stages."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._send_lock = threading.Lock()  # publish_with against abandon
        self.grabbed = 0
        self.published = 0
        self.dropped = {r: 0 for r in DROP_REASONS}
        self.source_errors = 0
        self.reopens = 0
        self.camera_skipped = 0  # lost before the source fetched them; not in grabbed (module docs)
        self.frozen = False      # set at a forced exit: the figures are final (Pipeline.count_abandoned)

    def grab(self) -> None:
        with self._lock:
            if not self.frozen:
                self.grabbed += 1

    def camera_skip(self, n: int) -> None:
        with self._lock:
            self.camera_skipped += n

    def publish_with(self, send: Callable[[], bool]) -> bool | None:
        """``send()`` and count the frame published if it went, as one step against
        :meth:`abandon`: once the counters are frozen nothing is sent (None), so a frame a
        forced exit counted as ``stage_failed`` is never delivered as well. The send holds a lock
        of its own, not the counters': a send can wait (a stuck subscriber's reset), and the
        grab stage, the status line and /metrics must not wait with it."""
        with self._send_lock:
            if self.frozen:
                return None
            sent = send()
            if sent:
                with self._lock:
                    self.published += 1
            return sent

    def drop(self, reason: str) -> None:
        with self._lock:
            if not self.frozen:
                self.dropped[reason] += 1

    def abandon(self) -> int:
        """Count what is still inside the pipeline as ``stage_failed`` and freeze the counters, so
        a stage thread that finishes its frame later cannot count it a second time. Returns how
        many frames were still inside."""
        with self._send_lock, self._lock:  # after a send under way: it is counted, or not sent
            n = self.grabbed - self.published - sum(self.dropped.values())
            if n > 0:
                self.dropped["stage_failed"] += n
            self.frozen = True
            return max(n, 0)

    def snapshot(self) -> dict:
        with self._lock:
            return {"grabbed": self.grabbed, "published": self.published,
                    "dropped": dict(self.dropped), "source_errors": self.source_errors,
                    "reopens": self.reopens, "camera_skipped": self.camera_skipped}

    @property
    def balanced(self) -> bool:
        with self._lock:
            return self.grabbed == self.published + sum(self.dropped.values())


class BurstLog:
    """Logs the first failure of a burst and then a count, not one line per frame."""

    def __init__(self, what: str, every_s: float = 10.0):
        self.what = what
        self.every_s = every_s
        self._last = 0.0
        self._quiet = 0

    def __call__(self, frame_id: int | None, err: BaseException) -> None:
        now = time.monotonic()
        if now - self._last >= self.every_s:
            more = f" (+{self._quiet} more since last report)" if self._quiet else ""
            # None: the source failed before it had a frame id; its message names the frame (as a
            # frame check's own message does: "frame 2: shape ...", not "frame 2: frame 2: ...")
            text = str(err)
            where = (f"frame {frame_id}: " if frame_id is not None
                     and not text.startswith(f"frame {frame_id}:") else "")
            log.error("%s: %s%s%s", self.what, where, text, more)
            self._last = now
            self._quiet = 0
        else:
            self._quiet += 1

    def tick(self) -> None:
        """After a frame that went through: a burst's count is said once its window has passed,
        not only at its next failure (which may never come)."""
        if self._quiet and time.monotonic() - self._last >= self.every_s:
            self.flush()

    def flush(self) -> None:
        """Say the count of failures not logged yet (at a stage's end, or by :meth:`tick`)."""
        if self._quiet:
            log.error("%s: +%d more since last report", self.what, self._quiet)
            self._quiet = 0
            self._last = time.monotonic()


@dataclass
class LoadedModel:
    bundle: Bundle
    adapter: ModelAdapter
    post: Postprocessor
    backend: str


def load_model(cfg: InspectorConfig) -> LoadedModel:
    """Bundle + engine + adapter + post-processing for ``cfg`` (fails fast with clear errors)."""
    try:
        bundle = load_bundle(cfg.resolve(cfg.model.bundle))
    except BundleError as e:
        # the file is named; so are the config and its key, which the line engineer edits to
        # point at another bundle
        raise BundleError(f"{cfg.source_file}: model.bundle: {e}") from None
    merged = bundle.spec.postprocess.model_dump() | cfg.model.postprocess
    try:
        pp = PostprocessConfig.model_validate(merged)
        post = Postprocessor(pp, bundle.spec.classes)
    except Exception as e:  # pydantic ValidationError or our ValueError
        errs = getattr(e, "errors", None)
        if callable(errs):
            err = errs()[0]
            key = "model.postprocess." + ".".join(str(p) for p in err["loc"])
            raise ConfigError(cfg.source_file, key, err["msg"]) from None
        raise ConfigError(cfg.source_file, "model.postprocess", str(e)) from None
    shadowed = shadowed_threshold(pp, cfg.model.postprocess, bundle.spec.classes)
    if shadowed:
        raise ConfigError(cfg.source_file, "model.postprocess.threshold", shadowed)
    unused = keys_unused_by(pp.type, cfg.model.postprocess)
    if unused:
        # e.g. `threshold: 0.95` against a residual model: accepted, it would change nothing, and
        # the engineer raising it to stop false alarms would see nothing happen
        raise ConfigError(cfg.source_file, f"model.postprocess.{unused[0]}",
                          f"the {pp.type} post-processing of {bundle.path.name} does not read it; "
                          f"it reads {', '.join(RECIPE_KEYS[pp.type])} and min_area_px, "
                          "connectivity, max_defects")
    engine = make_engine(cfg.model.engine, bundle.graph_path("model"), cfg.source_file)
    adapter = make_adapter(bundle, engine, cfg.model.max_batch)
    misfit = recipe_misfit(pp.type, adapter.outputs)
    if misfit:
        # found at load, not as a post-processing error on every frame of a run that exits 0
        where = "model.postprocess.type" if "type" in cfg.model.postprocess else "model.bundle"
        raise ConfigError(cfg.source_file, where, f"{misfit} ({bundle.path.name}, kind {bundle.spec.kind})")
    if cfg.preprocess.flat_field:
        try:
            adapter.flat_field = FlatField.load(cfg.resolve(cfg.preprocess.flat_field))
        except ValueError as e:
            raise ConfigError(cfg.source_file, "preprocess.flat_field", str(e)) from None
    return LoadedModel(bundle, adapter, post, engine.backend)


class Stats:
    """Rolling figures for the status line: fps, end-to-end latency, defects per frame."""

    def __init__(self, window: int):
        self._lock = threading.Lock()
        self._t: list[float] = []
        self._lat: list[float] = []
        self._def: list[int] = []
        self.window = window

    def add(self, t_s: float, latency_ms: float, defects: int) -> None:
        with self._lock:
            self._t.append(t_s)
            self._lat.append(latency_ms)
            self._def.append(defects)
            if len(self._t) > 2 * self.window:
                del self._t[:-self.window], self._lat[:-self.window], self._def[:-self.window]

    def summary(self, now: float | None = None) -> dict:
        """``now``: time.monotonic() by default (the clock ``add`` is fed with)."""
        now = time.monotonic() if now is None else now
        with self._lock:
            t = self._t[-self.window:]
            lat = self._lat[-self.window:]
            d = self._def[-self.window:]
        if len(t) < 2:
            return {"fps": 0.0, "p50_ms": None, "p99_ms": None, "defects_per_frame": None}
        span = t[-1] - t[0]
        fps = (len(t) - 1) / span if span > 0 else 0.0
        # The rate of the last frames alone froze at its last value when frames stopped (status
        # line and inspector_fps read "20 fps" with the camera down): count the silence since.
        gap = now - t[-1]
        interval = span / (len(t) - 1)
        if gap > max(5 * interval, 5.0):
            fps = 0.0
        elif gap > 2 * interval:
            fps = (len(t) - 1) / (now - t[0])
        return {"fps": fps,
                "p50_ms": float(np.percentile(lat, 50)), "p99_ms": float(np.percentile(lat, 99)),
                "defects_per_frame": float(np.mean(d))}


@dataclass
class _Job:
    frame: Frame
    t_grab: float  # perf_counter when the frame left the source
    t_queued: float
    out: ModelOutput | None = None
    t_infer_done: float = 0.0
    model: LoadedModel | None = None  # the model that inferred it; post-processing must match


class Pipeline:
    """One camera's pipeline. Use as a context manager, or call start()/stop()/close()."""

    def __init__(self, cfg: InspectorConfig, on_report: Callable[[dict], None] | None = None,
                 model: LoadedModel | None = None, source: Source | None = None):
        self.cfg = cfg
        self.on_report = on_report
        self.model = model
        self._owns_model = model is None
        self.source = source
        self.publisher: Publisher | None = None
        #: keeps defect (and sample normal) frames on disk when ``record.enabled``
        self.recorder: Recorder | None = None
        self.counters = Counters()
        self.stats = Stats(cfg.status.window)
        self.camera_state = "closed"
        self.error: BaseException | None = None
        self._q_infer: queue.Queue = queue.Queue(cfg.pipeline.queue_size)
        self._q_post: queue.Queue = queue.Queue(2)
        self._stop = threading.Event()
        self._done = threading.Event()
        self._threads: list[threading.Thread] = []
        self._frame_limit: int | None = None
        self._expected: tuple[tuple[int, ...], np.dtype] | None = None
        self._shape_from = "pipeline.frame"  # what set the expected shape, for the drop message
        self._geometry = Geometry.of(cfg.geometry)
        self._geometry_checked = False  # whether the first frame's source geometry was compared
        #: the post stage's region mask (uint8 0/1, HxW), reused frame after frame: the publisher
        #: encodes it into new bytes and the recorder copies it, so nothing keeps it past a frame
        self._region_buf: np.ndarray | None = None
        self.warmup_ms = 0.0
        self._shape_matched = False   # a frame of the expected shape has come
        self._shape_misses = 0        # frames of another shape before that
        fs = cfg.pipeline.frame
        if fs is not None:
            shape = (fs.height, fs.width) if fs.channels == 1 else (fs.height, fs.width, 3)
            self._expected = (shape, np.dtype(np.uint8))

    # -- set-up -----------------------------------------------------------------------------------
    def open(self) -> None:
        """Bind the publisher first (subscribers connect during warm-up), then model and source."""
        cfg = self.cfg
        self.publisher = Publisher(cfg.publish, cfg.camera_id)
        if self.model is None:
            self.model = load_model(cfg)
        if self.source is None:
            self.source = make_source(cfg.source, cfg.camera_id, cfg.base_dir, cfg.source_file)
        # the camera takes its settings now, not after the warm-up: a width beyond its sensor is
        # an error in a second, not after a 15 s warm-up of a wide model (it streams only below)
        self.source.prepare()
        if cfg.record.enabled and self.recorder is None:
            self.recorder = Recorder(cfg.record, cfg.camera_id, self.model.bundle.spec.classes,
                                     cfg.base_dir, cfg.source_file)
            self.recorder.start()
        # Warm up and wait for subscribers (connect grace, wait_for_subscribers) before the camera
        # streams: frames it captured meanwhile would arrive as a stale burst and overflow the
        # queue, or, beyond the producer's buffers, be lost in the camera.
        shape = self._warmup_shape()
        self.warmup_ms = self.model.adapter.warmup(shape)
        log.info("model %s (%s) on %s, warm-up %.0f ms at %s", self.model.bundle.spec.name,
                 self.model.bundle.spec.kind, self.model.backend, self.warmup_ms, shape)
        n = self.publisher.wait_ready(self._stop)
        self.source.open()
        self.camera_state = "ok"
        log.info("source %s; %d subscriber(s) at start", self.source.describe(), n)

    def _warmup_shape(self) -> tuple[int, ...]:
        if self._expected is not None:
            return self._expected[0]
        src = self.cfg.source
        h, w = getattr(src, "height", None), getattr(src, "width", None)
        if h and w:
            ch = getattr(src, "channels", 1)
            return (h, w) if ch == 1 else (h, w, 3)
        th, tw = self.model.bundle.spec.input.tile
        ff = self.model.adapter.flat_field
        if ff is not None:
            # A source that does not say its frame size (replay, GenICam without width/height):
            # the flat-field maps were computed at the camera's size, so warm up there rather
            # than at one tile, which the maps would refuse as a frame of the wrong size.
            mh, mw = ff.shape
            return (mh if mh > 1 else th, mw)
        return (th, tw)

    def start(self, frames: int | None = None) -> None:
        """Start the three stage threads; grab stops by itself after ``frames`` frames."""
        if self.publisher is None:
            self.open()
        self._frame_limit = frames
        self._threads = [threading.Thread(target=self._guard, args=(fn, name), name=name, daemon=True)
                         for fn, name in ((self._grab_loop, "grab"), (self._infer_loop, "infer"),
                                          (self._post_loop, "publish"))]
        for t in self._threads:
            t.start()

    def _guard(self, fn: Callable[[], None], stage: str) -> None:
        try:
            fn()
        except BaseException as e:
            if self.counters.frozen:
                # abandoned at a forced exit: its frames are counted and the publisher and engine
                # released under it; what it trips over now is no failure of its own
                log.debug("stage %s ended after the pipeline was abandoned: %r", stage, e)
                return
            if isinstance(e, ConfigError):  # the config's fault, said in one line (exit 2)
                log.error("stage %s stopped: %s", stage, e)
            elif isinstance(e, SourceError) and stage == "grab":
                # a lost camera with pipeline.reopen_source off: the documented end, not a bug
                self.camera_state = "down"
                log.error("camera %s lost, not reopened (pipeline.reopen_source is off): %s",
                          self.cfg.camera_id, e)
            else:
                log.exception("stage %s failed", stage)
            self.error = self.error or e
            self._stop.set()
            # The grab stage passed the end marker on as it stopped, so the frames it grabbed are
            # still published. A dead infer or publish stage must still take in what reaches it
            # (count it, pass the end on), or the stages before it would wait forever.
            if stage == "infer":
                self._drain(self._q_infer)
                self._q_post.put(_END)
            elif stage == "publish":
                self._drain(self._q_post)
                self._done.set()

    def _drain(self, q: queue.Queue) -> None:
        while q.get() is not _END:
            self.counters.drop("stage_failed")

    # -- stages -----------------------------------------------------------------------------------
    def _check_frame(self, frame: Frame) -> None:
        img = frame.image
        if not isinstance(img, np.ndarray) or img.dtype != np.uint8:
            raise FrameError(f"frame {frame.frame_id}: dtype {getattr(img, 'dtype', type(img))}, "
                             f"expected uint8")
        if img.ndim not in (2, 3) or (img.ndim == 3 and img.shape[2] != 3):
            raise FrameError(f"frame {frame.frame_id}: shape {img.shape}, expected HxW or HxWx3")
        name = frame.meta.get("file") if frame.meta else None  # a replayed file's name
        if self._expected is None:
            self._expected = (img.shape, img.dtype)
            self._shape_from = f"{name} (frame {frame.frame_id})" if name else f"frame {frame.frame_id}"
            log.info("frame shape locked to %s by %s (pipeline.frame sets it instead)", img.shape,
                     self._shape_from)
        elif img.shape != self._expected[0]:
            where = f" ({name})" if name else ""
            raise FrameError(f"frame {frame.frame_id}{where}: shape {img.shape}, expected "
                             f"{self._expected[0]} (set by {self._shape_from})")
        self._shape_matched = True

    def _refuse_configured_shape(self, frame: Frame) -> None:
        """Stop with a config error when the first frames all miss ``pipeline.frame``: the camera
        delivers another shape and every frame would be dropped, for ever (a mismatch after a
        frame has matched is a counted drop: a camera reconfigured under a running line)."""
        if self.cfg.pipeline.frame is None or self._shape_matched:
            return
        self._shape_misses += 1
        if self._shape_misses >= SHAPE_MISSES_FATAL:
            raise ConfigError(self.cfg.source_file, "pipeline.frame", f"the first "
                              f"{self._shape_misses} frames are {list(frame.image.shape)}, not "
                              f"{list(self._expected[0])}: every frame would be dropped as bad_frame "
                              "(fix it, or leave it out to take the first frame's shape)")

    def _read(self) -> Frame | None:
        """Next frame from the source, reopening it with backoff when it fails."""
        backoff, longest = self.cfg.pipeline.reopen_backoff_s
        while not self._stop.is_set():
            try:
                frame = self.source.read()
            except FrameError:
                raise
            except SourceError as e:
                self.counters.source_errors += 1
                if not self.cfg.pipeline.reopen_source:
                    raise
                if self.camera_state == "ok":
                    log.error("camera %s down: %s; reopening", self.cfg.camera_id, e)
                self.camera_state = "down"
                self._reopen(backoff)
                backoff = min(longest, backoff * 2)
                continue
            if frame is not None and self.camera_state == "down":
                # back only once it delivers: a camera that opens but sends nothing (trigger or
                # encoder stopped) would otherwise flap down/back at every reopen, and the
                # camera_down alarm and the PLC's camera-ok bit with it
                self.camera_state = "ok"
            return frame
        return None

    def _reopen(self, wait_s: float) -> None:
        try:
            self.source.close()
        except Exception as e:  # closing a dead device may fail; it is being replaced anyway
            log.debug("close after failure: %s", e)
        if self._stop.wait(wait_s):
            return
        try:
            self.source.open()
        except SourceError as e:
            log.debug("reopen failed: %s", e)
            return
        self.counters.reopens += 1
        log.warning("camera %s reopened, waiting for its first frame", self.cfg.camera_id)

    def _grab_loop(self) -> None:
        # one log per kind: a burst of one kind must not hide the first of another (an unreadable
        # file among frames of the wrong shape would never be named)
        unreadable = BurstLog("frame dropped")
        bad = BurstLog("frame dropped")
        full = BurstLog("queue full, frame dropped")
        lost = BurstLog("frames lost in the camera")
        logs = (unreadable, bad, full, lost)
        n = 0
        try:
            while not self._stop.is_set():
                if self._frame_limit is not None and n >= self._frame_limit:
                    break
                try:
                    frame = self._read()
                except FrameError as e:
                    self.counters.grab()
                    n += 1
                    self.counters.drop("incomplete_frame")
                    unreadable(None, e)
                    continue
                if frame is None:
                    break
                t_grab = time.perf_counter()
                self.counters.grab()
                n += 1
                skipped = frame.meta.get("camera_skipped", 0)
                if skipped:
                    self.counters.camera_skip(skipped)
                    lost(frame.frame_id, RuntimeError(
                        f"{skipped} frame(s) before it never reached the source (device frame id "
                        "jumped; the camera or its producer ran out of buffers); counted as "
                        "camera_skipped, strip positions account for them"))
                try:
                    self._check_frame(frame)
                except FrameError as e:
                    self.counters.drop("bad_frame")
                    bad(frame.frame_id, e)
                    self._refuse_configured_shape(frame)
                    continue
                for burst in logs:
                    burst.tick()
                job = _Job(frame, t_grab, time.perf_counter())
                if self.cfg.pipeline.backpressure:
                    # Wait even when a stop is asked for: the frame is grabbed and the infer stage
                    # drains until the end marker, so it will be taken (unless a stage died).
                    while True:
                        try:
                            self._q_infer.put(job, timeout=0.1)
                            break
                        except queue.Full:
                            if self.error is not None:  # a later stage died: nothing takes it
                                self.counters.drop("stage_failed")
                                break
                else:
                    try:
                        self._q_infer.put_nowait(job)
                    except queue.Full:
                        self.counters.drop("queue_full")
                        full(frame.frame_id, RuntimeError("engine behind the camera"))
        finally:
            for burst in logs:
                burst.flush()
            self._q_infer.put(_END)

    def _infer_loop(self) -> None:
        fail = BurstLog("engine error, frame dropped")
        while True:
            job = self._q_infer.get()
            if job is _END:
                fail.flush()
                self._q_post.put(_END)
                return
            if self.counters.frozen:
                continue  # a forced exit counted this frame as stage_failed: it must not appear
            job.t_queued = time.perf_counter() - job.t_queued
            # Read per frame: swap_model() may replace it; the job carries it on to post-processing.
            job.model = model = self.model
            try:
                job.out = model.adapter.infer(job.frame.image)
            except Exception as e:
                self.counters.drop("engine_error")
                fail(job.frame.frame_id, e)
                continue
            except BaseException:
                self.counters.drop("stage_failed")  # the frame in hand dies with the stage
                raise
            job.t_infer_done = time.perf_counter()
            fail.tick()
            self._q_post.put(job)

    def _post_loop(self) -> None:
        fail = BurstLog("post-processing error, frame dropped")
        slow = BurstLog("subscriber too slow, frame dropped")
        model = None
        enc = self.cfg.publish.mask_encoding
        while True:
            job = self._q_post.get()
            if job is _END:
                fail.flush()
                slow.flush()
                self._done.set()
                return
            if self.counters.frozen:
                # a forced exit counted it as stage_failed ("not published"): publishing it now
                # would deliver a frame the counters call dropped
                if job.out is not None and job.out.release:
                    job.out.release()
                continue
            if job.model is not model:  # first frame, or the first after swap_model()
                model = job.model
                spec = model.bundle.spec
                model_info = {"name": spec.name, "kind": spec.kind,
                              "sha256": spec.graphs["model"].sha256[:16], "backend": model.backend}
                # the bundle decides whether messages carry a region (header key + 4th part)
                region_spec = spec.region
            f, out = job.frame, job.out
            region = region_info = region_bytes = None
            try:
                t0 = time.perf_counter()
                label = model.post.mask(out.probs, out.residual, out.score_map)
                g = self._geometry
                f.strip_pos_mm = g.frame_pos_mm(f.frame_id, label.shape[0], f.meta, f.strip_pos_mm)
                geo = g.for_frame(f.meta)
                if not self._geometry_checked:
                    self._geometry_checked = True
                    for line in g.overridden_by(f.meta):
                        log.warning("%s: %s", self.cfg.source_file, line)
                defects, total = model.post.defects(label, out.score_map, geo, f.strip_pos_mm)
                if region_spec is not None:
                    # before out.release(): the probability map lives in the adapter's pool
                    region = self._region_mask(f.frame_id, out.region, region_spec.threshold,
                                               label.shape)
                    region_info = {"name": region_spec.name,
                                   "threshold": float(region_spec.threshold),
                                   **region_summary(region), "encoding": enc}
                t1 = time.perf_counter()
                mask_bytes = encode_mask(label, enc)
                if region is not None:
                    region_bytes = encode_mask(region, enc)
                t2 = time.perf_counter()
            except Exception as e:
                self.counters.drop("postprocess_error")
                fail(f.frame_id, e)
                if out.release:
                    out.release()
                continue
            except BaseException:
                self.counters.drop("stage_failed")  # the frame in hand dies with the stage
                raise
            if out.release:
                out.release()
            timings = {"queue": job.t_queued * 1e3, **out.timings_ms,
                       "postprocess": (t1 - t0) * 1e3, "encode": (t2 - t1) * 1e3}
            timings["pipeline"] = (time.perf_counter() - job.t_grab) * 1e3
            t_pub = time.time_ns()
            timings["e2e"] = (t_pub - f.t_capture_ns) / 1e6
            header = {
                "schema": SCHEMA, "camera_id": f.camera_id, "frame_id": f.frame_id,
                "t_capture_ns": f.t_capture_ns, "t_publish_ns": t_pub,
                "strip_pos_mm": round(f.strip_pos_mm, 2), "shape": list(label.shape),
                "mask_encoding": enc, "classes": spec.classes, "model": model_info,
                "defects": defects, "defects_total": total,
                "timings_ms": {k: round(v, 3) for k, v in timings.items()},
                "counters": self.counters.snapshot(), "camera_state": self.camera_state,
            }
            if region_info is not None:
                header["region"] = region_info
            pub = self.publisher
            try:
                # the 3-part call as before when there is no region (wrappers of send keep working)
                sent = self.counters.publish_with(
                    lambda: pub.send(header, mask_bytes) if region_bytes is None
                    else pub.send(header, mask_bytes, region_bytes))
            except BaseException:  # socket closed under it, unserialisable header: the stage dies
                self.counters.drop("stage_failed")
                raise
            if sent is None:
                continue  # a forced exit counted it as stage_failed meanwhile: not sent
            if sent:
                fail.tick()
                slow.tick()
            else:
                self.counters.drop("subscriber_slow")
                slow(f.frame_id, RuntimeError(f"send queue full ({self.cfg.publish.sndhwm} messages)"))
            if self.recorder is not None:
                # inspected either way: a frame a slow subscriber missed is still worth keeping
                self.recorder.offer(f, label, header, region)
            self.stats.add(time.monotonic(), timings["pipeline"], len(defects))
            if self.on_report is not None:
                if out.stats:
                    # local consumers (the benchmark) see the model kind's per-frame figures;
                    # the message already went out without them (schema unchanged)
                    header["model_stats"] = out.stats
                self.on_report(header)

    def _region_mask(self, frame_id: int, prob: np.ndarray | None, threshold: float,
                     shape: tuple[int, ...]) -> np.ndarray:
        """The region probability thresholded (p >= threshold) into the reused 0/1 buffer."""
        if prob is None:
            raise ValueError(f"frame {frame_id}: the bundle declares a region but the model "
                             "output has no region map")
        if prob.shape != shape:
            raise ValueError(f"frame {frame_id}: region map shape {prob.shape} != mask shape {shape}")
        buf = self._region_buf
        if buf is None or buf.shape != prob.shape:
            buf = self._region_buf = np.empty(prob.shape, np.uint8)
        # a bool view of the uint8 buffer: the comparison writes 0/1 in place, no temporary
        np.greater_equal(prob, threshold, out=buf.view(np.bool_))
        return buf

    # -- control ----------------------------------------------------------------------------------
    def swap_model(self, model: LoadedModel, geometry: Geometry | None = None) -> float:
        """Warm ``model`` up at the running frame shape, then make it the model of the next frame.

        The swap is one reference assignment: a frame in flight finishes on the model that
        inferred it (the job carries it), so adapter and post-processing always match and no
        frame is dropped. Returns the warm-up time in ms; raises (old model untouched) if warm-up
        fails.
        """
        shape = self._expected[0] if self._expected is not None else self._warmup_shape()
        warmup_ms = model.adapter.warmup(shape)
        if geometry is not None:
            self._geometry = geometry
            self._geometry_checked = False  # a reloaded geometry is compared with the source's again
        self.model = model
        log.info("model %s (%s) on %s swapped in, warm-up %.0f ms at %s", model.bundle.spec.name,
                 model.bundle.spec.kind, model.backend, warmup_ms, shape)
        return warmup_ms

    def stop(self) -> None:
        """Stop grabbing; frames already in the queues are still processed and published."""
        self._stop.set()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until every stage has drained; True when done."""
        return self._done.wait(timeout)

    def run(self, frames: int | None = None, seconds: float | None = None,
            tick: Callable[["Pipeline"], None] | None = None, tick_s: float = 1.0) -> dict:
        """Run until ``frames`` are grabbed, ``seconds`` passed, the source ended or stop();
        drain, and return the final counters."""
        self.start(frames)
        t_end = time.monotonic() + seconds if seconds else None
        while not self._done.wait(tick_s if tick else 0.05):
            if tick:
                tick(self)
            if t_end is not None and time.monotonic() >= t_end:
                self.stop()
        for t in self._threads:
            t.join()
        if tick:
            tick(self)
        if self.error is not None:
            raise self.error
        return self.counters.snapshot()

    def close(self, join_timeout_s: float = 5.0) -> None:
        """Stop, wait at most ``join_timeout_s`` in all for the stage threads, release the source,
        publisher and engine."""
        self.stop()
        deadline = time.monotonic() + join_timeout_s
        for t in self._threads:
            t.join(timeout=max(0.0, deadline - time.monotonic()))
        if self.source is not None:
            try:
                self.source.close()
            except Exception as e:
                log.warning("closing source: %s", e)
        if self.recorder is not None:
            self.recorder.close(timeout_s=max(1.0, deadline - time.monotonic()))
        if self.publisher is not None:
            self.publisher.close()
            self.publisher = None
        if self._owns_model and self.model is not None:
            # a model handed in (bench phases, reload tests) belongs to the caller
            self.model.adapter.engine.close()
        self.camera_state = "closed"

    def count_abandoned(self) -> int:
        """At a forced exit (the queues did not drain in time): count the frames still inside the
        pipeline, queued or held by a hung stage, as ``stage_failed``, so the last counters still
        balance instead of leaving them counted nowhere. Returns how many."""
        n = self.counters.abandon()
        if n:
            log.error("%d frame(s) still in the pipeline at exit, not published: counted as stage_failed", n)
        return n

    def __enter__(self) -> "Pipeline":
        try:
            self.open()
        except BaseException:
            self.close()  # `with` calls no __exit__ for a failed __enter__: release what opened
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()
