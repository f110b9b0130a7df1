"""``inspector check --user NAME``: prove the service user can reach what the daemon opens.

Run as root (an install step, ``sudo inspector check``), a check passes on files the service
user cannot read and on a recordings folder it cannot write, and the unit then fails at start
with exit 2. With ``--user`` the access questions are asked again by a child process that runs
as that user (its uid, primary group and supplementary groups, as systemd's ``User=`` gives
them), so the kernel answers them: permissions, ACLs, read-only mounts, every folder on the way.
Nothing is created or changed.
"""

from __future__ import annotations

import json
import logging
import os
import pwd
import signal
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

from inspector.errors import ConfigError, InspectorError

log = logging.getLogger(__name__)

#: what each kind of access asks of the kernel
_NEED = {"read": os.R_OK, "list": os.R_OK | os.X_OK, "write": os.W_OK | os.X_OK, "run": os.X_OK,
         "modify": os.R_OK | os.W_OK}


@dataclass(frozen=True)
class Access:
    """One question: may the user ``need`` (read, list, write, run) ``path``; ``key`` is the
    config key that names it (None: the config file itself, or the installed runtime)."""

    path: Path
    need: str
    key: str | None
    what: str
    #: when refused: the folder on the way the user may not pass through (None: the path itself)
    closed: str | None = None

    def refusal(self) -> str:
        """``write the recordings folder /x (record.dir; owned by root:root, mode 0755)``: the key
        and who owns what is in the way, so the fix (chown, chmod, a group) can be chosen."""
        blocker = self.closed or str(self.path)
        why = [self.key] if self.key else []
        if self.closed:
            why.append(f"the folder {self.closed} is closed to it")
        owner = owner_text(blocker)
        if owner:
            why.append(owner)
        return f"{self.need} {self.what} {self.path}" + (f" ({'; '.join(why)})" if why else "")


def owner_text(path: str) -> str:
    """``owned by user:group, mode 0755`` of ``path`` (empty when it cannot be stat'ed)."""
    import grp
    import pwd
    import stat

    try:
        st = os.stat(path)
    except OSError:
        return ""
    try:
        user = pwd.getpwuid(st.st_uid).pw_name
    except KeyError:
        user = str(st.st_uid)
    try:
        group = grp.getgrgid(st.st_gid).gr_name
    except KeyError:
        group = str(st.st_gid)
    return f"owned by {user}:{group}, mode {stat.S_IMODE(st.st_mode):04o}"


def needed_access(cfg, record_root: Path | None) -> list[Access]:
    """What the daemon of ``cfg`` opens as its user: the config, the runtime, the bundle's files,
    the flat-field file, a replay folder or a GenTL producer, and the camera's recordings folder
    ``record_root`` (None: recording off): the folders in it and its lock when it exists (a root
    shell's ``inspector run`` may have made them root's), else the folder it will be made in."""
    from inspector.config import ReplayConfig
    from inspector.sources.genicam import BUILTIN_VIKY, GenicamConfig, default_viky_cti

    out = [Access(Path(cfg.source_file), "read", None, "the config file"),
           Access(Path(sys.executable), "run", None, "the runtime's Python"),
           Access(Path(__file__).resolve().parent, "list", None, "the inspector package")]
    bundle = cfg.resolve(cfg.model.bundle)
    out.append(Access(bundle, "list", "model.bundle", "the model bundle folder"))
    files = _files_under(bundle)
    first = [p for p in files if p.name in ("bundle.yaml", "model.onnx")]
    for p in first + [p for p in files if p not in first]:
        out.append(Access(p, "read", "model.bundle", "a model bundle file"))
    if cfg.preprocess.flat_field:
        out.append(Access(cfg.resolve(cfg.preprocess.flat_field), "read", "preprocess.flat_field",
                          "the flat-field file"))
    src = cfg.source
    if isinstance(src, ReplayConfig):
        p = cfg.resolve(src.path)
        out.append(Access(p, "list" if p.is_dir() else "read", "source.path", "the replay source"))
        if p.is_dir():
            from inspector.sources.replay import list_images
            out += [Access(f, "read", "source.path", "a replay image")
                    for f in list_images(p, src.pattern)]
    elif isinstance(src, GenicamConfig):
        cti = default_viky_cti() if src.cti == BUILTIN_VIKY else cfg.resolve(src.cti)
        if cti is not None:
            out.append(Access(Path(cti), "read", "source.cti", "the GenTL producer"))
    latch = _latch_access(cfg)
    if latch is not None:
        out.append(latch)
    if record_root is not None:
        if record_root.is_dir():
            dirs = [record_root] + sorted(d for d in record_root.glob("*") if d.is_dir()) \
                + sorted(d for d in record_root.glob("*/*") if d.is_dir())
            out += [Access(d, "write", "record.dir", "the recordings folder") for d in dirs]
            if (record_root / ".lock").is_file():
                out.append(Access(record_root / ".lock", "modify", "record.dir",
                                  "the recordings folder's lock"))
        else:
            base = record_root.parent
            while not base.exists() and base != base.parent:
                base = base.parent
            out.append(Access(base, "write", "record.dir", "the folder the recordings go into"))
    return out


def _latch_access(cfg) -> Access | None:
    """The latched-alarm file's folder (or the folder it will be made in), where a rule latches."""
    from inspector.alarms.latch_store import latch_path

    if not any(r.latch for r in cfg.alarms.rules):
        return None
    path = latch_path(cfg.alarms.latch_file, cfg.camera_id, cfg.base_dir)
    if path is None:
        return None
    base = path.parent
    while not base.exists() and base != base.parent:
        base = base.parent
    return Access(base, "write", "alarms.latch_file", "the latched-alarm folder")


def _files_under(folder: Path) -> list[Path]:
    """Every file in ``folder`` and its sub-folders, through links as the engine follows them (a
    folder reached twice, a link loop, is walked once)."""
    if not folder.is_dir():
        return []
    seen: set[str] = set()
    files = []
    for top, dirs, names in os.walk(folder, followlinks=True):
        real = os.path.realpath(top)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        dirs.sort()
        files += [Path(top) / n for n in sorted(names) if os.path.isfile(os.path.join(top, n))
                  or os.path.islink(os.path.join(top, n))]
    return files


def user_ids(name: str) -> tuple[int, int, list[int]]:
    """uid, primary gid and all group ids of ``name``, as a login (or systemd's ``User=``) gets them."""
    if not name.strip():
        # `--user "$SVC_USER"` with the variable unset skipped the very check it asked for
        raise InspectorError("--user: empty; give the unit's User= (a user name or a numeric UID)")
    try:
        pw = pwd.getpwnam(name)
    except KeyError:
        if not name.isdigit():
            raise InspectorError(f"--user {name}: no such user on this machine (the unit's User=; "
                                 "deploy/install.sh creates it)") from None
        # systemd's User= takes a numeric UID too
        try:
            pw = pwd.getpwuid(int(name))
        except (KeyError, OverflowError):
            raise InspectorError(f"--user {name}: no user with UID {name} on this machine (the "
                                 "unit's User=; deploy/install.sh creates it)") from None
    return pw.pw_uid, pw.pw_gid, os.getgrouplist(pw.pw_name, pw.pw_gid)


def refused_as(user: str, wanted: list[Access], timeout_s: float = 30.0) -> list[Access]:
    """The accesses of ``wanted`` that ``user`` is refused, asked by a forked child running as it.

    A fork, not a new interpreter: the question whether the user may run this interpreter is
    one of the answers, not a condition of getting them."""
    uid, gid, groups = user_ids(user)
    if os.geteuid() != 0 and uid != os.geteuid():
        raise InspectorError(f"--user {user}: checking as another user needs root "
                             f"(sudo {Path(sys.argv[0]).name} check --user {user} ...)")
    paths = [(str(a.path), _NEED[a.need]) for a in wanted]
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: only system calls from here, then _exit
        code = 3
        try:
            os.close(r)
            if uid != os.geteuid():
                os.setgroups(groups)
                os.setgid(gid)
                os.setuid(uid)  # last: it takes away the right to the two above
            bad = {i: _closed_folder(p) for i, (p, m) in enumerate(paths) if not os.access(p, m)}
            data = json.dumps(bad).encode() + b"."
            while data:
                data = data[os.write(w, data):]
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    try:
        answer = _read_until_eof(r, pid, timeout_s, user)
    finally:
        os.close(r)
    if not answer.endswith(b"."):
        raise InspectorError(f"--user {user}: the access check failed (its process ended without "
                             "an answer)")
    refused = {int(i): folder for i, folder in json.loads(answer[:-1]).items()}
    return [replace(a, closed=refused[i]) for i, a in enumerate(wanted) if i in refused]


def _closed_folder(path: str) -> str | None:
    """The first folder above ``path`` this process may not pass through (None: the way is open,
    the path itself is refused)."""
    for folder in reversed(Path(os.path.realpath(path)).parents):  # a venv's python is a link
        if not os.access(folder, os.X_OK):
            return str(folder)
    return None


def _read_until_eof(fd: int, pid: int, timeout_s: float, user: str) -> bytes:
    """The child's whole answer; it is killed after ``timeout_s`` (a hung network mount)."""
    import select

    deadline = time.monotonic() + timeout_s
    out = b""
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                os.kill(pid, signal.SIGKILL)
                raise InspectorError(f"--user {user}: the access check did not answer within "
                                     f"{timeout_s:g} s (a hung network mount on the way?)")
            chunk = os.read(fd, 65536)
            if not chunk:
                return out
            out += chunk
    finally:
        _reap(pid)


def _reap(pid: int, wait_s: float = 2.0) -> None:
    """Collect the child; one stuck in the kernel (a dead NFS server) is left, not waited for."""
    deadline = time.monotonic() + wait_s
    while True:
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done or time.monotonic() > deadline:
            if not done:
                log.warning("access check: process %d did not end after SIGKILL (stuck in the "
                            "kernel on a hung mount?); not waited for", pid)
            return
        time.sleep(0.01)


#: folders the shipped unit hides from the daemon whatever their permissions (deploy/inspector@.service)
UNIT_HIDES = {"/home": "ProtectHome=yes", "/root": "ProtectHome=yes", "/run/user": "ProtectHome=yes",
              "/tmp": "PrivateTmp=yes", "/var/tmp": "PrivateTmp=yes"}


def hidden_from_unit(wanted: list[Access]) -> list[str]:
    """Warnings for paths the shipped unit's sandbox hides (the user may have a drop-in)."""
    out: dict[str, str] = {}
    for a in wanted:
        if a.key is None or a.key in out:
            continue  # the runtime and the config file: the unit names where they are, not the config
        real = Path(os.path.realpath(a.path))
        for top, setting in UNIT_HIDES.items():
            if real == Path(top) or Path(top) in real.parents:
                out[a.key] = (f"{a.key}: {a.what} {a.path} is under {top}, which the shipped unit "
                              f"hides ({setting}): it fails there unless a drop-in changes that")
                break
    return list(out.values())


def check_as_user(cfg, user: str, record_root: Path | None) -> tuple[str, list[str]]:
    """Raise :class:`ConfigError` naming the first refused access's key (all of them in the
    message); returns a one-line summary of what was proved, and warnings for paths the unit's
    sandbox hides."""
    wanted = needed_access(cfg, record_root)
    refused = refused_as(user, wanted)
    if refused:
        said = "; cannot ".join(a.refusal() for a in refused[:5])
        more = f"; and {len(refused) - 5} more" if len(refused) > 5 else ""
        raise ConfigError(cfg.source_file, refused[0].key,
                          f"the service user '{user}' cannot {said}{more}; the unit would fail at "
                          "start (give the user access: chown or chmod the path, or a folder above it)")
    files = sum(1 for a in wanted if a.what == "a model bundle file")
    writes = [str(a.path) for a in wanted if a.need == "write"]
    images = sum(1 for a in wanted if a.what == "a replay image")
    also = "".join(f", {a.what}" for a in wanted if a.what in ("the flat-field file", "the GenTL producer"))
    also += "".join(f", {a.what}" + (f" ({images} images)" if a.need == "list" else "")
                    for a in wanted if a.what == "the replay source")
    summary = (f"{user} can read the config, the runtime and the bundle ({files} files){also}"
               + (f", and write {writes[0]}" + (f" ({len(writes)} folders)" if len(writes) > 1 else "")
                  if writes else ""))
    return summary, hidden_from_unit(wanted)
