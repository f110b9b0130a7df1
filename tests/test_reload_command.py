"""`inspector reload` (the unit's ExecReload=): waits for the daemon's reload and reports it.

With ``ExecReload=/bin/kill -HUP $MAINPID`` a reload the daemon refused (bad YAML, corrupt model)
still made ``systemctl reload`` succeed: the operator saw nothing while the old config ran on.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from conftest import ROOT, run_cli, write_config
from inspector import daemon as daemon_module
from inspector.daemon import Daemon, Notifier
from inspector.reload_state import RECORD_NAME, read_record
from test_daemon import finish, notify, start_daemon, stream, wait_frames  # noqa: F401 (fixtures)


def wait_for(pred, timeout: float = 60.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_reload_waits_for_the_outcome_and_fails_when_the_daemon_refused_the_config(  # noqa: F811
        tmp_path, notify, stream, synthetic_cfg):  # noqa: F811
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    raw = synthetic_cfg(source={"fps": 20, "defect_rate": 1.0}, pipeline={"backpressure": True},
                        publish={"connect_grace_s": 0.5})
    cfg = write_config(tmp_path / "cam.yaml", raw)
    got = stream(raw["publish"]["endpoint"])
    proc = start_daemon(cfg, notify.address, 300_000, "--runtime-dir", str(run_dir))
    try:
        notify.wait(lambda m: "READY=1" in m.split("\n"), what="READY=1")
        record = read_record(run_dir)
        assert record is not None and record.pid == proc.pid and record.finished == 0
        wait_frames(got, 5)

        raw["model"]["postprocess"] = {"threshold": 0.999}
        write_config(cfg, raw)
        r = run_cli("reload", "--pid", str(proc.pid), "--runtime-dir", str(run_dir), timeout=120)
        assert r.returncode == 0, r.stderr
        assert "reload done: model" in r.stdout  # returned after the swap, not at the signal
        assert read_record(run_dir).finished == 1

        cfg.write_text("camera_id: [unclosed\n")
        r = run_cli("reload", "--pid", str(proc.pid), "--runtime-dir", str(run_dir), timeout=120)
        assert r.returncode == 1
        assert "reload failed, the running model and rules stay" in r.stderr
        assert f"{cfg}: not valid YAML" in r.stderr
        n = len(got)
        wait_frames(got, n + 5)  # still running on the old config
        proc.terminate()
        rc, err = finish(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert rc == 0, err[-3000:]
    assert not (run_dir / RECORD_NAME).exists()  # a stopped daemon leaves no record behind


def test_reload_does_not_signal_a_process_that_keeps_no_record(tmp_path):
    # SIGHUP's default action kills: a process that has not said it takes one must not get it
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        r = run_cli("reload", "--pid", str(sleeper.pid), "--runtime-dir", str(tmp_path), timeout=60)
        assert r.returncode == 1
        assert f"{tmp_path / RECORD_NAME}: no reload record" in r.stderr and "nothing was signalled" in r.stderr
        (tmp_path / RECORD_NAME).write_text(json.dumps({"pid": sleeper.pid + 100000}))
        r = run_cli("reload", "--pid", str(sleeper.pid), "--runtime-dir", str(tmp_path), timeout=60)
        assert r.returncode == 1 and f"a record of PID {sleeper.pid + 100000}" in r.stderr
        (tmp_path / RECORD_NAME).write_text("{not json")
        r = run_cli("reload", "--pid", str(sleeper.pid), "--runtime-dir", str(tmp_path), timeout=60)
        assert r.returncode == 1 and "not a reload record" in r.stderr
        assert sleeper.poll() is None
    finally:
        sleeper.kill()
        sleeper.wait()
    r = run_cli("reload", "--pid", "123", timeout=60, env={k: v for k, v in __import__("os").environ.items()
                                                             if k != "RUNTIME_DIRECTORY"})
    assert r.returncode == 2 and "--runtime-dir is needed" in r.stderr


# A process that keeps the record like the daemon and, on SIGHUP, starts a reload that either
# never ends or ends with the process.
FAKE_DAEMON = textwrap.dedent("""
    import os, signal, sys, time
    from pathlib import Path
    from inspector.reload_state import ReloadLog
    log = ReloadLog(Path(sys.argv[1]))
    mode = sys.argv[2]
    def on_hup(*_):
        log.begin()
        if mode == "exit":
            os._exit(3)
    signal.signal(signal.SIGHUP, on_hup)
    log.ready()
    time.sleep(60)
""")


@pytest.mark.parametrize("mode, expected", [("hang", "did not finish within 1s"),
                                            ("exit", "exited before its reload finished")])
def test_reload_fails_when_the_daemon_hangs_or_exits_during_the_reload(tmp_path, mode, expected):
    fake = subprocess.Popen([sys.executable, "-c", FAKE_DAEMON, str(tmp_path), mode], cwd=ROOT)
    try:
        wait_for(lambda: (tmp_path / RECORD_NAME).exists(), 30, "the record")
        r = run_cli("reload", "--pid", str(fake.pid), "--runtime-dir", str(tmp_path), "--timeout", "1",
                    timeout=60)
        assert r.returncode == 1 and expected in r.stderr, r.stderr
    finally:
        fake.kill()
        fake.wait()


@contextlib.contextmanager
def running_daemon(tmp_path: Path, sink, synthetic_cfg):
    """A daemon on the synthetic camera at 20 fps, READY (on the ``notify`` fixture's ``sink``)
    before the block, stopped after it."""
    cfg = write_config(tmp_path / "cam.yaml", synthetic_cfg(source={"fps": 20}))
    d = Daemon(cfg, notifier=Notifier(sink.address), runtime_dir=tmp_path)
    t = threading.Thread(target=d.run, daemon=True)
    t.start()
    try:
        sink.wait(lambda m: "READY=1" in m.split("\n"), what="READY=1")
        yield d
    finally:
        d.request_stop()
        t.join(60)


def test_a_reload_after_an_upgrade_under_the_running_daemon_is_refused(  # noqa: F811
        tmp_path, notify, synthetic_cfg, monkeypatch):  # noqa: F811
    # A reload imports modules the daemon has not loaded yet: after `install.sh` upgraded the venv
    # they would be the new version's, mixed with the old in memory. A restart is the way.
    monkeypatch.setattr(daemon_module, "installed_version", lambda: "9.9.9")
    with running_daemon(tmp_path, notify, synthetic_cfg) as d:
        d.request_reload()
        wait_for(lambda: d.reloads["failed"] == 1, 60, "the reload to fail")
        record = read_record(Path(tmp_path))
        assert record.ok is False and "on disk is version 9.9.9" in record.message
        assert "restart the service" in record.message and d.reloads["ok"] == 0


def test_a_reload_after_a_reinstall_of_the_same_version_is_refused(  # noqa: F811
        tmp_path, notify, synthetic_cfg, monkeypatch):  # noqa: F811
    # install.sh run again with a fixed build that kept the version number: the files on disk
    # differ from those the daemon imported, so a reload would mix them just the same
    from inspector import __version__

    monkeypatch.setattr(daemon_module, "installed_version", lambda: __version__)
    monkeypatch.setattr(daemon_module, "FILES_AT_START", "a" * 64)
    monkeypatch.setattr(daemon_module, "installed_files", lambda: "b" * 64)
    with running_daemon(tmp_path, notify, synthetic_cfg) as d:
        d.request_reload()
        wait_for(lambda: d.reloads["failed"] == 1, 60, "the reload to fail")
        record = read_record(Path(tmp_path))
        assert record.ok is False and "reinstalled under this daemon" in record.message
        assert f"version {__version__} still" in record.message and d.reloads["ok"] == 0
        # the same files as at start: the reload goes through
        monkeypatch.setattr(daemon_module, "installed_files", lambda: "a" * 64)
        d.request_reload()
        wait_for(lambda: d.reloads["ok"] == 1, 60, "the reload to succeed")


def test_installed_files_digest_follows_the_record_pip_wrote():
    """In this checkout's venv the package is installed (``make`` runs pip install): the digest
    is the RECORD's, and it is stable between two reads."""
    import hashlib
    import importlib.metadata

    try:
        record = importlib.metadata.distribution("strip-inspector").read_text("RECORD")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("strip-inspector is not installed in this environment")
    got = daemon_module.installed_files()
    assert got == daemon_module.installed_files()
    assert got == (None if record is None else hashlib.sha256(record.encode()).hexdigest())


def test_no_record_is_left_by_a_reload_that_ends_after_the_daemon_removed_it(tmp_path):
    from inspector.reload_state import ReloadLog

    log = ReloadLog(tmp_path, pid=4242)
    log.ready()
    log.begin()
    log.remove()  # the daemon exits while its reload thread still runs
    log.end(True, "reload done")
    assert not (tmp_path / RECORD_NAME).exists()


def test_an_unreadable_record_says_so(tmp_path):
    # `inspector reload` run by an operator who is neither root nor the service user
    import os
    import shutil
    import tempfile

    if os.geteuid() != 0:
        (tmp_path / RECORD_NAME).write_text("{}")
        (tmp_path / RECORD_NAME).chmod(0)
        with pytest.raises(Exception, match="cannot read the reload record"):
            read_record(tmp_path)
        return
    # root reads any file: read it as nobody, as test_config_cli.py's unreadable config does
    if shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv: cannot drop to an unprivileged user")
    d = Path(tempfile.mkdtemp(prefix="unreadable-record-"))  # tmp_path is root's alone (0700)
    try:
        os.chmod(d, 0o755)
        record = d / RECORD_NAME
        record.write_text("{}")
        record.chmod(0o600)
        probe = textwrap.dedent(f"""
            from pathlib import Path
            from inspector.errors import InspectorError
            from inspector.reload_state import read_record
            try:
                read_record(Path({str(d)!r}))
            except InspectorError as e:
                print(e)
            else:
                print("read it")
            """)
        r = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                            sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True,
                           timeout=60)
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip() == (f"{record}: cannot read the reload record (Permission denied); "
                                    "run as root or as the service user"), r.stdout + r.stderr
    finally:
        shutil.rmtree(d, ignore_errors=True)
