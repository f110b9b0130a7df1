"""Readers of labelled surface-image folders, shared by evaluation (runtime) and training (export/).

numpy and OpenCV only, so the runtime can evaluate a bundle on a line PC without torch, and the
training code reads the very same files the same way.

Three layouts (``FORMATS``):

* ``magnetic-tile``: ``MT_<Category>/Imgs/<stem>.jpg`` with ``<stem>.png`` masks beside them
  (255 defect, 0 background; anti-aliased in-between values are thresholded at >= 128).
  ``MT_Free`` holds the defect-free images. The class of a defect pixel is its folder's category.
* ``neu-seg``: ``images/<subset>/<stem>.jpg`` with ``annotations/<subset>/<stem>.png`` holding
  class indices (0 background, 1 inclusion, 2 patches, 3 scratches). Optionally
  ``regions/<subset>/<stem>.png``: a second label of the same image, the machine region of ARCD's
  region head (nonzero = region; may overlap defects). Where ``regions/`` exists every image must
  have one (:attr:`Sample.region`, :attr:`Dataset.has_regions`); the other layouts have none.
* ``folder``: every image under the root (recursively), all taken as defect-free.

Splits are deterministic and need no list file: a stem's split is fixed by the SHA-256 of the
stem (:func:`split_of`), so every reader, machine and run agrees on which images are held out,
and adding images to a folder never moves the old ones between splits. One exception: a NEU-Seg
root that has the data set's own ``test`` subset folder (``images/test/``) answers split ``test``
with that folder, whole, and the hash splits ``train`` / ``val`` with the other subsets only
(:data:`NEU_SEG_TEST_SUBSET`), so the official held-out images are scored as published and never
mixed into training or threshold choice.

Example::

    >>> split_of("exp1_num_10181") in ("train", "val", "test")
    True
    >>> ds = open_dataset("magnetic-tile", "../shared/data/magnetic_tile", split="test")  # doctest: +SKIP
    >>> s = ds.load(0); s.image.shape, s.mask.dtype, ds.classes[s.mask.max()]             # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Literal, Sequence

import cv2
import numpy as np

from inspector.fileio import missing_folder
from inspector.image_file import UnreadableImage, decode_file

log = logging.getLogger(__name__)

__all__ = ["Sample", "Entry", "Dataset", "SplitFractions", "split_of", "hash_fraction", "trained_split",
           "read_image", "open_dataset", "magnetic_tile", "neu_seg", "image_folder", "FORMATS",
           "MAGNETIC_TILE_CLASSES", "NEU_SEG_CLASSES", "SPLITS"]

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})
MAGNETIC_TILE_CLASSES = ("background", "Blowhole", "Break", "Crack", "Fray", "Uneven")
NEU_SEG_CLASSES = ("background", "inclusion", "patches", "scratches")
SPLITS = ("train", "val", "test", "all")


@dataclass(frozen=True)
class SplitFractions:
    """Shares of the hash range: [0, test) test, [test, test + val) val, the rest train."""

    test: float = 0.3
    val: float = 0.2

    def __post_init__(self) -> None:
        if not (0 <= self.test and 0 <= self.val and self.test + self.val <= 1):
            raise ValueError(f"split fractions test={self.test}, val={self.val} must be >= 0 and sum to <= 1")


DEFAULT_SPLIT = SplitFractions()


def hash_fraction(stem: str) -> float:
    """A stable number in [0, 1) from the file stem (first 8 bytes of its SHA-256)."""
    return int.from_bytes(hashlib.sha256(stem.encode("utf-8")).digest()[:8], "big") / 2.0 ** 64


def trained_split(provenance: dict) -> SplitFractions:
    """The hash-split fractions a bundle's model was trained with (``provenance.split_fractions``,
    or the clgan / fuzzymask training config of bundles exported before that key); the defaults
    for every other bundle. Scoring with other fractions than training used would score images
    the model was trained on."""
    sf = provenance.get("split_fractions")
    if sf is None:
        data = (provenance.get("training_config") or {}).get("data") or {}
        if isinstance(data, dict) and "split_test" in data:
            sf = {"test": data["split_test"], "val": data.get("split_val", DEFAULT_SPLIT.val)}
    if not sf:
        return DEFAULT_SPLIT
    return SplitFractions(float(sf["test"]), float(sf["val"]))


def split_of(stem: str, fractions: SplitFractions = DEFAULT_SPLIT) -> str:
    h = hash_fraction(stem)
    if h < fractions.test:
        return "test"
    if h < fractions.test + fractions.val:
        return "val"
    return "train"


def read_image(path: Path, color: Literal["keep", "gray", "rgb"] = "keep") -> np.ndarray:
    """uint8 HxW (grey) or HxWx3 (RGB order). ``keep`` returns grey files grey and colour files
    RGB; JPEGs that are colour-coded but grey in content stay 3-channel (the model adapter
    converts to its own channel count, as it does for camera frames)."""
    flag = {"keep": cv2.IMREAD_UNCHANGED, "gray": cv2.IMREAD_GRAYSCALE, "rgb": cv2.IMREAD_COLOR}[color]
    try:
        img = decode_file(path, flag)
    except UnreadableImage as e:
        raise ValueError(f"{path}: cannot read the image ({e})") from None
    if img.dtype != np.uint8:
        if img.dtype == np.uint16:  # 16-bit scans: keep the top 8 bits
            img = (img >> 8).astype(np.uint8)
        else:
            raise ValueError(f"{path}: pixel type {img.dtype}, expected 8- or 16-bit")
    if img.ndim == 3:
        if img.shape[2] == 4:
            img = img[:, :, :3]
        img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    return img


@dataclass(frozen=True)
class Entry:
    """One image of a data set, not yet loaded."""

    image: Path
    mask: Path | None  # None: defect-free by construction (no mask file)
    stem: str
    category: str  # MT_Crack, training, ... (the folder the image came from)
    split: str
    #: class index given to every mask pixel >= 128 (binary masks), or None: the mask file holds
    #: class indices already
    binary_class: int | None = None
    #: the image's region label (neu-seg ``regions/<subset>/<stem>.png``), None: no region labels
    region: Path | None = None


@dataclass
class Sample:
    """A loaded image with its class-index mask (0 = background), same height and width, and
    where the data set has region labels its region mask (HxW uint8, 1 = region, 0 = not)."""

    image: np.ndarray
    mask: np.ndarray
    entry: Entry
    region: np.ndarray | None = None

    @property
    def defective(self) -> bool:
        return bool(self.mask.any())

    @property
    def name(self) -> str:
        return f"{self.entry.category}/{self.entry.stem}"


@dataclass
class Dataset:
    """A list of entries plus how to load them. ``classes[0]`` is always ``background``."""

    format: str
    root: Path
    classes: list[str]
    entries: list[Entry]
    split: str = "all"
    color: Literal["keep", "gray", "rgb"] = "keep"
    notes: list[str] = field(default_factory=list)
    #: how ``split`` was taken: a hash share of the file stems, or a folder of its own (NEU-Seg's
    #: ``images/test/``), which no training run with the hash splits has read
    split_by: Literal["hash", "folder"] = "hash"

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def has_regions(self) -> bool:
        """Whether every image has a region label (a data set with ``regions/``). Derived from
        the entries, so subsets (:meth:`filter`) and unions built from them stay right."""
        return bool(self.entries) and all(e.region is not None for e in self.entries)

    def load(self, i: int) -> Sample:
        e = self.entries[i]
        img = read_image(e.image, self.color)
        h, w = img.shape[:2]
        if e.mask is None:
            mask = np.zeros((h, w), np.uint8)
        else:
            raw = _read_label(e.mask)
            if raw is None:
                raise ValueError(f"{e.mask}: cannot read the mask of {e.image.name}")
            if raw.shape != (h, w):
                raise ValueError(f"{e.mask}: mask is {raw.shape[1]}x{raw.shape[0]} but its image "
                                 f"{e.image.name} is {w}x{h}")
            if e.binary_class is not None:
                mask = np.where(raw >= 128, np.uint8(e.binary_class), np.uint8(0))
            else:
                if raw.max() >= len(self.classes):
                    raise ValueError(f"{e.mask}: class index {int(raw.max())} but the {self.format} "
                                     f"layout has {len(self.classes)} classes {self.classes}")
                mask = raw
        region = None if e.region is None else _read_region(e.region, e.image, h, w)
        return Sample(img, mask, e, region)

    def __iter__(self) -> Iterator[Sample]:
        for i in range(len(self)):
            yield self.load(i)

    def filter(self, keep: Callable[[Entry], bool]) -> "Dataset":
        return Dataset(self.format, self.root, self.classes, [e for e in self.entries if keep(e)],
                       self.split, self.color, list(self.notes), self.split_by)

    def summary(self) -> dict:
        cats: dict[str, int] = {}
        for e in self.entries:
            cats[e.category] = cats.get(e.category, 0) + 1
        return {"format": self.format, "root": str(self.root), "split": self.split,
                "images": len(self.entries), "by_category": cats}


def _read_label(path: Path) -> np.ndarray | None:
    """A label PNG as one channel of its own values (None: unreadable). 16-bit files keep their
    values: read as grey, OpenCV would divide them by 256 and turn a 0/1 or class-index label
    into zeros without a word. A 16-bit value above 255 is refused naming the file."""
    raw = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if raw is None:
        return None
    if raw.ndim == 3:
        raw = raw[:, :, 0] if raw.shape[2] in (1, 2) else cv2.cvtColor(raw[:, :, :3], cv2.COLOR_BGR2GRAY)
    if raw.dtype != np.uint8:
        if raw.dtype != np.uint16 or int(raw.max(initial=0)) > 255:
            raise ValueError(f"{path}: {raw.dtype} label with values up to {raw.max()}; labels "
                             f"are class indices or 0/1 (8-bit, or 16-bit below 256)")
        raw = raw.astype(np.uint8)
    return raw


def _read_region(path: Path, image: Path, h: int, w: int) -> np.ndarray:
    """The region label ``path`` of ``image`` (h x w) as uint8 0/1: any nonzero grey is region
    (a 3-channel PNG is read as grey, so colour-coded labels work too)."""
    raw = _read_label(path)
    if raw is None:
        what = "missing" if not path.is_file() else "unreadable (truncated or not an image)"
        raise ValueError(f"{path}: cannot read the region label of {image.name} ({what})")
    if raw.shape != (h, w):
        raise ValueError(f"{path}: region label is {raw.shape[1]}x{raw.shape[0]} but its image "
                         f"{image.name} is {w}x{h}")
    return (raw > 0).astype(np.uint8)


def _images_in(folder: Path, recursive: bool = False) -> list[Path]:
    it = folder.rglob("*") if recursive else folder.glob("*")
    return sorted(p for p in it if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def _in_split(stem: str, split: str, fractions: SplitFractions) -> tuple[bool, str]:
    s = split_of(stem, fractions)
    return (split == "all" or s == split), s


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")


def magnetic_tile(root: str | Path, split: str = "all", categories: Sequence[str] | None = None,
                  fractions: SplitFractions = DEFAULT_SPLIT, strict: bool = True) -> Dataset:
    """The magnetic-tile layout (``MT_*/Imgs``). ``categories`` limits the folders, e.g.
    ``["MT_Free"]``. Folders beyond the five known defect kinds get classes of their own,
    appended in name order, so the known class ids never change. ``strict`` (default): a defect
    image without its mask is an error naming it (a score must not quietly leave images out);
    ``strict=False`` skips it, naming it in a warning and the notes. MT_Free needs no masks."""
    root = Path(root)
    _check_split(split)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: {missing_folder(root, 'magnetic-tile root')} (expected "
                                "MT_*/Imgs/ folders)")
    folders = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("MT_")
                     and (p / "Imgs").is_dir())
    if not folders:
        raise FileNotFoundError(f"{root}: no MT_<Category>/Imgs/ folders (magnetic-tile layout)")
    classes = list(MAGNETIC_TILE_CLASSES)
    for f in folders:
        cat = f.name[3:]
        if cat != "Free" and cat not in classes:
            classes.append(cat)
    if categories is not None:
        unknown = sorted(set(categories) - {f.name for f in folders})
        if unknown:
            raise FileNotFoundError(f"{root}: no folder(s) {unknown} (has {[f.name for f in folders]})")
        folders = [f for f in folders if f.name in set(categories)]
    entries, missing = [], []
    for f in folders:
        cat = f.name[3:]
        cls = 0 if cat == "Free" else classes.index(cat)
        for img in _images_in(f / "Imgs"):
            if img.suffix.lower() == ".png":
                continue  # the masks share the folder with the .jpg images
            ok, s = _in_split(img.stem, split, fractions)
            if not ok:
                continue
            mask = img.with_suffix(".png")
            if not mask.is_file():
                if cat != "Free":
                    if strict:
                        raise FileNotFoundError(f"{img}: no mask {mask.name} beside it")
                    missing.append(f"{f.name}/Imgs/{img.name}")
                    continue  # a defect image without its mask cannot be scored
                mask = None
            entries.append(Entry(img, mask, img.stem, f.name, s, binary_class=cls))
    ds = Dataset("magnetic-tile", root, classes, entries, split)
    if missing:
        named = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        ds.notes.append(f"{len(missing)} defect image(s) without a mask skipped: {named}")
        log.warning("%s: %d defect image(s) without a .png mask skipped: %s", root, len(missing), named)
    return ds


#: NEU-Seg's own held-out subset folder (``images/test/``, ``annotations/test/``).
NEU_SEG_TEST_SUBSET = "test"


def neu_seg(root: str | Path, split: str = "all", subsets: Sequence[str] | None = None,
            fractions: SplitFractions = DEFAULT_SPLIT, strict: bool = True,
            official_test: bool = True) -> Dataset:
    """The NEU-Seg layout (``images/<subset>/*.jpg``, ``annotations/<subset>/*.png``). All
    subsets present are read unless ``subsets`` names some (e.g. ``["training"]``).
    ``strict`` (default): an image without its annotation is an error naming both files (a score
    or a training set must not quietly leave images out); ``strict=False`` skips such images,
    naming them in a warning and in the data set's notes.

    Where the root has the data set's own ``test`` subset and ``subsets`` is not given, split
    ``test`` is that whole folder (not a hash share of every folder, which would mix training
    images into the score) and ``train`` / ``val`` are hash shares of the other subsets.
    ``official_test=False`` never reads that folder (training: its hash ``test`` share of the
    training folder is training data, the official test images are not)."""
    root = Path(root)
    _check_split(split)
    img_root, ann_root, reg_root = root / "images", root / "annotations", root / "regions"
    # regions/ is optional for a data set; where it exists it labels every image (a partial
    # labelling would score the region on a silently chosen subset)
    with_regions = reg_root.is_dir()
    if not root.is_dir():
        # the usual case: a relative ../shared/data/... given from another working directory
        rel = "" if root.is_absolute() else f"; a relative path is taken from {Path.cwd()}"
        raise FileNotFoundError(f"{root}: {missing_folder(root, 'NEU-Seg root')} (expected images/ and annotations/ "
                                f"folders in it{rel})")
    if not img_root.is_dir() or not ann_root.is_dir():
        raise FileNotFoundError(f"{root}: expected images/ and annotations/ folders (NEU-Seg layout)")
    subs = sorted(p.name for p in img_root.iterdir() if p.is_dir())
    if subsets is not None:
        unknown = sorted(set(subsets) - set(subs))
        if unknown:
            raise FileNotFoundError(f"{img_root}: no subset folder(s) {unknown} (has {subs})")
        subs = [s for s in subs if s in set(subsets)]
    whole_test = False
    if subsets is None and NEU_SEG_TEST_SUBSET in subs:
        if not official_test:
            subs = [s for s in subs if s != NEU_SEG_TEST_SUBSET]
        elif split == "test":
            subs, whole_test = [NEU_SEG_TEST_SUBSET], True
            log.info("%s: split 'test' is the data set's own %s/ folder, whole", root,
                     img_root / NEU_SEG_TEST_SUBSET)
        elif split != "all":
            subs = [s for s in subs if s != NEU_SEG_TEST_SUBSET]
    entries, missing = [], []
    for sub in subs:
        for img in _images_in(img_root / sub):
            ok, s = (True, "test") if whole_test else _in_split(img.stem, split, fractions)
            if not ok:
                continue
            ann = ann_root / sub / f"{img.stem}.png"
            if not ann.is_file():
                if strict:
                    raise FileNotFoundError(f"{img}: no annotation {ann}")
                missing.append(img.name)
                continue
            region = None
            if with_regions:
                region = reg_root / sub / f"{img.stem}.png"
                if not region.is_file():
                    # a ValueError like the readers' unreadable-label errors, found at opening
                    # rather than after the model has run over the images before it
                    raise ValueError(f"{region}: missing: the region label of {img} ({reg_root} "
                                     "exists, so every image needs its region PNG)")
            entries.append(Entry(img, ann, img.stem, sub, s, binary_class=None, region=region))
    ds = Dataset("neu-seg", root, list(NEU_SEG_CLASSES), entries, split,
                 split_by="folder" if whole_test else "hash")
    if missing:
        named = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        ds.notes.append(f"{len(missing)} image(s) without annotation skipped: {named}")
        log.warning("%s: %d image(s) without an annotation skipped: %s", root, len(missing), named)
    return ds


def image_folder(root: str | Path, split: str = "all",
                 fractions: SplitFractions = DEFAULT_SPLIT) -> Dataset:
    """Every image under ``root`` (recursively), all defect-free. The stem used for the split is
    the path relative to the root, so equal file names in two sub-folders split independently."""
    root = Path(root)
    _check_split(split)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: {missing_folder(root, 'image folder')}")
    from inspector.sources.replay import without_mask_twins

    entries = []
    images, twins = without_mask_twins(_images_in(root, recursive=True))
    for img in images:
        rel = img.relative_to(root).with_suffix("").as_posix()
        ok, s = _in_split(rel, split, fractions)
        if ok:
            cat = img.parent.relative_to(root).as_posix() or "."
            entries.append(Entry(img, None, rel, cat, s, binary_class=0))
    entries.sort(key=lambda e: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", e.stem)])
    ds = Dataset("folder", root, ["background", "defect"], entries, split)
    if twins:
        ds.notes.append(f"{twins} .png file(s) beside a same-name image taken as masks and skipped")
        log.warning("%s: %s", root, ds.notes[-1])
    return ds


FORMATS: dict[str, Callable[..., Dataset]] = {
    "magnetic-tile": magnetic_tile,
    "neu-seg": neu_seg,
    "folder": image_folder,
}


def open_dataset(fmt: str, root: str | Path, split: str = "all",
                 fractions: SplitFractions = DEFAULT_SPLIT, **kw) -> Dataset:
    """Open ``root`` in layout ``fmt`` (one of :data:`FORMATS`) restricted to ``split``."""
    try:
        reader = FORMATS[fmt]
    except KeyError:
        raise ValueError(f"unknown data format {fmt!r}; expected one of {', '.join(FORMATS)}") from None
    return reader(root, split=split, fractions=fractions, **kw)


def defect_free_windows(mask: np.ndarray, size: int, stride: int = 8) -> np.ndarray:
    """Top-left corners (K x 2, y/x) of ``size`` x ``size`` windows on a ``stride`` grid whose
    mask is background everywhere: where a reconstruction model may take normal training crops
    from images that also show defects (NEU-Seg has no defect-free image)."""
    h, w = mask.shape
    if h < size or w < size:
        return np.zeros((0, 2), np.int64)
    ii = cv2.integral((mask > 0).astype(np.uint8), sdepth=cv2.CV_32S)
    ys = np.arange(0, h - size + 1, stride)
    xs = np.arange(0, w - size + 1, stride)
    yy, xx = np.meshgrid(ys, xs, indexing="ij")
    s = ii[yy + size, xx + size] - ii[yy, xx + size] - ii[yy + size, xx] + ii[yy, xx]
    keep = s == 0
    return np.stack([yy[keep], xx[keep]], axis=1).astype(np.int64)
