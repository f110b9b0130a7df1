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

The pairs go to a hidden temporary folder beside the output (``.<out>.partial-...``), which
:meth:`PairWriter.close` renames to the output once ``manifest.json`` is in it: a ``sample``
that fails or is stopped half-way leaves no output folder (the temporary one is removed when
the writer is used as a context manager; one left by a killed process is never read), and the
output never mixes pairs of two runs. An output folder that exists and is not empty (earlier
pairs, a real data set) is refused.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import cv2
import numpy as np

from inspector.evaluation.datasets import NEU_SEG_CLASSES, Dataset, open_dataset
from inspector.fileio import missing_folder

log = logging.getLogger(__name__)

__all__ = ["labelled_subset", "PairWriter", "MANIFEST", "check_output_folder", "open_pairs"]

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
    """Writes generated (image, class-index mask) pairs and the manifest (module doc).

    Use it as a context manager (``with PairWriter(...) as w: ...; w.close(...)``): an exception
    in the block (an error, Ctrl-C) removes the temporary folder, so nothing is left behind."""

    root: Path
    generator: str
    config: dict[str, Any] = field(default_factory=dict)
    classes: Sequence[str] = NEU_SEG_CLASSES
    jpeg_quality: int = 95
    pairs: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.root = Path(self.root)
        check_output_folder(self.root)
        self.root.parent.mkdir(parents=True, exist_ok=True)
        #: where the pairs are written until :meth:`close` renames it to ``root``
        self.work = self.root.parent / f".{self.root.name}.partial-{os.getpid()}-{secrets.token_hex(4)}"
        (self.work / "images" / "training").mkdir(parents=True)
        (self.work / "annotations" / "training").mkdir(parents=True)
        self.closed = False

    def __enter__(self) -> "PairWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self.closed:
            self.abort()

    def abort(self) -> None:
        """Remove the temporary folder and what was written to it (the output is not touched)."""
        shutil.rmtree(self.work, ignore_errors=True)
        self.closed = True

    def add(self, image: np.ndarray, mask: np.ndarray, **info: Any) -> str:
        """One pair: ``image`` HxW (or HxWx3 RGB) uint8, ``mask`` HxW uint8 class indices."""
        if self.closed:
            raise ValueError(f"{self.root}: the pair writer is closed")
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
        cv2.imwrite(str(self.work / "images" / "training" / f"{stem}.jpg"), img,
                    [cv2.IMWRITE_JPEG_QUALITY, self.jpeg_quality])
        cv2.imwrite(str(self.work / "annotations" / "training" / f"{stem}.png"), mask)
        classes = sorted({int(c) for c in np.unique(mask) if c})
        self.pairs.append({"stem": stem, "classes": [self.classes[c] for c in classes],
                           "defect_px": int((mask > 0).sum()), **info})
        return stem

    def close(self, **extra: Any) -> Path:
        """Write ``manifest.json``, then rename the temporary folder to the output; returns the
        manifest's path (in the output)."""
        if self.closed:
            raise ValueError(f"{self.root}: the pair writer is closed")
        man = {"format": "neu-seg", "generator": self.generator, "classes": list(self.classes),
               "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
               "pairs": len(self.pairs), "config": self.config, **extra, "items": self.pairs}
        (self.work / MANIFEST).write_text(json.dumps(man, indent=2, default=str))
        check_output_folder(self.root)  # made meanwhile by someone else: keep theirs
        if self.root.is_dir():
            self.root.rmdir()  # empty (checked): a folder cannot be renamed onto a folder
        os.replace(self.work, self.root)
        self.closed = True
        log.info("%s: %d pairs written by %s", self.root, len(self.pairs), self.generator)
        return self.root / MANIFEST


def check_output_folder(root: Path) -> None:
    """Refuse an output that exists and is not an empty folder, naming what it holds: generated
    pairs (their manifest), a data set (its images), anything else. Writing into it would mix
    the new pairs with what is there, and a reader of the folder would take both."""
    root = Path(root)
    if not root.exists():
        return
    if not root.is_dir():
        raise FileExistsError(f"{root}: exists and is not a folder; choose another --out")
    if (root / MANIFEST).exists():
        raise FileExistsError(f"{root}: already holds generated pairs ({MANIFEST}); "
                              f"choose another --out or delete it")
    if any(root.iterdir()):
        images = root / "images"
        what = ("holds a data set (images/ with files, no manifest.json)"
                if images.is_dir() and any(p.is_file() for p in images.rglob("*")) else "is not empty")
        raise FileExistsError(f"{root}: {what}; --out must be a new or empty folder")


def open_pairs(root: str | Path) -> tuple[Dataset, dict[str, Any]]:
    """A folder :class:`PairWriter` wrote: (its pairs as a data set, in the manifest's order,
    the manifest). Only the pairs ``manifest.json`` lists are read; a folder without a readable
    manifest (not written by a generator, or a ``sample`` that did not finish), or a listed
    pair whose files are missing, is an error naming the folder."""
    root = Path(root)
    path = root / MANIFEST
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: {missing_folder(root, 'folder of generated pairs')}")
    if not path.is_file():
        raise FileNotFoundError(f"{root}: no {MANIFEST}: not a folder of generated pairs, or "
                                "one whose `sample` did not finish; sample again into a new --out")
    try:
        man = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    items = man.get("items") if isinstance(man, dict) else None
    if not isinstance(items, list) or not all(isinstance(it, dict) and "stem" in it for it in items):
        raise ValueError(f"{path}: no list of pairs ('items' with a 'stem' each)")
    ds = open_dataset("neu-seg", root, split="all", strict=True)
    by_stem = {e.stem: e for e in ds.entries}
    missing = [it["stem"] for it in items if it["stem"] not in by_stem]
    if missing:
        raise FileNotFoundError(f"{root}: {len(missing)} pair(s) listed in {MANIFEST} are missing "
                                f"(first: {missing[0]})")
    extra = len(by_stem) - len({it["stem"] for it in items})
    if extra:
        log.warning("%s: %d image(s) not listed in %s are ignored", root, extra, MANIFEST)
    return Dataset(ds.format, ds.root, ds.classes, [by_stem[it["stem"]] for it in items], ds.split,
                   ds.color, list(ds.notes)), man
