"""The viky GenICam camera removed mid-run: the daemon reopens it and reports the outage.

Removal is simulated by destroying the harvesters image acquirer the way a vanished device leaves
it, but between two fetches (under the source's lock): destroying it from another thread *during*
a fetch can leave the viky producer unusable for the rest of the process, which would test viky's
robustness rather than ours. The whole run happens in a subprocess so that, whatever the producer
does, it cannot poison the test process (other viky tests run in it).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from conftest import DAEMON_SCRIPT_PREAMBLE, ROOT, write_config
from inspector.sources.genicam import default_viky_cti

SCRIPT = DAEMON_SCRIPT_PREAMBLE + r"""

d = Daemon(sys.argv[1], notifier=Notifier(None))
res = {}
t = threading.Thread(target=lambda: res.update(rc=d.run()), daemon=True)
t.start()

def wait(pred, what, timeout=60):
    end = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > end or not t.is_alive():
            print(json.dumps({"error": f"timeout waiting for {what}", "log": records[-30:]}))
            sys.exit(3)
        time.sleep(0.02)

wait(lambda: d.pipeline is not None and d.metrics is not None and d.metrics.port
     and d.pipeline.counters.snapshot()["published"] >= 10, "first frames")
src = d.pipeline.source
with src._lock:                 # between two fetches: the safe way to pull the device away
    ia = src._ia
    ia.stop()
    ia.destroy()
removed_at = d.pipeline.counters.snapshot()["published"]
wait(lambda: d.pipeline.counters.snapshot()["reopens"] >= 1, "the reopen")
wait(lambda: d.pipeline.counters.snapshot()["published"] >= removed_at + 10, "frames after the reopen")
metrics = urllib.request.urlopen(f"http://127.0.0.1:{d.metrics.port}/metrics", timeout=10).read().decode()
raised = d.engine.raised_counts()
active = d.engine.active()
d.request_stop()
t.join(60)
print(json.dumps({"rc": res.get("rc"), "counters": d.pipeline.counters.snapshot(), "raised": raised,
                  "active": active, "metrics": metrics, "log": records}))
"""


@pytest.mark.skipif(default_viky_cti() is None, reason="viky.cti not found in the installed genicam package")
def test_viky_camera_removed_mid_run_is_reopened_and_the_outage_reported(tmp_path, synthetic_cfg):
    raw = synthetic_cfg(
        pipeline={"reopen_backoff_s": [0.5, 1.0]},
        metrics={"enabled": True, "port": 0},
        alarms={"rules": [{"name": "camera_lost", "type": "camera_down", "after_s": 0.2, "off_delay_s": 0}]})
    raw["source"] = {"type": "genicam", "cti": "builtin:viky", "serial": "2", "pixel_format": "Mono8",
                     "width": 320, "height": 160, "fps": 20, "fetch_timeout_s": 2.0}
    cfg = write_config(tmp_path / "viky.yaml", raw)
    r = subprocess.run([sys.executable, "-c", SCRIPT, str(cfg)], capture_output=True, text=True,
                       timeout=180, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:] + r.stdout[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    c = out["counters"]
    assert out["rc"] == 0
    assert c["source_errors"] >= 1 and c["reopens"] >= 1
    assert c["grabbed"] == c["published"] + sum(c["dropped"].values())
    log = "\n".join(out["log"])
    assert "image acquirer was destroyed" in log          # the cause, once
    assert "camera test back after" in log and "outage" in log   # the outage and its length
    assert out["raised"] == {"camera_lost": 1} and out["active"] == {"camera_lost": False}
    reopens = re.search(r'^inspector_camera_reopens_total\{camera="test"\} (\S+)$', out["metrics"], re.M)
    assert reopens and float(reopens.group(1)) == c["reopens"]
    assert re.search(r'^inspector_camera_up\{camera="test"\} 1\.0$', out["metrics"], re.M)
