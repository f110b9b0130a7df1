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
not hold up the publish thread that raised the alarm. The newest state always wins.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path

from inspector.errors import ConfigError
from inspector.fileio import atomic_write_text

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


class LatchStore:
    """Reads the latched alarms a previous run left and keeps the file up to date."""

    def __init__(self, path: Path, source_file: str = "<memory>", latch_file: str | None = None):
        self.path = path
        self.source_file = source_file
        self.key = _where(latch_file)
        self._cond = threading.Condition()
        self._pending: list[dict] | None = None
        self._written: list[dict] | None = None
        self._closed = False
        self._failing = False
        self._thread: threading.Thread | None = None

    # -- start ------------------------------------------------------------------------------------
    def check_writable(self) -> None:
        """ConfigError naming the key when the folder cannot be made or written (at start, as the
        recorder does: an alarm that cannot be kept must not be found out about after a restart)."""
        folder = self.path.parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
            probe = folder / f".{self.path.name}.{os.getpid()}.probe"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as e:
            raise ConfigError(self.source_file, self.key,
                              f"cannot write the latched-alarm file's folder {folder} "
                              f"({e.strerror or e}); latched alarms would be lost at a restart. "
                              "Make it writable by the service user, or set alarms.latch_file") from None

    def load(self) -> list[dict]:
        """The alarms latched when the previous run last wrote; [] when there is no file. A file
        that cannot be read is kept aside as ``<name>.bad`` and reported: its alarms are unknown."""
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return []
        except OSError as e:
            log.error("%s: %s: cannot read %s (%s): alarms latched before the restart are unknown",
                      self.source_file, self.key, self.path, e.strerror or e)
            return []
        try:
            data = json.loads(text)
            records = data["latched"]
            if data.get("version") != FORMAT_VERSION or not isinstance(records, list):
                raise ValueError(f"version {data.get('version')!r}, expected {FORMAT_VERSION}")
            out = []
            for r in records:
                if not isinstance(r, dict) or not isinstance(r.get("name"), str):
                    raise ValueError(f"entry {r!r} has no alarm name")
                out.append({"name": r["name"], "type": str(r.get("type", "defect")),
                            "since": str(r.get("since", "")), "detail": str(r.get("detail", ""))})
        except (ValueError, KeyError, TypeError) as e:
            bad = self.path.with_name(self.path.name + ".bad")
            try:
                os.replace(self.path, bad)
                kept = f"kept as {bad}"
            except OSError as e2:
                kept = f"could not be moved aside ({e2.strerror or e2})"
            log.error("%s: %s: %s is not a latched-alarm file (%s); %s. Alarms latched before the "
                      "restart are unknown: check the line", self.source_file, self.key, self.path,
                      e, kept)
            return []
        self._written = out
        return out

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
        """Write what is pending and stop; False when the write did not finish in time."""
        with self._cond:
            self._closed = True
            self._cond.notify()
            t = self._thread
        if t is None:
            return True
        t.join(timeout)
        if t.is_alive():
            log.error("%s: latched alarms not written within %gs at stop", self.path, timeout)
            return False
        return True

    def _run(self) -> None:
        owed: list[dict] | None = None  # what a failed write still owes the file
        while True:
            with self._cond:
                if self._pending is None and not self._closed:
                    # the latched set may not change for hours: after a failed write, retry on a
                    # timer, so the file is right again soon after the disk is
                    self._cond.wait(RETRY_S if owed is not None else None)
                records, self._pending = self._pending, None
                closed = self._closed
            if records is None:
                records = owed
            if records is not None:
                if records == self._written:
                    self._failing = False  # the file already holds it
                else:
                    self._write(records)
                owed = records if self._failing else None
            if closed:
                return

    def _write(self, records: list[dict]) -> None:
        text = json.dumps({"version": FORMAT_VERSION, "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                           "latched": records}, indent=1) + "\n"
        try:
            atomic_write_text(self.path, text)
        except OSError as e:
            if not self._failing:
                log.error("%s: %s: cannot write %s (%s): latched alarms will not survive a restart "
                          "until it works again", self.source_file, self.key, self.path, e.strerror or e)
            self._failing = True
            return
        if self._failing:
            log.info("%s: %s: %s written again", self.source_file, self.key, self.path)
        self._failing = False
        self._written = records
