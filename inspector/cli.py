"""The ``inspector`` console command.

Subcommands import what they need when they run, so ``inspector run`` on a line PC never imports
torch, and ``inspector train`` only fails (with a clear message) where torch is missing.

Exit codes: 0 done; 1 runtime failure (camera, engine); 2 bad input (config, bundle, arguments).
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import time
from pathlib import Path

from inspector import __version__
from inspector.errors import BundleError, ConfigError, EngineError, InspectorError, SourceError

log = logging.getLogger("inspector")

EXIT_OK, EXIT_FAIL, EXIT_BAD_INPUT = 0, 1, 2


def _setup_logging(level: str = "INFO") -> None:
    logging.basicConfig(level=getattr(logging, level), stream=sys.stderr,
                        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s")


def _fail(msg: str, code: int) -> int:
    print(f"inspector: error: {msg}", file=sys.stderr)
    return code


def _load(path: str):
    from inspector.config import load_config
    return load_config(path)


def status_line(p) -> str:
    s = p.stats.summary()
    c = p.counters.snapshot()
    drops = sum(c["dropped"].values())
    why = ", ".join(f"{k} {v}" for k, v in c["dropped"].items() if v)
    lat = (f"p50 {s['p50_ms']:.1f} ms p99 {s['p99_ms']:.1f} ms" if s["p50_ms"] is not None
           else "p50 - p99 -")
    dpf = f"{s['defects_per_frame']:.2f}" if s["defects_per_frame"] is not None else "-"
    return (f"[{p.cfg.camera_id}] {s['fps']:5.1f} fps | latency {lat} | defects/frame {dpf} | "
            f"grabbed {c['grabbed']} published {c['published']} dropped {drops}"
            + (f" ({why})" if why else "") + f" | camera {p.camera_state}")


def cmd_run(args: argparse.Namespace) -> int:
    from inspector.pipeline import Pipeline

    cfg = _load(args.config)
    if args.log_level:
        logging.getLogger().setLevel(args.log_level)
    tty = sys.stderr.isatty()

    def tick(p) -> None:
        if args.quiet:
            return
        line = status_line(p)
        sys.stderr.write(("\r" + line + "\x1b[K") if tty else line + "\n")
        sys.stderr.flush()

    pipe = Pipeline(cfg)
    stop = lambda *_: pipe.stop()  # noqa: E731 - Ctrl-C and SIGTERM drain, then exit 0
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    try:
        pipe.open()
        counters = pipe.run(frames=args.frames, seconds=args.seconds, tick=tick,
                            tick_s=cfg.status.interval_s)
    finally:
        pipe.close()
    if tty and not args.quiet:
        sys.stderr.write("\n")
    log.info("stopped: %s", json.dumps(counters))
    return EXIT_OK


def cmd_check(args: argparse.Namespace) -> int:
    from inspector.pipeline import load_model
    from inspector.sources import make_source

    cfg = _load(args.config)
    model = load_model(cfg)
    spec = model.bundle.spec
    src = make_source(cfg.source, cfg.camera_id, cfg.base_dir)
    with src:
        frame = None
        for _ in range(10):  # a replay may start with unreadable files; a camera may need a moment
            try:
                frame = src.read()
                break
            except InspectorError as e:
                last = e
        if frame is None:
            raise SourceError(f"source gave no frame: {locals().get('last', 'source ended')}")
        out = model.adapter.infer(frame.image)  # first call also warms the engine up
        t0 = time.perf_counter()
        out = model.adapter.infer(frame.image)
        infer_ms = (time.perf_counter() - t0) * 1e3
        label = model.post.mask(out.probs, out.residual)
        defects, total = model.post.defects(label, out.score_map)
        if out.release:
            out.release()
    summary = {
        "config": cfg.source_file, "camera_id": cfg.camera_id,
        "source": src.describe(), "frame_shape": list(frame.image.shape),
        "bundle": str(model.bundle.path), "model": f"{spec.name} ({spec.kind})",
        "classes": spec.classes, "engine": model.backend,
        "infer_ms": round(infer_ms, 1), "defects_in_frame": total,
        "publish": cfg.publish.endpoint, "result": "ok",
    }
    if args.json:
        print(json.dumps(summary))
    else:
        for k, v in summary.items():
            print(f"{k:>16}: {v}")
    return EXIT_OK


def cmd_subscribe(args: argparse.Namespace) -> int:
    import cv2

    from inspector.publish import Subscriber

    sub = Subscriber(args.endpoint, args.topic)
    save = Path(args.save_masks) if args.save_masks else None
    if save:
        save.mkdir(parents=True, exist_ok=True)
    n = 0
    try:
        while args.count is None or n < args.count:
            msg = sub.recv(timeout_s=args.timeout)
            if msg is None:
                return _fail(f"no message from {args.endpoint} within {args.timeout}s "
                             f"({n} received)", EXIT_FAIL)
            n += 1
            h = msg.header
            if save:
                cv2.imwrite(str(save / f"{h['camera_id']}_{h['frame_id']:08d}.png"), msg.mask())
            if args.json:
                print(json.dumps(h), flush=True)
            else:
                print(f"{h['camera_id']} frame {h['frame_id']} at {h['strip_pos_mm']:.0f} mm: "
                      f"{len(h['defects'])} defect(s), e2e {h['timings_ms'].get('e2e', 0):.1f} ms",
                      flush=True)
    except KeyboardInterrupt:
        pass
    finally:
        sub.close()
    return EXIT_OK


def cmd_bench(args: argparse.Namespace) -> int:
    from inspector.bench import run_bench

    cfg = _load(args.config)
    result = run_bench(cfg, frames=args.frames, out_dir=Path(args.out), fps=args.fps,
                       throughput_frames=args.throughput_frames)
    print(json.dumps(result["summary"], indent=2))
    return EXIT_OK


def _needs_torch() -> None:
    try:
        import torch  # noqa: F401
    except ImportError:
        raise InspectorError("this command needs the training extra (torch): "
                             "pip install -e '.[train]'  (torch==2.13.0 for the CPU build)") from None


def cmd_train(args: argparse.Namespace) -> int:
    _needs_torch()
    if args.kind == "arcd":
        from export.arcd.train import train
        run_dir = train(Path(args.config), Path(args.run_dir) if args.run_dir else None, args.resume)
        print(run_dir)
        return EXIT_OK
    return _fail(f"unknown model kind {args.kind}", EXIT_BAD_INPUT)


def cmd_export(args: argparse.Namespace) -> int:
    _needs_torch()
    if args.format == "onnx":
        from export.onnx_export import export_bundle
        out = export_bundle(Path(args.run_dir), Path(args.out), name=args.name, opset=args.opset)
        print(out)
        return EXIT_OK
    return _fail(f"unknown export format {args.format}", EXIT_BAD_INPUT)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="inspector", description=__doc__.split("\n")[0])
    ap.add_argument("--version", action="version", version=f"inspector {__version__}")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="run the pipeline of one camera")
    p.add_argument("--config", required=True, help="camera config YAML")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--frames", type=int, help="grab this many frames, drain, exit")
    g.add_argument("--seconds", type=float, help="run this long, drain, exit")
    p.add_argument("--quiet", action="store_true", help="no status line")
    p.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    p.set_defaults(fn=cmd_run)

    p = sub.add_parser("check", help="validate a config, open the source, run one frame")
    p.add_argument("--config", required=True)
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_check)

    p = sub.add_parser("subscribe", help="print (and save) the defect stream")
    p.add_argument("--endpoint", default="tcp://127.0.0.1:5556")
    p.add_argument("--topic", default="", help="topic prefix, e.g. defects.cam1")
    p.add_argument("--count", type=int, help="exit after this many messages")
    p.add_argument("--timeout", type=float, help="fail if no message arrives within this many seconds")
    p.add_argument("--json", action="store_true", help="one header JSON per line")
    p.add_argument("--save-masks", metavar="DIR", help="write each mask as PNG into DIR")
    p.set_defaults(fn=cmd_subscribe)

    p = sub.add_parser("bench", help="latency and throughput benchmark (JSON + PNG)")
    p.add_argument("--config", required=True)
    p.add_argument("--frames", type=int, default=200, help="frames in the latency phase")
    p.add_argument("--throughput-frames", type=int, default=100, help="frames in the throughput phase")
    p.add_argument("--fps", type=float, help="pace of the latency phase (default: 70%% of throughput)")
    p.add_argument("--out", default="bench-out", help="folder for bench.json and bench.png")
    p.set_defaults(fn=cmd_bench)

    p = sub.add_parser("train", help="train a model (needs the train extra)")
    p.add_argument("kind", choices=["arcd"])
    p.add_argument("--config", required=True, help="training config YAML")
    p.add_argument("--run-dir", help="run folder (default: runs/<name>-<time>)")
    p.add_argument("--resume", action="store_true", help="continue from the run folder's checkpoint")
    p.set_defaults(fn=cmd_train)

    p = sub.add_parser("export", help="export a trained run to a model bundle (needs the train extra)")
    p.add_argument("format", choices=["onnx"])
    p.add_argument("--run-dir", required=True)
    p.add_argument("--out", required=True, help="bundle folder to write")
    p.add_argument("--name", help="bundle name (default: the folder name)")
    p.add_argument("--opset", type=int, default=17)
    p.set_defaults(fn=cmd_export)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(getattr(args, "log_level", None) or "INFO")
    try:
        return args.fn(args)
    except (ConfigError, BundleError) as e:
        return _fail(str(e), EXIT_BAD_INPUT)
    except (SourceError, EngineError, OSError) as e:
        return _fail(str(e), EXIT_FAIL)
    except InspectorError as e:
        return _fail(str(e), EXIT_BAD_INPUT)


if __name__ == "__main__":
    sys.exit(main())
