"""Frame recorder: keeps the frames quality staff and model training need, on a disk budget.

The ``record:`` section of a camera config. After a frame is published, the recorder may keep its
image, its published class-index mask and its published header:

* every frame with a defect (``defects``; ``classes`` narrows it to some classes), for review and
  relabelling;
* every ``normal_every``-th frame without one, the line's own defect-free images, which
  ``inspector calibrate thresholds --normal`` and ARCD's stage 1 (a folder of normal images) read.

Layout, one folder per camera, one record = the same file stem in each sub-folder::

    <dir>/<camera_id>/defects/images/<stem>.png   the frame as grabbed (lossless)
    <dir>/<camera_id>/defects/masks/<stem>.png    the published mask, class index per pixel
    <dir>/<camera_id>/defects/meta/<stem>.json    the published header (defects, model, timings)
    <dir>/<camera_id>/defects/regions/<stem>.png  the published region mask, 0/255 (region heads only)
    <dir>/<camera_id>/normal/images/<stem>.png    (no mask: it is empty)
    <dir>/<camera_id>/normal/meta/<stem>.json
    <dir>/<camera_id>/normal/regions/<stem>.png   (region heads only)

``regions/`` holds the machine-region mask of a bundle with a region head (``header["region"]``),
255 = region, so it is viewable as is; it is made at the first region record, and absent for
bundles without a region.

``<stem>`` is the capture time in UTC and the frame id (``20261128T013000123Z-f000000042``), so
names sort by time and never collide across restarts. Each file appears whole (written under a
hidden name, then renamed) and the image last, so a reader that lists ``images/`` (the replay
source, the calibration tools) sees only complete records; a start removes what a killed process
left (hidden files, a meta or mask without its image, an empty image). By default files are not
fsync'd: after a power cut the last records may be missing or empty, and the next start removes
them. ``fsync: true`` flushes each file to the disk before it is renamed into place, and the
folders after the rename, so a record that was counted survives a power cut; it costs the writer
thread (never the inspection) a disk flush per file (``benchmarks/recorder_bench.py --fsync``).
One recorder per camera folder: a second one (two configs with one ``camera_id``) is refused.
A start refuses, too, a folder of the layout this user cannot write (a sub-folder left root's by a
run as root), naming ``record.dir`` and the folder, as ``inspector check --user`` does.

Inspection never waits for the disk: frames go through a bounded queue to one writer thread.
A frame not recorded is counted by reason and logged once per burst, never silently: the queue
was full (``queue_full``), the file system had less than ``min_free_gb`` free (``disk_low``),
the write failed (``write_error``), or the recorder was closed before it got to it
(``shutdown``). The first record written once a burst's report interval has passed is logged
with the burst's full count, so the log says how many and that recording works again. The folder
is held under ``max_gb``, and the file system above ``min_free_gb``, by removing the oldest
records first, in the order they were written (a clock stepped back does not make new records
look old).

Example::

    rec = Recorder(RecordConfig(enabled=True, dir="/tmp/rec"), "cam1", ["background", "scratch"])
    rec.start()
    rec.offer(frame, label, header)   # from the publish stage, never blocks (region=... with a region head)
    rec.close(timeout_s=5)
"""

from __future__ import annotations

import fcntl
import heapq
import json
import logging
import os
import queue
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from inspector.access_check import owner_text
from inspector.errors import ConfigError
from inspector.fileio import nearest_existing, unlock_and_close

log = logging.getLogger(__name__)

#: how long no frame may have been skipped before a record written counts as recording again
RECOVERED_AFTER_S = 1.0

GB = 1024 ** 3
DEFAULT_DIR = "/var/lib/inspector/recordings"
#: what a record is kept as, and the sub-folders of its files, in write order (the image last)
KINDS = {"defects": ("meta", "masks", "regions", "images"), "normal": ("meta", "regions", "images")}
#: sub-folders made only when a record has such a file (the region of a region-head bundle), so
#: a recorder of a bundle without one leaves the layout as it was
OPTIONAL_SUBS = frozenset({"regions"})
SKIP_REASONS = ("queue_full", "disk_low", "write_error", "shutdown")
_SUFFIX = {"images": ".png", "masks": ".png", "regions": ".png", "meta": ".json"}
_END = object()


class RecordConfig(BaseModel):
    """``record:`` section of a camera config (off unless ``enabled``)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    enabled: bool = False
    dir: str | None = Field(None, description="recordings root; the camera writes <dir>/<camera_id>/; "
                                              "relative paths resolve against the config file; default "
                                              "$INSPECTOR_RECORDINGS (the unit sets it to the install's "
                                              "state folder), else " + DEFAULT_DIR)
    defects: bool = Field(True, description="record every frame with at least one defect")
    classes: list[str] = Field(default_factory=list,
                               description="only defects of these classes count (empty: any class)")
    normal_every: int = Field(0, ge=0, description="also every Nth frame without a defect (0: none)")
    max_gb: float = Field(20.0, gt=0, description="this camera's folder is kept under this size; "
                                                  "the oldest records are removed first")
    min_free_gb: float = Field(2.0, ge=0, description="record nothing while the file system has less "
                                                      "free space than this")
    queue_size: int = Field(32, ge=1, le=4096, description="frames waiting for the writer")
    png_compression: int = Field(1, ge=0, le=9, description="PNG level: 1 is fast, 9 small")
    fsync: bool = Field(False, description="flush every file and its folder to the disk before the "
                                           "record is counted: survives a power cut, costs the "
                                           "writer a disk flush per file")
    writer_nice: int = Field(10, ge=0, le=19, description="how much lower the writer thread's CPU "
                                                          "priority is than inspection's (nice steps, "
                                                          "up to nice 19; 0: the same): PNG encoding "
                                                          "yields to inference on a busy CPU")


def _fsync_dir(folder: Path) -> None:
    """Flush a folder's entries (the renames into it) to the disk."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass
class _Item:
    kind: str
    stem: str
    image: np.ndarray
    label: np.ndarray | None
    header: dict
    #: the region mask as written, 0/255 (a copy: the pipeline reuses its buffer)
    region: np.ndarray | None = None


def record_stem(t_capture_ns: int, frame_id: int) -> str:
    """``20261128T013000123Z-f000000042``: sorts by capture time, unique across restarts.

    >>> record_stem(1_795_000_000_123_456_789, 42)
    '20261118T110640123Z-f000000042'
    """
    s, ns = divmod(int(t_capture_ns), 1_000_000_000)
    return time.strftime("%Y%m%dT%H%M%S", time.gmtime(s)) + f"{ns // 1_000_000:03d}Z-f{frame_id:09d}"


def recordings_root(cfg: RecordConfig, camera_id: str, base_dir: Path | None = None) -> Path:
    """The camera's folder: ``<dir>/<camera_id>`` (``dir`` relative to the config file)."""
    root = Path(cfg.dir or os.environ.get("INSPECTOR_RECORDINGS") or DEFAULT_DIR).expanduser()
    if not root.is_absolute():
        root = (base_dir or Path.cwd()) / root
    return root / camera_id


def check_classes(cfg: RecordConfig, class_names: list[str], config_file: str) -> set[int]:
    unknown = sorted(set(cfg.classes) - set(class_names[1:]))
    if unknown:
        raise ConfigError(config_file, "record.classes", f"unknown class(es) {unknown}; the "
                          f"model's defect classes are {class_names[1:]}")
    return {class_names.index(c) for c in cfg.classes}


def _ordinal(n: int) -> str:
    """2nd, 3rd, 11th, 21st, 500th."""
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def describe(cfg: RecordConfig) -> str:
    """What the config records, in words."""
    what = []
    if cfg.defects:
        what.append("frames with " + (f"{'/'.join(cfg.classes)} defects" if cfg.classes else "defects"))
    if cfg.normal_every:
        what.append(f"every {_ordinal(cfg.normal_every)} frame without" if cfg.normal_every > 1
                    else "every frame without")
    return " and ".join(what) or "nothing (record.defects false, record.normal_every 0)"


def _reasons(counts: dict[str, int]) -> str:
    """``write_error 20, disk_low 6``: the reasons with a count."""
    return ", ".join(f"{k} {v}" for k, v in counts.items() if v)


def _by_reason(counts: dict[str, int]) -> str:
    """``26 (write_error 26)``, ``0``: a total and its reasons, as the STATUS line says drops."""
    total = sum(counts.values())
    return f"{total} ({_reasons(counts)})" if total else "0"


def _unwritable_folder(root: Path) -> Path | None:
    """The first existing folder of the camera's layout (the kind folders and their sub-folders,
    ``regions/`` too) this user cannot write, or None. The camera folder itself is left to the
    caller (a start proves it with a file): a sub-folder left root's by a root run passes that
    proof and would fail every record instead, so each is asked as ``inspector check --user``
    asks (:mod:`inspector.access_check`), by ``os.access``."""
    for kind, subs in KINDS.items():
        for folder in [root / kind] + [root / kind / sub for sub in subs]:
            if folder.is_dir() and not os.access(folder, os.W_OK | os.X_OK):
                return folder
    return None


def _sub_folder_error(config_file: str, root: Path, folder: Path) -> ConfigError:
    owner = owner_text(str(folder))
    return ConfigError(config_file, "record.dir", f"cannot write recordings into {root}: its "
                       f"sub-folder {folder} is not writable to this user"
                       + (f" ({owner})" if owner else "") + "; every folder of the layout must be "
                       "writable to the service's user (a run as root leaves the folders it made "
                       "root's: chown them)")


def preflight(cfg: RecordConfig, camera_id: str, class_names: list[str], base_dir: Path | None = None,
              config_file: str = "<memory>", root_note: bool = True) -> tuple[Path, list[str]]:
    """The start-up checks without touching the disk (``inspector check``, a reload): the classes,
    and that the folder is or can be made a writable folder. Returns the camera folder and notes
    for the user; raises :class:`ConfigError` naming the key for what a start would refuse."""
    check_classes(cfg, class_names, config_file)
    root = recordings_root(cfg, camera_id, base_dir)
    notes = []
    if not cfg.dir and not os.environ.get("INSPECTOR_RECORDINGS"):
        notes.append(f"record.dir not set: {DEFAULT_DIR} here; the unit uses its own "
                     "INSPECTOR_RECORDINGS (<STATEDIR>/recordings)")
    base = nearest_existing(root)
    if not base.is_dir():
        raise ConfigError(config_file, "record.dir", f"cannot write recordings into {root}: {base} "
                          "is not a folder")
    if not os.access(base, os.W_OK | os.X_OK):
        raise ConfigError(config_file, "record.dir", f"cannot write recordings into {root}: {base} is "
                          "not writable to this user")
    if root.is_dir():
        bad = _unwritable_folder(root)
        if bad is not None:
            raise _sub_folder_error(config_file, root, bad)
    if os.geteuid() == 0 and root_note:  # (not when the service user's access was checked itself)
        st = base.stat()
        notes.append(f"checked as root: the service user must be able to write {base} (owner uid "
                     f"{st.st_uid}, mode {st.st_mode & 0o777:o})")
    lock = root / ".lock"
    if lock.exists():
        try:
            with open(lock) as fh:
                try:
                    fcntl.flock(fh, fcntl.LOCK_SH | fcntl.LOCK_NB)
                except BlockingIOError:
                    notes.append(f"a running recorder holds {root} (pid {lock.read_text().strip() or '?'})")
        except OSError:
            pass
    try:
        free = shutil.disk_usage(base).free
        used = sum(f.stat().st_size for f in root.rglob("*") if f.is_file()) if root.is_dir() else 0
        room = used + free - int(cfg.min_free_gb * GB)
        if room < int(cfg.max_gb * GB):
            notes.append(f"the file system holds {max(room, 0) / GB:.1f} GB for recordings, less than "
                         f"record.max_gb {cfg.max_gb:g}: the oldest records will go to keep "
                         f"record.min_free_gb {cfg.min_free_gb:g} free")
    except OSError:
        pass
    return root, notes


class Recorder:
    """One camera's recorder (see module docs). Thread-safe ``offer``; one writer thread."""

    #: a burst's report interval (s): a reason's skips are logged at most once per interval, and
    #: the burst's count at the first record written once it has passed (the pipeline's drop log,
    #: :class:`inspector.pipeline.BurstLog`, keeps the same rule)
    report_every_s: float = 10.0

    def __init__(self, cfg: RecordConfig, camera_id: str, class_names: list[str],
                 base_dir: Path | None = None, config_file: str = "<memory>"):
        self.cfg = cfg
        self.root = recordings_root(cfg, camera_id, base_dir)
        self.config_file = config_file
        self._class_ids = check_classes(cfg, class_names, config_file)
        self.max_bytes = int(cfg.max_gb * GB)
        self.min_free = int(cfg.min_free_gb * GB)
        self._lock = threading.Lock()
        self.recorded = {"defects": 0, "normal": 0}
        self.skipped = {r: 0 for r in SKIP_REASONS}
        self.removed = 0
        self._normal_seen = 0
        self._queue: queue.Queue = queue.Queue(cfg.queue_size)
        self._thread: threading.Thread | None = None
        self._closed = False
        self._last_log = {r: -1e9 for r in SKIP_REASONS}
        self._quiet = {r: 0 for r in SKIP_REASONS}
        self._burst = {r: 0 for r in SKIP_REASONS}  # skips since recording last worked
        self._last_skip = -1e9
        self._log_lock = threading.Lock()  # the skip log's state: the publish and writer threads
        self._trim_warned = -1e9
        self._room_warned = -1e9
        self._seq = 0                 # write order: what "oldest" means when removing
        self._newest_stem = ""        # the latest capture time written, to notice a clock set back
        self._clock_warned = False
        self._current: _Item | None = None
        self._frozen = False          # set by close() once it has counted what is left
        self._writer_done = False     # set by the writer thread as it ends
        self._lock_fh: Any = None
        self._prepare()

    # -- set-up -----------------------------------------------------------------------------------
    def _prepare(self) -> None:
        """Create the folders, take the folder's lock, prove it is writable, and take stock of
        what is there (removing what a killed process left)."""
        try:
            made = self._mkdirs()
            self._lock_fh = open(self.root / ".lock", "a+")
        except OSError as e:
            raise ConfigError(self.config_file, "record.dir", f"cannot write recordings into "
                              f"{self.root}: {e.strerror or e} (the service runs as its own user: "
                              "the folder must be writable to it)") from None
        try:
            fcntl.flock(self._lock_fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock_fh.seek(0)
            pid = self._lock_fh.read().strip() or "?"
            self._lock_fh.close()
            self._lock_fh = None
            raise ConfigError(self.config_file, "record.dir", f"{self.root} is in use by another "
                              f"recorder (pid {pid}): two cameras with one camera_id?") from None
        try:
            self._lock_fh.seek(0)
            self._lock_fh.truncate()
            self._lock_fh.write(f"{os.getpid()}\n")
            self._lock_fh.flush()
            probe = self.root / ".write-test"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as e:
            self._release()
            raise ConfigError(self.config_file, "record.dir", f"cannot write recordings into "
                              f"{self.root}: {e.strerror or e} (the service runs as its own user: "
                              "the folder must be writable to it)") from None
        if made and os.geteuid() == 0:
            self._give_to_parent_owner(made)
        # before the stock-taking below, which removes files in these folders
        bad = _unwritable_folder(self.root)
        if bad is not None:
            self._release()
            raise _sub_folder_error(self.config_file, self.root, bad)
        # records in write order (oldest first): (seq, stem, kind, bytes); on disk, the files'
        # modification times stand for the order
        found: list[tuple[float, str, str, int]] = []
        self.used = 0
        cleaned = 0
        for kind, subs in KINDS.items():
            files: dict[str, dict[str, Path]] = {}
            for sub in subs:
                folder = self.root / kind / sub
                if sub in OPTIONAL_SUBS and not folder.is_dir():
                    continue
                for p in folder.iterdir():
                    if p.name.startswith("."):  # a write cut short
                        p.unlink(missing_ok=True)
                        cleaned += 1
                        continue
                    files.setdefault(p.stem, {})[sub] = p
            for stem, parts in files.items():
                try:
                    stats = {sub: p.stat() for sub, p in parts.items()}
                except OSError:
                    continue
                image = stats.get("images")
                if image is None or image.st_size == 0:
                    # killed between its renames, or an empty image after a power cut
                    for p in parts.values():
                        p.unlink(missing_ok=True)
                    cleaned += 1
                    continue
                size = sum(st.st_size for st in stats.values())
                found.append((max(st.st_mtime for st in stats.values()), stem, kind, size))
                self.used += size
        found.sort()
        self._heap = [(i, stem, kind, size) for i, (_, stem, kind, size) in enumerate(found)]
        self._seq = len(found)
        self._newest_stem = max((stem for _, stem, _, _ in found), default="")
        if cleaned:
            log.warning("recorder: removed %d incomplete record(s) or file(s) a stopped process left "
                        "in %s", cleaned, self.root)
        log.info("recording %s into %s (%.2f GB of %.2f GB used, %d records)", self.describe(),
                 self.root, self.used / GB, self.cfg.max_gb, len(self._heap))
        try:
            room = self.used + shutil.disk_usage(self.root).free - self.min_free
            if room < self.max_bytes:
                log.warning("recorder: the file system holds %.1f GB for recordings, less than "
                            "record.max_gb %g: the oldest records will go to keep record.min_free_gb "
                            "%g free", max(room, 0) / GB, self.cfg.max_gb, self.cfg.min_free_gb)
        except OSError:
            pass

    def _mkdirs(self) -> list[Path]:
        """Create the folders; returns those it created, outermost first."""
        made: list[Path] = []
        for kind, subs in KINDS.items():
            for sub in subs:
                if sub in OPTIONAL_SUBS:
                    continue
                target = self.root / kind / sub
                missing = []
                p = target
                while not p.exists() and p != p.parent:
                    missing.append(p)
                    p = p.parent
                target.mkdir(parents=True, exist_ok=True)
                made.extend(reversed(missing))
        return made

    def _give_to_parent_owner(self, made: list[Path]) -> None:
        """Folders a root shell created (``inspector run`` by hand) belong to whoever owns the
        folder above them (the service user's state folder), or the service could not write them."""
        owner = nearest_existing(made[0].parent).stat()
        if owner.st_uid == 0:
            return
        for p in made:
            try:
                os.chown(p, owner.st_uid, owner.st_gid)
            except OSError:
                return
        try:
            os.chown(self.root / ".lock", owner.st_uid, owner.st_gid)
        except OSError:
            pass

    def _release(self) -> None:
        with self._lock:  # close() and a writer that outlived it may both get here
            fh, self._lock_fh = self._lock_fh, None
        unlock_and_close(fh)

    def describe(self) -> str:
        return describe(self.cfg)

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._writer, name="recorder", daemon=True)
            self._thread.start()

    # -- the publish stage's side -------------------------------------------------------------------
    def wants(self, defects: list[dict]) -> str | None:
        """Which kind of record a frame with these defects makes, or None."""
        c = self.cfg
        if defects:
            if c.defects and (not self._class_ids
                              or any(d.get("class_id") in self._class_ids for d in defects)):
                return "defects"
            return None
        if c.normal_every:
            self._normal_seen += 1
            if self._normal_seen >= c.normal_every:
                self._normal_seen = 0
                return "normal"
        return None

    def offer(self, frame: Any, label: np.ndarray, header: dict,
              region: np.ndarray | None = None) -> str | None:
        """Queue a published frame for recording when the config wants it; never blocks.

        ``frame.image`` and ``label`` must not be written to afterwards (the pipeline allocates
        both per frame). ``region`` (the 0/1 region mask, when the bundle has a region head) may
        be: it is copied, as 0/255, for the frames recorded only. Returns the kind queued, or
        None."""
        kind = self.wants(header.get("defects") or [])
        if kind is None:
            return None
        # the pipeline reuses its region buffer for the next frame: copy it now, scaled to 0/255
        # in the same pass so the PNG is viewable as is
        region_png = np.multiply(region, np.uint8(255), dtype=np.uint8) if region is not None else None
        item = _Item(kind, record_stem(frame.t_capture_ns, frame.frame_id), frame.image,
                     label if kind == "defects" else None, dict(header), region_png)
        with self._lock:  # close() sets _closed under it: nothing is queued behind its end mark
            closed = self._closed
            full = False
            if not closed:
                try:
                    self._queue.put_nowait(item)
                except queue.Full:
                    full = True
        if closed:
            self._skip("shutdown", item.stem, "the recorder is closed")
            return None
        if full:
            self._skip("queue_full", item.stem, f"the writer is behind ({self.cfg.queue_size} frames "
                       "waiting: record.queue_size; the disk is slower than the defect rate)")
            return None
        return kind

    def _skip(self, reason: str, stem: str, why: str, writer: bool = False) -> None:
        """Count a frame not recorded and log it (once per burst). ``writer``: the writer's frame
        in hand, which is then done, so close() cannot count it again."""
        with self._lock:
            if writer:
                if self._frozen:  # close() has said its figures: they hold this frame already
                    return
                self._current = None
            self.skipped[reason] += 1
        self._log_skip(reason, stem, why)

    def _log_skip(self, reason: str, stem: str, why: str) -> None:
        now = time.monotonic()
        with self._log_lock:
            self._last_skip = now
            self._burst[reason] += 1
            if now - self._last_log[reason] < self.report_every_s:
                self._quiet[reason] += 1
                return
            more = f" (+{self._quiet[reason]} more since last report)" if self._quiet[reason] else ""
            self._last_log[reason] = now
            self._quiet[reason] = 0
        log.warning("recorder: %s not recorded: %s%s", stem, why, more)

    def _log_recovered(self) -> None:
        """After a record was written: close a burst of skips whose report interval has passed
        with its full count. Without it the skips quieted after the burst's last line appear only
        in the stop's summary, and nothing says that recording works again."""
        now = time.monotonic()
        with self._log_lock:
            burst = {r: n for r, n in self._burst.items() if n}
            # ... and only once the skips have stopped: frames still skipped now and then between
            # records (a writer that keeps falling behind) are no recovery, and their burst keeps
            # being counted by the skip lines themselves
            if (not burst or now - max(self._last_log[r] for r in burst) < self.report_every_s
                    or now - self._last_skip < min(RECOVERED_AFTER_S, self.report_every_s)):
                return
            for r in burst:
                self._burst[r] = 0
                self._quiet[r] = 0  # in the count said here
                self._last_log[r] = -1e9  # a new burst's first skip is said at once
        log.warning("recorder: recording again after %d frame(s) not recorded (%s)",
                    sum(burst.values()), _reasons(burst))

    def snapshot(self) -> dict:
        with self._lock:
            return {"recorded": dict(self.recorded), "skipped": dict(self.skipped),
                    "removed": self.removed, "bytes": self.used, "waiting": self._queue.qsize()}

    # -- the writer thread ------------------------------------------------------------------------
    def _lower_priority(self) -> None:
        """Make the writer thread (only it: Linux takes a thread id here) yield the CPU to the
        inspection threads; lowering one's own priority needs no privilege."""
        n = self.cfg.writer_nice
        if n == 0:
            return
        try:
            tid = threading.get_native_id()
            base = os.getpriority(os.PRIO_PROCESS, tid)
            os.setpriority(os.PRIO_PROCESS, tid, min(19, base + n))
        except (OSError, AttributeError) as e:  # not Linux, or a sandbox that forbids it
            log.warning("recorder: cannot lower the writer's priority (record.writer_nice %d): %s; "
                        "it encodes at inspection's priority", n, e)
            return
        if base + n > 19:  # nice stops at 19: a service already niced keeps less of a gap
            log.warning("recorder: the writer runs at nice 19, %d step(s) below inspection's %d, not "
                        "record.writer_nice %d: the process is already niced", 19 - base, base, n)

    def _writer(self) -> None:
        try:
            self._write_queue()
        finally:
            with self._lock:
                self._writer_done = True
                frozen = self._frozen
            if frozen:  # close() gave up waiting and left the folder's lock to this thread
                self._release()

    def _write_queue(self) -> None:
        self._lower_priority()
        while True:
            item = self._queue.get()
            if item is _END:
                return
            with self._lock:
                late = self._frozen
                if late:  # close() gave up between the get and here, so could not count this one
                    self.skipped["shutdown"] += 1
                else:
                    self._current = item
            if not late:
                try:
                    self._write(item)
                except Exception as e:  # a bug must not end recording silently: count, log, go on
                    self._skip("write_error", item.stem, f"{type(e).__name__}: {e}", writer=True)
                finally:
                    with self._lock:
                        self._current = None
            if self._frozen:  # close() gave up waiting and emptied the queue
                return

    def _write(self, item: _Item) -> None:
        try:
            free = shutil.disk_usage(self.root).free
        except OSError:
            free = None
        if free is not None and free < self.min_free:
            free = self._make_room(free)
            if free < self.min_free:
                self._skip("disk_low", item.stem, f"{free / GB:.2f} GB free on the file system of "
                           f"{self.root}, below record.min_free_gb {self.cfg.min_free_gb:g}, and no "
                           "older record of this camera left to remove", writer=True)
                return
        if item.stem < self._newest_stem and not self._clock_warned:
            log.warning("recorder: frame capture time %s is before the latest recorded (%s): the "
                        "clock was set back; records are removed in the order they were written",
                        item.stem[:19], self._newest_stem[:19])
            self._clock_warned = True
        self._newest_stem = max(self._newest_stem, item.stem)
        files = self._encode(item)
        folder = self.root / item.kind
        written: list[Path] = []
        final = tmp = d = folder
        try:
            for sub, data in files:  # meta, mask, region, image: the image marks a complete record
                if sub in OPTIONAL_SUBS:
                    self._ensure_folder(folder / sub)
                final = folder / sub / (item.stem + _SUFFIX[sub])
                tmp = final.with_name("." + final.name + ".part")
                with open(tmp, "wb") as fh:
                    fh.write(data)
                    if self.cfg.fsync:
                        # the data before the name: a rename that reaches the disk first would
                        # leave a complete-looking empty file after a power cut
                        fh.flush()
                        os.fsync(fh.fileno())
                if sub != "images":
                    os.replace(tmp, final)
                    written.append(final)
                    continue
                # the image's name completes the record: it is given under the lock close() counts
                # under, so a frame close() counted as a shutdown skip never lands on disk and one
                # that landed is counted as recorded, whenever the stop comes
                with self._lock:
                    landed = not self._frozen
                    if landed:
                        os.replace(tmp, final)
                        written.append(final)
                        self.recorded[item.kind] += 1
                        self._current = None
                if not landed:
                    for p in written + [tmp]:
                        p.unlink(missing_ok=True)
                    return
            if self.cfg.fsync:
                # the renames live in the folders' entries; flushed last, the image's too
                for d in dict.fromkeys(p.parent for p in written):
                    _fsync_dir(d)
        except OSError as e:
            landed = self._current is None  # only this thread clears it while it writes
            if landed:
                # counted as recorded when a folder's flush failed: taken back, unless the stop
                # has said its figures with it in them (then it stays, as they say)
                with self._lock:
                    keep = self._frozen
                    if not keep:
                        self.recorded[item.kind] -= 1
                        self.skipped["write_error"] += 1
            if landed and keep:
                log.warning("recorder: %s recorded during the stop, but flushing %s failed: %s",
                            item.stem, d, e.strerror or e)
            else:
                for p in written + ([tmp] if tmp != folder else []):
                    try:
                        p.unlink(missing_ok=True)
                    except OSError:
                        pass
                if landed:
                    self._log_skip("write_error", item.stem, f"{d}: {e.strerror or e}")
                else:
                    self._skip("write_error", item.stem, f"{final}: {e.strerror or e}", writer=True)
                return
        size = sum(len(d) for _, d in files)
        with self._lock:
            self.used += size
        heapq.heappush(self._heap, (self._seq, item.stem, item.kind, size))
        self._seq += 1
        self._trim()
        self._log_recovered()

    def _encode(self, item: _Item) -> list[tuple[str, bytes]]:
        level = [cv2.IMWRITE_PNG_COMPRESSION, self.cfg.png_compression]
        img = item.image
        if img.ndim == 3:  # frames are RGB, OpenCV writes BGR
            # numpy, not cv2.cvtColor: a parallel cv2 call here could start OpenCV's worker
            # threads, which would inherit this thread's lowered priority and serve inspection
            img = np.ascontiguousarray(img[:, :, ::-1])
        ok, image_png = cv2.imencode(".png", img, level)
        if not ok:
            raise ValueError(f"PNG encoding of a {item.image.shape} frame failed")
        meta = dict(item.header, recorded_as=item.kind)
        files = [("meta", json.dumps(meta, separators=(",", ":")).encode())]
        if item.label is not None:
            ok, mask_png = cv2.imencode(".png", item.label, level)
            if not ok:
                raise ValueError(f"PNG encoding of a {item.label.shape} mask failed")
            files.append(("masks", mask_png.tobytes()))
        if item.region is not None:
            ok, region_png = cv2.imencode(".png", item.region, level)
            if not ok:
                raise ValueError(f"PNG encoding of a {item.region.shape} region mask failed")
            files.append(("regions", region_png.tobytes()))
        files.append(("images", image_png.tobytes()))
        return files

    def _ensure_folder(self, folder: Path) -> None:
        """Make an optional sub-folder at its first file, owned as the start-up folders are."""
        if folder.is_dir():
            return
        folder.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            self._give_to_parent_owner([folder])
        if self.cfg.fsync:
            _fsync_dir(folder.parent)  # the new folder's own entry

    def _remove_oldest(self) -> bool:
        """Remove the oldest record (never the only one left); False when it could not."""
        if len(self._heap) <= 1:
            return False
        seq, stem, kind, size = heapq.heappop(self._heap)
        # the image first: a reader listing images/ never finds one without its mask
        subs = ["images"] + [s for s in KINDS[kind] if s != "images"]
        try:
            for sub in subs:
                (self.root / kind / sub / (stem + _SUFFIX[sub])).unlink(missing_ok=True)
        except OSError as e:
            now = time.monotonic()
            if now - self._trim_warned >= 60.0:
                log.warning("recorder: cannot remove old record %s: %s; recording goes on "
                            "over record.max_gb", stem, e.strerror or e)
                self._trim_warned = now
            heapq.heappush(self._heap, (seq, stem, kind, size))
            return False
        with self._lock:
            self.used -= size
            self.removed += 1
        return True

    def _trim(self) -> None:
        """Remove the oldest records until the folder is under ``max_gb`` (never the newest)."""
        while self.used > self.max_bytes and self._remove_oldest():
            pass

    def _make_room(self, free: int) -> int:
        """Remove the oldest records until the file system has ``min_free_gb`` free again (a
        budget larger than the disk must not end recording for good); returns the free bytes."""
        removed = 0
        while free < self.min_free and self._remove_oldest():
            removed += 1
            try:
                free = shutil.disk_usage(self.root).free
            except OSError:
                break
        if removed:
            now = time.monotonic()
            if now - self._room_warned >= 60.0:
                log.warning("recorder: removed %d old record(s) to keep record.min_free_gb %g free on "
                            "the file system of %s (%.2f GB free now)", removed, self.cfg.min_free_gb,
                            self.root, free / GB)
                self._room_warned = now
        return free

    # -- stop -------------------------------------------------------------------------------------
    def close(self, timeout_s: float = 5.0) -> int:
        """Write what is queued (at most ``timeout_s``), then stop. Frames still waiting after
        that, and the one being written, are counted as ``shutdown`` skips; returns how many."""
        with self._lock:
            if self._closed:
                return 0
            self._closed = True
        left = 0
        if self._thread is not None:
            deadline = time.monotonic() + timeout_s
            while True:
                try:
                    self._queue.put(_END, timeout=max(0.05, deadline - time.monotonic()))
                    break
                except queue.Full:
                    if time.monotonic() >= deadline:
                        break
            self._thread.join(timeout=max(0.0, deadline - time.monotonic()))
            if self._thread.is_alive():
                # what the writer has not finished is not recorded: the one in hand is dropped at
                # its last rename (see _write), so the figures are final from here and match the disk
                with self._lock:
                    self._frozen = True
                    done = self._writer_done  # it ended just now: the lock is not its to free
                    left = 1 if self._current is not None else 0
                while True:
                    try:
                        item = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if item is not _END:
                        left += 1
                if done:
                    self._release()
                else:
                    # a writer that emptied a full queue before _END got in waits in get(): wake it
                    self._queue.put_nowait(_END)
        else:
            left = self._queue.qsize()
        if left:
            with self._lock:
                self.skipped["shutdown"] += left
            log.warning("recorder: %d frame(s) not recorded: the writer did not finish within %gs "
                        "of the stop", left, timeout_s)
        if self._thread is None or not self._thread.is_alive():
            self._release()
        s = self.snapshot()
        log.info("recorder: %d defect frame(s) and %d normal frame(s) recorded, %d old record(s) "
                 "removed, skipped %s", s["recorded"]["defects"], s["recorded"]["normal"],
                 s["removed"], _by_reason(s["skipped"]))
        return left
