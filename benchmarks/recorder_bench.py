"""How fast the frame recorder writes, and what it costs the publish stage (JSON + PNG).

Feeds synthetic-strip frames (the demo's 256x1600, or any size) with a defect mask into a
:class:`inspector.recorder.Recorder` and measures, per PNG compression level:

* ``offer_us``: what the publish stage pays per frame (the decision and the queue put);
* ``writer_ms_per_frame`` / ``writer_fps``: the writer thread draining a queue holding every
  frame (image, mask and header; files renamed into place), i.e. the defect-frame rate it
  sustains on this disk;
* ``kib_per_record``: disk use per record.

``--fsync`` measures every level a second time with ``record.fsync: true`` (each file and its
folder flushed to the disk), so the JSON and the plot show what surviving a power cut costs
on the disk ``--dir`` points at.

    python benchmarks/recorder_bench.py --frames 60 --levels 0 1 3 6 --out bench-out/recorder
    python benchmarks/recorder_bench.py --levels 1 --fsync --dir /var/lib/inspector --out bench-out/recorder
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from inspector.bench import (benchmark_out, machine_caption, machine_under_load, save_figure, script_command,
                             write_benchmark)
from inspector.frame import Frame
from inspector.recorder import Recorder, RecordConfig
from inspector.sources.synthetic import SyntheticConfig, SyntheticSource

CLASSES = ["background", "inclusion", "patches", "scratches"]


def measure(frames: list[Frame], level: int, folder: Path, fsync: bool = False) -> dict:
    rec = Recorder(RecordConfig(enabled=True, dir=str(folder), queue_size=len(frames) + 1,
                                png_compression=level, min_free_gb=0, fsync=fsync), "bench", CLASSES)
    label = np.zeros(frames[0].image.shape[:2], np.uint8)
    label[100:120, 300:400] = 2
    offer = []
    for f in frames:
        header = {"frame_id": f.frame_id, "defects": [{"class_id": 2, "class": "patches"}]}
        t0 = time.perf_counter()
        rec.offer(f, label, header)
        offer.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    rec.start()
    rec.close(timeout_s=600)
    wall = time.perf_counter() - t0
    s = rec.snapshot()
    n = s["recorded"]["defects"]
    if n != len(frames):
        raise RuntimeError(f"level {level}: {n} of {len(frames)} frames recorded, skipped {s['skipped']}")
    return {"png_compression": level, "fsync": fsync, "frames": n,
            "offer_us": {"p50": float(np.median(offer) * 1e6), "p99": float(np.percentile(offer, 99) * 1e6)},
            "writer_ms_per_frame": wall / n * 1e3, "writer_fps": n / wall,
            "kib_per_record": s["bytes"] / n / 1024}


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["levels"]
    levels = [f"{r['png_compression']}{' fsync' if r.get('fsync') else ''}" for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.5))
    a.bar(levels, [r["writer_fps"] for r in rows],
          color=["tab:red" if r.get("fsync") else "tab:blue" for r in rows])
    a.set_xlabel("png_compression (fsync: record.fsync on)")
    a.set_ylabel("defect frames / s the writer sustains")
    b.bar(levels, [r["kib_per_record"] for r in rows], color="tab:orange")
    b.set_xlabel("png_compression")
    b.set_ylabel("KiB per record")
    h, w = result["frame_shape"][:2]
    fig.suptitle(f"recorder, {h}x{w} synthetic strip, {machine_caption(result['machine'])}")
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--frames", type=int, default=60)
    ap.add_argument("--width", type=int, default=1600)
    ap.add_argument("--height", type=int, default=256)
    ap.add_argument("--levels", type=int, nargs="+", default=[0, 1, 3, 6])
    ap.add_argument("--dir", help="where to write the records (default: a temporary folder; "
                                  "point it at the line PC's recordings disk)")
    ap.add_argument("--fsync", action="store_true",
                    help="also measure each level with record.fsync: true")
    ap.add_argument("--out", required=True, help="folder for recorder-bench.json and .png")
    args = ap.parse_args(argv)
    out = benchmark_out(args.out)
    src = SyntheticSource(SyntheticConfig(width=args.width, height=args.height, fps=0, seed=0,
                                          defect_rate=0.5), "bench")
    src.open()
    frames = [src.read() for _ in range(args.frames)]
    src.close()
    load = os.getloadavg()
    rows = []
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        for level, fsync in [(lv, fs) for lv in args.levels for fs in ((False, True) if args.fsync else (False,))]:
            rows.append(measure(frames, level, Path(tmp) / f"level{level}{'-fsync' if fsync else ''}", fsync))
            r = rows[-1]
            print(f"png_compression {level}{' fsync' if fsync else ''}: offer p50 {r['offer_us']['p50']:.1f} us, writer "
                  f"{r['writer_fps']:.1f} frames/s ({r['writer_ms_per_frame']:.1f} ms), "
                  f"{r['kib_per_record']:.0f} KiB/record", file=sys.stderr)
    result = {"what": "frame recorder write rate per PNG level (benchmarks/recorder_bench.py)",
              "command": script_command("recorder_bench.py", argv),
              "frame_shape": list(frames[0].image.shape),
              "machine": machine_under_load(load),
              "levels": rows}
    write_benchmark(out, "recorder-bench", result, plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
