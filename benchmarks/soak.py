"""Soak run of `inspector daemon`: does memory, open files or threads grow, is any frame lost?

A line PC runs one daemon per camera for months. A leak of a few MiB an hour, or one socket per
PLC reconnect, shows only after days; this runs the daemon for ``--minutes`` with everything on
(the synthetic strip, a model bundle, ZeroMQ with a live subscriber, the recorder pruning a small
folder, a Modbus PLC driver against the test suite's real server on 127.0.0.1, the metrics
endpoint, and optionally a SIGHUP reload every ``--reload-every-min`` minutes) and every
``--sample-s`` seconds reads the daemon's resident memory, open files and threads from
``/proc/<pid>`` and its counters from ``/metrics``. After the warm-up (the first fifth of the run,
at least one minute) it fits a line to the resident memory and reports the slope in MiB per
hour. At the end it checks the frame accounting: every grabbed frame published or counted as
dropped, and every published frame received by the subscriber (by ``frame_id``).

    python benchmarks/soak.py --minutes 30 --fps 10 --reload-every-min 3 --out bench-out/soak
    python benchmarks/soak.py --minutes 60 --config my-camera.yaml --out bench-out/soak-cam1

``--config`` soaks your own camera config instead of the generated one (its ``metrics`` section
is replaced by one on a free loopback port; its publish endpoint is subscribed to). Linux only
(``/proc``). Writes ``soak.json`` and ``soak.png`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from inspector.bench import (benchmark_out, machine_caption, machine_under_load, refuse,  # noqa: E402
                             save_figure, script_command, write_benchmark)

RULES = [{"name": "big_defect", "min_area_mm2": 100}, {"name": "scratches", "classes": ["scratches"]}]
PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def proc_sample(pid: int) -> dict:
    """Resident memory (MiB), open files, threads and CPU seconds of process ``pid``."""
    status = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        status[key] = value.strip()
    stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return {"rss_mib": int(status["VmRSS"].split()[0]) / 1024,
            "fds": len(os.listdir(f"/proc/{pid}/fd")),
            "threads": int(status["Threads"]),
            "cpu_s": (int(stat[11]) + int(stat[12])) / TICKS}


def scrape(port: int) -> dict:
    """The daemon's frame counters, fps, recorder and PLC figures from ``/metrics``."""
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out: dict = {"dropped": {}}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            name = s.name
            if name == "inspector_frames_dropped_total":
                out["dropped"][s.labels["reason"]] = int(s.value)
            elif name in ("inspector_frames_grabbed_total", "inspector_frames_published_total",
                          "inspector_fps", "inspector_recordings_bytes", "inspector_plc_writes_total",
                          "inspector_plc_errors_total", "inspector_camera_source_errors_total"):
                out[name.removeprefix("inspector_").removesuffix("_total")] = s.value
            elif name == "inspector_recorded_frames_total":
                out["recorded"] = out.get("recorded", 0) + int(s.value)
            elif name == "inspector_reloads_total":
                out.setdefault("reloads", {})[s.labels["result"]] = int(s.value)
    return out


class Subscriber(threading.Thread):
    """Counts the reports on ``endpoint`` and the gaps in their ``frame_id``."""

    def __init__(self, endpoint: str):
        super().__init__(daemon=True)
        import zmq

        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.SUB)
        self.sock.setsockopt(zmq.SUBSCRIBE, b"")
        self.sock.setsockopt(zmq.RCVTIMEO, 200)
        self.sock.connect(endpoint)
        self.received = 0
        self.missing = 0         # frame ids skipped between two received reports of one run
        self.runs = 1            # frame_id restarts (a reload that restarts the pipeline)
        self.last_header: dict | None = None
        self._halt = threading.Event()

    def run(self) -> None:
        import zmq

        last_id = None
        while not self._halt.is_set():
            try:
                parts = self.sock.recv_multipart()
            except zmq.Again:
                continue
            header = json.loads(parts[1])
            fid = header["frame_id"]
            if last_id is not None:
                if fid > last_id:
                    # ids the daemon dropped are gaps too; the accounting subtracts its drops
                    self.missing += fid - last_id - 1
                else:
                    self.runs += 1
            last_id = fid
            self.received += 1
            self.last_header = header

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=5)
        self.sock.close(linger=0)
        self.ctx.term()


def generated_config(args, work: Path, plc_cfg: dict | None) -> dict:
    cfg: dict = {"camera_id": "soak",
                 "source": {"type": "synthetic", "width": args.width, "height": args.height,
                            "fps": args.fps, "seed": 7, "defect_rate": 0.3},
                 "model": {"bundle": str(Path(args.bundle).resolve())},
                 "publish": {"endpoint": f"tcp://127.0.0.1:{free_port()}"},
                 "alarms": {"rules": RULES, "drivers": [plc_cfg] if plc_cfg else []}}
    if not args.no_record:
        # a small cap so the recorder prunes its folder many times during the run
        cfg["record"] = {"enabled": True, "dir": str(work / "rec"), "normal_every": 10,
                         "max_gb": args.record_max_mb / 1024, "min_free_gb": 0}
    return cfg


def fit_slope(ts: list[float], ys: list[float]) -> float | None:
    """Least-squares slope of ys over ts (units of y per unit of t)."""
    n = len(ts)
    if n < 3:
        return None
    mt, my = sum(ts) / n, sum(ys) / n
    var = sum((t - mt) ** 2 for t in ts)
    return sum((t - mt) * (y - my) for t, y in zip(ts, ys)) / var if var else None


def between_reloads(samples: list[dict], reloads: list[float], warm_s: float, settle_s: float = 30.0) -> dict:
    """Resident memory while frames flow and nothing reloads: the slope fitted within each
    stretch between reloads (after ``settle_s``), averaged weighted by length, and the step each
    reload left (last sample before it to the first settled one after it)."""
    edges = [warm_s] + [r for r in reloads if r > warm_s] + [float("inf")]
    slopes, weights, steps = [], [], []
    for a, b in zip(edges, edges[1:]):
        part = [s for s in samples if a + (settle_s if a > warm_s else 0) <= s["t_s"] < b]
        if len(part) >= 3:
            k = fit_slope([s["t_s"] / 3600 for s in part], [s["rss_mib"] for s in part])
            if k is not None:
                slopes.append(k)
                weights.append(part[-1]["t_s"] - part[0]["t_s"])
    for r in reloads:
        before = [s for s in samples if s["t_s"] < r]
        after = [s for s in samples if s["t_s"] >= r + settle_s]
        if before and after:
            steps.append(round(after[0]["rss_mib"] - before[-1]["rss_mib"], 1))
    slope = sum(k * w for k, w in zip(slopes, weights)) / sum(weights) if weights and sum(weights) else None
    return {"rss_slope_between_reloads_mib_per_hour": round(slope, 2) if slope is not None else None,
            "stretches": len(slopes), "rss_step_per_reload_mib": steps}


def summarise(samples: list[dict], warm_s: float, reloads: list[float] | None = None) -> dict:
    after = [s for s in samples if s["t_s"] >= warm_s]
    if len(after) < 3:
        return {"samples_after_warmup": len(after)}
    slope = fit_slope([s["t_s"] / 3600 for s in after], [s["rss_mib"] for s in after])
    first, last = after[0], after[-1]
    return {**between_reloads(samples, reloads or [], warm_s),
            "samples_after_warmup": len(after), "warmup_s": warm_s,
            "rss_mib_at_warmup": round(first["rss_mib"], 1), "rss_mib_at_end": round(last["rss_mib"], 1),
            "rss_mib_max": round(max(s["rss_mib"] for s in after), 1),
            "rss_slope_mib_per_hour": round(slope, 2) if slope is not None else None,
            "fds_min_max": [min(s["fds"] for s in after), max(s["fds"] for s in after)],
            "threads_min_max": [min(s["threads"] for s in after), max(s["threads"] for s in after)],
            "cpu_share_of_one_core": round((last["cpu_s"] - first["cpu_s"]) / max(last["t_s"] - first["t_s"], 1e-9), 3)}


def log_levels(lines: list[str]) -> dict:
    """Log lines counted by level (the daemon's format: date, time, level, logger)."""
    out: dict = {}
    for ln in lines:
        parts = ln.split(maxsplit=3)
        level = parts[2] if len(parts) > 2 and parts[2].isupper() else "other"
        out[level] = out.get(level, 0) + 1
    return out


def soak(args, work: Path, written: list[Path]) -> dict:
    from plc_servers import ModbusPlc

    plc = None if args.no_plc or args.config else ModbusPlc(n_classes=3).start()
    try:
        if args.config:
            try:
                cfg = yaml.safe_load(Path(args.config).read_text())
            except (OSError, yaml.YAMLError) as e:
                refuse(f"--config {args.config}: {e}")
            if not isinstance(cfg, dict):
                refuse(f"--config {args.config}: not a camera config (a YAML mapping)")
        else:
            cfg = generated_config(args, work, plc.driver_cfg(heartbeat_s=1.0) if plc else None)
        metrics_port = free_port()
        cfg["metrics"] = {"enabled": True, "address": "127.0.0.1", "port": metrics_port}
        endpoint = (cfg.get("publish") or {}).get("endpoint", "tcp://127.0.0.1:5556")
        # beside the user's file: its relative paths (model.bundle, ...) resolve against its folder
        path = (Path(args.config).resolve().parent / f".soak-{os.getpid()}.yaml" if args.config
                else work / "soak.yaml")
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        written.append(path)
        sub = Subscriber(endpoint.replace("*", "127.0.0.1"))
        sub.start()
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        env.pop("JOURNAL_STREAM", None)
        log_path = work / "daemon.log"
        with open(log_path, "w") as log:
            proc = subprocess.Popen([sys.executable, "-m", "inspector", "daemon", "--config", str(path),
                                     "--runtime-dir", str(work / "rt")], stderr=log, stdout=log,
                                    env=env, cwd=work)
        samples: list[dict] = []
        reload_times: list[float] = []
        t0 = time.monotonic()
        end = t0 + args.minutes * 60
        next_reload = t0 + args.reload_every_min * 60 if args.reload_every_min else None
        try:
            while time.monotonic() < end:
                if proc.poll() is not None:
                    break
                now = time.monotonic()
                if next_reload is not None and now >= next_reload:
                    proc.send_signal(signal.SIGHUP)
                    reload_times.append(now - t0)
                    next_reload += args.reload_every_min * 60
                try:
                    s = {"t_s": round(now - t0, 1), **proc_sample(proc.pid)}
                except (OSError, KeyError):
                    break
                try:
                    s.update(scrape(metrics_port))
                except OSError:
                    pass  # endpoint not up yet (model loading)
                s["received"] = sub.received
                samples.append(s)
                time.sleep(max(0.0, args.sample_s - (time.monotonic() - now)))
        finally:
            if proc.poll() is None:
                final = {}
                try:
                    final = scrape(metrics_port)
                except OSError:
                    pass
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            else:
                final = {}
            time.sleep(1.0)  # the last reports in flight
            sub.stop()
        elapsed = time.monotonic() - t0
    finally:
        if plc is not None:
            plc.stop()
    log_lines = log_path.read_text().splitlines()
    # the daemon's own last counters: those of the last report, plus that report itself
    last = (sub.last_header or {}).get("counters") or {}
    published = (last.get("published", -1) + 1) if sub.last_header else 0
    grabbed_at_scrape = final.get("frames_grabbed")
    dropped_at_scrape = sum(final.get("dropped", {}).values()) if final else None
    accounting = {
        "received_by_subscriber": sub.received,
        "published_per_last_report": published,
        "lost_between_daemon_and_subscriber": published - sub.received if sub.runs == 1 else None,
        "frame_id_gaps": sub.missing,
        # gaps the daemon's own drops do not explain: frames lost without a count
        "frame_id_gaps_not_counted_dropped": (sub.missing - sum((last.get("dropped") or {}).values())
                                              if sub.runs == 1 and sub.last_header else None),
        "dropped_per_last_report": last.get("dropped"),
        "grabbed_at_last_scrape": grabbed_at_scrape,
        "published_at_last_scrape": final.get("frames_published"),
        "dropped_at_last_scrape": final.get("dropped"),
        # a frame in flight at the scrape is neither published nor dropped yet
        "unaccounted_at_last_scrape": (grabbed_at_scrape - final["frames_published"] - dropped_at_scrape
                                       if final.get("frames_published") is not None else None),
        "pipeline_runs_seen": sub.runs,
    }
    warm_s = max(60.0, 0.2 * elapsed)
    reload_times_rel = [round(t, 1) for t in reload_times]
    return {"minutes": round(elapsed / 60, 2), "exit": proc.returncode, "config": cfg,
            "reloads_sent_at_s": [round(t, 1) for t in reload_times],
            "reloads": final.get("reloads"), "summary": summarise(samples, warm_s, reload_times_rel),
            "accounting": accounting, "log_lines": len(log_lines),
            "log_by_level": log_levels(log_lines),
            # alarms raised and cleared are the daemon's work, not a problem
            "log_problems": [ln for ln in log_lines if (" WARNING " in ln or " ERROR " in ln
                                                        or ln.startswith("inspector: error:"))
                             and "inspector.alarms.rules" not in ln][:50],
            "samples": samples}


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run = result["run"]
    ss = run["samples"]
    t = [s["t_s"] / 60 for s in ss]
    fig, axes = plt.subplots(3, 1, figsize=(8, 8), sharex=True)
    ax = axes[0]
    ax.plot(t, [s["rss_mib"] for s in ss], color="tab:blue", label="resident memory")
    summ = run["summary"]
    if summ.get("rss_slope_mib_per_hour") is not None:
        ax.axvline(summ["warmup_s"] / 60, color="grey", ls=":", label="end of warm-up")
        ax.set_title(f"slope after warm-up: {summ['rss_slope_mib_per_hour']:+.2f} MiB/h")
    for r in run["reloads_sent_at_s"]:
        ax.axvline(r / 60, color="tab:orange", lw=0.8, alpha=0.6)
    ax.set_ylabel("MiB")
    ax.legend(loc="lower right")
    ax = axes[1]
    ax.plot(t, [s["fds"] for s in ss], label="open files")
    ax.plot(t, [s["threads"] for s in ss], label="threads")
    ax.set_ylabel("count")
    ax.legend(loc="lower right")
    ax = axes[2]
    ax.plot(t, [s.get("fps", float("nan")) for s in ss], label="fps (daemon)")
    ax2 = ax.twinx()
    ax2.plot(t, [sum(s.get("dropped", {}).values()) for s in ss], color="tab:red", label="dropped (total)")
    ax.set_ylabel("fps")
    ax2.set_ylabel("dropped frames")
    ax.set_xlabel("minutes")
    ax.legend(loc="upper left")
    ax2.legend(loc="upper right")
    acc = run["accounting"]
    fig.suptitle(f"inspector daemon soak, {run['minutes']:g} min: {acc['received_by_subscriber']} "
                 f"reports received, {machine_caption(result['machine'])}")
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=30.0)
    ap.add_argument("--fps", type=float, default=10.0, help="synthetic strip frame rate")
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--height", type=int, default=256)
    ap.add_argument("--bundle", default=str(ROOT / "deploy" / "models" / "demo-arcd"))
    ap.add_argument("--config", help="soak this camera config instead of the generated one")
    ap.add_argument("--reload-every-min", type=float, default=0.0, help="send SIGHUP this often (0: never)")
    ap.add_argument("--record-max-mb", type=float, default=20.0, help="recorder folder cap (generated config)")
    ap.add_argument("--no-plc", action="store_true", help="no Modbus driver (generated config)")
    ap.add_argument("--no-record", action="store_true", help="no recorder (generated config)")
    ap.add_argument("--sample-s", type=float, default=5.0)
    ap.add_argument("--out", required=True, help="folder for soak.json and soak.png")
    args = ap.parse_args(argv)
    if args.minutes <= 0 or args.sample_s <= 0 or args.reload_every_min < 0:
        refuse("--minutes and --sample-s must be > 0, --reload-every-min >= 0")
    if args.fps <= 0 or args.width < 32 or args.height < 32 or args.record_max_mb <= 0:
        refuse("--fps and --record-max-mb must be > 0, --width and --height at least 32")
    if not Path("/proc/self/status").exists():
        refuse("needs Linux /proc to read the daemon's memory")
    if args.config and not Path(args.config).is_file():
        refuse(f"--config {args.config}: no such file")
    if not args.config and not (Path(args.bundle) / "bundle.yaml").is_file():
        refuse(f"--bundle {args.bundle}: no bundle.yaml there")
    out = benchmark_out(args.out)
    load = os.getloadavg()
    written: list[Path] = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            run = soak(args, Path(tmp), written)
    finally:
        for p in written:
            p.unlink(missing_ok=True)
    if run["exit"] not in (0, None) and run["minutes"] * 60 < args.minutes * 60 - 2 * args.sample_s:
        # the daemon ended on its own (a config it refused, a crash): no soak to report
        refuse(f"the daemon exited {run['exit']} after {run['minutes'] * 60:.0f} s: "
               + " | ".join(run["log_problems"][-3:] or ["(no error line)"]))
    result = {"what": "inspector daemon soak: memory, files, threads and frame accounting (benchmarks/soak.py)",
              "command": script_command("soak.py", argv), "machine": machine_under_load(load), "run": run}
    s, a = run["summary"], run["accounting"]
    print(f"{run['minutes']:g} min, exit {run['exit']}: RSS {s.get('rss_mib_at_warmup')} -> "
          f"{s.get('rss_mib_at_end')} MiB ({s.get('rss_slope_mib_per_hour')} MiB/h), fds {s.get('fds_min_max')}, "
          f"threads {s.get('threads_min_max')}; received {a['received_by_subscriber']} of "
          f"{a['published_per_last_report']} published, dropped {a['dropped_per_last_report']}",
          file=sys.stderr)
    write_benchmark(out, "soak", result, plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
