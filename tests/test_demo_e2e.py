"""The shipped demo: CLI run + subscribe in separate processes, and detection quality."""

import json
import subprocess
import sys
import time

import yaml

from conftest import ROOT, free_endpoint, write_config
from inspector.config import load_config
from inspector.pipeline import Pipeline
from inspector.publish import Subscriber
from inspector.sources.synthetic import SyntheticSource


def demo_config(tmp_path, backpressure=False, publish=None, **source):
    cfg = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    # a loaded 2-core CI box may not keep the demo's pace; waiting instead of dropping keeps the
    # frame count exact (drops and their accounting are tested in test_pipeline.py)
    cfg.setdefault("pipeline", {})["backpressure"] = backpressure
    cfg["model"]["bundle"] = str(ROOT / "deploy" / "models" / "demo-arcd")
    cfg["publish"]["endpoint"] = free_endpoint()
    cfg["publish"].update(publish or {})
    cfg["source"].update(source)
    return write_config(tmp_path / "demo.yaml", cfg), cfg["publish"]["endpoint"]


def test_run_and_subscribe_as_two_commands(tmp_path, demo_bundle):
    # The first frame waits for the subscriber (publish.wait_for_subscribers, the product's
    # option for this), and the subscriber is started only once `run` is up and waiting: no
    # frame may be sent before it listens, however long either process takes to start.
    path, endpoint = demo_config(tmp_path, backpressure=True, fps=20,
                                 publish={"wait_for_subscribers": 1, "wait_timeout_s": 120})
    n = 30
    log = tmp_path / "run.log"
    with open(log, "w") as run_err:
        run = subprocess.Popen([sys.executable, "-m", "inspector", "run", "--config", str(path),
                                "--frames", str(n)], stdout=subprocess.DEVNULL, stderr=run_err, cwd=ROOT)
    sub = None
    try:
        deadline = time.monotonic() + 120
        while "warm-up" not in log.read_text():  # logged just before the wait for subscribers
            assert run.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        sub = subprocess.Popen([sys.executable, "-m", "inspector", "subscribe", "--endpoint", endpoint,
                                "--count", str(n), "--json", "--timeout", "120",
                                "--save-masks", str(tmp_path / "masks")],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
        out, err = sub.communicate(timeout=180)
        assert run.wait(timeout=180) == 0, log.read_text()
    finally:
        for proc in (run, sub):
            if proc is not None and proc.poll() is None:
                proc.kill()
    run_stderr = log.read_text()
    assert sub.returncode == 0, err
    assert "1 subscriber(s) at start" in run_stderr and "starting anyway" not in run_stderr, run_stderr
    headers = [json.loads(line) for line in out.splitlines()]
    assert [h["frame_id"] for h in headers] == list(range(n))
    assert len(list((tmp_path / "masks").glob("*.png"))) == n
    # the status line reports fps, latency and drops
    assert "fps" in run_stderr and "latency p50" in run_stderr and "dropped 0" in run_stderr


class RecordingSource(SyntheticSource):
    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.truth = {}

    def read(self):
        f = super().read()
        if f is not None:
            self.truth[f.frame_id] = f.truth
        return f


def test_demo_model_finds_the_injected_defects(tmp_path, demo_bundle):
    # the first frame waits for the subscription: one sent before it arrives is lost to ZeroMQ
    path, endpoint = demo_config(tmp_path, backpressure=True, fps=0, seed=12345, defect_rate=1.0,
                                 publish={"wait_for_subscribers": 1, "wait_timeout_s": 60})
    cfg = load_config(path)
    src = RecordingSource(cfg.source, cfg.camera_id)
    sub = Subscriber(endpoint)
    n = 24
    masks = {}
    with Pipeline(cfg, source=src) as p:
        p.run(frames=n)
    while len(masks) < n:
        m = sub.recv(timeout_s=10)
        assert m is not None, f"only {len(masks)} of {n} messages arrived"
        masks[m.header["frame_id"]] = m.mask()
    sub.close()
    inter = union = 0
    for fid, mask in masks.items():
        t, pr = src.truth[fid] > 0, mask > 0
        inter += int((t & pr).sum())
        union += int((t | pr).sum())
    iou = inter / union
    # measured 0.70 on the shipped bundle (24 frames, seed 12345; README "Demo model");
    # the bound sits below it so that only a real regression fails
    assert iou > 0.55, f"defect IoU {iou:.3f}"
