"""Where a calibration command writes its report: checked before any work is done.

A calibration can take minutes and some write the bundle; an ``--out`` that cannot be written
(a path below a regular file, a read-only folder) must be refused at the start, as bad input
(exit 2, one line naming the argument), not after the work with a bare ``[Errno 20]`` and the
bundle already rewritten. :func:`check_out_dir` and :func:`check_out_file` only look (nothing is
created for a command that may still be refused); :func:`make_out_dir` creates the folder when
the report is written, with the same one-line error should it fail after all.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from calibration.frames import CalibrationInputError

__all__ = ["check_out_dir", "check_out_file", "make_out_dir", "check_bundle_writable"]


def unwritable(folder: Path) -> str | None:
    """Why no file can be created in the existing folder ``folder`` (None: one can). A real
    file is made and removed: permission bits alone miss a read-only mount or a folder such as
    /proc, where the write then failed after the work with a bare errno on a temp-file name."""
    if not os.access(folder, os.W_OK | os.X_OK):
        return f"{folder} is not writable"
    try:
        fd, name = tempfile.mkstemp(dir=folder, prefix=".inspector-write-check-")
    except OSError as e:
        return f"{folder}: {e.strerror or e}"
    os.close(fd)
    os.unlink(name)
    return None


def _check_creatable(folder: Path, arg: str, shown: Path, name: str = "the folder") -> None:
    """``folder`` exists as a writable folder, or can be created: its nearest existing ancestor
    is a writable folder."""
    p = folder
    while not p.exists():
        if p.is_symlink():  # a dangling link: mkdir would fail on it
            raise CalibrationInputError(f"{arg} {shown}: cannot create {name} ({p} is a broken link)")
        parent = p.parent
        if parent == p:
            break
        p = parent
    if not p.is_dir():
        raise CalibrationInputError(f"{arg} {shown}: cannot create {name} ({p} is a file, not a folder)")
    why = unwritable(p)
    if why:
        what = f"write to {name}" if p == folder else f"create {name}"
        raise CalibrationInputError(f"{arg} {shown}: cannot {what} ({why})")


def check_out_dir(out: str | Path, arg: str = "--out") -> Path:
    """Refuse a report folder ``out`` that cannot be created or written (nothing is created)."""
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise CalibrationInputError(f"{arg} {path}: cannot create the folder (a file of that name exists)")
    _check_creatable(path, arg, path)
    return path


def check_out_file(out: str | Path, arg: str = "--out") -> Path:
    """Refuse an output file ``out`` whose folder cannot be created or written, or that is a
    folder (nothing is created)."""
    path = Path(out)
    if path.is_dir():
        raise CalibrationInputError(f"{arg} {path}: is a folder; expected a file name")
    _check_creatable(path.parent, arg, path, "its folder")
    return path


def make_out_dir(out: str | Path, arg: str = "--out") -> Path:
    """Create the report folder ``out`` (and its parents); a failure is bad input naming ``arg``."""
    path = Path(out)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CalibrationInputError(f"{arg} {path}: cannot create the folder ({e.strerror or e})") from None
    return path


def check_bundle_writable(bundle: str | Path, arg: str = "--bundle", hint: str = "") -> Path:
    """Refuse, before any work, a bundle folder the calibration could not write ``bundle.yaml``
    into (it is replaced through a temporary file beside it): a read-only install of a bundle
    used to cost the whole run and end in a bare ``[Errno 13]`` on the temporary name, exit 1."""
    folder = Path(bundle)
    why = unwritable(folder) if folder.is_dir() else None
    if why:
        raise CalibrationInputError(f"{arg} {folder}: cannot write bundle.yaml into the bundle folder "
                                    f"({why}){hint}")
    return folder
