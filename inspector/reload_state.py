"""What ``systemctl reload`` waits for: the daemon's record of its reloads.

A SIGHUP only asks for a reload; the daemon re-reads its config and warms the new model up in the
background, and a reload that fails leaves the old model running. ``ExecReload=/bin/kill -HUP``
therefore returned at once and reported success for a config that was refused. systemd wants
``ExecReload=`` to wait for the reload to finish, so ``inspector reload`` sends the signal and
waits for the daemon's record of it, exiting 1 with the daemon's error when the reload failed.

The record is ``reload.json`` in the daemon's runtime folder (``/run/inspector/<camera>/``
under the unit, whose ``RuntimeDirectory=`` sets ``RUNTIME_DIRECTORY``). It is written once the
SIGHUP handler is in place (before that, SIGHUP's default action would kill the daemon, so
``inspector reload`` refuses to signal a process without a record), and again when each reload
starts and ends. Signals that arrive during a reload are merged into one more reload after it:
the waiter therefore waits for the end of the first reload that started after its signal.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from inspector.errors import InspectorError
from inspector.fileio import atomic_write_text

log = logging.getLogger(__name__)

RECORD_NAME = "reload.json"


def runtime_dir_from_env() -> Path | None:
    """The first folder of systemd's ``RUNTIME_DIRECTORY`` (set by ``RuntimeDirectory=``)."""
    value = os.environ.get("RUNTIME_DIRECTORY", "").split(":")[0]
    return Path(value) if value else None


@dataclass
class ReloadRecord:
    pid: int
    started: int = 0
    finished: int = 0
    #: outcome of the last finished reload (None before the first)
    ok: bool | None = None
    message: str = ""

    @property
    def in_progress(self) -> bool:
        return self.started > self.finished


class ReloadLog:
    """The daemon's side: keeps ``reload.json`` in ``folder`` current. Without a folder (a
    daemon run in a terminal) it does nothing; a record that cannot be written is logged once
    and never stops the daemon."""

    def __init__(self, folder: Path | None, pid: int | None = None):
        self.path = folder / RECORD_NAME if folder is not None else None
        self.record = ReloadRecord(pid=pid if pid is not None else os.getpid())
        self._warned = False
        self._closed = False
        self._lock = threading.Lock()  # the reload thread writes, the main thread removes

    def _write(self) -> None:
        with self._lock:
            # after remove(): a reload still running as the daemon exits must not leave a record
            # of a PID that may be reused (`inspector reload` would signal that process)
            if self.path is None or self._closed:
                return
            try:
                atomic_write_text(self.path, json.dumps(asdict(self.record)) + "\n")
            except OSError as e:
                if not self._warned:
                    self._warned = True
                    log.warning("cannot write the reload record %s (inspector reload cannot wait "
                                "for reloads): %s", self.path, e)

    def ready(self) -> None:
        """The SIGHUP handler is in place: from now on the daemon may be signalled."""
        self._write()

    def begin(self) -> None:
        self.record.started += 1
        self._write()

    def end(self, ok: bool, message: str) -> None:
        self.record.finished += 1
        self.record.ok = ok
        self.record.message = message
        self._write()

    def remove(self) -> None:
        with self._lock:
            self._closed = True
            if self.path is not None:
                try:
                    self.path.unlink(missing_ok=True)
                except OSError:
                    pass


def read_record(folder: Path) -> ReloadRecord | None:
    """The record in ``folder``, or None where there is none (a torn read cannot happen: the
    daemon replaces the file atomically)."""
    path = folder / RECORD_NAME
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except PermissionError as e:
        raise InspectorError(f"{path}: cannot read the reload record ({e.strerror}); run as root or "
                             "as the service user") from None
    except IsADirectoryError:
        raise InspectorError(f"{path}: is a folder, not a reload record") from None
    except NotADirectoryError:
        raise InspectorError(f"{folder}: is not a folder (--runtime-dir)") from None
    except OSError as e:
        raise InspectorError(f"{path}: cannot read the reload record ({e.strerror or e})") from None
    except (ValueError, UnicodeDecodeError):
        raise InspectorError(f"{path}: not a reload record (not valid JSON); the daemon rewrites it "
                             "at its next start or reload") from None
    return _record_of(path, data)


_RECORD_TYPES = {"pid": (int,), "started": (int,), "finished": (int,), "ok": (bool, type(None)),
                 "message": (str,)}


def _record_of(path: Path, data: object) -> ReloadRecord:
    """A record from the JSON ``data``; anything else is named in one line (a list gave
    "argument after ** must be a mapping, not list")."""
    expected = "expected a JSON object with " + ", ".join(_RECORD_TYPES)
    if not isinstance(data, dict):
        raise InspectorError(f"{path}: not a reload record ({expected}, found a {type(data).__name__})")
    unknown = sorted(set(data) - set(_RECORD_TYPES))
    if unknown or "pid" not in data:
        what = f"unknown key(s) {unknown}" if unknown else "no pid"
        raise InspectorError(f"{path}: not a reload record ({what}; {expected})")
    for key, value in data.items():
        if not isinstance(value, _RECORD_TYPES[key]) or (isinstance(value, bool) and bool not in _RECORD_TYPES[key]):
            raise InspectorError(f"{path}: not a reload record ({key}: {value!r} is not a "
                                 f"{' or '.join(t.__name__ for t in _RECORD_TYPES[key])})")
    return ReloadRecord(**data)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    # an exited process its parent has not reaped yet still takes signal 0
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rpartition(")")[2].split()[:1] != ["Z"]


def request_reload(pid: int, folder: Path, timeout_s: float, poll_s: float = 0.1) -> ReloadRecord:
    """Send SIGHUP to the daemon ``pid`` and wait for the reload it causes to end; returns the
    record with that reload's outcome. Raises :class:`InspectorError` (nothing signalled) when
    the daemon keeps no record in ``folder``, and when it exits or does not finish in time."""
    first = read_record(folder)
    if first is None or first.pid != pid:
        found = "no reload record" if first is None else f"a record of PID {first.pid}"
        raise InspectorError(
            f"{folder / RECORD_NAME}: {found}, not one of PID {pid}; nothing was signalled. "
            "The daemon writes it once it can take a SIGHUP, into its runtime folder "
            "(--runtime-dir, or RUNTIME_DIRECTORY under systemd): a daemon started by an older "
            "version keeps none (restart it), one still starting has not written it yet")
    if not _alive(pid):
        raise InspectorError(f"PID {pid} is not running; nothing was signalled")
    target = first.finished + (2 if first.in_progress else 1)
    try:
        os.kill(pid, signal.SIGHUP)
    except ProcessLookupError:
        raise InspectorError(f"PID {pid} exited before it could be signalled") from None
    except PermissionError as e:
        raise InspectorError(f"cannot signal PID {pid}: {e}") from None
    deadline = time.monotonic() + timeout_s
    while True:
        now = read_record(folder)
        if now is not None and now.pid == pid and now.finished >= target:
            return now
        if not _alive(pid):
            raise InspectorError(f"PID {pid} exited before its reload finished")
        if time.monotonic() >= deadline:
            raise InspectorError(f"PID {pid}: the reload did not finish within {timeout_s:g}s; it goes "
                                 "on in the daemon (its log says how it ends)")
        time.sleep(poll_s)
