"""What the pipeline's own CPU stages cost per frame, beside the engine (JSON + PNG).

Issue #8 sets the pipeline's overhead above the engine's own time at 1.5 ms a frame. That
overhead is CPU work whatever the engine: cutting the frame into the input batch
(``preprocess``), stitching the outputs back (``decode``), thresholds and connected components
(``postprocess``) and the mask's encoding (``encode``), the four stages ``inspector bench`` and
the stream's ``timings_ms`` report. This script times exactly those calls on fixed frames, with
the engine run once per frame beforehand, so the engine's own time and its noise stay out.

``--src`` names source trees to compare (say, an older commit checked out with ``git worktree
add``); each is measured in its own process, the trees taking turns for ``--rounds`` rounds, so a
busy machine slows them alike. Per stage the figure is the median over rounds of each round's
median over frames and repetitions.

    python benchmarks/cpu_stages.py --bundle deploy/models/arcd-neu --frames neu --out bench-out/cpu
    python benchmarks/cpu_stages.py --bundle deploy/models/arcd-neu --frames synthetic \\
        --src /tmp/old-tree --src . --out bench-out/cpu-before-after

``--frames neu`` builds 256x1600 frames from NEU-Seg images (every one holds a defect, 3-13 % of
a frame's pixels; needs ``../shared/data/neu_seg``); ``synthetic`` renders the synthetic strip
with defects in every frame, ``clean`` without any, as most frames of a real strip are
(``--width``/``--height``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("preprocess", "decode", "postprocess", "encode")
NEU = ROOT.parent / "shared" / "data" / "neu_seg" / "images" / "training"


def make_frames(kind: str, count: int, width: int, height: int):
    import numpy as np

    if kind == "neu":
        import cv2

        files = sorted(NEU.glob("*.jpg"))
        per_row = -(-width // 200)
        rows = -(-height // 200)
        need = count * per_row * rows
        if len(files) < need:
            raise SystemExit(f"error: --frames neu: {NEU} holds {len(files)} images, {need} needed")
        frames = []
        for k in range(count):
            imgs = [cv2.imread(str(f), cv2.IMREAD_GRAYSCALE) for f in files[k * per_row * rows:(k + 1) * per_row * rows]]
            grid = np.vstack([np.hstack(imgs[r * per_row:(r + 1) * per_row]) for r in range(rows)])
            frames.append(np.ascontiguousarray(grid[:height, :width, None]))
        return frames
    from inspector.sources.synthetic import StripRenderer

    rng = np.random.default_rng(0)
    renderer = StripRenderer(width, height, seed=3)
    return [renderer.render(rng, 1.0 if kind == "synthetic" else 0.0)[0] for _ in range(count)]


def worker(args) -> dict:
    """One tree's medians (ms) per stage; runs with that tree first on the import path."""
    import numpy as np

    import inspector
    from inspector.config import parse_config
    from inspector.pipeline import load_model
    from inspector.publish import encode_mask

    cfg = parse_config({"camera_id": "cpu-stages",
                        "source": {"type": "synthetic", "width": args.width, "height": args.height},
                        "model": {"bundle": str(Path(args.bundle).resolve()),
                                  "engine": {"type": "onnxruntime", "providers": ["cpu"]}}},
                       "cpu_stages.yaml")
    model = load_model(cfg)
    adapter, post = model.adapter, model.post
    frames = make_frames(args.frames, args.count, args.width, args.height)
    times: dict[str, list[float]] = {s: [] for s in STAGES}
    defects = []
    per_frame = []  # each frame's medians: a frame without a defect costs less than one with
    for frame in frames:
        mine: dict[str, list[float]] = {s: [] for s in STAGES}
        batch, g = adapter.fill_batch(frame)
        raw = adapter.run_engine(batch)
        raw = {k: [c.copy() for c in v] for k, v in raw.items()}  # the engine may reuse its buffers
        warm = adapter.decode(raw, g, frame)  # buffers of this shape allocated before timing
        if warm.release:
            warm.release()
        for _ in range(args.reps):
            t0 = time.perf_counter()
            adapter.fill_batch(frame)
            t1 = time.perf_counter()
            out = adapter.decode(raw, g, frame)
            t2 = time.perf_counter()
            label = post.mask(out.probs, out.residual, out.score_map)
            found, total = post.defects(label, out.score_map)
            t3 = time.perf_counter()
            encode_mask(label, args.encoding)
            t4 = time.perf_counter()
            if out.release:
                out.release()
            for stage, dt in zip(STAGES, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
                times[stage].append(dt * 1e3)
                mine[stage].append(dt * 1e3)
        defects.append(total)
        med_f = {st: round(float(np.median(v)), 3) for st, v in mine.items()}
        per_frame.append({**med_f, "total": round(sum(med_f.values()), 3), "defects": total})
    med = {s: float(np.median(v)) for s, v in times.items()}
    med["total"] = sum(med[s] for s in STAGES)
    return {"ms": med, "inspector": str(Path(inspector.__file__).resolve().parents[1]),
            "defects_per_frame": defects, "per_frame": per_frame, "tiles": int(g.count)}


def run_tree(src: Path, args) -> dict:
    cmd = [sys.executable, __file__, "--worker", "--bundle", args.bundle, "--frames", args.frames,
           "--count", str(args.count), "--reps", str(args.reps), "--width", str(args.width),
           "--height", str(args.height), "--encoding", args.encoding, "--out", "-"]
    env = {**os.environ, "PYTHONPATH": str(src)}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"error: --src {src}: the measurement failed:\n{done.stderr.strip()[-2000:]}")
    res = json.loads(done.stdout.strip().splitlines()[-1])
    if Path(res["inspector"]) != src.resolve():
        raise SystemExit(f"error: --src {src}: python imported inspector from {res['inspector']}")
    return res


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from inspector.bench import machine_caption, save_figure

    trees = list(result["trees"])
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(trees)
    names = [*STAGES, "total"]
    for i, tree in enumerate(trees):
        ms = result["trees"][tree]["ms"]
        xs = [j + i * width for j in range(len(names))]
        bars = ax.bar(xs, [ms[s] for s in names], width, label=tree)
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
    ax.axhline(1.5, color="tab:red", ls=":", label="#8 target, 1.5 ms")
    ax.set_xticks([j + width * (len(trees) - 1) / 2 for j in range(len(names))], names)
    ax.set_ylabel("ms per frame (median)")
    ax.legend(fontsize=8)
    fig.suptitle(f"CPU stages, {Path(result['bundle']).name}, {result['frames']} frames "
                 f"{result['height']}x{result['width']}, {machine_caption(result['machine'])}", fontsize=9)
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", default=str(ROOT / "deploy" / "models" / "arcd-neu"))
    ap.add_argument("--frames", choices=("neu", "synthetic", "clean"), default="synthetic")
    ap.add_argument("--count", type=int, default=4, help="frames")
    ap.add_argument("--reps", type=int, default=25, help="timings of each stage per frame and round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--width", type=int, default=1600)
    ap.add_argument("--height", type=int, default=256)
    ap.add_argument("--encoding", choices=("png", "raw"), default="png")
    ap.add_argument("--src", action="append", help="source tree to measure (repeat to compare; default: this one)")
    ap.add_argument("--out", required=True, help="folder for cpu-stages.json and .png")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return 0
    sys.path.insert(0, str(ROOT))
    from inspector.bench import benchmark_out, machine_under_load, refuse, script_command, write_benchmark

    if min(args.count, args.reps, args.rounds) < 1:
        refuse("--count, --reps and --rounds must be at least 1")
    if min(args.width, args.height) < 32:
        refuse("--width and --height must be at least 32")
    if not (Path(args.bundle) / "bundle.yaml").is_file():
        refuse(f"--bundle {args.bundle}: no bundle.yaml there")
    import yaml

    kind = (yaml.safe_load((Path(args.bundle) / "bundle.yaml").read_text()) or {}).get("kind")
    if kind == "fuzzymask":
        # its decoding runs the engine again (the dynamic inference), so no stage is CPU alone
        refuse(f"--bundle {args.bundle}: a fuzzymask bundle runs the engine inside its decoding; "
               "`inspector bench` reports its stages")
    if args.frames == "neu" and not NEU.is_dir():
        refuse(f"--frames neu: {NEU} not found (NEU-Seg is read from ../shared/data)")
    srcs = [Path(s) for s in (args.src or [str(ROOT)])]
    for s in srcs:
        if not (s / "inspector" / "__init__.py").is_file():
            refuse(f"--src {s}: no inspector package there")
    out = benchmark_out(args.out)
    load = os.getloadavg()
    labels = [str(s.resolve()) for s in srcs]
    rounds: dict[str, list[dict]] = {lab: [] for lab in labels}
    for r in range(args.rounds):
        for src, lab in zip(srcs, labels):
            rounds[lab].append(run_tree(src, args))
            print(f"round {r + 1}/{args.rounds} {lab}: "
                  f"{ {k: round(v, 3) for k, v in rounds[lab][-1]['ms'].items()} }", file=sys.stderr)
    import numpy as np

    trees = {}
    for lab in labels:
        ms = {s: round(float(np.median([x["ms"][s] for x in rounds[lab]])), 3) for s in (*STAGES, "total")}
        frames_ms = [{k: round(float(np.median([x["per_frame"][i][k] for x in rounds[lab]])), 3)
                      for k in (*STAGES, "total")}
                     | {"defects": rounds[lab][0]["per_frame"][i]["defects"]}
                     for i in range(args.count)]
        trees[lab] = {"ms": ms, "per_frame_ms": frames_ms, "rounds": [x["ms"] for x in rounds[lab]],
                      "tiles": rounds[lab][0]["tiles"], "defects_per_frame": rounds[lab][0]["defects_per_frame"]}
    result = {"what": "pipeline CPU stages per frame, engine excluded (benchmarks/cpu_stages.py)",
              "command": script_command("cpu_stages.py", argv), "machine": machine_under_load(load),
              "bundle": str(Path(args.bundle).resolve().relative_to(ROOT) if Path(args.bundle).resolve().is_relative_to(ROOT) else args.bundle),
              "frames": args.frames, "width": args.width, "height": args.height, "count": args.count,
              "reps": args.reps, "rounds": args.rounds, "encoding": args.encoding, "trees": trees}
    write_benchmark(out, "cpu-stages", result, plot)
    for lab in labels:
        print(f"{lab}: {trees[lab]['ms']}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
