"""What a busy recorder costs inspection, and what ``record.writer_nice`` gives back (JSON + PNG).

The model (ONNX Runtime, the config's bundle and threads) infers one synthetic-strip frame after
another while the recorder's writer is kept busy encoding PNGs (a feeder offers a frame whenever
its queue has room: the worst case, a defect on every frame at the line's full rate). Measured
per mode — ``none`` (no recorder), and the writer at each ``--nice`` value — in interleaved
blocks, so a change in the machine's load spreads over every mode alike:

* ``infer_ms``: p50 / p90 / p99 of one frame's inference;
* ``writer_fps``: records the writer finished per second meanwhile.

    python benchmarks/recorder_contention_bench.py --config configs/demo.yaml --out bench-out/contention
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from inspector.bench import (benchmark_out, machine_caption, machine_under_load, save_figure, script_command,
                             write_benchmark)
from inspector.config import load_config
from inspector.pipeline import load_model
from inspector.recorder import Recorder, RecordConfig
from inspector.sources.synthetic import SyntheticConfig, SyntheticSource


class BusyRecorder:
    """A recorder whose queue a feeder thread keeps full of defect frames."""

    def __init__(self, folder: Path, nice: int, level: int, frames: list, classes: list[str]):
        self.rec = Recorder(RecordConfig(enabled=True, dir=str(folder), png_compression=level,
                                         min_free_gb=0, max_gb=1.0, queue_size=4, writer_nice=nice),
                            "bench", classes)
        self.frames = frames
        self.label = np.zeros(frames[0].image.shape[:2], np.uint8)
        self.label[100:120, 300:400] = 1
        self.stop = threading.Event()
        self.feeder = threading.Thread(target=self._feed, daemon=True)
        self.next_id = 0

    def _feed(self) -> None:
        while not self.stop.is_set():
            if self.rec.snapshot()["waiting"] >= 3:
                time.sleep(0.002)
                continue
            f = self.frames[self.next_id % len(self.frames)]
            f = type(f)(f.camera_id, self.next_id, time.time_ns(), f.image)
            self.rec.offer(f, self.label, {"frame_id": self.next_id,
                                           "defects": [{"class_id": 1, "class": "x"}]})
            self.next_id += 1

    def recorded(self) -> int:
        return sum(self.rec.snapshot()["recorded"].values())

    def __enter__(self) -> "BusyRecorder":
        self.rec.start()
        self.feeder.start()
        time.sleep(0.3)  # the writer is busy before the first timed inference
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.feeder.join()
        self.rec.close(timeout_s=60)


def block(model, frames: list, n: int) -> list[float]:
    times = []
    for i in range(n):
        img = frames[i % len(frames)].image
        t0 = time.perf_counter()
        out = model.adapter.infer(img)
        times.append((time.perf_counter() - t0) * 1e3)
        if out.release:
            out.release()
    return times


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["modes"]
    names = [r["mode"] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.5))
    x = np.arange(len(rows))
    for off, q, c in ((-0.25, "p50", "tab:blue"), (0, "p90", "tab:orange"), (0.25, "p99", "tab:red")):
        a.bar(x + off, [r["infer_ms"][q] for r in rows], 0.25, label=q, color=c)
    a.set_xticks(x, names)
    a.set_ylabel("inference ms per frame")
    a.legend()
    b.bar(names, [r["writer_fps"] or 0 for r in rows], color="tab:green")
    b.set_ylabel("records written / s meanwhile")
    fig.suptitle(f"inference beside a busy recorder (png {result['png_compression']}), "
                 f"{machine_caption(result['machine'])}")
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/demo.yaml", help="camera config (its bundle and engine)")
    ap.add_argument("--nice", type=int, nargs="+", default=[0, 10], help="writer_nice values to compare")
    ap.add_argument("--level", type=int, default=1, help="png_compression")
    ap.add_argument("--blocks", type=int, default=6, help="interleaved blocks per mode")
    ap.add_argument("--per-block", type=int, default=10, help="inferences per block")
    ap.add_argument("--dir", help="where the records go (default: a temporary folder)")
    ap.add_argument("--out", required=True, help="folder for recorder-contention-bench.json and .png")
    args = ap.parse_args(argv)
    out = benchmark_out(args.out)
    cfg = load_config(args.config)
    model = load_model(cfg)
    classes = model.bundle.spec.classes
    src = SyntheticSource(SyntheticConfig(width=1600, height=256, fps=0, seed=0, defect_rate=0.5), "bench")
    src.open()
    frames = [src.read() for _ in range(8)]
    src.close()
    block(model, frames, 3)  # warm-up
    modes = ["none"] + [f"nice {n}" for n in args.nice]
    times: dict[str, list[float]] = {m: [] for m in modes}
    written: dict[str, list[tuple[int, float]]] = {m: [] for m in modes}
    load = os.getloadavg()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        for b in range(args.blocks):
            for m in modes:
                if m == "none":
                    times[m] += block(model, frames, args.per_block)
                    continue
                nice = int(m.split()[1])
                with BusyRecorder(Path(tmp) / f"{b}-{nice}", nice, args.level, frames, classes) as busy:
                    n0, t0 = busy.recorded(), time.perf_counter()
                    times[m] += block(model, frames, args.per_block)
                    written[m].append((busy.recorded() - n0, time.perf_counter() - t0))
            print(f"block {b + 1}/{args.blocks}: " + ", ".join(
                f"{m} p50 {np.median(times[m]):.1f} ms" for m in modes), file=sys.stderr)
    rows = []
    for m in modes:
        t = np.array(times[m])
        n, s = sum(w[0] for w in written[m]), sum(w[1] for w in written[m])
        rows.append({"mode": m, "inferences": len(t),
                     "infer_ms": {q: round(float(np.percentile(t, p)), 2)
                                  for q, p in (("p50", 50), ("p90", 90), ("p99", 99))},
                     "writer_fps": round(n / s, 2) if s else None})
    result = {"what": "inference time beside a recorder kept busy, per record.writer_nice "
                      "(benchmarks/recorder_contention_bench.py)",
              "command": script_command("recorder_contention_bench.py", argv),
              "bundle": str(model.bundle.path), "engine": model.backend,
              "frame_shape": list(frames[0].image.shape), "png_compression": args.level,
              "machine": machine_under_load(load), "modes": rows}
    write_benchmark(out, "recorder-contention-bench", result, plot)
    for r in rows:
        print(f"{r['mode']}: infer p50 {r['infer_ms']['p50']} p99 {r['infer_ms']['p99']} ms, "
              f"writer {r['writer_fps']} records/s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
