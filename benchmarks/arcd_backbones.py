"""What each ARCD D backbone costs: parameters, ONNX size, inference and training-step time.

For every ``model.d_backbone`` (U-Net, SegNet, PSPNet, DeepLabV3+), as ARCD (R + D) and as the
plain baseline (D alone), at one set of CPU-sized widths: the fused graph is exported exactly as
``inspector export onnx`` does (BatchNorm folded, parity checked against torch on a random batch),
then timed in ONNX Runtime on one tile (the runtime's path), and one stage-2 training step (frozen
R forward, D forward + backward + Adam, a batch of crops) is timed in torch. Weights are the
fresh initialisation: this measures cost, not accuracy.

    python benchmarks/arcd_backbones.py --out bench-out/arcd-backbones
    python benchmarks/arcd_backbones.py --d-width 64 --r-width 128 --iters 5   # thesis sizes

Writes ``arcd-backbones.json`` and ``arcd-backbones.png`` into ``--out``. Speed is measured
here, never asserted in tests.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from inspector.bench import _machine, _percentiles  # noqa: E402  (the runtime bench's summaries)

log = logging.getLogger("benchmarks.arcd_backbones")

BACKBONES = ("unet", "segnet", "pspnet", "deeplabv3plus")


def measure(backbone: str, reconstruction: bool, args: argparse.Namespace) -> dict:
    import torch

    from export.arcd.torch_model import ARCDInference, count_parameters
    from export.arcd.train import _validate, build_models
    from export.onnx_export import _session, check_parity, export_onnx

    model_cfg = {"in_channels": 1, "classes": ["background", "inclusion", "patches", "scratches"],
                 "tile": [args.tile, args.tile], "r_base_width": args.r_width, "r_depth": 5,
                 "d_base_channels": args.d_width, "d_depth": 5 if backbone == "segnet" else 6,
                 "d_backbone": backbone, "d_resnet_layers": args.resnet_layers,
                 "reconstruction": reconstruction}
    cfg = _validate({"model": model_cfg}, "arcd_backbones benchmark").model
    torch.manual_seed(0)
    r, d = build_models(cfg)
    model = ARCDInference(r, d).eval()
    row: dict = {"backbone": backbone, "model": "arcd" if reconstruction else "plain",
                 "r_parameters": count_parameters(r), "d_parameters": count_parameters(d),
                 "d_depth": cfg.d_depth}

    # one stage-2 step as the trainer takes it: R frozen (no grad), D trained with Adam. Timed
    # first: the steps move D's BatchNorm statistics off their initial values, without which a
    # fresh D outputs near-constant probabilities and the parity figure below would say nothing.
    cl = torch.channels_last  # the trainer's default (model.channels_last), ~2x on CPU
    r.eval().to(memory_format=cl)
    d.train().to(memory_format=cl)
    opt = torch.optim.Adam(d.parameters(), lr=1e-3)
    crops = torch.rand(args.batch, 1, args.crop, args.crop).to(memory_format=cl)
    target = torch.randint(0, 4, (args.batch, args.crop, args.crop))
    times = []
    for i in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        with torch.no_grad():
            rec = r(crops)
        d_in = crops if not reconstruction else torch.cat([rec, crops], 1)
        loss = torch.nn.functional.cross_entropy(d(d_in), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if i >= args.warmup:
            times.append((time.perf_counter() - t0) * 1e3)
    row["train_step_ms"] = _percentiles(times)
    model.eval()

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        export_onnx(model, path, 1, (args.tile, args.tile))
        row["onnx_mb"] = round(path.stat().st_size / 1e6, 3)
        x = np.random.default_rng(0).random((2, 1, args.tile, args.tile), dtype=np.float32)
        row["parity_max_abs"] = max(check_parity(model, path, {"random": x}, tol=1.0)["random"].values())
        sess = _session(path, threads=args.threads)
        tile = x[:1]
        for _ in range(args.warmup):
            sess.run(None, {"image": tile})
        times = []
        for _ in range(args.iters):
            t0 = time.perf_counter()
            sess.run(None, {"image": tile})
            times.append((time.perf_counter() - t0) * 1e3)
        row["ort_tile_ms"] = _percentiles(times)
    log.info("%-13s %-5s D %7d params  ORT %.1f ms/tile  train step %.0f ms  parity %.1e",
             backbone, row["model"], row["d_parameters"], row["ort_tile_ms"]["p50"],
             row["train_step_ms"]["p50"], row["parity_max_abs"])
    return row


def plot(rows: list[dict], backbones: list[str], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, label in ((axes[0], "ort_tile_ms", "ONNX Runtime, ms per tile (p50)"),
                           (axes[1], "train_step_ms", "stage-2 training step, ms (p50)")):
        for k, model in enumerate(("arcd", "plain")):
            sel = [r for r in rows if r["model"] == model]
            xs = np.arange(len(sel)) + (k - 0.5) * 0.38
            ax.bar(xs, [r[key]["p50"] for r in sel], 0.38,
                   label="ARCD (R + D)" if model == "arcd" else "D alone")
        ax.set_xticks(np.arange(len(backbones)), backbones)
        ax.set_title(label)
        ax.legend()
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("bench-out/arcd-backbones"))
    p.add_argument("--backbones", default=",".join(BACKBONES))
    p.add_argument("--d-width", type=int, default=12, help="model.d_base_channels (shipped: 12)")
    p.add_argument("--r-width", type=int, default=8, help="model.r_base_width (shipped: 8)")
    p.add_argument("--resnet-layers", type=int, nargs=4, default=[3, 4, 6, 3])
    p.add_argument("--tile", type=int, default=224, help="inference tile side (shipped: 224)")
    p.add_argument("--crop", type=int, default=128, help="training crop side (shipped: 128)")
    p.add_argument("--batch", type=int, default=16, help="training batch (shipped: 16)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--iters", type=int, default=50, help="timed ONNX Runtime runs")
    p.add_argument("--steps", type=int, default=8, help="timed training steps")
    p.add_argument("--warmup", type=int, default=3)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)-7s %(name)s: %(message)s")

    import torch

    torch.set_num_threads(args.threads)
    chosen = [b.strip() for b in args.backbones.split(",") if b.strip()]
    unknown = sorted(set(chosen) - set(BACKBONES))
    if unknown:
        p.error(f"--backbones: unknown {', '.join(unknown)}; choose from {', '.join(BACKBONES)}")
    from inspector.errors import ConfigError

    try:
        rows = [measure(b, rec, args) for b in chosen for rec in (True, False)]
    except ConfigError as e:  # e.g. a --tile or --crop the networks' strides do not divide
        p.error(str(e))
    args.out.mkdir(parents=True, exist_ok=True)
    machine = _machine()
    result = {"machine": {**machine, "threads": args.threads}, "torch": torch.__version__,
              "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "rows": rows}
    (args.out / "arcd-backbones.json").write_text(json.dumps(result, indent=2))
    plot(rows, chosen, args.out / "arcd-backbones.png",
         f"ARCD D backbones, R {args.r_width} / D {args.d_width}, tile {args.tile}, "
         f"batch {args.batch}x{args.crop}; {machine['cpu']}, {args.threads} threads")
    log.info("wrote %s", args.out / "arcd-backbones.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
