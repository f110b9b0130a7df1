"""Latency and throughput benchmark of one camera config: JSON plus a PNG plot.

Two phases on the configured model and source:

1. throughput — the source runs free (recorded or synthetic sources) and the grab stage waits
   for the engine instead of dropping, so frames/s is the pipeline's sustained rate;
2. latency — the source is paced below that rate (default 70 %), so queues stay short and the
   per-stage and end-to-end figures are what a frame costs, not how long it waited.

Stage keys (ms): ``queue`` (wait for the engine), ``preprocess`` (tiling, normalisation),
``engine`` (the inference call), ``decode`` (stitching), ``postprocess`` (threshold,
morphology, components), ``encode`` (mask PNG), ``pipeline`` (grab to publish on this host),
``e2e`` (capture timestamp to publish).

Model kinds that run the engine several times per frame (``fuzzymask``: dynamic inference)
also get ``dynamic_inference`` in the JSON: engine calls (batched rounds) per frame, converged
tiles, and the cost relative to one plain reconstruction pass ``Model(x)`` over the frame's tiles
on the same engine, timed in the same run right after the latency phase
(``ratio_p50``: the median over frames of a frame's engine time over one plain pass of its
shape; the issue's target is at most 4).
"""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from pathlib import Path
from typing import NoReturn

import numpy as np

from inspector import __version__
from inspector.config import InspectorConfig
from inspector.pipeline import Pipeline, load_model

log = logging.getLogger(__name__)

STAGES = ("queue", "preprocess", "engine", "decode", "postprocess", "encode", "pipeline", "e2e")


def _variant(cfg: InspectorConfig, fps: float | None, free_run: bool) -> InspectorConfig:
    src = cfg.source
    if src.type == "genicam":
        # a camera cannot run free: it frames at AcquisitionFrameRate, which --fps sets (it was
        # ignored, and the camera's own rate went into the JSON under the pace asked for)
        if fps is not None:
            src = src.model_copy(update={"fps": fps})
    elif getattr(src, "fps", None) is not None:
        src = src.model_copy(update={"fps": 0.0 if free_run else (fps or src.fps), "frames": None})
    pipe = cfg.pipeline.model_copy(update={"backpressure": free_run and src.type != "genicam"})
    # a private port, so the benchmark never collides with a daemon already running
    pub = cfg.publish.model_copy(update={"endpoint": "tcp://127.0.0.1:*", "connect_grace_s": 0.0,
                                         "wait_for_subscribers": 0})
    new = cfg.model_copy(update={"source": src, "pipeline": pipe, "publish": pub})
    new.base_dir, new.source_file = cfg.base_dir, cfg.source_file
    return new


def _phase(cfg: InspectorConfig, frames: int, model) -> tuple[list[dict], float, dict]:
    headers: list[dict] = []
    with Pipeline(cfg, on_report=headers.append, model=model) as p:
        t0 = time.perf_counter()
        counters = p.run(frames=frames)
        wall = time.perf_counter() - t0
    return headers, wall, counters


def _percentiles(values: list[float]) -> dict:
    a = np.asarray(values, np.float64)
    return {"p50": round(float(np.percentile(a, 50)), 3), "p90": round(float(np.percentile(a, 90)), 3),
            "p99": round(float(np.percentile(a, 99)), 3), "mean": round(float(a.mean()), 3),
            "n": int(a.size)}


def _machine() -> dict:
    import onnxruntime

    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "onnxruntime": onnxruntime.__version__, "platform": platform.platform()}


def machine_caption(machine: dict) -> str:
    """``N CPUs, load X`` of a recorded machine (:func:`machine_under_load`; older records
    name the core count ``cpus``), for a benchmark plot's title."""
    cores = machine.get("cores", machine.get("cpus"))
    return f"{cores} CPUs, load {machine['load_before'][0]:.1f}"


def save_figure(fig, path: Path) -> None:
    """Lay out, write (PNG, 100 dpi) and close a benchmark's matplotlib figure."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_benchmark(out: Path, stem: str, result: dict, plot) -> None:
    """A benchmark script's output: ``<stem>.json`` and the plot ``<stem>.png`` drawn by
    ``plot(result, path)``."""
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2))
    plot(result, out / f"{stem}.png")


def refuse(message: str) -> NoReturn:
    """A benchmark script's bad input: one line on stderr, exit 2 (as the inspector commands)."""
    import sys

    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def benchmark_out(path: str | Path) -> Path:
    """A benchmark script's ``--out`` folder, made before any measuring: one it cannot make (a
    path below a file, a read-only place) is refused naming ``--out``, not a traceback after
    the work."""
    out = Path(path)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        refuse(f"--out {path}: cannot make this folder ({e.strerror or e})")
    if not os.access(out, os.W_OK | os.X_OK):
        refuse(f"--out {path}: this folder is not writable")
    return out


def script_command(script: str, argv: list[str] | None) -> str:
    """The command line a benchmark script was run with, as its JSON records it."""
    import sys

    return f"python benchmarks/{script} " + " ".join(argv if argv is not None else sys.argv[1:])


def machine_under_load(load_before: tuple[float, ...]) -> dict:
    """What a benchmark's JSON records of the machine: :func:`_machine` plus the load average
    before the measurement (``load_before``, from ``os.getloadavg()``) and now, after it."""
    return {**_machine(), "load_before": [round(x, 2) for x in load_before],
            "load_after": [round(x, 2) for x in os.getloadavg()]}


def run_bench(cfg: InspectorConfig, frames: int = 200, out_dir: Path = Path("bench-out"),
              fps: float | None = None, throughput_frames: int = 100) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    model = load_model(cfg)
    try:
        return _bench(cfg, model, frames, out_dir, fps, throughput_frames)
    finally:
        # the phases borrow the model (a Pipeline given one leaves it open): release the engine
        # here, also when a phase fails (a camera refusing --fps)
        model.adapter.engine.close()


def _bench(cfg: InspectorConfig, model, frames: int, out_dir: Path, fps: float | None,
           throughput_frames: int) -> dict:
    result: dict = {"inspector": __version__, "config": cfg.source_file, "camera_id": cfg.camera_id,
                    "model": model.bundle.spec.name, "kind": model.bundle.spec.kind,
                    "backend": model.backend, "machine": _machine(),
                    "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    throughput = None
    if cfg.source.type != "genicam" and throughput_frames > 0:
        hdrs, wall, counters = _phase(_variant(cfg, None, free_run=True), throughput_frames, model)
        throughput = counters["published"] / wall if wall > 0 else 0.0
        result["throughput"] = {"frames": throughput_frames, "wall_s": round(wall, 3),
                                "fps": round(throughput, 2), "counters": counters}
        log.info("throughput %.1f frames/s", throughput)
    pace = fps
    if pace is None and throughput:
        pace = 0.7 * throughput
        cfg_fps = getattr(cfg.source, "fps", 0) or 0
        if cfg_fps:
            pace = min(pace, cfg_fps)
    paced = _variant(cfg, pace, free_run=False)
    if pace is None and paced.source.type == "genicam":
        pace = paced.source.fps  # the configured AcquisitionFrameRate (None: the camera's own)
    hdrs, wall, counters = _phase(paced, frames, model)
    stages = {k: _percentiles([h["timings_ms"][k] for h in hdrs if k in h["timings_ms"]])
              for k in STAGES if any(k in h["timings_ms"] for h in hdrs)}
    frame_shape = hdrs[0]["shape"] if hdrs else None
    # what ran, beside what was asked: a replay folder without loop ends early, a camera frames
    # at its own rate where none is configured
    result["latency"] = {"frames": len(hdrs), "frames_requested": frames,
                         "paced_fps": round(pace, 2) if pace else None,
                         "grabbed_fps": round(counters["grabbed"] / wall, 2) if wall > 0 else None,
                         "frame_shape": frame_shape, "wall_s": round(wall, 3),
                         "counters": counters, "stages_ms": stages}
    summary = {"model": result["model"], "backend": result["backend"], "frame_shape": frame_shape,
               "throughput_fps": result.get("throughput", {}).get("fps"),
               "paced_fps": result["latency"]["paced_fps"]}
    for k in ("engine", "pipeline", "e2e"):
        if k in stages:
            summary[f"{k}_p50_ms"] = stages[k]["p50"]
            summary[f"{k}_p99_ms"] = stages[k]["p99"]
    if "engine" in stages and "e2e" in stages:
        summary["e2e_minus_engine_p50_ms"] = round(stages["e2e"]["p50"] - stages["engine"]["p50"], 3)
    dyn = _dynamic_inference(model, hdrs, stages, frame_shape, plain_repeats=max(5, min(30, frames)))
    if dyn is not None:
        result["dynamic_inference"] = dyn
        summary["engine_calls_per_frame"] = dyn["engine_calls_per_frame"]["mean"]
        summary["dynamic_vs_plain_engine_ratio_p50"] = dyn["ratio_p50"]
    result["summary"] = summary
    (out_dir / "bench.json").write_text(json.dumps(result, indent=2))
    _plot(result, hdrs, out_dir / "bench.png")
    log.info("wrote %s and %s", out_dir / "bench.json", out_dir / "bench.png")
    return result


def _dynamic_inference(model, headers: list[dict], stages: dict, frame_shape,
                       plain_repeats: int = 20) -> dict | None:
    """Engine calls per frame and the cost of dynamic inference against one plain pass (module
    doc); None for kinds that run the engine once per frame.

    The plain pass is timed once per distinct frame shape of the run (replayed image folders may
    hold many), and each frame's ratio is its own engine time over the plain pass of its shape.
    """
    rows = [(h["model_stats"], h["timings_ms"].get("engine"), tuple(h["shape"]))
            for h in headers if "engine_calls" in h.get("model_stats", {})]
    plain_fn = getattr(model.adapter, "plain_engine_ms", None)
    if not rows or plain_fn is None or frame_shape is None or "engine" not in stages:
        return None
    channels = tuple(frame_shape[2:])
    shapes = sorted({shape for _, _, shape in rows})
    # spread the repeats over the shapes, at least 3 each, so a folder of many sizes stays quick
    reps = max(3, plain_repeats // len(shapes))
    plain_by_shape: dict[tuple, float] = {}
    all_plain: list[float] = []
    for shape in shapes:
        # a CNN's run time does not depend on the pixel values: a mid-grey frame of the shape
        frame = np.full(shape[:2] + channels, 128, np.uint8)
        plain_fn(frame)  # warm: buffers of this shape, engine hot
        times = [plain_fn(frame) for _ in range(reps)]
        plain_by_shape[shape] = float(np.median(times))
        all_plain += times
    stats = [r for r, _, _ in rows]
    calls = np.array([r["engine_calls"] for r in stats], np.float64)
    tiles = sum(r["tiles"] for r in stats)
    ratios = np.array([e / plain_by_shape[shape] for _, e, shape in rows
                       if e is not None and plain_by_shape[shape] > 0], np.float64)

    def share(key: str) -> float | None:
        return round(sum(r.get(key, 0) for r in stats) / tiles, 4) if tiles else None
    p = _percentiles(all_plain)
    dyn = stages["engine"]
    return {
        "frames": len(rows),
        "frame_shapes": len(shapes),
        "engine_calls_per_frame": {"mean": round(float(calls.mean()), 3), "p50": float(np.median(calls)),
                                   "max": int(calls.max())},
        "engine_runs_per_frame": round(float(np.mean([r["engine_runs"] for r in stats])), 3),
        "tile_passes_per_tile": round(sum(r["tile_passes"] for r in stats) / tiles, 3) if tiles else None,
        "converged_tile_fraction": share("converged_tiles"),
        "repaired_tile_fraction": share("repaired_tiles"),
        "tiles_per_frame": round(tiles / len(rows), 2),
        "plain_pass_engine_ms": p,
        "dynamic_engine_ms": {k: dyn[k] for k in ("p50", "p99", "mean")},
        # per frame: its engine time over one plain pass of its own shape
        "ratio_p50": round(float(np.median(ratios)), 3) if len(ratios) else None,
        "ratio_p99": round(float(np.percentile(ratios, 99)), 3) if len(ratios) else None,
        "ratio_mean": round(float(ratios.mean()), 3) if len(ratios) else None,
        "target_ratio": 4.0,
    }


def _plot(result: dict, headers: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = result["latency"]["stages_ms"]
    parts = [k for k in ("queue", "preprocess", "engine", "decode", "postprocess", "encode") if k in stages]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.5))
    x = np.arange(len(parts))
    a1.bar(x - 0.2, [stages[k]["p50"] for k in parts], 0.4, label="p50")
    a1.bar(x + 0.2, [stages[k]["p99"] for k in parts], 0.4, label="p99")
    a1.set_xticks(x, parts, rotation=20)
    a1.set_ylabel("ms")
    a1.set_title("where a frame's time goes (per stage)")
    dyn = result.get("dynamic_inference")
    if dyn and "engine" in parts:
        # one plain reconstruction pass over the frame's tiles, against the engine bar
        i = parts.index("engine")
        pl = dyn["plain_pass_engine_ms"]["p50"]
        a1.hlines(pl, i - 0.45, i + 0.45, colors="k", linestyles="--",
                  label=f"1 plain pass {pl:.1f} ms")
        a1.set_title(f"per stage | dynamic inference: {dyn['engine_calls_per_frame']['mean']:.2f} engine "
                     f"calls/frame, engine = {dyn['ratio_p50']}x plain (target <= 4)", fontsize=9)
    a1.legend()
    e2e = [h["timings_ms"]["e2e"] for h in headers if "e2e" in h["timings_ms"]]
    if e2e:
        a2.hist(e2e, bins=40, color="tab:green")
        a2.axvline(stages["e2e"]["p50"], color="k", ls="--", label=f"p50 {stages['e2e']['p50']:.1f} ms")
        a2.axvline(stages["e2e"]["p99"], color="r", ls="--", label=f"p99 {stages['e2e']['p99']:.1f} ms")
        a2.legend()
    a2.set_xlabel("capture to publish, ms")
    a2.set_title("end-to-end latency")
    tp = result.get("throughput", {}).get("fps")
    fig.suptitle(f"{result['model']} on {result['backend']} | frame {result['latency']['frame_shape']} | "
                 f"throughput {tp} fps | {result['machine']['cores']} cores", fontsize=10)
    save_figure(fig, path)
