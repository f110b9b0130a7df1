from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from ports import free_port

ROOT = Path(__file__).resolve().parents[1]
DEMO_BUNDLE = ROOT / "deploy" / "models" / "demo-arcd"
SHARED_DATA = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(Path(__file__).parent))


#: the start of a script that runs an in-process daemon in a subprocess and keeps its log lines
#: in ``records`` (the viky tests: a camera removed under a running daemon)
DAEMON_SCRIPT_PREAMBLE = r"""
import json, logging, sys, threading, time, urllib.request
from inspector.daemon import Daemon, Notifier

records = []
class Keep(logging.Handler):
    def emit(self, r):
        records.append(r.getMessage())
logging.getLogger().addHandler(Keep())
logging.getLogger().setLevel(logging.INFO)
"""


@pytest.fixture(autouse=True)
def _inspector_environment_left_as_found():
    """The INSPECTOR_* variables name folders every later test in the process (and every CLI run
    it starts) would write to: a test that leaves one set sends them to a fixed host path."""
    before = {k: v for k, v in os.environ.items() if k.startswith("INSPECTOR_")}
    yield
    after = {k: v for k, v in os.environ.items() if k.startswith("INSPECTOR_")}
    if after != before:
        os.environ.update(before)
        for k in set(after) - set(before):
            del os.environ[k]
        pytest.fail(f"the test changed the environment: {before} -> {after}")


def free_endpoint() -> str:
    return f"tcp://127.0.0.1:{free_port()}"


def write_config(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def run_cli(*args: str, timeout: float = 120, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "inspector", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, **kw)


def sigterm_when(args: list[str], log: Path, pattern: str, timeout_s: float = 120.0
                 ) -> tuple[int, str]:
    """Run ``python -m *args`` as a background job of a script would (SIGINT ignored), send
    SIGTERM once its stderr matches ``pattern``; returns (exit status, stderr)."""
    with open(log, "w") as err:
        p = subprocess.Popen([sys.executable, "-m", *args], cwd=ROOT, stdout=subprocess.DEVNULL,
                             stderr=err, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
        try:
            deadline = time.monotonic() + timeout_s
            while not re.search(pattern, log.read_text()):
                if p.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"no {pattern!r} before exit / timeout:\n{log.read_text()[-2000:]}")
                time.sleep(0.05)
            p.send_signal(signal.SIGTERM)
            return p.wait(timeout=timeout_s), log.read_text()
        finally:
            if p.poll() is None:
                p.kill()


def pairwise_auroc(s, y) -> float | None:
    """Reference AUROC for tests: P(positive > negative) + 0.5 P(equal), counting every pair."""
    import numpy as np

    s = np.asarray(s, np.float64).ravel()
    y = np.asarray(y, bool).ravel()
    pos, neg = s[y], s[~y]
    if not pos.size or not neg.size:
        return None
    gt = eq = 0
    for i in range(0, pos.size, 512):
        p = pos[i:i + 512, None]
        gt += int((p > neg[None, :]).sum())
        eq += int((p == neg[None, :]).sum())
    return (gt + 0.5 * eq) / (pos.size * neg.size)


def collect(endpoint: str, n: int, out: list, ready: threading.Event | None = None,
            timeout_s: float = 60.0) -> None:
    """Subscribe to ``endpoint`` and append messages to ``out`` until there are ``n`` or
    ``timeout_s`` passed (run it in a thread). ``ready`` is set once subscribed, so the test can
    start publishing only then."""
    from inspector.publish import Subscriber

    sub = Subscriber(endpoint)
    if ready:
        ready.set()
    deadline = time.monotonic() + timeout_s
    while len(out) < n and time.monotonic() < deadline:
        m = sub.recv(timeout_s=0.5)
        if m is not None:
            out.append(m)
    sub.close()


def subscribed(endpoint: str, n: int, timeout_s: float = 60.0) -> tuple[list, threading.Thread]:
    """A subscriber collecting ``n`` messages in a thread, connected before this returns."""
    got: list = []
    ready = threading.Event()
    t = threading.Thread(target=collect, args=(endpoint, n, got),
                         kwargs={"ready": ready, "timeout_s": timeout_s})
    t.start()
    ready.wait()
    return got, t


@pytest.fixture(scope="session")
def toy_bundle(tmp_path_factory) -> Path:
    """A hand-built real ONNX graph (dark spots -> class 1) in a valid bundle, 4 NEU classes."""
    from toy_models import dark_spot_bundle
    return dark_spot_bundle(tmp_path_factory.mktemp("bundles") / "toy", tile=128,
                            classes=("background", "inclusion", "patches", "scratches"))


@pytest.fixture
def demo_bundle() -> Path:
    if not (DEMO_BUNDLE / "bundle.yaml").is_file():
        pytest.fail(f"the shipped demo bundle is missing at {DEMO_BUNDLE}")
    return DEMO_BUNDLE


@pytest.fixture
def synthetic_cfg(toy_bundle):
    """A camera config dict on the synthetic strip and the toy model, on a free port."""
    def make(**over) -> dict:
        cfg = {
            "camera_id": "test",
            "source": {"type": "synthetic", "width": 512, "height": 128, "fps": 0, "seed": 3},
            "model": {"bundle": str(toy_bundle)},
            "publish": {"endpoint": free_endpoint(), "connect_grace_s": 0.2},
        }
        for k, v in over.items():
            if isinstance(v, dict) and isinstance(cfg.get(k), dict):
                cfg[k] = {**cfg[k], **v}
            else:
                cfg[k] = v
        return cfg
    return make


def unloadable_graph_bundle(src: Path, dest: Path, how: str = "truncated") -> Path:
    """A copy of bundle ``src`` whose model.onnx onnxruntime cannot load, with its sha256 recorded
    as is: what an export that wrote a bad graph leaves, or one made for a newer onnxruntime.
    ``how``: ``truncated`` (not a protobuf), ``opset`` (an opset this onnxruntime lacks)."""
    import shutil

    import onnx

    from inspector.bundle import sha256_file
    shutil.copytree(src, dest)
    graph = dest / "model.onnx"
    if how == "truncated":
        graph.write_bytes(graph.read_bytes()[: graph.stat().st_size // 2])
    elif how == "opset":
        model = onnx.load(str(graph))
        model.opset_import[0].version = 99
        onnx.save(model, str(graph))
    else:
        raise ValueError(how)
    meta = yaml.safe_load((dest / "bundle.yaml").read_text())
    meta["graphs"]["model"]["sha256"] = sha256_file(graph)
    (dest / "bundle.yaml").write_text(yaml.safe_dump(meta, sort_keys=False))
    return dest


def checkpoint_differences(a, b, where: str = "") -> list[str]:
    """Where two checkpoint parts differ: tensors bit for bit (torch.equal), the rest with ==
    (for the resume tests: a resumed run must end with an uninterrupted run's weights)."""
    import torch

    if isinstance(a, dict) and isinstance(b, dict):
        if set(a) != set(b):
            return [f"{where}: keys {sorted(map(str, set(a) ^ set(b)))}"]
        return [d for k in a for d in checkpoint_differences(a[k], b[k], f"{where}.{k}")]
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return [f"{where}: length {len(a)} vs {len(b)}"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in checkpoint_differences(x, y, f"{where}[{i}]")]
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return [] if a.dtype == b.dtype and torch.equal(a, b) else [where]
    return [] if a == b else [f"{where}: {a!r} vs {b!r}"]
