"""Writing files so that a reader sees the old content or the new, never a torn mix.

A bundle's ``bundle.yaml`` is read by every camera that loads the bundle; a write cut short (disk
full, quota, a killed process) must not leave a truncated file that still parses as YAML with
keys missing. Each write here goes to a temporary file in the target's own folder (``os.replace``
is atomic only within one file system), is flushed to disk, and then replaces the target.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
from pathlib import Path
from typing import Iterator

__all__ = ["atomic_path", "atomic_write_bytes", "atomic_write_text", "missing_folder", "nearest_existing",
           "unlock_and_close"]


def _fsync_dir(folder: Path) -> None:
    # Makes the rename itself durable; some platforms and file systems cannot open or sync a
    # folder, and the file content is already on disk by then, so a failure here is not fatal.
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; when the block ends without an error, the file
    written there is synced to disk and renamed onto ``path``. On an error the temporary file is
    removed and ``path`` keeps its old content.

    For writers that only take a file name (``np.savez`` behind an API, ``torch.save``)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    # hidden and unique, so a crashed write never shadows a real file or collides with another writer
    tmp = target.with_name(f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        with contextlib.suppress(FileNotFoundError):
            # a replaced file keeps its permissions (a bundle may be readable by a service user)
            os.chmod(tmp, target.stat().st_mode & 0o7777)
        os.replace(tmp, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    _fsync_dir(target.parent)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (see module doc); returns ``path`` as a Path."""
    target = Path(path)
    with atomic_path(target) as tmp:
        with open(tmp, "xb") as f:
            f.write(data)
    return target


def atomic_write_text(path: str | Path, text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically (see module doc); returns ``path`` as a Path."""
    return atomic_write_bytes(path, text.encode(encoding))


def nearest_existing(path: Path) -> Path:
    """``path`` or the nearest folder above it that exists (where a folder to be made would go)."""
    p = Path(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def unlock_and_close(fh) -> None:
    """Let go of a lock file taken with ``flock`` (at a stop: never raises)."""
    if fh is None:
        return
    with contextlib.suppress(OSError):
        fcntl.flock(fh, fcntl.LOCK_UN)
        fh.close()


def missing_folder(path: str | Path, what: str) -> str:
    """Why ``path`` is not the folder ``what`` names ("NEU-Seg root"): "not found" misleads
    someone whose ``ls`` shows the path (a file given where the folder was meant)."""
    p = Path(path)
    if p.exists():
        return f"is a file, not {'an' if what[:1] in 'aeiouAEIOU' else 'a'} {what}"
    if p.is_symlink():
        return f"{what} not found (a link to a path that does not exist)"
    return f"{what} not found"
