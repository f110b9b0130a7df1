"""``inspector augment measure``: diversity of generated pairs against real images.

Only argparse at import time (the ``inspector`` parser is built without torch)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

__all__ = ["add_commands"]


def image_cap(text: str) -> int:
    """``--max-images``: a whole number >= 2 (diversity compares pairs of images)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 2:
        raise argparse.ArgumentTypeError(f"must be >= 2 (diversity compares pairs of images), got {text}")
    return value


def check_out(out: str) -> Path:
    """``--out``: a file to write, refused before the measurement runs (a folder, or a path
    under a file, used to fail after it with an errno line, exit 1 for the folder)."""
    path = Path(out)
    if path.is_dir():
        raise ValueError(f"--out {out}: is a folder; give a file name (e.g. {path / 'measure.json'})")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ValueError(f"--out {out}: {parent} is a file, not a folder; give a path "
                                 "in a folder")
            break
    from export.augment.cli_common import writable_place
    writable_place(path, "--out")  # /proc, a read-only folder: a bare errno after the measurement
    return path


def cmd_measure(args: argparse.Namespace) -> int:
    from export.augment.dataset import open_pairs
    from export.augment.measure import diversity
    from inspector.evaluation.datasets import open_dataset
    from inspector.fileio import missing_folder

    if args.max_images < 2:  # the command line refuses it; a caller building args may not
        raise ValueError(f"--max-images: must be >= 2, got {args.max_images}")
    out_path = check_out(args.out) if args.out else None
    out: dict = {}
    for key, root, fmt, split in (("generated", args.pairs, "neu-seg", "all"),
                                  ("reference", args.reference, args.reference_format,
                                   args.reference_split)):
        if root is None:
            continue
        flag = "--pairs" if key == "generated" else "--reference"
        if not Path(root).is_dir():
            raise FileNotFoundError(f"{flag} {root}: {missing_folder(root, 'folder')}")
        if key == "generated":
            # the pairs data.synthetic_root would train on: only those its manifest lists, and
            # a folder without a readable manifest refused the same way (real images are
            # measured with --reference)
            try:
                ds, _ = open_pairs(root)
            except (FileNotFoundError, ValueError) as e:
                raise ValueError(f"--pairs: {e} (measure real images with --reference)") from None
        else:
            ds = open_dataset(fmt, root, split=split)
        n = min(len(ds), args.max_images)
        if n < 2:
            raise ValueError(f"{root}: {len(ds)} image(s) in split {split}; diversity needs 2")
        out[key] = {"root": str(root), "split": split, "images": n,
                    "diversity": round(diversity((ds.load(i).image for i in range(n)), n), 4)}
    if not out:
        raise ValueError("--pairs: required (and/or --reference)")
    if "generated" in out and "reference" in out:
        out["ratio"] = round(out["generated"]["diversity"] / out["reference"]["diversity"], 4)
    text = json.dumps(out, indent=2)
    if out_path is not None:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(text)
    print(text)
    return 0


def add_commands(gsub: argparse._SubParsersAction) -> None:
    p = gsub.add_parser("measure", help="diversity of generated pairs in a fixed feature space, "
                                        "against real images (mask alignment: inspector evaluate)")
    p.add_argument("--pairs", help="generated pairs: a folder `sample` wrote (only the pairs its "
                                   "manifest.json lists, as data.synthetic_root reads them)")
    p.add_argument("--reference", help="real images to compare with, e.g. ../shared/data/neu_seg")
    p.add_argument("--reference-format", default="neu-seg", choices=["neu-seg", "magnetic-tile", "folder"])
    p.add_argument("--reference-split", default="val", choices=["train", "val", "test", "all"])
    p.add_argument("--max-images", type=image_cap, default=300,
                   help="images per set (the first N; at least 2)")
    p.add_argument("--out", help="also write the JSON to this file")
    p.set_defaults(augment_fn=cmd_measure)
