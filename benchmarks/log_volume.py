"""How many log lines `inspector daemon` writes with PLC drivers connected (JSON + PNG).

Runs the daemon for ``--seconds`` on the synthetic strip with an OPC UA (client) and an S7
driver against the test suite's real servers on 127.0.0.1 (``tests/plc_servers.py``), stops it
with SIGTERM and counts its stderr lines by library and level. The journal holds what this
counts, per camera: the PLC libraries used to add about 3 INFO lines a second (asyncua logs
every heartbeat write and acknowledge read); the daemon holds them back below DEBUG
(``inspector/logs.py``). ``--src`` runs another source tree (an older commit checked out with
``git worktree add``) with the same servers, for a before/after figure.

    python benchmarks/log_volume.py --seconds 40 --out bench-out/log-volume
    python benchmarks/log_volume.py --seconds 40 --src /tmp/old-tree --out bench-out/log-volume-old
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from inspector.bench import (benchmark_out, machine_caption, machine_under_load, save_figure,  # noqa: E402
                             script_command, write_benchmark)

RULES = [{"name": "big_defect", "min_area_mm2": 100}, {"name": "scratches", "classes": ["scratches"]}]
LINE = re.compile(r"\S+ \S+ (\w+)\s+([\w.]+):")


def count_lines(src: Path, seconds: float, work: Path) -> dict:
    """Run the daemon of source tree ``src`` for ``seconds``; its stderr lines by library and level."""
    from conftest import free_endpoint
    from plc_servers import OpcUaPlc, S7Plc

    opc = OpcUaPlc("line1", [r["name"] for r in RULES], ["inclusion", "patches", "scratches"]).start()
    s7 = S7Plc(n_classes=3).start()
    try:
        cfg = {"camera_id": "line1",
               "source": {"type": "synthetic", "width": 512, "height": 128, "fps": 2, "seed": 3},
               "model": {"bundle": str(ROOT / "deploy" / "models" / "demo-arcd")},
               "publish": {"endpoint": free_endpoint()},
               "alarms": {"rules": RULES, "drivers": [opc.driver_cfg(object_name="line1"), s7.driver_cfg()]}}
        path = work / "cam.yaml"
        path.write_text(yaml.safe_dump(cfg))
        env = {**os.environ, "PYTHONPATH": str(src)}
        env.pop("JOURNAL_STREAM", None)  # plain text lines, as counted here
        proc = subprocess.Popen([sys.executable, "-m", "inspector", "daemon", "--config", str(path),
                                 "--runtime-dir", str(work / "rt")], stderr=subprocess.PIPE, text=True,
                                env=env, cwd=work)
        time.sleep(seconds)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        opc.stop()
        s7.stop()
    by = collections.Counter()
    for line in err.splitlines():
        m = LINE.match(line)
        if m:
            by[f"{m.group(2).split('.')[0]} {m.group(1)}"] += 1
    return {"src": str(src), "seconds": seconds, "exit": proc.returncode, "lines": len(err.splitlines()),
            "lines_per_hour": round(len(err.splitlines()) * 3600 / seconds),
            "by_library_level": dict(sorted(by.items()))}


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by = result["run"]["by_library_level"]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.barh(list(by), list(by.values()), color="tab:blue")
    ax.set_xlabel(f"lines in {result['run']['seconds']:g} s")
    fig.suptitle(f"inspector daemon, OPC UA + S7 drivers: {result['run']['lines']} lines, "
                 f"{machine_caption(result['machine'])}")
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=40.0)
    ap.add_argument("--src", default=str(ROOT), help="source tree to run (default: this one)")
    ap.add_argument("--out", required=True, help="folder for log-volume.json and .png")
    args = ap.parse_args(argv)
    out = benchmark_out(args.out)
    load = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        run = count_lines(Path(args.src), args.seconds, Path(tmp))
    result = {"what": "log lines of inspector daemon with PLC drivers (benchmarks/log_volume.py)",
              "command": script_command("log_volume.py", argv), "machine": machine_under_load(load),
              "run": run}
    print(f"{run['lines']} lines in {run['seconds']:g} s: {run['by_library_level']}", file=sys.stderr)
    write_benchmark(out, "log-volume", result, plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
