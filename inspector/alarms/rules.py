"""Alarm rules: from published frames and pipeline health to alarm bits.

The engine is fed from two places: :meth:`AlarmEngine.on_frame` with every report header the
pipeline publishes (publish thread), and :meth:`AlarmEngine.tick` a few times a second from the
daemon loop with the camera state and the counters (time-based rules, debounce timers). Every
change of the PLC-visible state goes to the subscribed drivers, which never block.

Each alarm has a *cause* (the rule's raw condition), debounced by ``on_delay_s`` (cause must last
that long) and ``off_delay_s`` (cause must be gone that long), and optionally a *latch*: a latched
alarm stays on after its cause is gone until acknowledged (PLC acknowledge bit, OPC UA
``Acknowledge`` method). Acknowledging only releases the latch; an alarm whose cause is still
there stays on until the cause goes. With a :class:`~inspector.alarms.latch_store.LatchStore`,
the latched set is kept in a file, and :meth:`AlarmEngine.restore` raises what a previous run left
latched again at start.

Example::

    eng = AlarmEngine(cfg.alarms, classes=["background", "scratches"])
    eng.subscribe(lambda state: print(state.alarms))
    eng.on_frame(header)           # from Pipeline(on_report=...)
    eng.tick("ok", pipeline.counters.snapshot())
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from typing import Callable, Iterable, Sequence

from inspector.alarms.config import AlarmsConfig, CameraDownRule, DefectRule, OverloadRule
from inspector.alarms.latch_store import LatchStore
from inspector.alarms.layout import PlcState
from inspector.errors import ConfigError

log = logging.getLogger(__name__)


class _Alarm:
    """One rule's live state."""

    def __init__(self, index: int, rule, now: float):
        self.index = index
        self.rule = rule
        self.cause = False
        self.t_cause = now          # when ``cause`` last changed
        self.cond = False           # debounced cause
        self.latched = False
        self.latched_at = ""        # wall-clock time the latch was set (kept across a restart)
        self.latch_detail = ""      # what set the latch (kept across a restart, as it was)
        self.active = False
        self.raised = 0             # times it went on
        self.window: deque = deque()
        self.window_end = 0.0       # ``per_m``: strip position of the last frame counted
        self.detail = ""
        self.warned: set[str] = set()

    @property
    def on_delay(self) -> float:
        r = self.rule
        return r.after_s if isinstance(r, CameraDownRule) else r.on_delay_s

    def update(self, now: float, cause: bool) -> bool:
        """Apply a new cause value at ``now``; True when the output (``active``) changed."""
        if cause != self.cause:
            self.cause = cause
            self.t_cause = now
        held = now - self.t_cause
        if not self.cond and self.cause and held >= self.on_delay:
            self.cond = True
            if self.rule.latch and not self.latched:
                self.latched = True
                self.latched_at = time.strftime("%Y-%m-%dT%H:%M:%S%z")
                self.latch_detail = self.detail
        elif self.cond and not self.cause and held >= self.rule.off_delay_s:
            self.cond = False
        was = self.active
        self.active = self.cond or self.latched
        if self.active and not was:
            self.raised += 1
        return self.active != was


class AlarmEngine:
    """Evaluates ``alarms.rules`` (see module docs). Thread-safe."""

    def __init__(self, cfg: AlarmsConfig, classes: Sequence[str], source_file: str = "<memory>",
                 clock: Callable[[], float] = time.monotonic, store: LatchStore | None = None):
        self.source_file = source_file
        self.clock = clock
        self.all_classes = list(classes)
        self.defect_classes = tuple(self.all_classes[1:])  # index 0 is the background
        self._lock = threading.RLock()
        self._listeners: list[Callable[[PlcState], None]] = []
        self.counts = [0] * len(self.defect_classes)
        self.frames = 0
        self.defects_total = 0
        self.running = False
        self.camera_ok = False
        self._last = (0, 0.0, 0.0, 0.0, 0.0)  # class index, pos mm, across px, area, score
        self._overload_hist: deque = deque()
        self._alarms: list[_Alarm] = []
        #: the PLC drivers this engine feeds (:func:`inspector.alarms.make_drivers`), for status lines
        self.drivers: list = []
        #: where the latched set is kept across a restart (None: not kept)
        self.store = store
        self._kept: list[dict] = []
        self.set_rules(cfg)

    # -- configuration --------------------------------------------------------------------------
    def check_rules(self, cfg: AlarmsConfig) -> None:
        """ConfigError naming the key when a rule names a class the model does not have."""
        known = set(self.defect_classes)
        for i, rule in enumerate(cfg.rules):
            if isinstance(rule, DefectRule):
                unknown = [c for c in rule.classes if c not in known]
                if unknown:
                    raise ConfigError(self.source_file, f"alarms.rules.{i}.classes",
                                      f"unknown class(es) {unknown}; the model's defect classes are "
                                      f"{list(self.defect_classes)}")

    def set_rules(self, cfg: AlarmsConfig) -> None:
        """(Re)load the rules; alarms whose name stays keep their state (SIGHUP reload)."""
        self.check_rules(cfg)
        now = self.clock()
        dropped: list[tuple[_Alarm, str]] = []
        with self._lock:
            old = {a.rule.name: a for a in self._alarms}
            alarms = []
            for i, rule in enumerate(cfg.rules):
                a = old.get(rule.name)
                if a is not None and type(a.rule) is not type(rule) and a.latched:
                    dropped.append((a, f"the rule is of type {rule.type} now"))
                if a is None or type(a.rule) is not type(rule):
                    a = _Alarm(i, rule, now)
                else:
                    if a.rule != rule:
                        # What the window holds (positions or times, of which classes) was
                        # counted under the old rule; the active / latched output carries over.
                        a.window.clear()
                    a.index, a.rule = i, rule
                alarms.append(a)
            names = {r.name for r in cfg.rules}
            dropped += [(a, "no rule has that name now") for a in self._alarms
                        if a.latched and a.rule.name not in names]
            self._alarms = alarms
            self.cfg = cfg
        for a, why in dropped:
            # an unacknowledged alarm leaves the PLC with this reload: say so, as a restart does
            log.warning("alarm %s was latched and not acknowledged (since %s) but %s: dropped by "
                        "the reload", a.rule.name, a.latched_at or "?", why)
        self._keep_latched()
        self._notify()

    def restore(self) -> list[str]:
        """Raise again the alarms the previous run left latched (from the store); returns their
        names. Call once, after the rules are set and before the drivers start."""
        if self.store is None:
            return []
        records = self.store.load()
        back: list[str] = []
        with self._lock:
            # what the file holds: a record dropped below, or listed twice, rewrites it
            self._kept = self.store.held
            by_name = {a.rule.name: a for a in self._alarms}
            for r in records:
                a = by_name.get(r["name"])
                if a is None or a.rule.type != r["type"] or not a.rule.latch:
                    why = ("no rule has that name now" if a is None else
                           f"the rule is of type {a.rule.type} now" if a.rule.type != r["type"] else
                           "the rule no longer latches")
                    log.warning("alarm %s was latched before the restart (since %s) but %s: dropped",
                                r["name"], r["since"] or "?", why)
                    continue
                a.latched = True
                a.latched_at = r["since"]
                a.latch_detail = r["detail"]  # kept as it was: the file must not grow per restart
                a.detail = f"latched before the restart, since {r['since'] or '?'}: {r['detail'] or '?'}"
                if not a.active:
                    a.active = True
                    a.raised += 1
                back.append(a.rule.name)
        for name in back:
            log.warning("alarm %s RAISED again: %s; not acknowledged yet", name, by_name[name].detail)
        self._keep_latched()
        self._notify()
        return back

    @property
    def names(self) -> list[str]:
        return [a.rule.name for a in self._alarms]

    def subscribe(self, fn: Callable[[PlcState], None]) -> None:
        """Call ``fn(state)`` after every change; ``fn`` must not block (drivers queue)."""
        self._listeners.append(fn)

    # -- inputs ---------------------------------------------------------------------------------
    def set_running(self, running: bool, camera_ok: bool | None = None) -> None:
        with self._lock:
            self.running = running
            if camera_ok is not None:
                self.camera_ok = camera_ok
            if not running:
                # a stopped inspector cannot vouch for the camera (README, PLC maps: status)
                self.camera_ok = False
        self._notify()

    def on_frame(self, header: dict) -> None:
        """Account one published frame and evaluate the defect rules on it."""
        now = self.clock()
        defects = header.get("defects") or []
        changed: list[_Alarm] = []
        with self._lock:
            self.frames += 1
            # the header's total counts regions beyond the max_defects cap of the list
            self.defects_total += max(int(header.get("defects_total") or 0), len(defects))
            for d in defects:
                k = d.get("class_id", 0) - 1
                if 0 <= k < len(self.counts):
                    self.counts[k] += 1
            if defects:
                d = defects[0]  # the largest of the frame
                pos = d.get("strip_pos_mm")
                area = d.get("area_mm2")
                self._last = (d.get("class_id", 0), pos if pos is not None else header.get("strip_pos_mm", 0.0),
                              (d.get("centroid") or [0.0])[0], area if area is not None else d.get("area_px", 0),
                              d.get("score", 0.0))
            for a in self._alarms:
                if isinstance(a.rule, DefectRule):
                    cause = self._defect_cause(a, header, defects, now)
                    if a.update(now, cause):
                        changed.append(a)
        self._report(changed)
        if changed:
            self._keep_latched()
        self._notify()

    def tick(self, camera_state: str, counters: dict | None = None) -> None:
        """Time-based rules and debounce timers; call a few times a second."""
        now = self.clock()
        changed: list[_Alarm] = []
        with self._lock:
            camera_ok = camera_state == "ok"
            status_changed = camera_ok != self.camera_ok
            self.camera_ok = camera_ok
            if counters is not None:
                lost = {**counters["dropped"], "camera_skipped": counters.get("camera_skipped", 0)}
                self._overload_hist.append((now, counters["grabbed"], lost))
                longest = max((a.rule.window_s for a in self._alarms if isinstance(a.rule, OverloadRule)),
                              default=0.0)
                while len(self._overload_hist) > 2 and now - self._overload_hist[1][0] >= longest:
                    self._overload_hist.popleft()
            for a in self._alarms:
                r = a.rule
                if isinstance(r, CameraDownRule):
                    cause = self.running and not camera_ok
                    if cause and not a.cause:
                        a.detail = f"camera {camera_state} for {r.after_s:g} s"
                elif isinstance(r, OverloadRule):
                    cause = self._overload_cause(a, now)
                elif r.window_s is not None:
                    while a.window and now - a.window[0] > r.window_s:
                        a.window.popleft()
                    cause = len(a.window) >= r.count
                else:
                    cause = a.cause
                if a.update(now, cause):
                    changed.append(a)
        self._report(changed)
        if changed:
            self._keep_latched()
        if changed or status_changed:
            self._notify()

    def ack(self, indices: Iterable[int] | None = None, by: str = "") -> list[str]:
        """Release the latch of the given alarms (all when None); returns the names released."""
        with self._lock:
            wanted = set(range(len(self._alarms))) if indices is None else set(indices)
            done, changed = self._release(wanted)
        return self._released(done, changed, by)

    def _release(self, wanted: set[int]) -> tuple[list[str], list[_Alarm]]:
        """Under the lock: unlatch the alarms at ``wanted``; their names, and those whose state
        changed."""
        done: list[str] = []
        changed: list[_Alarm] = []
        for a in self._alarms:
            if a.index in wanted and a.latched:
                a.latched = False
                done.append(a.rule.name)
                was = a.active
                a.active = a.cond
                if was != a.active:
                    changed.append(a)
        return done, changed

    def _released(self, done: list[str], changed: list[_Alarm], by: str) -> list[str]:
        for name in done:
            log.info("alarm %s acknowledged%s", name, f" by {by}" if by else "")
        self._report(changed)
        if done:
            self._keep_latched()
            self._notify()
        return done

    def ack_names(self, names: Iterable[str], by: str = "", unknown_ok: bool = False) -> list[str]:
        """Release the latch of the alarms named; a name no rule has now is a KeyError, or with
        ``unknown_ok`` (a PLC's request made before a reload removed that rule) a log line. The
        names are resolved against the rules under the same lock as the release: a reload that
        reorders the rules in between cannot make a request release another alarm."""
        names = list(names)
        with self._lock:
            index = {a.rule.name: a.index for a in self._alarms}
            unknown = [n for n in names if n not in index]
            if unknown and not unknown_ok:
                raise KeyError(f"unknown alarm(s) {unknown}; alarms are {list(index)}")
            done, changed = self._release({index[n] for n in names if n in index})
        if unknown:
            log.info("acknowledge of %s%s ignored: no such alarm since the last reload",
                     ", ".join(unknown), f" by {by}" if by else "")
        return self._released(done, changed, by)

    # -- rules ----------------------------------------------------------------------------------
    def _matches(self, a: _Alarm, d: dict) -> bool:
        r: DefectRule = a.rule
        if r.classes and d.get("class") not in r.classes:
            return False
        if d.get("score", 0.0) < r.min_score:
            return False
        if r.min_area_px is not None and d.get("area_px", 0) < r.min_area_px:
            return False
        if r.min_area_mm2 is not None:
            if d.get("area_mm2") is None:
                self._warn_once(a, "min_area_mm2", "defects carry no area in mm² (the source gives "
                                "no pixel size: set geometry.mm_per_px_across/along); the rule cannot fire")
                return False
            if d["area_mm2"] < r.min_area_mm2:
                return False
        return True

    def _defect_cause(self, a: _Alarm, header: dict, defects: list[dict], now: float) -> bool:
        r: DefectRule = a.rule
        hits = [d for d in defects if self._matches(a, d)]
        if r.per_m is not None:
            end = header.get("strip_pos_mm") or 0.0
            if end < a.window_end:
                # New coil, encoder reset or wrap: the old positions are another strip's.
                log.info("alarm %s: strip position went back from %.0f to %.0f mm; its %g m "
                         "window starts again", r.name, a.window_end, end, r.per_m)
                a.window.clear()
            a.window_end = end
            placed = [d["strip_pos_mm"] for d in hits if d.get("strip_pos_mm") is not None]
            if len(placed) < len(hits):
                # Without positions every defect since start would stay in the window and the
                # alarm would stick on; like min_area_mm2, the rule cannot fire then.
                self._warn_once(a, "per_m", "defects carry no strip position (the source gives no "
                                "pixel size: set geometry.mm_per_px_along); those defects are not "
                                "counted and the rule cannot fire on them")
            a.window.extend(placed)
            while a.window and a.window[0] < end - r.per_m * 1000.0:
                a.window.popleft()
            n = len(a.window)
            span = f"within {r.per_m:g} m"
        elif r.window_s is not None:
            a.window.extend([now] * len(hits))
            while a.window and now - a.window[0] > r.window_s:
                a.window.popleft()
            n = len(a.window)
            span = f"within {r.window_s:g} s"
        else:
            n = len(hits)
            span = "in one frame"
        cause = n >= r.count
        if cause and hits and not a.cause:
            d = hits[0]
            area = (f"{d['area_mm2']:g} mm²" if d.get("area_mm2") is not None else f"{d.get('area_px')} px")
            a.detail = (f"{n} defect(s) {span}; {d.get('class')} score {d.get('score', 0):.2f} area {area} "
                        f"at {d.get('strip_pos_mm') if d.get('strip_pos_mm') is not None else '?'} mm "
                        f"(frame {header.get('frame_id')})")
        return cause

    def _overload_cause(self, a: _Alarm, now: float) -> bool:
        r: OverloadRule = a.rule
        hist = self._overload_hist
        if len(hist) < 2:
            return False
        t1, g1, d1 = hist[-1]
        # the oldest sample still inside the window (or the oldest kept)
        base = hist[0]
        for s in hist:
            if now - s[0] <= r.window_s:
                break
            base = s
        _, g0, d0 = base
        grabbed = g1 - g0
        if "camera_skipped" in r.reasons:  # never grabbed: frames the camera delivered or lost
            grabbed += d1.get("camera_skipped", 0) - d0.get("camera_skipped", 0)
        dropped = sum(d1.get(k, 0) - d0.get(k, 0) for k in r.reasons)
        if grabbed < r.min_frames:
            return a.cause if grabbed > 0 else False
        frac = dropped / grabbed
        cause = frac >= r.drop_fraction
        if cause and not a.cause:
            a.detail = (f"{dropped} of {grabbed} frames dropped ({'/'.join(r.reasons)}) "
                        f"in {r.window_s:g} s")
        return cause

    def _warn_once(self, a: _Alarm, key: str, msg: str) -> None:
        if key not in a.warned:
            a.warned.add(key)
            log.warning("%s: alarms.rules.%d.%s: %s", self.source_file, a.index, key, msg)

    # -- outputs --------------------------------------------------------------------------------
    def _report(self, changed: list[_Alarm]) -> None:
        # One line per state change (journald), never per frame.
        for a in changed:
            if a.active:
                log.warning("alarm %s RAISED: %s", a.rule.name, a.detail or a.rule.type)
            else:
                log.info("alarm %s cleared", a.rule.name)

    def state(self) -> PlcState:
        with self._lock:
            c, pos, across, area, score = self._last
            return PlcState(alarm_names=tuple(a.rule.name for a in self._alarms),
                            alarms=tuple(a.active for a in self._alarms),
                            classes=self.defect_classes, counts=tuple(self.counts),
                            frames=self.frames, defects_total=self.defects_total,
                            running=self.running, camera_ok=self.camera_ok, last_class=c,
                            last_pos_mm=pos, last_across_px=across, last_area=area, last_score=score)

    def active(self) -> dict[str, bool]:
        with self._lock:
            return {a.rule.name: a.active for a in self._alarms}

    def latched_names(self) -> list[str]:
        with self._lock:
            return [a.rule.name for a in self._alarms if a.latched]

    def raised_counts(self) -> dict[str, int]:
        with self._lock:
            return {a.rule.name: a.raised for a in self._alarms}

    def latched_records(self) -> list[dict]:
        """The latched set as the store keeps it."""
        with self._lock:
            return self._records()

    def _records(self) -> list[dict]:
        return [{"name": a.rule.name, "type": a.rule.type, "since": a.latched_at,
                 "detail": a.latch_detail} for a in self._alarms if a.latched]

    def move_store(self, new: LatchStore) -> LatchStore | None:
        """Keep the latched set in ``new`` from now on (a reload moving the file; ``new`` holds
        what :meth:`latched_records` gave, written); returns the old store, for the caller to
        close. What latched or cleared since goes to ``new``, never to the old one."""
        with self._lock:
            old, self.store = self.store, new
            self._kept = new.held
            kept = self._records()
            if kept != self._kept:
                self._kept = kept
                new.submit(kept)
        return old

    def _keep_latched(self) -> None:
        # A latch is only ever set by an update that changed the output, released by ack(), or
        # dropped with its rule by set_rules(): the callers of those run this after them.
        if self.store is None:
            return
        with self._lock:
            kept = self._records()
            if kept == self._kept:
                return
            self._kept = kept
            self.store.submit(kept)

    def _notify(self) -> None:
        if not self._listeners:
            return
        # Snapshot and hand-over under the lock: on_frame (publish thread) and tick (daemon
        # loop) both notify, and a driver keeps the state it got last, so an older snapshot
        # must never arrive after a newer one. Listeners never block (drivers queue).
        with self._lock:
            s = self.state()
            for fn in self._listeners:
                try:
                    fn(s)
                except Exception:  # a broken listener must not stop the frame that fed us
                    log.exception("alarm state listener failed")
