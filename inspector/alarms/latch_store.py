"""Latched alarms kept across a restart of the inspector.

A latched alarm means "someone must look at this": it stays on until the PLC (or an operator
through OPC UA) acknowledges it. A restart (a crash that systemd restarts, an update, a reboot of
the line PC) used to start with every alarm off, so an alarm nobody had acknowledged vanished from
the PLC with the first write of the new process. The engine now records which alarms are latched
in a small JSON file, rewritten whenever that set changes (a latch set, an acknowledge, a rule
removed by a reload), and a starting daemon raises them again until they are acknowledged.

The file lives in the service's state folder: ``alarms.latch_file`` when the config sets it,
otherwise ``$INSPECTOR_STATE/alarms/<camera_id>.json`` (the unit sets ``INSPECTOR_STATE`` to the
install's state folder). Without either, nothing is kept, and the daemon says so at start when a
rule latches.

Writes go through a thread of their own: they are rare, but an fsync on a busy or slow disk must
not hold up the publish thread that raised the alarm. The newest state always wins. A running
daemon holds ``<file>.lock``: a second daemon with the same file (two configs with one camera_id)
would raise the other's alarms on its PLC after a restart, and is refused. Folders and files a root
shell creates (``inspector daemon`` run by hand) are given to the owner of the folder above, as the
recorder does, so that the service user can still write them.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import IO

from inspector.errors import ConfigError
from inspector.fileio import atomic_write_text, nearest_existing, unlock_and_close

log = logging.getLogger(__name__)

#: environment variable naming the service's state folder (the unit sets it)
STATE_ENV = "INSPECTOR_STATE"
FORMAT_VERSION = 1
#: seconds between attempts after a failed write
RETRY_S = 5.0


def latch_path(latch_file: str | None, camera_id: str, base_dir: Path | None) -> Path | None:
    """Where this camera's latched alarms are kept, or None when nothing says where."""
    if latch_file:
        p = Path(latch_file).expanduser()
        return p if p.is_absolute() or base_dir is None else base_dir / p
    state = os.environ.get(STATE_ENV)
    if state:
        return Path(state) / "alarms" / f"{camera_id}.json"
    return None


def _where(latch_file: str | None) -> str:
    """The setting a user changes to move the file: for error messages."""
    return "alarms.latch_file" if latch_file else f"alarms.latch_file (default from ${STATE_ENV})"


#: lock files of stores this process has moved off while a write to them was under way: held
#: until that write ends, then removed (an open meanwhile is told so, not "another daemon")
_RETIRING: dict[Path, "LatchStore"] = {}


class LatchStore:
    """Reads the latched alarms a previous run left and keeps the file up to date."""

    def __init__(self, path: Path, source_file: str = "<memory>", latch_file: str | None = None):
        self.path = path
        self.source_file = source_file
        self.key = _where(latch_file)
        self._cond = threading.Condition()
        self._pending: list[dict] | None = None
        #: what the file holds (as read at start or last written)
        self._written: list[dict] = []
        #: what should be in the file (the last set submitted to the writer)
        self._wanted: list[dict] | None = None
        self._closed = False
        #: moved to another file (retire): nothing more is written, the file goes
        self._retired = False
        #: the writer thread is between taking a set and having written it (a disk write)
        self._writing = False
        #: retire() came during a write: the lock file (kept in _RETIRING) whose removal, with
        #: the file's, the writer thread does once that write has ended
        self._retiring_lock: Path | None = None
        #: the folder that existed above the file's at open, where open made the ones below
        self._made_below: Path | None = None
        self._failing = False
        self._thread: threading.Thread | None = None
        self._lock_fh: IO[str] | None = None
        #: (uid, gid) to give created files to: a root process writing into the service's folder
        self._owner: tuple[int, int] | None = None

    # -- start ------------------------------------------------------------------------------------
    def open(self) -> None:
        """Make the folder, take the file's lock and prove the folder writable; a ConfigError
        naming the key otherwise (at start, as the recorder does: an alarm that cannot be kept
        must not be found out about after a restart)."""
        if self.path.is_dir():
            raise ConfigError(self.source_file, self.key, f"{self.path} is a folder: name a file in "
                              f"it, such as {self.path / 'camera.json'}")
        folder = self.path.parent
        above = nearest_existing(folder)
        self._made_below = above if above != folder else None
        try:
            folder.mkdir(parents=True, exist_ok=True)
            if os.geteuid() == 0:
                self._owner = _give_to_owner_of(above, folder)
            fh = open(self._lock_path(), "a+")
        except OSError as e:
            raise self._unwritable(folder, e) from None
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            pid = fh.read().strip() or "?"
            fh.close()
            if self._lock_path() in _RETIRING:
                # a reload moved the latched set off this file while a write to it was under way
                # (a slow disk): it is let go once that write has ended
                raise ConfigError(self.source_file, self.key, f"{self.path} is still being written "
                                  "and removed by this daemon's previous move of the latched alarms "
                                  "(a slow disk): reload again in a moment") from None
            raise ConfigError(self.source_file, self.key, f"{self.path} is in use by another running "
                              f"daemon (pid {pid}): two cameras with one camera_id? Each needs its "
                              "own file, or the other's alarms come back on this PLC") from None
        self._lock_fh = fh
        try:
            fh.seek(0)
            fh.truncate()
            fh.write(f"{os.getpid()}\n")
            fh.flush()
            self._chown(Path(fh.name))
            probe = folder / f".{self.path.name}.{os.getpid()}.probe"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as e:
            self._release()
            raise self._unwritable(folder, e) from None

    def _lock_path(self) -> Path:
        """``<file>.lock`` beside the file the path leads to: a latch file that is a link to
        another camera's file is that file, and must be refused as one while the other runs."""
        target = self.path.resolve()
        return target.with_name(target.name + ".lock")

    def _unwritable(self, folder: Path, e: OSError) -> ConfigError:
        from inspector.access_check import owner_text

        where = nearest_existing(folder)
        if where.exists() and not where.is_dir():
            why = f"{where} is a file, not a folder"
        else:
            owner = owner_text(str(where))
            why = f"{e.strerror or e}" + (f"; {where} is {owner}" if owner else "")
        return ConfigError(self.source_file, self.key,
                           f"cannot write the latched-alarm file's folder {folder} ({why}); latched "
                           "alarms would be lost at a restart. Make it writable by the service user "
                           "(a root shell's run may have left it root's: chown it), or set "
                           "alarms.latch_file")

    def load(self, reload: bool = False) -> list[dict]:
        """The alarms latched when the previous run last wrote; [] when there is no file. A file
        that cannot be read as one is kept aside as ``<name>.<time>.bad`` and reported: its
        alarms are unknown (at a start), or replaced by the running set (``reload``: the file a
        reload moves the latched set into)."""
        unknown = ("what it held is set aside; the alarms latched now are to be written in its place"
                   if reload else
                   "alarms latched before the restart are unknown: check the line")
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return []
        except (OSError, UnicodeDecodeError) as e:
            log.error("%s: %s: cannot read %s (%s): %s", self.source_file, self.key, self.path,
                      getattr(e, "strerror", None) or e, unknown)
            return []
        try:
            out = _parse(text)
        except ValueError as e:
            bad = self.path.with_name(f"{self.path.name}.{time.strftime('%Y%m%dT%H%M%S')}.bad")
            try:
                os.replace(self.path, bad)
                kept = f"kept as {bad}"
            except OSError as e2:
                kept = f"could not be moved aside ({e2.strerror or e2})"
            log.error("%s: %s: %s is not a latched-alarm file (%s); %s. %s", self.source_file,
                      self.key, self.path, e, kept, unknown[0].upper() + unknown[1:])
            return []
        names = [r["name"] for r in out]
        for name in sorted({n for n in names if names.count(n) > 1}):
            log.warning("%s: alarm %s is listed more than once; the first entry is kept", self.path, name)
        first: dict[str, dict] = {}
        for r in out:
            first.setdefault(r["name"], r)
        self._written = list(first.values()) if len(first) == len(out) else out
        return list(first.values())

    @property
    def held(self) -> list[dict]:
        """What the file holds now (as read at start, duplicates included, or as last written)."""
        return list(self._written)

    # -- while running ------------------------------------------------------------------------------
    def submit(self, records: list[dict]) -> None:
        """Queue the current latched set for writing (the newest wins); never blocks on the disk."""
        with self._cond:
            if self._closed:
                return
            self._pending = records
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="latch-store", daemon=True)
                self._thread.start()
            self._cond.notify()

    def close(self, timeout: float = 2.0) -> bool:
        """Write what is pending, stop and let go of the lock; False (and an error line saying
        what the file holds) when the file is not up to date."""
        with self._cond:
            self._closed = True
            self._cond.notify()
            t = self._thread
        ok = True
        if t is not None:
            t.join(timeout)
            if t.is_alive():
                log.error("%s: latched alarms not written within %gs at stop", self.path, timeout)
                ok = False
            elif self._failing:
                log.error("%s: %s: latched alarms NOT written at stop: %s", self.source_file, self.key,
                          self._owed_text())
                ok = False
        self._release()
        return ok

    def abandon(self) -> None:
        """Let go of a file opened and never written (a reload that failed after taking it): its
        lock file and the folders ``open`` made go too, so the failed reload leaves nothing."""
        self.close()
        if self.path.exists():
            return  # a file this store did not write (an earlier run's): kept, with its lock file
        try:
            self._lock_path().unlink(missing_ok=True)
        except OSError:
            return
        if self._made_below is not None:
            d = self.path.parent
            while d != self._made_below and d != d.parent:
                try:
                    d.rmdir()  # empty folders only
                except OSError:
                    break
                d = d.parent

    def _run(self) -> None:
        try:
            self._loop()
        finally:
            with self._cond:
                self._writing = False
                deferred = self._retiring_lock is not None
            if deferred:  # retire() came while a write was under way: it is done now
                self._remove_files()
                self._release()
                _RETIRING.pop(self._retiring_lock, None)

    def _loop(self) -> None:
        owed: list[dict] | None = None  # what a failed write still owes the file
        while True:
            with self._cond:
                if self._pending is None and not self._closed:
                    # the latched set may not change for hours: after a failed write, retry on a
                    # timer, so the file is right again soon after the disk is
                    self._cond.wait(RETRY_S if owed is not None else None)
                records, self._pending = self._pending, None
                closed = self._closed
                if self._retired:
                    return
                self._writing = True
            if records is None:
                records = owed
            if records is not None:
                if records == self._written:
                    self._failing = False  # the file already holds it
                    self._wanted = records
                else:
                    self._write(records)
                owed = records if self._failing else None
            with self._cond:
                self._writing = False
            if closed:
                return

    def write_now(self, records: list[dict]) -> OSError | None:
        """Write ``records`` in the calling thread, before the writer thread has run (a reload
        moving the file must know it is written before it lets go of the old one); the error,
        not logged, when it is not."""
        with self._cond:
            if self._thread is not None or self._closed:
                raise RuntimeError("write_now after the writer started")
        self._wanted = records
        try:
            atomic_write_text(self.path, _text(records))
            self._chown(self.path)
        except OSError as e:
            return e
        self._written = records
        return None

    def retire(self) -> None:
        """Stop keeping this file, its alarms moved to another: nothing pending is written, and
        the file and its lock file are removed, so that a config naming it again later does not
        raise them again; by the writer thread once a write it is in the middle of has ended (a
        slow disk must not hold up the reload, nor the file come back after it was removed)."""
        with self._cond:
            self._closed = self._retired = True
            self._pending = None
            self._cond.notify()
            # an idle writer (the usual case) takes no more sets once retired: the files go now,
            # so the reload that moved them has them gone when it returns
            if self._writing:
                # taken now: a link's target is not found again once the link is removed
                self._retiring_lock = self._lock_path()
                _RETIRING[self._retiring_lock] = self
        if self._retiring_lock is None:
            self._remove_files()
            self._release()

    def _remove_files(self) -> None:
        for f in (self.path, self._lock_path()):
            try:
                f.unlink()
            except FileNotFoundError:
                pass
            except OSError as e:
                log.warning("%s: cannot remove %s (%s): a config naming it again would raise what "
                            "it holds", self.source_file, f, e.strerror or e)

    def _write(self, records: list[dict]) -> None:
        self._wanted = records
        try:
            atomic_write_text(self.path, _text(records))
            self._chown(self.path)
        except OSError as e:
            if not self._failing:
                log.error("%s: %s: cannot write %s (%s); retrying every %gs: %s", self.source_file,
                          self.key, self.path, e.strerror or e, RETRY_S, self._owed_text())
            self._failing = True
            return
        if self._failing:
            log.info("%s: %s: %s written again", self.source_file, self.key, self.path)
        self._failing = False
        self._written = records

    def _owed_text(self) -> str:
        """What the file holds against what is latched, and what a restart now would do."""
        held = [r["name"] for r in self._written]
        now = [r["name"] for r in (self._wanted if self._wanted is not None else self._written)]
        back = [n for n in held if n not in now]
        lost = [n for n in now if n not in held]
        what = []
        if back:
            what.append(f"raise {', '.join(back)} again, although acknowledged")
        if lost:
            what.append(f"not raise {', '.join(lost)}, latched and not acknowledged")
        return (f"the file holds {held or 'none'}, latched now {now or 'none'}"
                + (f": a restart now would {' and '.join(what)}" if what else ""))

    def _chown(self, path: Path) -> None:
        if self._owner is not None:
            try:
                os.chown(path, *self._owner)
            except OSError:
                pass

    def _release(self) -> None:
        fh, self._lock_fh = self._lock_fh, None
        unlock_and_close(fh)


def wait_for_retired(timeout: float) -> list[Path]:
    """At stop: let the writes still ending on files a reload moved off (a slow disk) end, so
    that those files are removed; the ones still there after ``timeout`` (they hold alarms that
    were moved, and a config naming them again would raise those)."""
    end = time.monotonic() + timeout
    for store in list(_RETIRING.values()):
        t = store._thread
        if t is not None:
            t.join(max(0.0, end - time.monotonic()))
    return [store.path for store in list(_RETIRING.values())]  # their removal has not happened


def _give_to_owner_of(above: Path, folder: Path) -> tuple[int, int] | None:
    """Folders a root process made below ``above`` go to ``above``'s owner (the service user's
    state folder); returns that owner for the files written later (None: root's own folder)."""
    st = above.stat()
    if st.st_uid == 0:
        return None
    p = folder
    while p != above and p != p.parent:
        try:
            if p.stat().st_uid == 0:
                os.chown(p, st.st_uid, st.st_gid)
        except OSError:
            break
        p = p.parent
    return st.st_uid, st.st_gid


def _text(records: list[dict]) -> str:
    return json.dumps({"version": FORMAT_VERSION, "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                       "latched": records}, indent=1) + "\n"


def _parse(text: str) -> list[dict]:
    """The records of a latched-alarm file; ValueError saying what is wrong with it."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"not JSON: {e}") from None
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    if data.get("version") != FORMAT_VERSION:
        raise ValueError(f"version {data.get('version')!r}; this inspector reads version {FORMAT_VERSION}")
    records = data.get("latched")
    if not isinstance(records, list):
        raise ValueError("'latched' is not a list")
    out = []
    for i, r in enumerate(records):
        if not isinstance(r, dict) or not isinstance(r.get("name"), str) or not r["name"]:
            raise ValueError(f"entry {i} has no alarm name")
        out.append({"name": r["name"], "type": str(r.get("type") or "defect"),
                    "since": str(r.get("since") or ""), "detail": str(r.get("detail") or "")})
    return out
