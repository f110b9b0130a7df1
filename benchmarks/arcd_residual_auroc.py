"""How much of an ARCD bundle's decision its reconstruction network R carries, per defect class.

ARCD's discriminator D sees ``concat(R(I), I)``; the unlabelled-normal stage can only help D if
R's reconstruction departs from the input where the defects are. This script ranks, per class of
a labelled data set (class-index masks, e.g. NEU-Seg), that class's pixels against every
background pixel of the split by three scores:

* ``discriminator``: the bundle's published score, 1 - p(background);
* ``reconstruction_residual``: ``Gauss5(|I - R(I)|)`` from the graph's ``reconstruction`` output;
* ``local_contrast``: the model-free ``|I - Gauss31(I)|`` reference.

With ``--simulate``, the bundle's own anomaly simulation (its training config's ``simulation``
section, never a clean sample) is pasted into each image's background instead, and the simulated
pixels are ranked against the rest of the background: R's residual on the anomalies it was
trained to remove. Writes JSON (``--out``) and logs one line per class.

    python benchmarks/arcd_residual_auroc.py --bundle deploy/models/arcd-neu \
        --data ../shared/data/neu_seg --split val --out bench-out/arcd-residual-auroc.json
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.mt_class_auroc import local_contrast  # noqa: E402
from inspector.bundle import BUNDLE_FILE  # noqa: E402
from inspector.errors import BundleError  # noqa: E402
from inspector.evaluation.datasets import open_dataset  # noqa: E402
from inspector.evaluation.evaluate import Runner  # noqa: E402
from inspector.evaluation.metrics import auroc  # noqa: E402

log = logging.getLogger("arcd_residual_auroc")

SCORES = ("discriminator", "reconstruction_residual", "local_contrast")


def score_maps(runner: Runner, image: np.ndarray) -> dict[str, np.ndarray]:
    """The three per-pixel scores of one frame, in frame coordinates."""
    adapter = runner.adapter
    recon_name = runner.bundle.spec.outputs.get("reconstruction")
    if recon_name is None:
        raise BundleError(f"{runner.bundle.path / BUNDLE_FILE}: outputs.reconstruction: not named; "
                          "this bundle has no reconstruction output (a U-Net without R?)")
    h, w = image.shape[:2]
    batch, g = adapter.fill_batch(image)
    raw = adapter.run_engine(batch)
    recon = adapter.stitch(raw[recon_name], g, np.empty((adapter.channels, g.height, g.width),
                                                        np.float32))[:, :h, :w]
    probs = adapter.stitch(raw[adapter.probs_name], g, np.empty((adapter.num_classes, g.height,
                                                                 g.width), np.float32))[:, :h, :w]
    # the reconstruction is in the network's normalised units: compare it with the normalised
    # input tiles the engine saw, stitched back the same way
    norm = adapter.stitch([batch], g, np.empty((adapter.channels, g.height, g.width),
                                               np.float32))[:, :h, :w]
    residual = np.abs(norm - recon).mean(axis=0)
    grey = adapter.to_model_channels(image)
    return {"discriminator": 1.0 - probs[0],
            "reconstruction_residual": cv2.GaussianBlur(residual, (5, 5), 0),
            "local_contrast": local_contrast(grey[:, :, 0] if grey.shape[2] == 1
                                             else cv2.cvtColor(grey, cv2.COLOR_RGB2GRAY))}


def simulator_of(runner: Runner, seed: int) -> tuple[object, np.random.Generator]:
    """The bundle's training-time anomaly simulation, every sample anomalous."""
    from export.arcd.simulation import AnomalySimulator, SimulationConfig

    raw = runner.bundle.spec.provenance.get("training_config", {}).get("simulation")
    if raw is None:
        raise BundleError(f"{runner.bundle.path / BUNDLE_FILE}: provenance.training_config."
                          "simulation: missing; --simulate needs the bundle's training config")
    cfg = SimulationConfig.model_validate({**raw, "clean_prob": 0.0})
    return AnomalySimulator(cfg), np.random.default_rng(seed)


def adapter_grey(runner: Runner, image: np.ndarray) -> np.ndarray:
    """The frame as the model's single grey channel (HxW uint8); --simulate needs 1 channel."""
    grey = runner.adapter.to_model_channels(image)
    if grey.shape[2] != 1:
        raise BundleError(f"{runner.bundle.path / BUNDLE_FILE}: input.channels: "
                          f"{grey.shape[2]}; --simulate handles grey (1-channel) models only")
    return grey[:, :, 0]


def class_auroc(bundle: Path, data: Path, fmt: str, split: str, stride: int = 2,
                limit: int = 0, simulate: bool = False, seed: int = 0) -> dict:
    runner = Runner(bundle)
    trained = runner.bundle.spec.provenance.get("training_config", {}).get("model", {})
    if trained.get("reconstruction") is False:
        # the plain U-Net's graph passes the image through as its "reconstruction"
        raise BundleError(f"{runner.bundle.path / BUNDLE_FILE}: trained with "
                          "model.reconstruction: false (no R); nothing to measure")
    classes = list(runner.bundle.spec.classes)
    ds = open_dataset(fmt, data, split=split)
    n = len(ds) if limit <= 0 else min(limit, len(ds))
    if n == 0:
        raise SystemExit(f"{data}: no {fmt} images in split '{split}'")
    sim = simulator_of(runner, seed) if simulate else None
    scores: dict[str, list[np.ndarray]] = {k: [] for k in SCORES}
    labels: list[np.ndarray] = []
    for i in range(n):
        sample = ds.load(i)
        image, label = sample.image, sample.mask
        if sim is not None:
            simulator, rng = sim
            background = label == 0
            grey = adapter_grey(runner, image)
            fake = simulator(grey.astype(np.float32) / 255.0, rng, valid=background)
            image = np.clip(fake.image * 255.0 + 0.5, 0, 255).astype(np.uint8)
            # real defects are left out (255), simulated pixels are class 1, the rest background
            label = np.where(background, (fake.mask > 0.5).astype(np.uint8), 255).astype(np.uint8)
        for name, m in score_maps(runner, image).items():
            scores[name].append(m.ravel()[::stride].astype(np.float32))
        labels.append(label.ravel()[::stride].astype(np.uint8))
        if (i + 1) % 100 == 0:
            log.info("scored %d/%d images", i + 1, n)
    lab = np.concatenate(labels)
    flat = {k: np.concatenate(v) for k, v in scores.items()}
    background = lab == 0
    out: dict = {"bundle": str(bundle), "data": str(data), "split": split, "images": n,
                 "pixel_stride": stride, "simulated": simulate, "classes": {}}
    if simulate:
        groups = {"simulated": lab == 1}
    else:
        groups = {c: lab == k for k, c in enumerate(classes) if k > 0}
        groups["all defects"] = ~background
    for cat, sel in groups.items():
        keep = sel | background
        row: dict = {"pixels": int(sel.sum())}
        for name in SCORES:
            row[f"pixel_auroc_{name}"] = auroc(flat[name][keep], sel[keep].astype(np.uint8))
        out["classes"][cat] = row
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", type=Path, required=True, help="an arcd bundle (with R)")
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--format", default="neu-seg", help="data set layout (neu-seg, magnetic-tile)")
    ap.add_argument("--split", default="val", help="hash split: train, val, test or all")
    ap.add_argument("--stride", type=int, default=2, help="use every n-th pixel (memory)")
    ap.add_argument("--limit", type=int, default=0, help="score only the first N images (0 = all)")
    ap.add_argument("--simulate", action="store_true",
                    help="rank the bundle's own simulated anomalies (pasted into the background)")
    ap.add_argument("--seed", type=int, default=0, help="simulation seed (--simulate)")
    ap.add_argument("--out", type=Path, help="write the table as JSON here")
    args = ap.parse_args(argv)
    if args.stride < 1:
        ap.error(f"--stride must be >= 1, got {args.stride}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        res = class_auroc(args.bundle, args.data, args.format, args.split, args.stride, args.limit,
                          args.simulate, args.seed)
    except (BundleError, OSError, ValueError) as e:  # missing/corrupt bundle, unreadable image or mask
        log.error("%s", e)
        return 2
    for cat, row in res["classes"].items():
        log.info("%-12s pixels %8d  AUROC D %.3f  R residual %.3f  local contrast %.3f", cat,
                 row["pixels"], *(row[f"pixel_auroc_{k}"] or float("nan") for k in SCORES))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
