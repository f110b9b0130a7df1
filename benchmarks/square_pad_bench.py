"""What the thesis's squaring (``input.fit: square_pad``) costs and saves against tiling (JSON + PNG).

Runs one ARCD bundle's graph both ways on grey frames of the given shapes (default: the
thesis's 1440x2560 camera frame and the demo line's 256x1600) with ONNX Runtime on the CPU:

* ``tile``: the bundle as shipped, native resolution, overlapping tiles (what the line runs);
* ``square_pad``: the same graph with ``input.fit: square_pad`` (a copy of ``bundle.yaml`` in a
  temporary folder, the graph linked): the frame padded to a square, resized to one tile, run
  once, the outputs resized back.

Per mode and shape it times ``adapter.infer`` (preparation, engine, decode: the infer stage's
work per frame) over ``--iters`` frames after warm-up and records the engine's batch (tiles
per frame). Squaring runs one input whatever the frame, so it is faster on large frames; what
it gives up is resolution (a 1440x2560 frame at 224x224 is 1/11 scale: a 3-pixel scratch
vanishes), which is why the line default stays tiling. Speed is measured here, never asserted.

    python benchmarks/square_pad_bench.py --bundle deploy/models/arcd-neu --out bench-out/square-pad
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from inspector.bench import (benchmark_out, machine_caption, machine_under_load, refuse, save_figure,
                             script_command, write_benchmark)  # noqa: E402
from inspector.bundle import BUNDLE_FILE, load_bundle  # noqa: E402
from inspector.errors import BundleError  # noqa: E402
from inspector.engines.onnxruntime import OnnxRuntimeConfig, OnnxRuntimeEngine  # noqa: E402
from inspector.models import make_adapter  # noqa: E402


def square_copy(bundle_dir: Path, dest: Path, align: str) -> Path:
    """``bundle_dir`` with ``input.fit: square_pad`` (same graph, same sha256)."""
    dest.mkdir(parents=True)
    spec = yaml.safe_load((bundle_dir / BUNDLE_FILE).read_text())
    for g in spec["graphs"].values():
        os.symlink((bundle_dir / g["file"]).resolve(), dest / g["file"])
    spec["input"]["fit"], spec["input"]["pad_align"] = "square_pad", align
    (dest / BUNDLE_FILE).write_text(yaml.safe_dump(spec, sort_keys=False))
    return dest


def time_infer(bundle_dir: Path, shape: tuple[int, int], iters: int, threads: int) -> dict:
    bundle = load_bundle(bundle_dir)
    engine = OnnxRuntimeEngine(bundle.graph_path("model"),
                               OnnxRuntimeConfig(providers=["cpu"], intra_op_threads=threads))
    try:
        adapter = make_adapter(bundle, engine)
        rng = np.random.default_rng(0)
        frame = rng.integers(90, 160, shape, dtype=np.uint8)
        tiles = adapter.grid(*shape)
        ms = []
        for i in range(iters + 2):
            t = time.perf_counter()
            out = adapter.infer(frame)
            dt = (time.perf_counter() - t) * 1e3
            if out.release:
                out.release()
            if i >= 2:  # warm-up: first runs allocate buffers and let ORT pick kernels
                ms.append(dt)
        return {"shape": list(shape), "iters": iters, "batch_per_frame": int(tiles.count),
                "p50_ms": float(np.median(ms)), "p90_ms": float(np.percentile(ms, 90)),
                "min_ms": float(np.min(ms))}
    finally:
        engine.close()


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["runs"]
    shapes = sorted({tuple(r["shape"]) for r in rows}, key=lambda s: s[0] * s[1])
    fig, ax = plt.subplots(figsize=(7, 3.5))
    width = 0.38
    for k, mode in enumerate(("tile", "square_pad")):
        vals = [next(r["p50_ms"] for r in rows if r["mode"] == mode and tuple(r["shape"]) == s)
                for s in shapes]
        xs = [i + (k - 0.5) * width for i in range(len(shapes))]
        ax.bar(xs, vals, width, label=mode)
    ax.set_xticks(range(len(shapes)), [f"{h}x{w}" for h, w in shapes])
    ax.set_ylabel("adapter.infer p50 (ms)")
    ax.legend()
    ax.set_title(f"{result['bundle']}, ORT CPU, {result['threads']} threads, "
                 f"{machine_caption(result['machine'])}")
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", default=str(ROOT / "deploy" / "models" / "arcd-neu"))
    ap.add_argument("--shapes", nargs="+", default=["1440x2560", "256x1600"])
    ap.add_argument("--align", choices=["top", "center"], default="top")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    bundle = Path(args.bundle)
    try:
        kind = load_bundle(bundle).spec.kind
    except (BundleError, OSError) as e:
        refuse(f"--bundle {bundle}: {e}")
    if kind != "arcd":
        refuse(f"--bundle {bundle}: a bundle of kind {kind}; square_pad applies to arcd bundles only")
    out = benchmark_out(args.out)
    load = os.getloadavg()
    runs = []
    tmp = Path(tempfile.mkdtemp(prefix="square-pad-bench-"))
    try:
        square = square_copy(bundle, tmp / "square", args.align)
        for s in args.shapes:
            h, w = (int(v) for v in s.lower().split("x"))
            for mode, path in (("tile", bundle), ("square_pad", square)):
                r = {"mode": mode, **time_infer(path, (h, w), args.iters, args.threads)}
                runs.append(r)
                print(f"{s} {mode}: p50 {r['p50_ms']:.1f} ms ({r['batch_per_frame']} input(s) "
                      f"per frame)", file=sys.stderr)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    result = {"what": "ARCD graph per frame: tiling against the thesis's squaring (benchmarks/square_pad_bench.py)",
              "command": script_command("square_pad_bench.py", argv),
              "bundle": bundle.name, "align": args.align, "threads": args.threads,
              "machine": machine_under_load(load),
              "runs": runs}
    write_benchmark(out, "square-pad-bench", result, plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
