"""Frame sets for calibration: normal frames from a folder or a live source, labelled defects,
and the deterministic split into a calibration part and a held-back check part.

The split is a fixed function of each image's key (:func:`inspector.evaluation.datasets.
hash_fraction`, the hash the evaluation and training code split by), so every run and machine
holds back the same frames, and adding frames never moves old ones between the parts. The key
of a normal frame from a folder is the one ``--format folder`` (:func:`inspector.evaluation.
datasets.image_folder`) splits by: its path below the folder, without the extension
(``coil_a/f0001``); for the files directly in the folder that is the bare stem, as in the
magnetic-tile and NEU readers, so ``--normal MT_Free/Imgs`` splits like ``magnetic-tile``:

* hash < ``check_fraction``                         -> ``check`` (held back, only measured)
* hash < ``check_fraction + calib_fraction``        -> ``calibration`` (thresholds chosen here)
* otherwise                                         -> ``unused``

With ``check_fraction 0.3, calib_fraction 0.2`` the parts are exactly the shared ``test`` and
``val`` splits (:data:`inspector.evaluation.datasets.DEFAULT_SPLIT`), and ``unused`` is the
``train`` split that a model such as clgan-mt was trained on: thresholds must not be set on
frames the model has learnt to reconstruct, or they come out too low for new frames.
``calib_fraction`` None (the default) takes every frame that is not held back.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Literal

import numpy as np

from inspector.errors import InspectorError
from inspector.fileio import missing_folder
from inspector.evaluation.datasets import (Dataset, hash_fraction, image_folder, open_dataset,
                                           read_image, trained_split)

log = logging.getLogger(__name__)

__all__ = ["Split", "FrameItem", "FrameSet", "normal_folder", "live_frames", "defect_set", "Part"]

Part = Literal["calibration", "check", "unused"]


class CalibrationInputError(InspectorError, ValueError):
    """Bad calibration input (an argument or a file): the CLI exits 2 with this message."""


@dataclass(frozen=True)
class Split:
    """Which part an image key falls in (see module doc)."""

    check_fraction: float = 0.3
    calib_fraction: float | None = None

    def __post_init__(self) -> None:
        if not 0 < self.check_fraction < 1:
            raise CalibrationInputError(f"--check-fraction: must be in (0, 1), got {self.check_fraction}")
        if self.calib_fraction is not None and not (
                0 < self.calib_fraction and self.check_fraction + self.calib_fraction <= 1 + 1e-12):
            raise CalibrationInputError(f"--calib-fraction: must be > 0 and leave check + calibration "
                                        f"<= 1, got {self.calib_fraction}")

    def part(self, key: str) -> Part:
        h = hash_fraction(key)
        if h < self.check_fraction:
            return "check"
        if self.calib_fraction is None or h < self.check_fraction + self.calib_fraction:
            return "calibration"
        return "unused"

    def describe(self) -> dict:
        return {"check_fraction": self.check_fraction, "calib_fraction": self.calib_fraction,
                "rule": "sha256(key) -> [0,1): < check_fraction held back for the check, the next "
                        "calib_fraction (default: the rest) calibrates; key: the image's path below "
                        "the folder without extension (the file stem for files directly in it), "
                        "the file stem for labelled data sets, camera/frame for live frames"}


@dataclass
class FrameItem:
    """One image of a frame set, loaded on demand (``load()`` -> image, truth or None)."""

    name: str
    part: Part
    load: Callable[[], tuple[np.ndarray, np.ndarray | None]]
    path: Path | None = None  # the image file, where there is one


@dataclass
class FrameSet:
    """Images split into parts; ``kind`` is ``normal`` or ``defect``."""

    kind: str
    source: str
    items: list[FrameItem]
    notes: list[str] = field(default_factory=list)
    #: the option that named the files (``--normal``, ``--defects``); None for grabbed frames
    arg: str | None = None

    def part(self, part: Part) -> list[FrameItem]:
        return [it for it in self.items if it.part == part]

    def counts(self) -> dict[str, int]:
        out = {"calibration": 0, "check": 0, "unused": 0}
        for it in self.items:
            out[it.part] += 1
        return out

    def summary(self) -> dict:
        return {"source": self.source, **self.counts(), "notes": list(self.notes)}


def normal_folder(root: str | Path, split: Split, arg: str = "--normal") -> FrameSet:
    """Every image under ``root`` (recursively) as a normal frame."""
    root = Path(root)
    if not root.is_dir():
        raise CalibrationInputError(f"{arg} {root}: {missing_folder(root, 'folder')}")
    ds = image_folder(root)  # a mask beside its image is no frame: left out there, with a note
    entries = sorted(ds.entries, key=lambda e: e.stem)
    if not entries:
        raise CalibrationInputError(f"{arg} {root}: no images in it (expected .png/.jpg/.bmp/.tif files)")
    # The key image_folder splits by (path below root): the same folder evaluated or trained on
    # with `format: folder` gives the same parts, and equal names in two sub-folders split
    # independently. Files directly in root keep the bare stem as their key.
    items = [FrameItem(e.stem, split.part(e.stem), _loader(e.image), e.image) for e in entries]
    return FrameSet("normal", str(root), items, notes=list(ds.notes), arg=arg)


def training_share_warning(provenance: dict, split: Split, normal: str) -> str | None:
    """What to say when the calibration part of ``--normal`` may hold the images the bundle's
    model was trained on (None: it cannot): a clgan / fuzzymask model trained on normal images
    of its sources' hash shares (``split`` of each source: ``train`` by default, or ``all``),
    against the calibration part's hash range. Its paths are not compared (a training root is
    recorded as the training machine saw it), so the warning says "if"."""
    data = (provenance.get("training_config") or {}).get("data") or {}
    if not isinstance(data, dict) or not isinstance(data.get("sources"), list):
        return None
    trained = {str(src.get("split", "train")) for src in data["sources"] if isinstance(src, dict)}
    desc = provenance.get("data")
    desc = "; ".join(desc) if isinstance(desc, list) else str(desc or data["sources"])
    if "all" in trained:
        return (f"{normal}: this model was trained on every image of its sources (split all: "
                f"{desc}); if this is one of those folders, every image calibrated or checked here "
                "is a training image and the thresholds come out too low for new frames: "
                "calibrate on normal images it never saw")
    fr = trained_split(provenance)
    t, v = fr.test, fr.val
    share = {"test": (0.0, t), "val": (t, t + v), "train": (t + v, 1.0)}
    lo = split.check_fraction
    hi = 1.0 if split.calib_fraction is None else min(1.0, lo + split.calib_fraction)

    def hits(a: float, b: float) -> list[str]:
        return [k for k in ("test", "val", "train") if k in trained and min(b, share[k][1]) > max(a, share[k][0])]

    def ranges(keys: list[str]) -> str:
        return ", ".join(f"'{k}' [{share[k][0]:g}, {share[k][1]:g})" for k in keys)
    said = []
    hit = hits(lo, hi)
    if hit:
        part = ("every image not held back" if split.calib_fraction is None
                else f"hash [{lo:g}, {hi:g})")
        advice = (f"pass --calib-fraction {t + v - lo:g} to stop short of it"
                  if hit == ["train"] and t + v > lo else
                  "choose --check-fraction / --calib-fraction clear of those shares")
        said.append(f"the calibration part is {part}, which includes the hash share(s) {ranges(hit)} "
                    f"this model was trained on; thresholds set on training images come out too low "
                    f"for new frames: {advice}")
    held = hits(0.0, lo)
    if held:
        said.append(f"the held-back check part (hash [0, {lo:g})) includes the hash share(s) "
                    f"{ranges(held)} this model was trained on: its false-alarm figure is then "
                    "measured on training images, lower than on new frames")
    if not said:
        return None
    return f"{normal}: if this is the model's training folder ({desc}): " + "; and ".join(said)


def _loader(path: Path) -> Callable[[], tuple[np.ndarray, None]]:
    return lambda: (read_image(path), None)


def live_frames(cfg, frames: int, split: Split) -> FrameSet:
    """``frames`` frames from the camera config's source, held in memory (N x frame size).

    Frames a source marks as defective (the synthetic strip's ``truth``) are skipped: they are
    not normal. The stem of a frame is ``<camera_id>/<frame_id>``.
    """
    from inspector.errors import FrameError
    from inspector.sources import make_source

    if frames < 1:
        raise CalibrationInputError(f"--frames: must be >= 1, got {frames}")
    src = make_source(cfg.source, cfg.camera_id, cfg.base_dir, cfg.source_file)
    items: list[FrameItem] = []
    skipped_defect = broken = 0
    with src:
        while len(items) + skipped_defect < frames:
            try:
                f = src.read()
            except FrameError as e:
                broken += 1
                if broken > max(10, frames):
                    raise
                log.warning("frame skipped: %s", e)
                continue
            if f is None:
                break
            if f.truth is not None and f.truth.any():
                skipped_defect += 1
                continue
            stem = f"{cfg.camera_id}/{f.frame_id:08d}"
            img = np.array(f.image, copy=True)
            items.append(FrameItem(stem, split.part(stem), (lambda im=img: (im, None))))
    if not items:
        raise CalibrationInputError(f"--config {cfg.source_file}: the source gave no normal frame")
    fs = FrameSet("normal", f"{cfg.source_file} ({src.describe()})", items)
    if skipped_defect:
        fs.notes.append(f"{skipped_defect} frame(s) with defects (source truth) skipped")
    if broken:
        fs.notes.append(f"{broken} broken frame(s) skipped")
    if len(items) + skipped_defect < frames:
        fs.notes.append(f"the source ended after {len(items) + skipped_defect} of {frames} frames")
    return fs


def defect_set(root: str | Path, fmt: str, split: Split, categories: list[str] | None = None) -> FrameSet:
    """Labelled defect images (``magnetic-tile`` without ``MT_Free`` unless named, or ``neu-seg``)."""
    root = Path(root)
    try:
        if fmt == "magnetic-tile":
            ds: Dataset = open_dataset(fmt, root, categories=categories) if categories else open_dataset(fmt, root)
            if not categories:
                ds = ds.filter(lambda e: e.category != "MT_Free")
        elif fmt == "neu-seg":
            ds = open_dataset(fmt, root, subsets=categories) if categories else open_dataset(fmt, root)
        else:
            raise CalibrationInputError(f"--format: {fmt!r}; expected magnetic-tile or neu-seg")
    except FileNotFoundError as e:
        raise CalibrationInputError(f"--defects {e}") from None
    if len(ds) == 0:
        raise CalibrationInputError(f"--defects {root}: no labelled images ({fmt} layout)")
    items = [FrameItem(f"{e.category}/{e.stem}", split.part(e.stem), _sample_loader(ds, i))
             for i, e in enumerate(ds.entries)]
    fs = FrameSet("defect", f"{root} ({fmt})", items, list(ds.notes), arg="--defects")
    return fs


def _sample_loader(ds: Dataset, i: int) -> Callable[[], tuple[np.ndarray, np.ndarray]]:
    def load() -> tuple[np.ndarray, np.ndarray]:
        s = ds.load(i)
        return s.image, s.mask
    return load


def iterate(items: list[FrameItem], what: str, every: int = 50, arg: str | None = None
            ) -> Iterator[tuple[FrameItem, np.ndarray, np.ndarray | None]]:
    """Load ``items`` one by one, logging progress. An unreadable file (not an image, cut short,
    not readable to this user) is bad input naming ``arg`` and the file, as in every other
    reader: skipping it calibrated on fewer frames than were given and wrote the result."""
    for n, it in enumerate(items, 1):
        try:
            image, truth = it.load()
        except CalibrationInputError:
            raise
        except ValueError as e:  # read_image names the file and what is wrong with it
            raise CalibrationInputError(f"{arg} {e}" if arg else str(e)) from None
        yield it, image, truth
        if n % every == 0:
            log.info("%s: %d/%d images", what, n, len(items))
