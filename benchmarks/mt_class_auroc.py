"""Pixel AUROC of a bundle's published score per magnetic-tile defect class, next to a model-free
local-contrast reference ``|I - Gauss31(I)|``.

Each class's defect pixels are ranked against every normal pixel: the background of that class's
images plus all MT_Free images of the split. The pooled AUROC that ``inspector evaluate`` reports
mixes the classes by pixel count; this table shows which classes a detector finds and which it
misses. Writes JSON (``--out``) and prints one line per class.

    python benchmarks/mt_class_auroc.py --bundle deploy/models/clgan-mt \
        --data ../shared/data/magnetic_tile --split test --out bench-out/mt-class-auroc.json
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

from inspector.errors import BundleError  # noqa: E402
from inspector.evaluation.datasets import magnetic_tile, trained_split  # noqa: E402
from inspector.evaluation.evaluate import Runner  # noqa: E402
from inspector.evaluation.metrics import auroc  # noqa: E402

log = logging.getLogger("mt_class_auroc")


def local_contrast(grey: np.ndarray, ksize: int = 31) -> np.ndarray:
    """The reference score: distance of each pixel from its local mean."""
    f = grey.astype(np.float32)
    return np.abs(f - cv2.GaussianBlur(f, (ksize, ksize), 0))


def class_auroc(bundle: Path, data: Path, split: str, stride: int = 2) -> dict:
    runner = Runner(bundle)
    # the shares the model was trained with, as `inspector evaluate` splits: other fractions
    # would put training images into the "test" set
    fractions = trained_split(runner.bundle.spec.provenance or {})
    ds = magnetic_tile(data, split=split, fractions=fractions)
    if len(ds) == 0:
        raise SystemExit(f"{data}: no magnetic-tile images in split '{split}'")
    scores: dict[str, dict[str, list[np.ndarray]]] = {}
    labels: dict[str, list[np.ndarray]] = {}
    for i, entry in enumerate(ds.entries):
        cat = entry.image.parent.parent.name
        sample = ds.load(i)
        img = sample.image
        grey = img if img.ndim == 2 else cv2.cvtColor(img, cv2.COLOR_BGR2GRAY)
        maps = {"model": runner.run(img).score_map, "local_contrast": local_contrast(grey)}
        for name, m in maps.items():
            scores.setdefault(cat, {}).setdefault(name, []).append(m.ravel()[::stride].astype(np.float32))
        labels.setdefault(cat, []).append((sample.mask > 0).ravel()[::stride].astype(np.uint8))
        if (i + 1) % 50 == 0:
            log.info("scored %d/%d images", i + 1, len(ds))
    free = scores.pop("MT_Free", None)
    labels.pop("MT_Free", None)
    if free is None:
        raise SystemExit(f"{data}: split '{split}' has no MT_Free images to rank against")
    total = sum(int(np.concatenate(v).sum()) for v in labels.values())
    out: dict = {"bundle": str(bundle), "data": str(data), "split": split,
                 "split_fractions": {"test": fractions.test, "val": fractions.val}, "pixel_stride": stride,
                 "normal_images": len(free["model"]), "classes": {}}
    for cat in sorted(labels):
        lab = np.concatenate(labels[cat])
        row = {"images": len(labels[cat]), "defect_pixel_share": float(lab.sum()) / max(total, 1)}
        for name in ("model", "local_contrast"):
            s = np.concatenate(scores[cat][name] + free[name])
            y = np.concatenate([lab, np.zeros(sum(a.size for a in free[name]), np.uint8)])
            row[f"pixel_auroc_{name}"] = auroc(s, y)
        out["classes"][cat] = row
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", type=Path, required=True)
    ap.add_argument("--data", type=Path, required=True, help="magnetic-tile root (MT_*/Imgs)")
    ap.add_argument("--split", default="test", help="hash split: train, val, test or all")
    ap.add_argument("--stride", type=int, default=2, help="use every n-th pixel (memory)")
    ap.add_argument("--out", type=Path, help="write the table as JSON here")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        res = class_auroc(args.bundle, args.data, args.split, args.stride)
    except (BundleError, OSError, ValueError) as e:  # missing/corrupt bundle, unreadable image or mask
        log.error("%s", e)
        return 2
    for cat, row in res["classes"].items():
        log.info("%-12s images %3d  defect-pixel share %.3f  AUROC model %.3f  local contrast %.3f",
                 cat, row["images"], row["defect_pixel_share"], row["pixel_auroc_model"],
                 row["pixel_auroc_local_contrast"])
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
