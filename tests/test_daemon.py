"""The daemon under a real sd_notify socket: READY, WATCHDOG, STATUS, STOPPING, SIGTERM, SIGHUP.

A unix datagram socket bound by the test plays systemd's part; the daemon runs as
``python -m inspector daemon`` in a subprocess so that real signals reach it.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import DAEMON_SCRIPT_PREAMBLE, ROOT, write_config
from inspector.daemon import Daemon, JournalFormatter, Notifier, watchdog_interval_s
from inspector.publish import Subscriber
from inspector.sources.synthetic import SyntheticConfig, SyntheticSource


class NotifySocket:
    """What systemd listens on: collects (monotonic time, message) datagrams."""

    def __init__(self, address: str):
        self.address = address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + address[1:] if address.startswith("@") else address)
        self.sock.settimeout(0.1)
        self.messages: list[tuple[float, str]] = []
        self._stop = False
        self._t = threading.Thread(target=self._loop, daemon=True)
        self._t.start()

    def _loop(self):
        while not self._stop:
            try:
                data = self.sock.recv(4096)
            except OSError:
                continue
            self.messages.append((time.monotonic(), data.decode()))

    def close(self):
        self._stop = True
        self._t.join(2)
        self.sock.close()

    def fields(self) -> list[str]:
        return [f for _, m in list(self.messages) for f in m.split("\n")]

    def wait(self, pred, timeout: float = 60.0, what: str = "") -> tuple[float, str]:
        deadline = time.monotonic() + timeout
        seen = 0
        while time.monotonic() < deadline:
            msgs = list(self.messages)
            for t, m in msgs[seen:]:
                if pred(m):
                    return t, m
            seen = len(msgs)
            time.sleep(0.02)
        raise AssertionError(f"no notify message {what} within {timeout}s; got {self.fields()[-20:]}")

    def count(self, field: str, since: float = 0.0) -> int:
        return sum(1 for t, m in list(self.messages) if t >= since and field in m.split("\n"))


@pytest.fixture
def notify(tmp_path):
    n = NotifySocket(str(tmp_path / "notify.sock"))
    yield n
    n.close()


def start_daemon(cfg_path: Path, notify_addr: str, watchdog_usec: int = 300_000, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "NOTIFY_SOCKET": notify_addr, "WATCHDOG_USEC": str(watchdog_usec)}
    env.pop("WATCHDOG_PID", None)
    return subprocess.Popen([sys.executable, "-m", "inspector", "daemon", "--config", str(cfg_path), *extra],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen, timeout: float = 60) -> tuple[int, str]:
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
        raise AssertionError(f"daemon did not exit within {timeout}s:\n{err[-3000:]}")
    return proc.returncode, err


# -- the notify protocol itself ------------------------------------------------------------------

@pytest.mark.parametrize("abstract", [False, True])
def test_notifier_sends_datagrams_to_path_and_abstract_sockets(tmp_path, abstract):
    addr = f"@inspector-test-{os.getpid()}-{time.monotonic_ns()}" if abstract else str(tmp_path / "n.sock")
    listener = NotifySocket(addr)
    try:
        n = Notifier(addr)
        assert n.enabled and n.send("READY=1", "STATUS=two\nlines")
        listener.wait(lambda m: m == "READY=1\nSTATUS=two lines", timeout=5)
        n.close()
    finally:
        listener.close()


def test_notifier_without_socket_or_with_a_dead_one(tmp_path, caplog):
    assert not Notifier(None).enabled and Notifier(None).send("READY=1") is False
    dead = Notifier(str(tmp_path / "nobody-listens.sock"))
    assert dead.send("READY=1") is False and dead.send("WATCHDOG=1") is False
    assert sum("cannot notify systemd" in r.getMessage() for r in caplog.records) == 1  # logged once


def test_watchdog_interval_from_environment(monkeypatch):
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    assert watchdog_interval_s() is None
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    assert watchdog_interval_s() == 15.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))  # meant for another process
    assert watchdog_interval_s() is None
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    monkeypatch.setenv("WATCHDOG_USEC", "soon")
    assert watchdog_interval_s() is None


def test_journal_formatter_prefixes_priorities():
    fmt = JournalFormatter("%(name)s: %(message)s")
    rec = logging.LogRecord("inspector.x", logging.ERROR, __file__, 1, "a\nb", None, None)
    assert fmt.format(rec) == "<3>inspector.x: a\n<3>b"
    rec = logging.LogRecord("inspector.x", logging.INFO, __file__, 1, "fine", None, None)
    assert fmt.format(rec) == "<6>inspector.x: fine"


# -- the daemon process --------------------------------------------------------------------------

def test_ready_after_warmup_watchdog_while_flowing_stopping_on_sigterm_exit_0(tmp_path, notify, synthetic_cfg):
    cfg = write_config(tmp_path / "cam.yaml", synthetic_cfg(
        source={"fps": 20}, status={"interval_s": 0.3},
        alarms={"rules": [{"name": "any_defect"}]}))
    proc = start_daemon(cfg, notify.address, 300_000, "--log-format", "journal")
    try:
        t_ready, ready = notify.wait(lambda m: "READY=1" in m.split("\n"), what="READY=1")
        # READY comes after the warm-up and the camera open, and no ping before it
        assert "model warm-up" in ready and "camera ok" in ready
        before = [m for t, m in notify.messages if t < t_ready]
        assert any("STATUS=warming up" in m for m in before)
        assert not any("WATCHDOG=1" in m for m in before)
        notify.wait(lambda m: m.startswith("STATUS=") and " fps, " in m and "published" in m, what="STATUS=")
        deadline = time.monotonic() + 30
        while notify.count("WATCHDOG=1") < 10:  # 1.5 s of frames: enough to show no line per frame
            assert time.monotonic() < deadline, notify.fields()
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        notify.wait(lambda m: "STOPPING=1" in m.split("\n"), what="STOPPING=1")
        rc, err = finish(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert rc == 0, err[-3000:]
    lines = err.strip().splitlines()
    # journald form: a priority prefix on every line, no timestamps, and no line per frame
    assert all(line[:1] == "<" and line[2:3] == ">" for line in lines), lines[:5]
    stopped = [line for line in lines if "stopped: grabbed" in line]
    assert stopped, lines
    grabbed = int(stopped[0].split("grabbed ")[1].split()[0])
    assert grabbed >= 20 and len(lines) < 30, (grabbed, lines)


class StallingSource(SyntheticSource):
    """A synthetic camera whose read() hangs after ``good`` frames until released: a stuck driver."""

    def __init__(self, good: int):
        super().__init__(SyntheticConfig(width=256, height=128, fps=50, seed=1), "stall")
        self.good = good
        self.n = 0
        self.stalled = threading.Event()
        self.release = threading.Event()

    def read(self):
        self.n += 1
        if self.n > self.good and not self.release.is_set():
            self.stalled.set()
            while not self.release.wait(0.05):
                pass
        return super().read()

    def close(self):
        self.release.set()  # never leave a reader hanging at shutdown
        super().close()


def test_watchdog_pings_stop_while_the_source_stalls_and_resume_after(tmp_path, notify, synthetic_cfg, monkeypatch,
                                                                     caplog):
    monkeypatch.setenv("WATCHDOG_USEC", "200000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    caplog.set_level("ERROR", logger="inspector.daemon")
    # backpressure: a scheduling hiccup on a loaded box must not turn a frame into queue_full
    cfg = write_config(tmp_path / "cam.yaml", synthetic_cfg(daemon={"watchdog_stall_s": 1.0},
                                                            pipeline={"backpressure": True}))
    src = StallingSource(good=15)
    d = Daemon(cfg, source=src, notifier=Notifier(notify.address))
    result = {}
    t = threading.Thread(target=lambda: result.update(rc=d.run()), daemon=True)
    t.start()
    try:
        notify.wait(lambda m: "READY=1" in m.split("\n"), what="READY=1")
        assert src.stalled.wait(30)
        # it pinged while frames flowed (the datagram may still be on its way)
        notify.wait(lambda m: "WATCHDOG=1" in m.split("\n"), timeout=10, what="a ping before the stall")
        # the daemon says when it stops pinging (watchdog_stall_s after the last frame) ...
        deadline = time.monotonic() + 30
        while not any("watchdog pings stop" in r.getMessage() for r in caplog.records):
            assert time.monotonic() < deadline, "the stall was never noticed"
            time.sleep(0.02)
        # ... and from then on no ping comes. A mark through the same socket orders the
        # datagrams: every ping sent before the stall was noticed arrives before it.
        Notifier(notify.address).send("X-TEST-MARK=1")
        notify.wait(lambda m: m == "X-TEST-MARK=1", timeout=10, what="the test's mark")
        marked = next(i for i, (_, m) in enumerate(list(notify.messages)) if m == "X-TEST-MARK=1")
        time.sleep(1.5)  # room for stray pings: seven ping intervals of the stuck daemon
        later = [m for _, m in list(notify.messages)[marked + 1:]]
        assert not any("WATCHDOG=1" in m.split("\n") for m in later), "pinged while the source was stuck"
        assert d.pipeline.counters.snapshot()["published"] == 15
        src.release.set()
        resumed = time.monotonic()
        deadline = resumed + 20
        while notify.count("WATCHDOG=1", since=resumed) < 2:
            assert time.monotonic() < deadline, "pings did not resume with the frames"
            time.sleep(0.05)
    finally:
        src.release.set()
        d.request_stop()
        t.join(60)
    assert result.get("rc") == 0
    assert notify.count("STOPPING=1") == 1



def test_a_subscriber_that_stops_reading_neither_starves_the_others_nor_stops_the_watchdog(
        tmp_path, notify, synthetic_cfg, monkeypatch, caplog):
    # With publish.nodrop a full queue refuses the message for every subscriber: one frozen
    # viewer used to cost the healthy subscribers every frame, and since only published frames
    # counted as progress the pings stopped and systemd restarted a healthy daemon, repeatedly.
    import zmq
    monkeypatch.setenv("WATCHDOG_USEC", "200000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    # 256 KB raw masks fill the stuck subscriber's socket buffers within a second or two;
    # backpressure: a loaded test machine's slow engine must not drop the frames instead
    cfg_dict = synthetic_cfg(source={"width": 512, "height": 512, "fps": 10},
                             pipeline={"backpressure": True},
                             publish={"mask_encoding": "raw", "sndhwm": 2, "stuck_subscriber_s": 1.0},
                             daemon={"watchdog_stall_s": 1.0})
    cfg = write_config(tmp_path / "cam.yaml", cfg_dict)
    endpoint = cfg_dict["publish"]["endpoint"]
    stuck = zmq.Context.instance().socket(zmq.SUB)  # subscribes, then never reads
    stuck.setsockopt(zmq.RCVHWM, 1)
    stuck.setsockopt(zmq.RCVBUF, 4096)
    stuck.setsockopt(zmq.LINGER, 0)
    stuck.setsockopt(zmq.SUBSCRIBE, b"")
    stuck.connect(endpoint)
    healthy, got, stop = Subscriber(endpoint), [], threading.Event()

    def read():
        while not stop.is_set():
            m = healthy.recv(timeout_s=0.1)
            if m is not None:
                got.append(time.monotonic())
    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    d = Daemon(cfg, notifier=Notifier(notify.address))
    result = {}
    t = threading.Thread(target=lambda: result.update(rc=d.run()), daemon=True)
    caplog.set_level("ERROR", logger="inspector.publish")
    t.start()
    try:
        t0, _ = notify.wait(lambda m: "READY=1" in m.split("\n"), what="READY=1")
        time.sleep(8.0)
        late = t0 + 3.0  # after the stuck subscriber's queue first filled
        c = d.pipeline.counters.snapshot()
        assert d.pipeline.publisher.resets >= 1, c
        assert "stopped reading" in caplog.text
        assert notify.count("WATCHDOG=1", since=late) >= 5, "pings stopped over one frozen subscriber"
        assert sum(1 for x in got if x > late) >= 15, (len(got), c)
    finally:
        stop.set()
        d.request_stop()
        t.join(60)
        reader.join(5)
        healthy.close()
        stuck.close(0)
    assert result.get("rc") == 0


class LostCamera(SyntheticSource):
    """A camera whose cable is pulled after ``good`` frames, for good."""

    def __init__(self, good: int, message: str = "GenTL: device lost (cable pulled)"):
        super().__init__(SyntheticConfig(width=512, height=128, fps=50), "lost")
        self.good = good
        self.message = message
        self.reads = 0

    def read(self):
        from inspector.errors import SourceError
        self.reads += 1
        if self.reads > self.good:
            raise SourceError(self.message)
        return super().read()


@pytest.mark.parametrize("message, shown", [("GenTL: device lost (cable pulled)",
                                             "GenTL: device lost (cable pulled)"),
                                            ("", "SourceError")])  # an error without a message
def test_camera_lost_without_reopen_exits_1_with_every_grabbed_frame_published(tmp_path, notify,
                                                                              synthetic_cfg,
                                                                              message, shown):
    # pipeline.reopen_source off: the unit ends and systemd's Restart= takes over. The frames the
    # camera delivered before it went are published, and STATUS says why the daemon stops.
    # (backpressure: a loaded test machine must not turn a slow engine into queue_full drops)
    cfg = write_config(tmp_path / "cam.yaml", synthetic_cfg(pipeline={"reopen_source": False,
                                                                      "backpressure": True}))
    d = Daemon(cfg, source=LostCamera(good=25, message=message), notifier=Notifier(notify.address))
    result = {}
    t = threading.Thread(target=lambda: result.update(rc=d.run()), daemon=True)
    t.start()
    t.join(60)
    assert not t.is_alive(), "the daemon did not end after losing its camera"
    c = d.pipeline.counters.snapshot()
    assert result.get("rc") == 1
    assert c["grabbed"] == 25 and c["published"] == 25 and d.pipeline.counters.balanced, c
    _, stopping = notify.wait(lambda m: "STOPPING=1" in m.split("\n"), what="STOPPING=1")
    assert f"STATUS=failed ({shown})" in stopping

VIKY_LOST_SCRIPT = DAEMON_SCRIPT_PREAMBLE + r"""

d = Daemon(sys.argv[1], notifier=Notifier(sys.argv[2]))
res = {}
t = threading.Thread(target=lambda: res.update(rc=d.run()), daemon=True)
t.start()
end = time.monotonic() + 60
while not (d.pipeline is not None and d.pipeline.counters.snapshot()["published"] >= 10):
    if time.monotonic() > end or not t.is_alive():
        print(json.dumps({"error": "no first frames", "log": records[-30:]}))
        sys.exit(3)
    time.sleep(0.02)
src = d.pipeline.source
with src._lock:                 # between two fetches: the safe way to pull the device away
    ia = src._ia
    ia.stop()
    ia.destroy()
t.join(60)
print(json.dumps({"alive": t.is_alive(), "rc": res.get("rc"), "counters": d.pipeline.counters.snapshot(),
                  "released": src._ia is None and src._harvester is None, "log": records}))
"""


def test_viky_camera_lost_without_reopen_exits_1_with_every_grabbed_frame_published(tmp_path, notify,
                                                                                    synthetic_cfg):
    # The real GenICam source's device-lost error on the no-reopen path: the unit ends (exit 1,
    # systemd's Restart= takes over), every frame grabbed before is published, STATUS names the
    # cause, the camera is released. In a subprocess, as test_daemon_viky.py, so that whatever the
    # viky producer does after the removal cannot poison this process.
    from inspector.sources.genicam import default_viky_cti
    if default_viky_cti() is None:
        pytest.skip("viky.cti not found in the installed genicam package")
    import json
    raw = synthetic_cfg(pipeline={"reopen_source": False, "queue_size": 16})
    raw["source"] = {"type": "genicam", "cti": "builtin:viky", "serial": "2", "pixel_format": "Mono8",
                     "width": 320, "height": 160, "fps": 20, "fetch_timeout_s": 2.0}
    cfg = write_config(tmp_path / "viky.yaml", raw)
    r = subprocess.run([sys.executable, "-c", VIKY_LOST_SCRIPT, str(cfg), notify.address], capture_output=True,
                       text=True, timeout=180, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:] + r.stdout[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    c = out["counters"]
    assert not out["alive"], "the daemon did not end after losing its camera"
    assert out["rc"] == 1
    assert c["source_errors"] == 1 and c["reopens"] == 0, c
    # a camera cannot wait (no backpressure): a loaded machine may drop frames at a full queue,
    # counted; none is lost with the stage threads (the frames queued when the camera went are
    # published)
    assert c["published"] >= 10 and c["grabbed"] == c["published"] + c["dropped"]["queue_full"], c
    assert sum(c["dropped"].values()) == c["dropped"]["queue_full"], c
    assert out["released"], "the acquirer and harvester were not released"
    _, stopping = notify.wait(lambda m: "STOPPING=1" in m.split("\n"), what="STOPPING=1")
    assert "STATUS=failed (" in stopping and "image acquirer was destroyed (device lost)" in stopping, stopping
    log = "\n".join(out["log"])
    assert "pipeline failed:" in log and "image acquirer was destroyed" in log, log[-3000:]


def _collect(endpoint: str, out: list, stop: threading.Event, ready: threading.Event):
    sub = Subscriber(endpoint)
    ready.set()
    while not stop.is_set():
        m = sub.recv(timeout_s=0.2)
        if m is not None:
            out.append(m.header)
    sub.close()


@pytest.fixture
def stream():
    started = []

    def start(endpoint):
        out: list = []
        stop, ready = threading.Event(), threading.Event()
        t = threading.Thread(target=_collect, args=(endpoint, out, stop, ready), daemon=True)
        t.start()
        ready.wait(10)
        started.append((t, stop))
        return out
    yield start
    for t, stop in started:
        stop.set()
        t.join(5)


def wait_frames(got: list, n: int, timeout: float = 60):
    deadline = time.monotonic() + timeout
    while len(got) < n:
        assert time.monotonic() < deadline, f"only {len(got)} of {n} frames arrived"
        time.sleep(0.05)


def test_sighup_with_a_changed_threshold_takes_effect_without_dropping_the_stream(tmp_path, notify, stream,
                                                                                   synthetic_cfg):
    raw = synthetic_cfg(source={"fps": 20, "defect_rate": 1.0}, pipeline={"backpressure": True},
                        publish={"connect_grace_s": 0.5})
    cfg = write_config(tmp_path / "cam.yaml", raw)
    got = stream(raw["publish"]["endpoint"])
    proc = start_daemon(cfg, notify.address)
    try:
        notify.wait(lambda m: "READY=1" in m.split("\n"), what="READY=1")
        wait_frames(got, 15)
        assert sum(1 for h in got if h["defects"]) >= 5  # threshold 0.5 finds the defects
        raw["model"]["postprocess"] = {"threshold": 0.999}
        write_config(cfg, raw)
        proc.send_signal(signal.SIGHUP)
        notify.wait(lambda m: "RELOADING=1" in m.split("\n"), what="RELOADING=1")
        notify.wait(lambda m: "READY=1" in m.split("\n") and "reloaded" in m, what="READY=1 after reload")
        n_at_reload = len(got)
        wait_frames(got, n_at_reload + 30)
        proc.send_signal(signal.SIGTERM)
        rc, err = finish(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert rc == 0, err[-3000:]
    ids = [h["frame_id"] for h in got]
    assert ids == list(range(len(ids))), "frames were lost across the reload"
    # frames still in the queues finish on the old model (4 at most), and the collecting thread
    # may be a few behind when READY is seen: room for 8 more on a loaded box (0.4 s at 20 fps)
    after = got[n_at_reload + 12:]
    assert len(after) >= 18 and all(h["defects"] == [] for h in after)
    assert all(sum(h["counters"]["dropped"].values()) == 0 for h in got)
    assert "reload done" in err and "reload failed" not in err


def test_sighup_with_a_corrupt_model_or_bad_config_keeps_the_old_model(tmp_path, notify, stream, synthetic_cfg,
                                                                       toy_bundle):
    bundle = tmp_path / "bundle"
    shutil.copytree(toy_bundle, bundle)
    raw = synthetic_cfg(source={"fps": 20, "defect_rate": 1.0}, model={"bundle": str(bundle)},
                        pipeline={"backpressure": True}, publish={"connect_grace_s": 0.5})
    cfg = write_config(tmp_path / "cam.yaml", raw)
    got = stream(raw["publish"]["endpoint"])
    proc = start_daemon(cfg, notify.address)
    try:
        notify.wait(lambda m: "READY=1" in m.split("\n"), what="READY=1")
        wait_frames(got, 10)
        onnx = bundle / "model.onnx"
        onnx.write_bytes(onnx.read_bytes()[: onnx.stat().st_size // 2])  # truncated on disk
        proc.send_signal(signal.SIGHUP)
        notify.wait(lambda m: "READY=1" in m.split("\n") and "reload failed" in m, what="reload failed")
        n1 = len(got)
        wait_frames(got, n1 + 15)
        assert sum(1 for h in got[n1:] if h["defects"]) >= 5  # the old model still finds defects
        cfg.write_text("camera_id: [unclosed\n")  # and then a broken config file
        proc.send_signal(signal.SIGHUP)
        _, m = notify.wait(lambda m: "READY=1" in m.split("\n") and "reload failed" in m and "YAML" in m,
                           what="second reload failed")
        n2 = len(got)
        wait_frames(got, n2 + 10)
        # a record section the next start would refuse (exit 2: the unit would stay down) fails
        # the reload now, though it only takes effect after a restart
        shutil.copytree(toy_bundle, bundle, dirs_exist_ok=True)  # the model sound again
        write_config(cfg, {**raw, "record": {"enabled": True, "dir": str(tmp_path / "rec"),
                                             "classes": ["rust"]}})
        proc.send_signal(signal.SIGHUP)
        notify.wait(lambda m: "READY=1" in m.split("\n") and "reload failed" in m and "record.classes" in m,
                    what="third reload failed")
        # so do alarm rules naming an unknown class while alarms were off at start
        write_config(cfg, {**raw, "alarms": {"rules": [{"name": "r", "classes": ["rust"]}]}})
        proc.send_signal(signal.SIGHUP)
        notify.wait(lambda m: "READY=1" in m.split("\n") and "reload failed" in m and "alarms.rules.0" in m,
                    what="fourth reload failed")
        proc.send_signal(signal.SIGTERM)
        rc, err = finish(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert rc == 0, err[-3000:]
    assert "reload failed, the running model and rules stay" in err
    assert "sha256" in err and str(onnx) in err  # names the file that is wrong
    assert f"{cfg}: not valid YAML" in err
    assert f"{cfg}: record.classes: unknown class(es) ['rust']" in err
    assert f"{cfg}: alarms.rules.0.classes: unknown class(es) ['rust']" in err
    ids = [h["frame_id"] for h in got]
    assert ids == list(range(len(ids)))
    assert len({h["model"]["sha256"] for h in got}) == 1


def test_startup_fails_fast_naming_file_and_key(tmp_path, synthetic_cfg):
    from conftest import run_cli
    # a rule naming a class the model does not have: exit 2 (no systemd restart loop)
    cfg = write_config(tmp_path / "cam.yaml", synthetic_cfg(alarms={"rules": [{"name": "r", "classes": ["rust"]}]}))
    r = run_cli("daemon", "--config", str(cfg), timeout=60)
    assert r.returncode == 2 and f"{cfg}: alarms.rules.0.classes: unknown class(es) ['rust']" in r.stderr
    # the metrics port is taken: exit 1 (runtime failure), naming the key
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        cfg = write_config(tmp_path / "cam2.yaml", synthetic_cfg(metrics={"enabled": True, "port": port}))
        r = run_cli("daemon", "--config", str(cfg), timeout=60)
    assert r.returncode == 1 and f"{cfg}: metrics.port: cannot listen on 127.0.0.1:{port}" in r.stderr


def test_startup_with_a_graph_onnxruntime_cannot_load_exits_2_naming_it(tmp_path, notify, synthetic_cfg,
                                                                       toy_bundle):
    # sha256 as recorded, bytes not a graph: a bad model, not a runtime failure (exit 1 is what
    # Restart=on-failure retries every RestartSec, for ever; RestartPreventExitStatus=2 stops it)
    from conftest import unloadable_graph_bundle
    b = unloadable_graph_bundle(toy_bundle, tmp_path / "bundle", "truncated")
    cfg = write_config(tmp_path / "cam.yaml", synthetic_cfg(model={"bundle": str(b)}))
    proc = start_daemon(cfg, notify.address)
    rc, err = finish(proc)
    assert rc == 2, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert f"{b / 'model.onnx'}: onnxruntime" in last and "INVALID_PROTOBUF" in last, last
    assert not any("READY=1" in m.split("\n") for _, m in notify.messages)


def test_a_log_level_given_on_the_command_line_survives_a_reload(tmp_path, notify, synthetic_cfg):
    # `inspector daemon --log-level DEBUG` used to fall back to the config's level at the first
    # SIGHUP, in the middle of the investigation it was given for
    root = logging.getLogger()
    saved = root.level
    cfg = write_config(tmp_path / "cam.yaml", synthetic_cfg(source={"fps": 20}, log_level="WARNING"))
    d = Daemon(cfg, notifier=Notifier(notify.address))
    d.log_level_override = "DEBUG"
    root.setLevel("DEBUG")
    t = threading.Thread(target=d.run, daemon=True)
    t.start()
    try:
        notify.wait(lambda m: "READY=1" in m.split("\n"), what="READY=1")
        d.request_reload()
        deadline = time.monotonic() + 60
        while d.reloads["ok"] < 1:
            assert time.monotonic() < deadline and d.reloads["failed"] == 0, d.reloads
            time.sleep(0.05)
        assert root.level == logging.DEBUG
    finally:
        d.request_stop()
        t.join(60)
        root.setLevel(saved)


def test_a_stop_with_a_hung_engine_ends_in_time_and_accounts_for_every_frame(tmp_path, notify, synthetic_cfg,
                                                                             caplog):
    # The drain, the PLC drivers' stop and each stage thread's join used to wait their own
    # timeouts one after the other (35 s with the defaults: past TimeoutStopSec=30, SIGKILL),
    # and the frames left inside were counted nowhere.
    cfg = write_config(tmp_path / "cam.yaml", synthetic_cfg(source={"fps": 20}, daemon={"stop_timeout_s": 1.0}))
    d = Daemon(cfg, notifier=Notifier(notify.address))
    out = {}
    t = threading.Thread(target=lambda: out.update(rc=d.run()), daemon=True)
    t.start()
    hang = threading.Event()
    try:
        notify.wait(lambda m: "READY=1" in m.split("\n"), what="READY=1")
        while d.pipeline.counters.snapshot()["published"] < 5:
            time.sleep(0.05)
        real = d.pipeline.model.adapter.infer

        def stuck(img):  # a GPU hang, a stuck driver
            hang.wait(120)
            return real(img)
        d.pipeline.model.adapter.infer = stuck
        time.sleep(0.5)  # frames queue up behind the hung call
        t0 = time.monotonic()
        d.request_stop()
        t.join(60)
        took = time.monotonic() - t0
        c = d.pipeline.counters.snapshot()
    finally:
        hang.set()  # the engine call returns after all (a slow GPU, not a dead one)
    assert out.get("rc") == 1
    # the drain gave up at daemon.stop_timeout_s instead of waiting for the hung call ...
    assert "queues not drained within daemon.stop_timeout_s=1s" in caplog.text
    # ... and the process was gone before the unit's TimeoutStopSec (then systemd SIGKILLs)
    unit = (ROOT / "deploy" / "inspector@.service").read_text()
    timeout_stop_s = float(re.search(r"^TimeoutStopSec=(\d+)$", unit, re.M).group(1))
    assert took < timeout_stop_s, took
    assert c["grabbed"] == c["published"] + sum(c["dropped"].values()), c
    assert c["dropped"]["stage_failed"] >= 1, c
    time.sleep(1.0)  # the late frame is not counted twice, and is no failure of the pipeline's
    assert d.pipeline.counters.snapshot() == c and d.pipeline.error is None


def test_frames_counted_not_published_at_a_forced_stop_are_not_sent_after_all(tmp_path, notify, synthetic_cfg):
    # a slow engine, not a hung one: the stages went on after the stop timeout and published the
    # frames the counters had just called stage_failed ("not published")
    import zmq

    # the first frame waits for the subscription: one sent before it arrives is counted as
    # published and never received (a test race, not the product's)
    raw = synthetic_cfg(source={"fps": 50}, pipeline={"queue_size": 8}, daemon={"stop_timeout_s": 0.05},
                        publish={"wait_for_subscribers": 1, "wait_timeout_s": 60})
    cfg = write_config(tmp_path / "cam.yaml", raw)
    sub = zmq.Context.instance().socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(raw["publish"]["endpoint"])
    d = Daemon(cfg, notifier=Notifier(notify.address))
    out = {}
    t = threading.Thread(target=lambda: out.update(rc=d.run()), daemon=True)
    t.start()
    try:
        notify.wait(lambda m: "READY=1" in m.split("\n"), what="READY=1")
        real = d.pipeline.model.adapter.infer

        def slow(img):
            time.sleep(0.1)
            return real(img)
        d.pipeline.model.adapter.infer = slow
        time.sleep(1.5)  # the queue fills behind the slow engine
        d.request_stop()
        t.join(60)
        c = d.pipeline.counters.snapshot()
        received = 0
        while sub.poll(500):
            sub.recv_multipart()
            received += 1
    finally:
        sub.close(linger=0)
    assert c["dropped"]["stage_failed"] >= 1 and out.get("rc") == 1, c
    assert c["grabbed"] == c["published"] + sum(c["dropped"].values()), c
    assert received == c["published"], (received, c)


def test_a_stop_while_waiting_for_subscribers_ends_the_wait_and_the_wait_is_said(tmp_path, notify, synthetic_cfg,
                                                                                 caplog):
    caplog.set_level(logging.INFO, logger="inspector.publish")
    cfg = write_config(tmp_path / "cam.yaml", synthetic_cfg(
        publish={"wait_for_subscribers": 1, "wait_timeout_s": 60}))
    d = Daemon(cfg, notifier=Notifier(notify.address))
    out = {}
    t = threading.Thread(target=lambda: out.update(rc=d.run()), daemon=True)
    t.start()
    deadline = time.monotonic() + 30
    while "publish.wait_for_subscribers" not in caplog.text and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "waiting up to 60s for 1 subscriber(s) on tcp://127.0.0.1:" in caplog.text
    t0 = time.monotonic()
    d.request_stop()
    t.join(30)
    assert not t.is_alive() and time.monotonic() - t0 < 10  # not the rest of the 60 s
    assert out.get("rc") == 0 and d.pipeline.counters.snapshot()["grabbed"] == 0


def test_a_reload_lets_go_of_the_model_it_swapped_out(tmp_path, notify, synthetic_cfg):
    # the first model stayed referenced for the daemon's life: a reload left its memory in use
    import gc
    import weakref

    cfg = write_config(tmp_path / "cam.yaml", synthetic_cfg(source={"fps": 20}))
    d = Daemon(cfg, notifier=Notifier(notify.address))
    t = threading.Thread(target=d.run, daemon=True)
    t.start()
    try:
        notify.wait(lambda m: "READY=1" in m.split("\n"), what="READY=1")
        first = weakref.ref(d.pipeline.model)
        d.request_reload()
        notify.wait(lambda m: "STATUS=reloaded" in m, what="reloaded")
        n0 = d.pipeline.counters.snapshot()["published"]
        deadline = time.monotonic() + 20
        while d.pipeline.counters.snapshot()["published"] < n0 + 5 and time.monotonic() < deadline:
            time.sleep(0.05)  # the publish stage lets go of the old model at its next frame
        gc.collect()
        assert first() is None
    finally:
        d.request_stop()
        t.join(30)


def test_a_stop_asked_while_the_model_loads_starts_no_wait_and_grabs_nothing(tmp_path, notify, synthetic_cfg):
    cfg = write_config(tmp_path / "cam.yaml", synthetic_cfg(
        publish={"wait_for_subscribers": 1, "wait_timeout_s": 60}))
    d = Daemon(cfg, notifier=Notifier(notify.address))
    d.request_stop()  # before the pipeline exists, as a SIGTERM during the model's load
    t0 = time.monotonic()
    assert d.run() == 0
    assert time.monotonic() - t0 < 20 and d.pipeline.counters.snapshot()["grabbed"] == 0


def test_a_send_that_waits_does_not_hold_up_the_counters():
    # the send holds its own lock: the grab stage and /metrics go on while a subscriber reset waits
    from inspector.pipeline import Counters

    c = Counters()
    started = threading.Event()

    sent = threading.Event()

    def slow_send() -> bool:
        started.set()
        assert sent.wait(10)  # a send that ends only when the test says so
        return True
    t = threading.Thread(target=lambda: c.publish_with(slow_send))
    t.start()
    assert started.wait(5)
    other = threading.Thread(target=lambda: (c.grab(), c.snapshot()))
    other.start()
    other.join(5)
    assert not other.is_alive(), "grab/snapshot waited for a send in progress"
    sent.set()
    t.join()
    assert c.snapshot()["published"] == 1
    assert c.abandon() == 0 and c.publish_with(lambda: True) is None  # frozen: nothing sent
