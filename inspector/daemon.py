"""One camera's daemon under systemd: notify, watchdog, signals, reload, alarms, metrics.

``inspector daemon --config F`` runs :class:`Daemon`. Under ``Type=notify`` it tells systemd:

* ``READY=1`` once the engine is warmed up and the camera is open (not before: a unit that
  depends on this one starts only when frames can flow);
* ``WATCHDOG=1`` every half ``WATCHDOG_USEC``, but only while frames came through the pipeline
  (published, or refused by a full subscriber queue) within ``daemon.watchdog_stall_s`` (or,
  with ``daemon.watchdog_while_reopening``, while a lost camera
  is being reopened), so a stuck pipeline stops pinging and systemd restarts it;
* ``STATUS=`` fps, latency, drops, camera and alarms, every ``status.interval_s``;
* ``STOPPING=1`` on SIGTERM/SIGINT, then the queues drain and the process exits 0;
* ``RELOADING=1`` ... ``READY=1`` around a SIGHUP reload: the config is re-read, the model is
  loaded and warmed up beside the running one and swapped in atomically; on any error the running
  model stays and the error is logged.

The notify protocol is a datagram per message to the unix socket named by ``NOTIFY_SOCKET``
(``@name`` = abstract namespace); without it, notifications are no-ops, so the same command runs
in a terminal.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import logging
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Callable

from inspector import __version__
from inspector.alarms import AlarmEngine, DriverWorker, make_drivers
from inspector.alarms.latch_store import STATE_ENV, LatchStore, latch_path, wait_for_retired
from inspector.config import InspectorConfig, load_config
from inspector.errors import ConfigError, InspectorError, first_line
from inspector.logs import set_level
from inspector.metrics import Metrics
from inspector.pipeline import BurstLog, LoadedModel, Pipeline, load_model
from inspector.postprocess import Geometry
from inspector.reload_state import ReloadLog
from inspector.signals import relay_signals
from inspector.sources import Source

log = logging.getLogger(__name__)

#: config sections a SIGHUP cannot change in a running daemon (sockets, threads, PLC layout)
RESTART_ONLY = ("camera_id", "source", "publish", "pipeline", "metrics", "daemon", "status", "record")


class Notifier:
    """sd_notify(3) over ``NOTIFY_SOCKET``; every call is a no-op when there is no socket."""

    def __init__(self, address: str | None):
        self.address = address or None
        self._sock: socket.socket | None = None
        self._warned = False
        if self.address:
            # '@' stands for the abstract namespace (leading NUL byte)
            self._target = "\0" + self.address[1:] if self.address.startswith("@") else self.address
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)

    @classmethod
    def from_env(cls) -> "Notifier":
        return cls(os.environ.get("NOTIFY_SOCKET"))

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def send(self, *fields: str) -> bool:
        """Send ``KEY=value`` fields as one datagram; False (logged once) when it cannot."""
        if self._sock is None:
            return False
        msg = "\n".join(f.replace("\n", " ") for f in fields).encode()
        try:
            self._sock.sendto(msg, self._target)
            return True
        except OSError as e:  # systemd gone or socket wrong: the daemon itself must go on
            if not self._warned:
                log.warning("cannot notify systemd at %s: %s", self.address, e)
                self._warned = True
            return False

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def watchdog_interval_s() -> float | None:
    """Half of ``WATCHDOG_USEC`` (as sd_watchdog_enabled(3) advises), or None when not asked for
    (no variable, or ``WATCHDOG_PID`` names another process)."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec:
        return None
    if pid and pid.isdigit() and int(pid) != os.getpid():
        return None
    try:
        value = int(usec)
    except ValueError:
        log.warning("ignoring WATCHDOG_USEC=%r (not a number)", usec)
        return None
    return value / 2e6 if value > 0 else None


def status_text(p: Pipeline, engine: AlarmEngine | None) -> str:
    """One line for ``STATUS=``: fps, latency, counters, camera, alarms, and each PLC driver
    whose states are not getting through (``plc: modbus down 25s``)."""
    s = p.stats.summary()
    c = p.counters.snapshot()
    drops = sum(c["dropped"].values())
    why = ", ".join(f"{k} {v}" for k, v in c["dropped"].items() if v)
    lat = (f"p50 {s['p50_ms']:.0f} ms p99 {s['p99_ms']:.0f} ms" if s["p50_ms"] is not None else "latency -")
    text = (f"{s['fps']:.1f} fps, {lat}, published {c['published']}, dropped {drops}"
            + (f" ({why})" if why else "") + f", camera {p.camera_state}")
    if p.recorder is not None:
        r = p.recorder.snapshot()
        skipped = sum(r["skipped"].values())
        text += f", recorded {sum(r['recorded'].values())}" + (f" (skipped {skipped})" if skipped else "")
    if engine is not None:
        on = [n for n, a in engine.active().items() if a]
        text += f", alarms: {' '.join(on) if on else 'none'}"
        # Without this a lost PLC is invisible here: "alarms: big_defect" reads as delivered.
        kinds = [w.label.split()[0] for w in engine.drivers]
        outages = [(kind if kinds.count(kind) == 1 else w.name, w.outage())
                   for kind, w in zip(kinds, engine.drivers)]
        down = [f"{name} {o}" for name, o in outages if o is not None]
        if down:
            text += f", plc: {', '.join(down)}"
    return text


#: how long a stop may take after the drain (``daemon.stop_timeout_s``): the PLC drivers' last
#: write and the stage threads, all together
STOP_TAIL_S = 5.0


def latch_store_for(cfg: InspectorConfig) -> LatchStore | None:
    """The store of the camera's latched alarms, opened (ConfigError naming the key where a rule
    latches and the file cannot be kept); None when no file is configured, said once when a rule
    latches. With no latching rule the store only clears what an earlier config left latched, and
    a folder it cannot use then is a warning, not a refused start."""
    path = latch_path(cfg.alarms.latch_file, cfg.camera_id, cfg.base_dir)
    latching = [r.name for r in cfg.alarms.rules if r.latch]
    if path is None:
        if latching:
            log.warning("%s: alarms %s latch, but latched alarms are not kept across a restart: set "
                        "alarms.latch_file (or %s, which the unit sets)", cfg.source_file,
                        ", ".join(latching), STATE_ENV)
        return None
    store = LatchStore(path, cfg.source_file, cfg.alarms.latch_file)
    try:
        store.open()
    except ConfigError as e:
        if latching:
            raise
        if path.exists():  # something an earlier config latched may be in it
            log.warning("%s; no rule latches now, so it is left as it is", e)
        return None
    return store


class Daemon:
    """Runs one camera (see module docs). ``source`` replaces the configured one (tests)."""

    def __init__(self, config_path: str | Path, source: Source | None = None,
                 notifier: Notifier | None = None, clock: Callable[[], float] = time.monotonic,
                 runtime_dir: Path | None = None):
        self.path = Path(config_path)
        self.cfg: InspectorConfig = load_config(self.path)
        self.notifier = notifier or Notifier.from_env()
        self.clock = clock
        self._source = source
        self._wake = threading.Event()
        self._reload_req = threading.Event()
        self.stop_requested = False
        self._reload_thread: threading.Thread | None = None
        self.pipeline: Pipeline | None = None
        self.engine: AlarmEngine | None = None
        self.workers: list[DriverWorker] = []
        self.metrics: Metrics | None = None
        self._report_fail = BurstLog("report consumer failed")
        self._consumers: list[Callable[[dict], None]] = []  # fed every published header
        self.reloads = {"ok": 0, "failed": 0}
        #: reload.json in the runtime folder, which `inspector reload` (ExecReload=) waits on
        self.reload_log = ReloadLog(runtime_dir)
        #: a level given on the command line (``--log-level``) wins over the config's, at start
        #: and after every reload
        self.log_level_override: str | None = None

    # -- requests (signal handlers, tests) --------------------------------------------------------
    # Signal handlers only set flags: the main loop does the work, outside the handler.
    def request_stop(self, *_: object) -> None:
        self.stop_requested = True
        self._wake.set()
        if self.pipeline is not None:
            # also while it is still opening (waiting for subscribers): it starts nothing more
            self.pipeline.stop()

    def request_reload(self, *_: object) -> None:
        self._reload_req.set()
        self._wake.set()

    def _install_signals(self) -> None:
        # in the main thread only; tests drive an in-process daemon through request_*()
        relay_signals({signal.SIGTERM: self.request_stop, signal.SIGINT: self.request_stop,
                       signal.SIGHUP: self.request_reload})

    # -- the frame hook -------------------------------------------------------------------------
    def _on_report(self, header: dict) -> None:
        # Runs in the publish thread for every frame: consumers must be quick and must not kill it.
        for fn in self._consumers:
            try:
                fn(header)
            except Exception as e:
                self._report_fail(header.get("frame_id", -1), e)

    # -- main -----------------------------------------------------------------------------------
    def run(self) -> int:
        """Start, serve until stopped or the source ends, drain; returns the exit code."""
        cfg = self.cfg
        n = self.notifier
        self._install_signals()
        self.reload_log.ready()
        try:
            return self._run(cfg, n)
        finally:
            self.reload_log.remove()

    def _run(self, cfg: InspectorConfig, n: Notifier) -> int:
        n.send("STATUS=loading model")
        model = load_model(cfg)
        classes = model.bundle.spec.classes
        if cfg.alarms.rules or cfg.alarms.drivers:
            self.engine = AlarmEngine(cfg.alarms, classes, cfg.source_file, clock=self.clock,
                                      store=latch_store_for(cfg))
            # before the drivers: their first write must carry what is still latched
            self.engine.restore()
        self.workers = make_drivers(cfg, self.engine)
        if cfg.metrics.enabled:
            self.metrics = Metrics(cfg.metrics, cfg.camera_id, cfg.source_file)
            self._consumers.append(self.metrics.observe)
        if self.engine is not None:
            self._consumers.append(self.engine.on_frame)
        p = self.pipeline = Pipeline(cfg, on_report=self._on_report, model=model, source=self._source)
        if self.stop_requested:  # asked while the model loaded: start nothing that waits or grabs
            p.stop()
        # the pipeline holds it from here: a reference kept in this frame, which lives as long as
        # the daemon, kept the first model (its onnxruntime arena, ~150 MiB for the demo bundle)
        # alive after a reload had swapped it out (measured with benchmarks/soak.py)
        del model
        drained = True
        try:
            if self.metrics is not None:
                self.metrics.bind(p, self.engine, self.workers)
                self.metrics.reloads = self.reloads
                self.metrics.start()
            n.send("STATUS=warming up and opening the camera")
            p.open()  # publisher, warm-up, camera: READY only after all three
            for w in self.workers:
                w.start()
            if self.engine is not None:
                self.engine.set_running(True, camera_ok=p.camera_state == "ok")
            p.start()
            n.send("READY=1", f"STATUS=running: model warm-up {p.warmup_ms:.0f} ms, camera {p.camera_state}")
            log.info("%s ready: %s", cfg.camera_id, p.source.describe())
            self._serve(p)
            if self.stop_requested:
                log.info("stop requested: draining the queues (at most %gs)", cfg.daemon.stop_timeout_s)
                n.send("STOPPING=1", "STATUS=stopping: draining the queues")
            elif p.error is not None:  # e.g. the camera was lost and pipeline.reopen_source is off
                n.send("STOPPING=1", f"STATUS=failed ({first_line(p.error)[:200]}): "
                       "draining the queues")
            else:
                n.send("STOPPING=1", "STATUS=source finished: draining the queues")
            p.stop()
            drained = p.wait(cfg.daemon.stop_timeout_s)
            if not drained:
                log.error("queues not drained within daemon.stop_timeout_s=%gs; exiting anyway",
                          cfg.daemon.stop_timeout_s)
        finally:
            # One deadline for the whole stop: the drain above, then at most STOP_TAIL_S for the
            # PLC drivers' last write and the stage threads together, so the process is gone
            # within stop_timeout_s + STOP_TAIL_S, inside the unit's TimeoutStopSec (30 s) with
            # the default 20 s; each part waiting its own timeout could take 35 s and be killed.
            tail_end = time.monotonic() + STOP_TAIL_S
            reloading = self._reload_thread
            if reloading is not None and reloading.is_alive():
                # it ends at its next step (it sees the stop) and lets go of a latch file it took;
                # one stuck in a model load is left to the exit
                reloading.join(max(0.2, (tail_end - time.monotonic()) / 2))
                if reloading.is_alive():
                    log.warning("stop: a reload is still loading its model; it is left unfinished "
                                "(nothing of it was applied)")
            if self.engine is not None:
                self.engine.set_running(False)
            for w in self.workers:  # all at once: a slow PLC must not eat the others' time
                w.request_stop()
            for w in self.workers:
                w.stop(timeout=max(0.2, tail_end - time.monotonic() - 1.0))
            if self.engine is not None and self.engine.store is not None:
                self.engine.store.close(timeout=max(0.2, tail_end - time.monotonic() - 0.5))
            for left in wait_for_retired(max(0.2, tail_end - time.monotonic() - 0.5)):
                log.error("%s: the last write to this latch file, which a reload moved off, has not "
                          "ended: where it lands, the file holds alarms moved to the file in use; remove "
                          "it before a config names it again, or they come back", left)
            if not drained:
                # before close() releases the publisher and engine under the hung stage: from
                # here its frames are counted, and what it trips over later is not reported
                p.count_abandoned()
            p.close(join_timeout_s=max(0.2, tail_end - time.monotonic()))
            if self.metrics is not None:
                self.metrics.stop()
        c = p.counters.snapshot()
        why = ", ".join(f"{k} {v}" for k, v in c["dropped"].items() if v)
        log.info("stopped: grabbed %d published %d dropped %d%s", c["grabbed"], c["published"],
                 sum(c["dropped"].values()), f" ({why})" if why else "")
        if p.error is not None:
            log.error("pipeline failed: %s", p.error)
            # bad config found only once frames flow: exit 2, which the unit does not restart
            return 2 if isinstance(p.error, ConfigError) else 1
        return 0 if drained else 1

    def _serve(self, p: Pipeline) -> None:
        cfg = self.cfg
        wd = watchdog_interval_s()
        if wd is not None:
            log.info("systemd watchdog: pinging every %.2fs while frames flow (stall after %gs)",
                     wd, cfg.daemon.watchdog_stall_s)
        tick = min(0.1, wd) if wd else 0.1
        now = self.clock()
        last_ping = last_status = now
        progress_at = now
        seen = (-1, -1, -1)
        camera = p.camera_state
        down_at = now
        stalled = False
        while not p.wait(0):
            self._wake.wait(tick)
            self._wake.clear()
            if self._reload_req.is_set():
                self._reload_req.clear()
                self._start_reload()
            if self.stop_requested:
                return
            now = self.clock()
            c = p.counters.snapshot()
            # Progress is a frame through the whole pipeline: one a stuck subscriber refused
            # (subscriber_slow) made it too. Counting only published frames let one frozen
            # viewer stop the pings, and systemd then restarted a healthy daemon over and over.
            mark = (c["published"] + c["dropped"].get("subscriber_slow", 0),) + (
                (c["source_errors"], c["reopens"]) if cfg.daemon.watchdog_while_reopening else (0, 0))
            if mark != seen:
                seen, progress_at = mark, now
            if self.engine is not None:
                self.engine.tick(p.camera_state, c)
            if p.camera_state != camera:  # one line per state change: the outage and its length
                if p.camera_state == "ok":
                    log.warning("camera %s back after %.1fs outage (%d reopen(s) so far)",
                                cfg.camera_id, now - down_at, c["reopens"])
                else:
                    down_at = now
                camera = p.camera_state
            healthy = now - progress_at <= cfg.daemon.watchdog_stall_s
            if healthy == stalled:
                stalled = not healthy
                if stalled:
                    log.error("no frame through the pipeline for %gs (daemon.watchdog_stall_s): "
                              "watchdog pings stop", cfg.daemon.watchdog_stall_s)
                else:
                    log.warning("frames flow again: watchdog pings resume")
            if wd is not None and healthy and now - last_ping >= wd:
                self.notifier.send("WATCHDOG=1")
                last_ping = now
            if now - last_status >= cfg.status.interval_s:
                self.notifier.send(f"STATUS={status_text(p, self.engine)}")
                last_status = now

    # -- SIGHUP ---------------------------------------------------------------------------------
    def _start_reload(self) -> None:
        # Loading and warming a model can take long (an engine build): do it beside the main loop,
        # which keeps ticking the watchdog and alarms. A SIGHUP during a reload runs after it.
        if self._reload_thread is not None and self._reload_thread.is_alive():
            self._reload_req.set()
            return
        self._reload_thread = threading.Thread(target=self.reload, name="reload", daemon=True)
        self._reload_thread.start()

    def _latch_move(self, new: InspectorConfig, later: list[str]) -> tuple[str | None, LatchStore | None]:
        """A reload changed ``alarms.latch_file`` or ``camera_id`` (which names the default
        file): the store the running latched set moves to
        (opened: a file the next start would refuse fails the reload, naming the key), with the
        ``latch_file`` the daemon then runs with; ``later`` gets the key where it is not moved."""
        old = self.cfg.alarms.latch_file
        key = ["alarms.latch_file"] if new.alarms.latch_file != old else []
        cur = self.engine.store if self.engine is not None else None
        path = latch_path(new.alarms.latch_file, new.camera_id, new.base_dir)
        if cur is None:
            if self.engine is not None and any(r.latch for r in new.alarms.rules):
                return new.alarms.latch_file, None  # taken below (new_store), as a start would
            later += key  # nothing is kept now: the next start takes it
            return old, None
        if path is not None and path.resolve() == cur.path.resolve():
            return new.alarms.latch_file, None  # another spelling of the same file
        if path is None:
            held = self.engine.latched_names()
            later += key
            if held:
                log.warning("reload: alarms.latch_file no longer names a file and %s is not set: "
                            "%s latched now stay%s in %s until a restart, which keeps nothing",
                            STATE_ENV, ", ".join(held), "s" if len(held) == 1 else "", cur.path)
            return old, None
        store = latch_store_for(new)
        if store is None:  # no rule latches and the new folder cannot be used: said as a warning
            later += key
            return old, None
        return new.alarms.latch_file, store

    def _move_latched(self, to: LatchStore) -> bool:
        """Write the latched set into ``to`` (a file a reload takes: what it held before is
        replaced, and said), switch the engine to it and remove the old file; False (logged, the
        old file kept in use) when ``to`` cannot be written."""
        engine = self.engine
        found = [r["name"] for r in to.load(reload=True)]
        kept = engine.latched_records()
        err = to.write_now(kept)
        if err is not None:
            to.close()
            log.error("reload: %s: alarms.latch_file: cannot write %s (%s); %s", self.cfg.source_file,
                      to.path, err.strerror or err,
                      f"latched alarms stay in {engine.store.path} until a restart, which reads the "
                      "new file" if engine.store is not None else "latched alarms are not kept")
            return False
        names = [r["name"] for r in kept]
        gone = [n for n in found if n not in names]
        if gone:
            log.warning("reload: %s held %s, not latched in this run: replaced by what is latched now",
                        to.path, ", ".join(gone))
        was = engine.move_store(to)
        if was is None:
            log.info("reload: latched alarms are kept in %s from now on", to.path)
            return True
        was.retire()
        log.info("reload: latched alarms (%s) moved from %s to %s", ", ".join(names) or "none",
                 was.path, to.path)
        return True

    def reload(self) -> bool:
        """Re-read the config file, load and warm up its model, swap it in; True on success.
        On any error the running model and rules stay and the error is logged."""
        p = self.pipeline
        n = self.notifier
        self.reload_log.begin()
        n.send("RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}",
               "STATUS=reloading")
        log.info("reload: reading %s", self.path)
        old = self.cfg
        new_store: LatchStore | None = None
        move_to: LatchStore | None = None  # the file a changed alarms.latch_file moves the latched set to
        latch_file = old.alarms.latch_file  # as the running daemon keeps it
        try:
            check_installed_version()
            new = load_config(self.path)
            later = [k for k in RESTART_ONLY if getattr(new, k) != getattr(old, k)]
            if new.alarms.drivers != old.alarms.drivers:
                later.append("alarms.drivers")
            if new.alarms.latch_file != old.alarms.latch_file or new.camera_id != old.camera_id:
                # the default file is named by the camera id: a rename moves it as well
                latch_file, move_to = self._latch_move(new, later)
            model: LoadedModel = load_model(new)
            if model.bundle.spec.classes != p.model.bundle.spec.classes:
                raise InspectorError(f"{new.source_file}: model.bundle: the new model's classes "
                                     f"{model.bundle.spec.classes} differ from the running model's "
                                     f"{p.model.bundle.spec.classes}; the PLC maps depend on them: "
                                     "restart the service to change them")
            if new.record != old.record and new.record.enabled:
                # it runs only after a restart, but a section the next start would refuse (exit 2,
                # the unit stays down) must fail now, while someone is looking
                from inspector.recorder import preflight
                preflight(new.record, new.camera_id, model.bundle.spec.classes, new.base_dir,
                          new.source_file)
            if any(r.latch for r in new.alarms.rules) and (self.engine is None or self.engine.store is None):
                # a rule latches now where this run keeps no file: what the next start would
                # refuse (exit 2, the unit stays down) fails the reload now; a file it can keep
                # is taken from here on
                new_store = latch_store_for(new)
                if self.engine is None and new_store is not None:
                    new_store.close()  # alarms were off at start: they run after a restart
                    new_store = None
            if self.engine is not None:
                self.engine.check_rules(new.alarms)
            elif new.alarms.rules:
                # they run only after a restart, but rules the next start would refuse (exit 2,
                # the unit stays down) must fail now, as with alarms on
                AlarmEngine(new.alarms, model.bundle.spec.classes, new.source_file)
                later.append("alarms.rules (alarms were off at start)")
            geometry = Geometry.of(new.geometry)
            if self.stop_requested:
                # the model took its time to load and a stop came meanwhile: applying it now would
                # change rules and files under the stop, which is closing them
                raise InspectorError("a stop came while the new model loaded: nothing of this "
                                     "reload is applied")
            warm = p.swap_model(model, geometry)
            if self.engine is not None:
                self.engine.set_rules(new.alarms)
                take, new_store, move_to = new_store or move_to, None, None
                if take is not None and not self._move_latched(take):
                    latch_file = old.alarms.latch_file
                    later.append("alarms.latch_file")
        except Exception as e:
            for taken in (new_store, move_to):
                if taken is not None:
                    taken.abandon()  # the reload failed after taking the file: let it go
            log.error("reload failed, the running model and rules stay: %s", e)
            # the record first: whoever sees the counter or READY=1 (systemctl reload returns
            # on it) reads this reload's outcome, not the one before
            self.reload_log.end(False, f"reload failed, the running model and rules stay: {e}")
            self.reloads["failed"] += 1
            n.send("READY=1", f"STATUS=reload failed ({first_line(e)[:200]}); running on")
            return False
        set_level(self.log_level_override or new.log_level)
        # Sections that need a restart keep their running values, so the next reload compares
        # against what actually runs.
        self.cfg = new.model_copy(update={k: getattr(old, k) for k in RESTART_ONLY}
                                  | {"alarms": new.alarms.model_copy(update={"drivers": old.alarms.drivers,
                                                                           "latch_file": latch_file})})
        done = f"reload done: model {model.bundle.spec.name} warmed up in {warm:.0f} ms and swapped in"
        log.info("%s", done)
        if later:
            log.warning("reload: %s changed; that takes effect after a restart", ", ".join(later))
            done += f"; {', '.join(later)} changed: that takes effect after a restart"
        self.reload_log.end(True, done)
        self.reloads["ok"] += 1
        n.send("READY=1", f"STATUS=reloaded: model {model.bundle.spec.name}, warm-up {warm:.0f} ms")
        return True


def installed_version() -> str | None:
    """The inspector's version as installed on disk now (None when run from a source tree that
    was never installed)."""
    try:
        return importlib.metadata.version("strip-inspector")
    except importlib.metadata.PackageNotFoundError:
        return None


def installed_files() -> str | None:
    """A digest of the installed package's file list with their hashes (the dist-info RECORD
    pip writes), or None outside an installed copy. It changes whenever an install changed any
    file, also when the version number stayed the same (a fix reinstalled, a build of a newer
    commit that did not bump the version)."""
    try:
        record = importlib.metadata.distribution("strip-inspector").read_text("RECORD")
    except importlib.metadata.PackageNotFoundError:
        return None
    return None if record is None else hashlib.sha256(record.encode()).hexdigest()


#: the installed files this process imported its code from (taken when the daemon module loads)
FILES_AT_START = installed_files()


def check_installed_version() -> None:
    """A reload imports modules the daemon has not loaded yet (another engine, a model kind):
    after an upgrade under a running daemon they would come from the new install and meet the
    old one's in memory. Refuse, and say that a restart runs the new version. The version number
    alone missed a reinstall that kept it; the installed files' digest catches that too."""
    on_disk = installed_version()
    if on_disk is not None and on_disk != __version__:
        raise InspectorError(f"the inspector on disk is version {on_disk}, this daemon runs {__version__} "
                             "(upgraded under it): restart the service to run the new version")
    now = installed_files()
    if FILES_AT_START is not None and now is not None and now != FILES_AT_START:
        raise InspectorError(f"the inspector on disk was reinstalled under this daemon (version "
                             f"{__version__} still, other files): restart the service to run it")


class JournalFormatter(logging.Formatter):
    """``<priority>logger: message``: journald reads the syslog priority prefix and stamps the
    time itself, so lines stay short and ``journalctl -p warning`` works."""

    PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        prio = self.PRIORITY.get(record.levelno, 6)
        # one journal entry per line: continuation lines (tracebacks) keep the priority
        return "\n".join(f"<{prio}>{line}" for line in text.splitlines() or [""])


def setup_logging(level: str = "INFO", journal: bool | None = None) -> None:
    """Log to stderr; in journald form when ``journal`` (default: when systemd connected stderr
    to the journal, i.e. ``JOURNAL_STREAM`` is set)."""
    if journal is None:
        journal = bool(os.environ.get("JOURNAL_STREAM"))
    handler = logging.StreamHandler(sys.stderr)
    if journal:
        handler.setFormatter(JournalFormatter("%(name)s: %(message)s"))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    set_level(level)
