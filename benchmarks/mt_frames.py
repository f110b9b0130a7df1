"""Fixed-size frames from the magnetic-tile images, for benchmarking a magnetic-tile model.

A camera delivers frames of one shape and the pipeline drops any other (``bad_frame``), but
magnetic tiles all differ in size. This writes each image of the chosen hash split reflect-padded
to at least ``--size`` and centre-cropped to ``--size`` x ``--size`` (grey PNG), so that
``inspector bench`` can replay them through ``configs/fuzzymask-mt.yaml``::

    python benchmarks/mt_frames.py --data ../shared/data/magnetic_tile --out bench-out/mt-frames
    inspector bench --config configs/fuzzymask-mt.yaml --frames 150 --out bench-out/fuzzymask
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from inspector.evaluation.datasets import open_dataset  # noqa: E402


def square_crop(image: np.ndarray, size: int) -> np.ndarray:
    h, w = image.shape[:2]
    ph, pw = max(0, size - h), max(0, size - w)
    if ph or pw:
        image = np.pad(image, ((ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2)), mode="reflect")
        h, w = image.shape[:2]
    y, x = (h - size) // 2, (w - size) // 2
    return image[y:y + size, x:x + size]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True, help="magnetic-tile root (MT_*/Imgs)")
    p.add_argument("--out", required=True, help="folder for the frames")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--split", default="test", choices=["train", "val", "test", "all"])
    p.add_argument("--categories", default="MT_Free", help="comma list of MT_ folders")
    a = p.parse_args(argv)
    ds = open_dataset("magnetic-tile", a.data, split=a.split, categories=a.categories.split(","))
    if len(ds) == 0:
        print(f"mt_frames: no images in {a.data} ({a.categories}, split {a.split})", file=sys.stderr)
        return 2
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    for i, e in enumerate(ds.entries):
        img = ds.load(i).image
        if img.ndim == 3:
            img = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)
        cv2.imwrite(str(out / f"{e.category}_{e.stem}.png"), square_crop(img, a.size))
    print(f"{len(ds)} frames of {a.size}x{a.size} in {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
