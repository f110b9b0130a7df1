"""What every defect generator shares: its training subset and the layout of what it writes.

**Training subset.** A generator that claims to help ARCD at a labelled-data rate may only see
the labelled images ARCD sees at that rate: :func:`labelled_subset` returns exactly the images
``inspector train arcd`` keeps with ``data.label_fraction`` / ``data.label_seed`` (the hash
``train`` + ``test`` shares of the folder, then :func:`export.arcd.data.sample_labelled`).

**Output.** :class:`PairWriter` writes generated pairs in the NEU-Seg layout
(``images/training/<stem>.jpg``, ``annotations/training/<stem>.png`` with class indices
0 = background, 1.. = the data set's defect classes) plus ``manifest.json`` (generator, its
config and checkpoint, the subset it learnt from, per-pair class and source), so the folder
opens with ``inspector.evaluation.datasets.open_dataset("neu-seg", root, split="all")`` and
``inspector train arcd`` mixes it in through ``data.synthetic_root``. Stems start with
``syn-`` so a synthetic image can never be mistaken for a real one.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import cv2
import numpy as np

from inspector.evaluation.datasets import NEU_SEG_CLASSES, Dataset, open_dataset

log = logging.getLogger(__name__)

__all__ = ["labelled_subset", "PairWriter", "MANIFEST"]

MANIFEST = "manifest.json"


def labelled_subset(root: str | Path, fraction: float, seed: int = 0,
                    splits: Sequence[str] = ("train", "test")) -> Dataset:
    """The NEU-Seg images ARCD's stage 2 trains on at ``fraction`` (same order, same subset)."""
    from export.arcd.data import sample_labelled

    # as ARCD's trainer: a full NEU-Seg root's own test folder is never training data
    parts = [open_dataset("neu-seg", root, split=s, strict=True, official_test=False) for s in splits]
    entries = [e for p in parts for e in p.entries]
    if not entries:
        raise ValueError(f"{root}: no NEU-Seg images in splits {list(splits)}")
    keep = sample_labelled(len(entries), fraction, seed)
    first = parts[0]
    return Dataset(first.format, first.root, first.classes, [entries[i] for i in keep],
                   "+".join(splits) + f"@{fraction:g}/seed{seed}", first.color,
                   [n for p in parts for n in p.notes])


@dataclass
class PairWriter:
    """Writes generated (image, class-index mask) pairs and the manifest (module doc)."""

    root: Path
    generator: str
    config: dict[str, Any] = field(default_factory=dict)
    classes: Sequence[str] = NEU_SEG_CLASSES
    jpeg_quality: int = 95
    pairs: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.root = Path(self.root)
        if (self.root / MANIFEST).exists():
            raise FileExistsError(f"{self.root}: already holds generated pairs ({MANIFEST}); "
                                  f"choose another --out or delete it")
        (self.root / "images" / "training").mkdir(parents=True, exist_ok=True)
        (self.root / "annotations" / "training").mkdir(parents=True, exist_ok=True)

    def add(self, image: np.ndarray, mask: np.ndarray, **info: Any) -> str:
        """One pair: ``image`` HxW (or HxWx3 RGB) uint8, ``mask`` HxW uint8 class indices."""
        if image.dtype != np.uint8 or mask.dtype != np.uint8:
            raise ValueError(f"pair {len(self.pairs)}: image and mask must be uint8, got "
                             f"{image.dtype} and {mask.dtype}")
        if image.shape[:2] != mask.shape:
            raise ValueError(f"pair {len(self.pairs)}: image {image.shape[:2]} and mask "
                             f"{mask.shape} differ in size")
        if int(mask.max()) >= len(self.classes):
            raise ValueError(f"pair {len(self.pairs)}: mask class {int(mask.max())} beyond the "
                             f"{len(self.classes)} classes {list(self.classes)}")
        stem = f"syn-{self.generator}-{len(self.pairs):06d}"
        img = image if image.ndim == 2 else cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
        cv2.imwrite(str(self.root / "images" / "training" / f"{stem}.jpg"), img,
                    [cv2.IMWRITE_JPEG_QUALITY, self.jpeg_quality])
        cv2.imwrite(str(self.root / "annotations" / "training" / f"{stem}.png"), mask)
        classes = sorted({int(c) for c in np.unique(mask) if c})
        self.pairs.append({"stem": stem, "classes": [self.classes[c] for c in classes],
                           "defect_px": int((mask > 0).sum()), **info})
        return stem

    def close(self, **extra: Any) -> Path:
        """Write ``manifest.json``; returns its path."""
        man = {"format": "neu-seg", "generator": self.generator, "classes": list(self.classes),
               "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
               "pairs": len(self.pairs), "config": self.config, **extra, "items": self.pairs}
        path = self.root / MANIFEST
        path.write_text(json.dumps(man, indent=2, default=str))
        log.info("%s: %d pairs written by %s", self.root, len(self.pairs), self.generator)
        return path
