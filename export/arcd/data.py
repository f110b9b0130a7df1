"""Training data for ARCD: tiles cut from whole frames, for both stages.

Two layers, so that new data sets only add a frame provider:

* a **frame provider** returns whole frames (:class:`LabeledFrame`: uint8 image, optional class
  mask, optional valid-region mask) drawn with a ``numpy.random.Generator``. The synthetic strip
  (:class:`SyntheticStripFrames`) is one; readers of NEU-Seg or magnetic-tile folders are meant to
  be others (they implement :class:`FrameProvider` and register in :data:`DATA_SOURCES`).
* **datasets** cut model-size tiles from provided frames:
  :class:`SimulatedAnomalyDataset` (stage 1: a normal tile, its simulated-anomaly version and the
  anomaly mask) and :class:`SegmentationTileDataset` (stage 2: a tile and its class mask, plus
  its region mask where the provider's frames carry region labels, ``has_regions``).

Sample ``i`` of a dataset is drawn from ``numpy.random.default_rng([seed, i])``, so any sample can
be regenerated on its own: training resumes mid-stage with the same data, and DataLoader workers
need no shared random state.

Example::

    >>> ds = SyntheticDefectDataset(tile=(64, 64), length=4, frame_size=(64, 256), seed=1)
    >>> s = ds[0]
    >>> tuple(s["image"].shape), tuple(s["mask"].shape), s["mask"].dtype
    ((1, 64, 64), (64, 64), torch.int64)
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Callable, Literal, Protocol, Sequence, Union

import cv2

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch.utils.data import Dataset

from inspector.errors import InspectorError
from inspector.sources.synthetic import CLASS_NAMES, StripRenderer

from export.arcd.simulation import AnomalySimulator, SimulationConfig, square_pad_resize

if TYPE_CHECKING:
    from inspector.evaluation.datasets import Dataset as EvalDataset

log = logging.getLogger(__name__)

__all__ = [
    "TrainingDataError",
    "LabeledFrame",
    "FrameProvider",
    "SyntheticStripFrames",
    "SimulatedAnomalyDataset",
    "SegmentationTileDataset",
    "SyntheticNormalDataset",
    "SyntheticDefectDataset",
    "SyntheticDataConfig",
    "FolderDataConfig",
    "DatasetFrames",
    "DefectFreePatches",
    "sample_labelled",
    "TrainingData",
    "DATA_SOURCES",
    "build_data",
    "to_tensor",
    "to_float01",
    "collate",
]


#: the value padding gets in a region label (:func:`cut_tile`): not a label, ignored by the loss
REGION_IGNORE = 255


class TrainingDataError(InspectorError, ValueError):
    """Training data that cannot be used: an unreadable image, a mask of another size, an empty
    split, no defect-free window. The message names the file or folder; ``key`` is the dotted
    config key to change, where one is to blame (the trainer puts it beside the config file).

    An :class:`InspectorError` so that ``inspector train`` reports it as one line (exit 2), and a
    ValueError so that callers which caught the readers' ValueError still catch it.
    """

    def __init__(self, message: str, key: str | None = None):
        super().__init__(message)
        self.key = key


@dataclass
class LabeledFrame:
    """A whole frame. ``image``: HxW or HxWxC uint8; ``truth``: HxW uint8 class ids (None for
    unlabeled normal data); ``valid``: HxW bool region that holds real image content (None = all);
    ``region``: HxW uint8 machine-region label, 1 region / 0 not (None: the data has none), cut,
    flipped, resized and padded exactly like ``truth`` (its padding is 255, ignored)."""

    image: np.ndarray
    truth: np.ndarray | None = None
    valid: np.ndarray | None = None
    region: np.ndarray | None = None


class FrameProvider(Protocol):
    """Anything that hands out frames: procedural (endless) or a folder of files."""

    channels: int
    class_names: tuple[str, ...]

    def sample(self, rng: np.random.Generator) -> LabeledFrame:
        """One frame, chosen with ``rng``."""
        ...

    def describe(self) -> str:
        """One line naming the data, for logs and bundle provenance."""
        ...


# ---------------------------------------------------------------------------------------------
# The synthetic strip
# ---------------------------------------------------------------------------------------------

class SyntheticStripFrames:
    """Frames of the procedural strip (``inspector.sources.synthetic``) with their truth masks.

    Several renderer seeds give several rolling-grain patterns (so a model does not learn one
    strip by heart); ``contrasts`` varies how strongly defects stand out, drawn per frame.
    Renderers are built lazily, so a provider is cheap to pass to DataLoader workers.
    """

    def __init__(self, width: int = 1600, height: int = 256, renderer_seeds: Sequence[int] = (0,),
                 contrasts: Sequence[float] = (1.0,), defect_rate: float = 0.5,
                 max_defects: int = 2, channels: int = 1,
                 classes: Sequence[str] = CLASS_NAMES[1:]):
        if not renderer_seeds:
            raise ValueError("SyntheticStripFrames needs at least one renderer seed")
        self.width, self.height = width, height
        self.renderer_seeds = tuple(int(s) for s in renderer_seeds)
        self.contrasts = tuple(float(c) for c in contrasts) or (1.0,)
        self.defect_rate = defect_rate
        self.max_defects = max_defects
        self.channels = channels
        self.defect_classes = tuple(classes)
        self.class_names = CLASS_NAMES
        self._renderers: dict[int, StripRenderer] = {}

    def _renderer(self, seed: int) -> StripRenderer:
        r = self._renderers.get(seed)
        if r is None:
            r = StripRenderer(self.width, self.height, seed=seed, classes=self.defect_classes,
                              max_defects=self.max_defects)
            self._renderers[seed] = r
        return r

    def sample(self, rng: np.random.Generator, defect_rate: float | None = None) -> LabeledFrame:
        r = self._renderer(self.renderer_seeds[int(rng.integers(len(self.renderer_seeds)))])
        # contrast only scales the painted defect's intensity change; set per frame
        r.contrast = self.contrasts[int(rng.integers(len(self.contrasts)))]
        img, truth = r.render(rng, self.defect_rate if defect_rate is None else defect_rate)
        if self.channels == 3:
            img = np.repeat(img[:, :, None], 3, axis=2)
        return LabeledFrame(image=img, truth=truth)

    def normal(self, rng: np.random.Generator) -> np.ndarray:
        """A defect-free frame image (texture source for the simulator's normal crops)."""
        return self.sample(rng, defect_rate=0.0).image

    def describe(self) -> str:
        return (f"synthetic strip {self.height}x{self.width}, renderer seeds "
                f"{list(self.renderer_seeds)}, contrasts {list(self.contrasts)}, defect rate "
                f"{self.defect_rate:g}, up to {self.max_defects} defects/frame, classes "
                f"{list(self.defect_classes)}")


# ---------------------------------------------------------------------------------------------
# Tiles
# ---------------------------------------------------------------------------------------------

def _pad_to(a: np.ndarray, h: int, w: int, value: int | None = None) -> np.ndarray:
    ph, pw = max(0, h - a.shape[0]), max(0, w - a.shape[1])
    if not ph and not pw:
        return a
    pad = ((0, ph), (0, pw)) + ((0, 0),) * (a.ndim - 2)
    if value is None:
        return np.pad(a, pad, mode="reflect")
    return np.pad(a, pad, mode="constant", constant_values=value)


def crop_box(shape: tuple[int, int], tile: tuple[int, int], rng: np.random.Generator,
             focus: np.ndarray | None = None, edge_prob: float = 0.0) -> tuple[int, int]:
    """Top-left corner of a ``tile`` crop; centred near a random ``focus`` pixel when given.

    Otherwise the corner is uniform, except that with probability ``edge_prob`` per axis the
    crop is pushed against a frame border. Why: the runtime's tiling always puts a tile border on
    the frame border (first and last tile), where the strip is darkest and nothing lies beyond;
    uniform crops almost never show that, and a model trained on them took the dark frame edge
    for a 'patches' defect.
    """
    h, w = shape
    th, tw = tile
    if focus is not None and focus.any():
        ys, xs = np.nonzero(focus)
        j = int(rng.integers(len(ys)))
        # jitter so the defect is not always at the tile centre
        cy = int(ys[j]) + int(rng.integers(-th // 3, th // 3 + 1))
        cx = int(xs[j]) + int(rng.integers(-tw // 3, tw // 3 + 1))
        y = int(np.clip(cy - th // 2, 0, max(0, h - th)))
        x = int(np.clip(cx - tw // 2, 0, max(0, w - tw)))
        return y, x
    y = int(rng.integers(0, max(0, h - th) + 1))
    x = int(rng.integers(0, max(0, w - tw) + 1))
    if edge_prob > 0:
        if rng.random() < edge_prob:
            y = 0 if rng.random() < 0.5 else max(0, h - th)
        if rng.random() < edge_prob:
            x = 0 if rng.random() < 0.5 else max(0, w - tw)
    return y, x


def cut_tile(frame: LabeledFrame, tile: tuple[int, int], rng: np.random.Generator,
             focus_prob: float = 0.0, edge_prob: float = 0.0) -> LabeledFrame:
    """A ``tile``-size crop of ``frame`` (reflect-padded when the frame is smaller); with
    probability ``focus_prob`` the crop is placed around a labelled defect pixel, else see
    :func:`crop_box` for ``edge_prob``."""
    th, tw = tile
    img = _pad_to(frame.image, th, tw)
    truth = None if frame.truth is None else _pad_to(frame.truth, th, tw, value=0)
    # padding is not a label: 255 (the stage-2 loss's ignore index), never "not region"
    region = None if frame.region is None else _pad_to(frame.region, th, tw, value=REGION_IGNORE)
    valid = frame.valid
    if valid is None and img.shape[:2] != frame.image.shape[:2]:
        valid = np.ones(frame.image.shape[:2], bool)
    if valid is not None:
        valid = _pad_to(valid.astype(np.uint8), th, tw, value=0).astype(bool)
    focus = None
    if truth is not None and focus_prob > 0 and rng.random() < focus_prob:
        focus = truth > 0
    y, x = crop_box(img.shape[:2], tile, rng, focus, edge_prob)
    sl = (slice(y, y + th), slice(x, x + tw))
    return LabeledFrame(image=img[sl], truth=None if truth is None else truth[sl],
                        valid=None if valid is None else valid[sl],
                        region=None if region is None else region[sl])


def to_tensor(image01: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """HxW or HxWxC float [0, 1] -> normalised CxHxW float32 tensor."""
    a = image01 if image01.ndim == 3 else image01[:, :, None]
    c = a.shape[2]
    m = np.broadcast_to(np.asarray(mean, np.float32), (c,))
    s = np.broadcast_to(np.asarray(std, np.float32), (c,))
    a = (a.astype(np.float32) - m) / s
    return torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1)))


def to_float01(image: np.ndarray, channels: int) -> np.ndarray:
    """uint8 (or float [0, 1]) HxW / HxWxC -> float32 HxWxC' in [0, 1] with the model's channels
    (BT.601 luma for RGB -> grey, repetition for grey -> RGB, as the runtime adapter does)."""
    a = image.astype(np.float32) / 255.0 if image.dtype == np.uint8 else image.astype(np.float32)
    if a.ndim == 2:
        a = a[:, :, None]
    if a.shape[2] == channels:
        return a
    if channels == 1:
        return (a[:, :, 0] * 0.299 + a[:, :, 1] * 0.587 + a[:, :, 2] * 0.114)[:, :, None]
    return np.repeat(a[:, :, :1], channels, axis=2)


def _flip(rng: np.random.Generator, hflip: bool, vflip: bool, *arrays: np.ndarray | None
          ) -> list[np.ndarray | None]:
    fh = hflip and rng.random() < 0.5
    fv = vflip and rng.random() < 0.5
    out = []
    for a in arrays:
        if a is not None:
            if fh:
                a = a[:, ::-1]
            if fv:
                a = a[::-1]
            a = np.ascontiguousarray(a)
        out.append(a)
    return out


class SimulatedAnomalyDataset(Dataset):
    """Stage 1: normal tiles with simulated anomalies (spec §2.2, §2.5).

    Item: ``image`` (simulated anomalous tile, CxHxW normalised), ``target`` (the clean tile),
    ``anomaly_mask`` (1xHxW 0/1). ``provider`` must hand out normal frames; the simulator may crop
    textures from further normal frames of the same provider.
    """

    def __init__(self, provider: FrameProvider, tile: tuple[int, int], simulator: AnomalySimulator,
                 length: int, seed: int = 0, mean: Sequence[float] = (0.0,),
                 std: Sequence[float] = (1.0,), hflip: bool = True, vflip: bool = False,
                 edge_prob: float = 0.0):
        self.provider = provider
        self.tile = tuple(tile)
        self.simulator = simulator
        self.edge_prob = edge_prob
        self.length = length
        self.seed = seed
        self.mean, self.std = list(mean), list(std)
        self.hflip, self.vflip = hflip, vflip

    def __len__(self) -> int:
        return self.length

    def _normal_image(self, rng: np.random.Generator) -> np.ndarray:
        normal = getattr(self.provider, "normal", None)
        return normal(rng) if normal is not None else self.provider.sample(rng).image

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not 0 <= i < self.length:
            raise IndexError(i)
        return self.sample(i)

    def sample(self, i: int) -> dict[str, torch.Tensor]:
        """Sample ``i`` for any ``i >= 0``; indices past ``len`` are held-out draws."""
        rng = np.random.default_rng([self.seed, 1, int(i)])
        if getattr(self.provider, "normal", None) is not None:
            frame = LabeledFrame(image=self._normal_image(rng))
        else:
            # whole frames (a folder of normal images): keep their valid region, so a square
            # pad's zeros get no simulated anomaly (the same draws as taking the image alone)
            frame = self.provider.sample(rng)
            frame = LabeledFrame(image=frame.image, valid=frame.valid)
        t = cut_tile(frame, self.tile, rng, edge_prob=self.edge_prob)
        img01 = to_float01(t.image, self.provider.channels)
        img01, valid = _flip(rng, self.hflip, self.vflip, img01, t.valid)
        texture_source: Callable[[np.random.Generator], np.ndarray] = self._normal_image
        sim = self.simulator(img01, rng, valid=valid, texture_source=texture_source)
        return {
            "image": to_tensor(sim.image, self.mean, self.std),
            "target": to_tensor(img01, self.mean, self.std),
            "anomaly_mask": torch.from_numpy(sim.mask[None].astype(np.float32)),
        }


class SegmentationTileDataset(Dataset):
    """Stage 2: labelled tiles. Item: ``image`` (CxHxW normalised), ``mask`` (HxW int64 class ids;
    ``ignore_index`` outside the valid region when the provider gives one), and where the
    provider's ``has_regions`` is true ``region`` (HxW int64, 1 machine region / 0 not,
    ``ignore_index`` on padding, outside the valid region and on frames without a region label)."""

    def __init__(self, provider: FrameProvider, tile: tuple[int, int], length: int, seed: int = 0,
                 mean: Sequence[float] = (0.0,), std: Sequence[float] = (1.0,),
                 focus_prob: float = 0.5, hflip: bool = True, vflip: bool = False,
                 ignore_index: int = 255, crops_per_frame: int = 1, edge_prob: float = 0.0):
        self.provider = provider
        self.tile = tuple(tile)
        self.length = length
        self.seed = seed
        self.mean, self.std = list(mean), list(std)
        self.focus_prob = focus_prob
        self.hflip, self.vflip = hflip, vflip
        self.ignore_index = ignore_index
        self.crops_per_frame = crops_per_frame
        self.edge_prob = edge_prob
        #: items carry "region": decided once for the provider, so every item of a batch has the
        #: same keys and ``collate`` can stack them
        self.has_regions = bool(getattr(provider, "has_regions", False))
        self._frame: tuple[int, LabeledFrame] | None = None

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not 0 <= i < self.length:
            raise IndexError(i)
        return self.sample(i)

    def _frame_for(self, i: int) -> LabeledFrame:
        # samples i with the same i // crops_per_frame share a frame; it is drawn from its own
        # seed, so the result does not depend on which sample asked first
        j = int(i) // self.crops_per_frame
        if self._frame is None or self._frame[0] != j:
            self._frame = (j, self.provider.sample(np.random.default_rng([self.seed, 3, j])))
        return self._frame[1]

    def sample(self, i: int) -> dict[str, torch.Tensor]:
        """Sample ``i`` for any ``i >= 0``; indices past ``len`` are held-out draws."""
        rng = np.random.default_rng([self.seed, 2, int(i)])
        if self.crops_per_frame > 1:
            frame = self._frame_for(i)
        else:
            frame = self.provider.sample(rng)
        if frame.truth is None:
            raise ValueError(f"{self.provider.describe()}: stage-2 frames need a truth mask")
        t = cut_tile(frame, self.tile, rng, self.focus_prob, self.edge_prob)
        img01 = to_float01(t.image, self.provider.channels)
        region_in = t.region if self.has_regions else None
        img01, truth, valid, region = _flip(rng, self.hflip, self.vflip, img01, t.truth, t.valid,
                                            region_in)
        mask = truth.astype(np.int64)
        if valid is not None:
            mask[~valid] = self.ignore_index
        item = {"image": to_tensor(img01, self.mean, self.std), "mask": torch.from_numpy(mask)}
        if self.has_regions:
            if region is None:
                # a frame of a source without region labels (generated pairs mixed into labelled
                # images that have them): nothing to learn about the region here
                reg = np.full(mask.shape, self.ignore_index, np.int64)
            else:
                reg = region.astype(np.int64)
                reg[reg == REGION_IGNORE] = self.ignore_index
                if valid is not None:
                    reg[~valid] = self.ignore_index
            item["region"] = torch.from_numpy(reg)
        return item


class SyntheticNormalDataset(SimulatedAnomalyDataset):
    """Stage 1 on the synthetic strip: defect-free frames (``defect_rate=0``) + simulation."""

    def __init__(self, tile: tuple[int, int] = (256, 256), length: int = 1000, seed: int = 0,
                 frame_size: tuple[int, int] = (256, 1600), renderer_seeds: Sequence[int] = (0,),
                 channels: int = 1, simulation: SimulationConfig | None = None,
                 mean: Sequence[float] = (0.0,), std: Sequence[float] = (1.0,), hflip: bool = True,
                 vflip: bool = False):
        provider = SyntheticStripFrames(width=frame_size[1], height=frame_size[0],
                                        renderer_seeds=renderer_seeds, defect_rate=0.0,
                                        channels=channels)
        super().__init__(provider, tile, AnomalySimulator(simulation), length, seed, mean, std,
                         hflip, vflip)


class SyntheticDefectDataset(SegmentationTileDataset):
    """Stage 2 on the synthetic strip: tiles with painted defects and their class masks."""

    def __init__(self, tile: tuple[int, int] = (256, 256), length: int = 1000, seed: int = 0,
                 frame_size: tuple[int, int] = (256, 1600), renderer_seeds: Sequence[int] = (0,),
                 contrasts: Sequence[float] = (1.0,), defect_rate: float = 0.9,
                 max_defects: int = 2, channels: int = 1, focus_prob: float = 0.5,
                 mean: Sequence[float] = (0.0,), std: Sequence[float] = (1.0,), hflip: bool = True,
                 vflip: bool = False, crops_per_frame: int = 1):
        provider = SyntheticStripFrames(width=frame_size[1], height=frame_size[0],
                                        renderer_seeds=renderer_seeds, contrasts=contrasts,
                                        defect_rate=defect_rate, max_defects=max_defects,
                                        channels=channels)
        super().__init__(provider, tile, length, seed, mean, std, focus_prob, hflip, vflip,
                         crops_per_frame=crops_per_frame)


def collate(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {k: torch.stack([it[k] for it in items]) for k in items[0]}


# ---------------------------------------------------------------------------------------------
# Config and the registry of data sources
# ---------------------------------------------------------------------------------------------

class SyntheticDataConfig(BaseModel):
    """``data:`` section for ``source: synthetic`` (the procedural strip)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    source: Literal["synthetic"] = "synthetic"
    frame_size: tuple[int, int] = Field((256, 1600), description="rendered frame H, W")
    renderer_seeds: list[int] = Field(default_factory=lambda: [0, 1, 2, 3])
    contrasts: list[float] = Field(default_factory=lambda: [0.7, 1.0, 1.3])
    defect_rate: float = Field(0.9, ge=0, le=1, description="stage-2 frames with defects")
    max_defects: int = Field(3, ge=1, le=16)
    focus_prob: float = Field(0.6, ge=0, le=1, description="stage-2 crops placed on a defect")
    #: training crop H, W (None = the model tile). The nets are fully convolutional; smaller
    #: crops put more defect pixels into the same compute, which short CPU schedules need.
    train_crop: tuple[int, int] | None = None
    #: stage-2 crops cut from one rendered frame before the next is rendered (rendering a
    #: 256x1600 frame costs about as much as a small net's step on a few crops)
    crops_per_frame: int = Field(1, ge=1)
    #: per axis, probability that a crop touches the frame border (see crop_box)
    edge_prob: float = Field(0.25, ge=0, le=1)
    hflip: bool = True
    vflip: bool = True
    # held-out frames: calibration (threshold choice) and validation (reported IoU)
    val_frames: int = Field(48, ge=1)
    val_renderer_seeds: list[int] = Field(default_factory=lambda: [100, 101])
    calib_frames: int = Field(32, ge=0)
    calib_renderer_seeds: list[int] = Field(default_factory=lambda: [200, 201])
    eval_contrast: float = Field(1.0, gt=0, description="contrast of held-out frames")
    eval_defect_rate: float = Field(0.5, ge=0, le=1, description="as the runtime demo's default")
    eval_max_defects: int = Field(2, ge=1, le=16)


# Data sources on labelled image folders (NEU-Seg, magnetic tile, plain normal folders) live in
# export/arcd/folders.py; they register themselves in DATA_SOURCES when imported.


@dataclass
class TrainingData:
    """What a data source gives the training loop."""

    stage1: SimulatedAnomalyDataset
    stage2: SegmentationTileDataset
    #: held-out labelled frames: choose thresholds on ``calib``, report IoU on ``val``
    calib: Callable[[], list[LabeledFrame]]
    val: Callable[[], list[LabeledFrame]]
    class_names: tuple[str, ...]
    description: str
    #: what stage 1 learns from, for metrics.json and the bundle's provenance (which normal
    #: source, and for defect-free windows: whose masks place them and how many images that is)
    stage1_info: dict = field(default_factory=dict)
    #: reads every file training will read, once, and returns figures for ``stage1_info``;
    #: raises :class:`TrainingDataError` on the first bad one. None: nothing to read (synthetic)
    check: Callable[[], dict] | None = None
    #: stage 2's frames carry machine-region labels (``stage2`` items have "region"; the
    #: ``calib`` / ``val`` frames have ``LabeledFrame.region`` where their data set has them).
    #: False: nothing could supervise a region head
    has_regions: bool = False
    #: how the model meets the ``calib`` / ``val`` frames. None: tiled, as the bundle tiles them.
    #: A :class:`SquarePad` (``data.square_pad``): those frames are the native images, with
    #: their native truth and region and no ``valid`` mask, and the model sees each one padded
    #: and resized by it, as the bundle's ``input.fit: square_pad`` does on the line (scoring
    #: the padded, resized squares instead measured a resolution the line never runs)
    square_fit: "SquarePad | None" = None
    #: ``description``'s parts: what stage 1 and stage 2 learn from as this config gives it, and
    #: ``description`` with those two replaced by :data:`STAGE1_SLOT` / :data:`STAGE2_SLOT`. A
    #: resumed run words its data with the checkpoint's record of them (:meth:`describe`): a
    #: copied stage-1 checkpoint, or a finished run resumed with another root, trained on other
    #: data than this config names
    stage1_text: str = ""
    stage2_text: str = ""
    template: str = ""
    #: images of the validation split left out of the scored frames, by category (magnetic-tile:
    #: the split's MT_Free images; ``inspector evaluate --split val`` scores them too)
    val_excluded: dict = field(default_factory=dict)

    def describe(self, stage1: str | None = None, stage2: str | None = None) -> str:
        """``description`` with stage 1's and stage 2's data worded as given (None: as this
        config gives them)."""
        if not self.template:
            return self.description
        return (self.template.replace(STAGE1_SLOT, self.stage1_text if stage1 is None else stage1)
                .replace(STAGE2_SLOT, self.stage2_text if stage2 is None else stage2))


#: placeholders of :attr:`TrainingData.template`
STAGE1_SLOT, STAGE2_SLOT = "\x00stage1\x00", "\x00stage2\x00"


def _build_synthetic(cfg: SyntheticDataConfig, *, tile: tuple[int, int], channels: int,
                     mean: Sequence[float], std: Sequence[float], simulation: SimulationConfig,
                     stage1_length: int, stage2_length: int, seed: int) -> TrainingData:
    h, w = cfg.frame_size
    normal = SyntheticStripFrames(w, h, cfg.renderer_seeds, cfg.contrasts, 0.0, cfg.max_defects,
                                  channels)
    defects = SyntheticStripFrames(w, h, cfg.renderer_seeds, cfg.contrasts, cfg.defect_rate,
                                   cfg.max_defects, channels)
    stage1 = SimulatedAnomalyDataset(normal, tile, AnomalySimulator(simulation), stage1_length,
                                     seed, mean, std, cfg.hflip, cfg.vflip, cfg.edge_prob)
    stage2 = SegmentationTileDataset(defects, tile, stage2_length, seed, mean, std,
                                     cfg.focus_prob, cfg.hflip, cfg.vflip,
                                     crops_per_frame=cfg.crops_per_frame, edge_prob=cfg.edge_prob)

    def held_out(seeds: list[int], n: int, salt: int) -> Callable[[], list[LabeledFrame]]:
        def frames() -> list[LabeledFrame]:
            p = SyntheticStripFrames(w, h, seeds, (cfg.eval_contrast,), cfg.eval_defect_rate,
                                     cfg.eval_max_defects, channels)
            rng = np.random.default_rng([seed, salt])
            return [p.sample(rng) for _ in range(n)]
        return frames

    s1 = ("stage 1 uses the same strip with defect rate 0 plus simulated anomalies" if stage1_length > 0
          else "no stage 1 (no R: the plain U-Net baseline)")
    template = (f"train: {STAGE2_SLOT}; {STAGE1_SLOT}; validation: {cfg.val_frames} frames, renderer "
                f"seeds {cfg.val_renderer_seeds}, contrast {cfg.eval_contrast:g}, defect rate "
                f"{cfg.eval_defect_rate:g}")
    s2 = defects.describe()
    desc = template.replace(STAGE2_SLOT, s2).replace(STAGE1_SLOT, s1)
    return TrainingData(stage1, stage2, held_out(cfg.calib_renderer_seeds, cfg.calib_frames, 7),
                        held_out(cfg.val_renderer_seeds, cfg.val_frames, 11), CLASS_NAMES, desc,
                        {"normal_source": "synthetic strip, defect rate 0", "mask_images": 0},
                        stage1_text=s1, stage2_text=s2, template=template)


DATA_SOURCES: dict[str, Callable[..., TrainingData]] = {"synthetic": _build_synthetic}


def build_data(cfg: DataConfig, **kwargs) -> TrainingData:
    """Datasets and held-out frames for ``cfg.source`` (see :data:`DATA_SOURCES`)."""
    try:
        builder = DATA_SOURCES[cfg.source]
    except KeyError:
        raise ValueError(f"data.source: unknown '{cfg.source}' (known: {sorted(DATA_SOURCES)})") from None
    return builder(cfg, **kwargs)


# ---------------------------------------------------------------------------------------------
# Labelled image folders: NEU-Seg, magnetic tile, plus plain folders of normal images
# ---------------------------------------------------------------------------------------------

class FolderDataConfig(BaseModel):
    """``data:`` section for real image folders (``source: neu-seg`` or ``magnetic-tile``).

    The folder is split by the SHA-256 of each file stem (``inspector.evaluation.datasets``), so
    training, the runtime's ``inspector evaluate`` and every machine agree on the held-out images.
    """

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    source: Literal["neu-seg", "magnetic-tile"]
    root: str = Field(..., description="data set root (NEU-Seg: images/ + annotations/)")
    #: hash splits trained on; 'val' is held out for the reported figures. The shared NEU-Seg
    #: training folder has its real test split kept elsewhere, so its hash 'test' share is
    #: training data by default (pass [train] to keep it out too). A root that also holds NEU-Seg's
    #: own images/test/ folder is fine: training never reads that folder.
    train_splits: list[Literal["train", "val", "test"]] = Field(default_factory=lambda: ["train", "test"])
    val_split: Literal["train", "val", "test"] = "val"
    #: thresholds are chosen on the first ``calib_images`` validation images (by hash order);
    #: 0 = use evaluation.default_threshold
    calib_images: int = Field(128, ge=0)
    #: cap on the validation images scored during training (0 = all); the full split is scored by
    #: ``inspector evaluate`` on the exported bundle
    val_images: int = Field(0, ge=0)
    #: share of the labelled training images stage 2 may use (thesis sampling rates 1/.8/.5/.3);
    #: a fixed permutation under ``label_seed``, so a smaller rate's images are a subset of a
    #: larger one's
    label_fraction: float = Field(1.0, gt=0, le=1)
    label_seed: int = 0
    #: where stage 1 gets normal images: square windows of labelled images whose mask is all
    #: background ('defect-free-regions'; NEU-Seg has no clean image), the MT_Free folder
    #: ('mt-free'), or every image under ``normal_root`` ('folder')
    normal_source: Literal["defect-free-regions", "mt-free", "folder"] = "defect-free-regions"
    normal_root: str | None = None
    #: with 'defect-free-regions': whose masks place stage 1's windows. 'all' (what every
    #: shipped result used): every training image's, whatever label_fraction says; the masks only
    #: keep the windows clear of defects, a stand-in for the defect-free strip a mill has in
    #: plenty, never a target. 'labelled': only the images stage 2 may use (label_fraction), for
    #: a protocol in which no mask outside the labelled subset is read at all.
    stage1_windows: Literal["all", "labelled"] = "all"
    #: side of the defect-free windows (stage 1 trains on crops of this size; the nets are fully
    #: convolutional). 200x200 NEU images rarely have a clean 128 window, but most have a 64 one.
    normal_patch: int = Field(64, ge=16)
    #: resize every image to H, W first (magnetic tiles vary in size); None keeps the file size
    frame_size: tuple[int, int] | None = None
    #: the thesis's pre-processing (spec §2.2): zero-pad each image to a square ('top': image at
    #: the top left; 'center': centred) and resize it to square_side; the padding is outside the
    #: valid region (no simulated anomaly, ignored by D's loss, not scored). The exported bundle then runs
    #: frames the same way (input.fit square_pad) instead of tiling them. 'none': off
    square_pad: Literal["none", "top", "center"] = "none"
    #: the square's side; None: model.tile's (the trainer fills it in)
    square_side: int | None = Field(None, ge=16)
    focus_prob: float = Field(0.5, ge=0, le=1)
    train_crop: tuple[int, int] | None = None
    crops_per_frame: int = Field(1, ge=1)
    edge_prob: float = Field(0.0, ge=0, le=1)
    hflip: bool = True
    vflip: bool = True
    #: generated pairs (``inspector augment ... sample``: NEU-Seg layout, same classes) mixed into
    #: stage 2: a share ``synthetic_ratio`` of the stage-2 frames is drawn from the first
    #: ``synthetic_limit`` pairs (0 = all) of this folder, the rest from the labelled images
    synthetic_root: str | None = None
    synthetic_ratio: float = Field(0.5, ge=0, le=1)
    synthetic_limit: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _check(self) -> "FolderDataConfig":
        if self.normal_source == "folder" and not self.normal_root:
            raise ValueError("normal_source 'folder' needs normal_root")
        if self.normal_source == "mt-free" and self.source != "magnetic-tile":
            raise ValueError("normal_source 'mt-free' is for source 'magnetic-tile'")
        if self.stage1_windows != "all" and self.normal_source != "defect-free-regions":
            # mt-free / folder images have no masks: nothing would be restricted
            raise ValueError(f"stage1_windows '{self.stage1_windows}' is for normal_source "
                             f"'defect-free-regions' (stage 1 reads no masks of '{self.normal_source}')")
        if self.synthetic_root and self.source != "neu-seg":
            raise ValueError("synthetic_root is for source 'neu-seg' (the generators write that layout)")
        if self.square_pad != "none" and self.frame_size is not None:
            raise ValueError("square_pad and frame_size both resize the images: set one of them")
        return self

    def fit(self) -> "tuple[int, int] | SquarePad | None":
        """How :class:`DatasetFrames` sizes each image: ``frame_size``, the square pad, or as is."""
        if self.square_pad != "none":
            if self.square_side is None:
                raise ValueError("data.square_side: not set (the trainer sets it to model.tile's side)")
            return SquarePad(self.square_side, self.square_pad)
        return self.frame_size


def _resized(img: np.ndarray, mask: np.ndarray | None, size: tuple[int, int] | None,
             region: np.ndarray | None = None
             ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """``img`` (area), ``mask`` and ``region`` (nearest) resized to ``size`` (H, W; None keeps)."""
    if size is None or img.shape[:2] == tuple(size):
        return img, mask, region
    h, w = size
    img = cv2.resize(img, (w, h), interpolation=cv2.INTER_AREA)
    # nearest neighbour keeps class indices (and the region's 0/1) intact
    if mask is not None:
        mask = cv2.resize(mask, (w, h), interpolation=cv2.INTER_NEAREST)
    if region is not None:
        region = cv2.resize(region, (w, h), interpolation=cv2.INTER_NEAREST)
    return img, mask, region


@dataclass(frozen=True)
class SquarePad:
    """Zero-pad to a square, resize to ``side`` (spec §2.2); ``align`` 'top' or 'center'."""

    side: int
    align: str = "top"

    def apply(self, img: np.ndarray, mask: np.ndarray | None, region: np.ndarray | None
              ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None, np.ndarray]:
        """(image, mask, region, valid) of one image: the image exactly as
        :func:`export.arcd.simulation.square_pad_resize` gives it (the runtime's ``square_pad``
        input does the same), labels by nearest neighbour, the padding background in the mask
        (outside ``valid``: not trained, not scored) and 255 (ignored) in the region."""
        out, valid = square_pad_resize(img, self.side, self.align)  # type: ignore[arg-type]
        if img.ndim == 2 and out.ndim == 3:
            out = out[:, :, 0]

        def label(a: np.ndarray | None, pad: int) -> np.ndarray | None:
            if a is None:
                return None
            h, w = a.shape
            side = max(h, w)
            top, left = (0, 0) if self.align == "top" else ((side - h) // 2, (side - w) // 2)
            canvas = np.full((side, side), pad, np.uint8)
            canvas[top:top + h, left:left + w] = a
            return cv2.resize(canvas, (self.side, self.side), interpolation=cv2.INTER_NEAREST)

        return out, label(mask, 0), label(region, 255), valid


def sample_labelled(n: int, fraction: float, seed: int) -> list[int]:
    """Indices of the labelled images kept at sampling rate ``fraction`` (at least one).

    The first ``round(fraction * n)`` entries of one fixed permutation, so for one seed the 30 %
    subset lies inside the 50 % one, which lies inside the 80 % one (spec §10: nested subsets).

    >>> sample_labelled(10, 0.3, 0)[:1] == sample_labelled(10, 0.8, 0)[:1]
    True
    """
    perm = np.random.default_rng([int(seed), 77]).permutation(n)
    k = max(1, int(round(fraction * n))) if n else 0
    return sorted(int(i) for i in perm[:k])


class DatasetFrames:
    """Frames of an ``inspector.evaluation`` :class:`~inspector.evaluation.datasets.Dataset`
    (the runtime's readers, so training reads files exactly as evaluation does). ``has_regions``:
    the data set has region labels (NEU-Seg ``regions/``), which the frames carry."""

    def __init__(self, dataset: "EvalDataset", channels: int = 1,
                 frame_size: "tuple[int, int] | SquarePad | None" = None,
                 indices: Sequence[int] | None = None):
        if len(dataset) == 0:
            raise TrainingDataError(f"{dataset.root}: no images in split '{dataset.split}' "
                                    f"({dataset.format} layout)")
        self.dataset = dataset
        self.channels = channels
        self.frame_size = (frame_size if isinstance(frame_size, SquarePad)
                           else tuple(frame_size) if frame_size else None)
        self.indices = list(range(len(dataset))) if indices is None else list(indices)
        if not self.indices:
            raise TrainingDataError(f"{dataset.root}: no images selected")
        self.class_names = tuple(dataset.classes)
        self.has_regions = bool(dataset.has_regions)

    def __len__(self) -> int:
        return len(self.indices)

    def frame(self, j: int) -> LabeledFrame:
        try:
            s = self.dataset.load(self.indices[j])
        except TrainingDataError:
            raise
        except ValueError as e:  # the readers' messages name the file: unreadable, mis-sized mask
            raise TrainingDataError(str(e), "data.root") from e
        if isinstance(self.frame_size, SquarePad):
            img = s.image
            if img.ndim == 3 and self.channels == 1:
                # the runtime takes a colour frame to grey (rounded BT.601) before it pads and
                # resizes; the same order here gives it the pixels training saw
                img = cv2.cvtColor(np.ascontiguousarray(img[:, :, :3]), cv2.COLOR_RGB2GRAY)
            img, mask, region, valid = self.frame_size.apply(img, s.mask, s.region)
            return LabeledFrame(image=img, truth=mask, region=region, valid=valid)
        img, mask, region = _resized(s.image, s.mask, self.frame_size, s.region)
        return LabeledFrame(image=img, truth=mask, region=region)

    def sample(self, rng: np.random.Generator) -> LabeledFrame:
        return self.frame(int(rng.integers(len(self.indices))))

    def describe(self) -> str:
        return (f"{self.dataset.format} {self.dataset.root} split {self.dataset.split}: "
                f"{len(self.indices)} of {len(self.dataset)} images")


class DefectFreePatches:
    """Normal frames for stage 1: ``patch`` x ``patch`` windows of labelled images whose mask is
    background everywhere (:func:`inspector.evaluation.datasets.defect_free_windows`).

    An image without any such window is skipped and another drawn; after ``tries`` misses in a
    row the draw fails loudly (the patch is too large for the data's defects).
    """

    def __init__(self, frames: DatasetFrames, patch: int, stride: int = 8, tries: int = 50):
        from inspector.evaluation.datasets import defect_free_windows

        self._windows = defect_free_windows
        self.frames = frames
        self.patch, self.stride, self.tries = patch, stride, tries
        self.channels = frames.channels
        self.class_names = frames.class_names

    def normal(self, rng: np.random.Generator) -> np.ndarray:
        for _ in range(self.tries):
            f = self.frames.sample(rng)
            # the square pad's zeros are not the surface: a window must lie inside the image
            truth = f.truth if f.valid is None else np.where(f.valid, f.truth, 1)
            win = self._windows(truth, self.patch, self.stride)
            if len(win):
                y, x = (int(v) for v in win[int(rng.integers(len(win)))])
                return np.ascontiguousarray(f.image[y:y + self.patch, x:x + self.patch])
        raise TrainingDataError(f"{self.frames.describe()}: no defect-free {self.patch}x{self.patch} "
                                f"window in {self.tries} images drawn; lower data.normal_patch",
                                "data.normal_patch")

    def sample(self, rng: np.random.Generator) -> LabeledFrame:
        return LabeledFrame(image=self.normal(rng))

    def describe(self) -> str:
        return f"defect-free {self.patch}x{self.patch} windows of {self.frames.describe()}"


def _open_eval_dataset(fmt: str, root: str, split: str, **kw) -> "EvalDataset":
    from inspector.evaluation.datasets import open_dataset

    try:
        return open_dataset(fmt, root, split=split, **kw)
    except TrainingDataError:
        raise
    except ValueError as e:
        # a bad file found while listing the folder (a missing region label): one line naming
        # the file and data.root, not a traceback
        raise TrainingDataError(str(e), "data.root") from e


def _union(parts: list["EvalDataset"]) -> "EvalDataset":
    from inspector.evaluation.datasets import Dataset as EvalDataset

    first = parts[0]
    entries = [e for p in parts for e in p.entries]
    return EvalDataset(first.format, first.root, first.classes, entries,
                       "+".join(p.split for p in parts), first.color,
                       [n for p in parts for n in p.notes])


def _build_folder(cfg: FolderDataConfig, *, tile: tuple[int, int], channels: int,
                  mean: Sequence[float], std: Sequence[float], simulation: SimulationConfig,
                  stage1_length: int, stage2_length: int, seed: int) -> TrainingData:
    # strict: training must not silently drop an image whose mask is missing
    kw: dict = {"strict": True}
    if cfg.source == "magnetic-tile":
        from inspector.evaluation.datasets import magnetic_tile

        probe = magnetic_tile(cfg.root)
        defect_cats = sorted({e.category for e in probe.entries if e.category != "MT_Free"})
        kw["categories"] = defect_cats
    elif cfg.source == "neu-seg":
        # a full NEU-Seg root also holds the data set's own test folder: never train or choose
        # thresholds on it (the hash shares below are of the other subsets)
        kw["official_test"] = False
    train_ds = _union([_open_eval_dataset(cfg.source, cfg.root, s, **kw) for s in cfg.train_splits])
    if len(train_ds) == 0:
        raise TrainingDataError(f"{cfg.root}: no images in split(s) {list(cfg.train_splits)} "
                                f"({cfg.source} layout)", "data.train_splits")
    labelled_all = DatasetFrames(train_ds, channels, cfg.fit())
    keep = sample_labelled(len(train_ds), cfg.label_fraction, cfg.label_seed)
    labelled = DatasetFrames(train_ds, channels, cfg.fit(), keep)
    log.info("labelled images: %d of %d (rate %g, seed %d)", len(keep), len(train_ds),
             cfg.label_fraction, cfg.label_seed)

    # spec §8 #14: the sampling rate applies to labelled images; normal data stays whole
    normal: FrameProvider
    window_frames: DatasetFrames | None = None  # the images whose masks place stage 1's windows
    normal_frames: DatasetFrames | None = None  # mt-free / folder: whole images, no masks read
    if cfg.normal_source == "defect-free-regions":
        # 'all' is what every shipped result used (README "ARCD on NEU-Seg"); 'labelled' reads
        # no mask outside the labelled subset
        window_frames = labelled_all if cfg.stage1_windows == "all" else labelled
        normal = DefectFreePatches(window_frames, cfg.normal_patch)
        s1_tile = (cfg.normal_patch, cfg.normal_patch)
        stage1_info: dict = {"normal_source": cfg.normal_source, "windows": cfg.stage1_windows,
                             "mask_images": len(window_frames), "labelled_images": len(keep),
                             "train_images": len(train_ds)}
        if stage1_length > 0:  # the plain U-Net has no stage 1 to describe
            log.info("stage 1: defect-free %dx%d windows placed by the masks of %d images "
                     "(data.stage1_windows %s; %d labelled for stage 2)", cfg.normal_patch,
                     cfg.normal_patch, len(window_frames), cfg.stage1_windows, len(keep))
    else:
        if cfg.normal_source == "mt-free":
            nds = _union([_open_eval_dataset("magnetic-tile", cfg.root, s, categories=["MT_Free"])
                          for s in cfg.train_splits])
        else:
            nds = _open_eval_dataset("folder", str(cfg.normal_root), "all")
        normal_frames = DatasetFrames(nds, channels, cfg.fit())
        normal = normal_frames
        s1_tile = tuple(tile)
        stage1_info = {"normal_source": cfg.normal_source, "images": len(normal_frames),
                       "mask_images": 0}
    stage1 = SimulatedAnomalyDataset(normal, s1_tile, AnomalySimulator(simulation), stage1_length,
                                     seed, mean, std, cfg.hflip, cfg.vflip, cfg.edge_prob)
    stage2_frames: FrameProvider = labelled
    synthetic: DatasetFrames | None = None
    if cfg.synthetic_root:
        synthetic = _synthetic_frames(cfg, train_ds.classes, channels)
        stage2_frames = MixedFrames(labelled, synthetic, cfg.synthetic_ratio)
    if labelled.has_regions:
        log.info("stage 2: region labels from %s", Path(cfg.root) / "regions")
    stage2 = SegmentationTileDataset(stage2_frames, tile, stage2_length, seed, mean, std,
                                     cfg.focus_prob, cfg.hflip, cfg.vflip,
                                     crops_per_frame=cfg.crops_per_frame, edge_prob=cfg.edge_prob)
    val_ds = _open_eval_dataset(cfg.source, cfg.root, cfg.val_split, **kw)
    if len(val_ds) == 0:
        raise TrainingDataError(f"{cfg.root}: no images in split '{cfg.val_split}' "
                                f"({cfg.source} layout)", "data.val_split")
    square_fit, scored_fit = _scored_fit(cfg)
    n_val = len(val_ds) if not cfg.val_images else min(cfg.val_images, len(val_ds))
    val_frames = DatasetFrames(val_ds, channels, scored_fit, list(range(n_val)))
    n_cal = min(cfg.calib_images, len(val_ds))
    calib_frames = DatasetFrames(val_ds, channels, scored_fit, list(range(max(1, n_cal))))

    def calib() -> list[LabeledFrame]:
        return [calib_frames.frame(j) for j in range(n_cal)] if n_cal else []

    def val() -> list[LabeledFrame]:
        return [val_frames.frame(j) for j in range(len(val_frames))]

    def check() -> dict:
        """Read every image and mask training will read, once, before it starts: a corrupt
        validation image found only after hours of training cost the run its metrics."""
        from inspector.evaluation.datasets import defect_free_windows

        t0 = time.monotonic()
        pool = set(window_frames.indices) if window_frames is not None else set()
        # only the training images either stage reads: with stage1_windows 'labelled' no mask
        # outside the labelled subset is opened, not even here
        used = DatasetFrames(train_ds, channels, cfg.fit(), sorted(pool | set(keep)))
        with_window = 0
        for j, i in enumerate(used.indices):
            f = used.frame(j)
            if i in pool and f.truth is not None and len(defect_free_windows(f.truth, cfg.normal_patch)):
                with_window += 1
        scored = DatasetFrames(val_ds, channels, scored_fit, list(range(max(n_val, n_cal))))
        extra = [fr for fr in (normal_frames, synthetic, scored) if fr is not None]
        for fr in extra:
            for j in range(len(fr)):
                fr.frame(j)
        n = len(used) + sum(len(fr) for fr in extra)
        # a run without stage 1 (the U-Net baseline: no R) never draws a window
        if window_frames is not None and not with_window and stage1_length > 0:
            raise TrainingDataError(
                f"{window_frames.describe()}: no image has a defect-free {cfg.normal_patch}x"
                f"{cfg.normal_patch} window for stage 1; lower data.normal_patch", "data.normal_patch")
        log.info("data check: %d images and their masks read in %.1f s", n, time.monotonic() - t0)
        out = {"images_checked": n}
        if window_frames is not None:
            out["mask_images_with_window"] = with_window
        return out

    s1 = (f"{normal.describe()} plus simulated anomalies" if stage1_length > 0
          else "none (no R: the plain U-Net baseline)")
    s2 = f"{stage2_frames.describe()} (label rate {cfg.label_fraction:g})"
    template = (f"stage 2: {STAGE2_SLOT}; stage 1: {STAGE1_SLOT}; thresholds from {n_cal} and "
                f"scores on {n_val} images of split '{cfg.val_split}'")
    val_excluded: dict[str, int] = {}
    if cfg.source == "magnetic-tile":
        # D has no class for a defect-free tile, so training and validation read the defect
        # folders only; `inspector evaluate --split val` on the same root scores MT_Free too, and
        # a user comparing the two figures must be able to see why they differ
        free = (len(_open_eval_dataset(cfg.source, cfg.root, cfg.val_split, categories=["MT_Free"]))
                if any(e.category == "MT_Free" for e in probe.entries) else 0)
        if free:
            val_excluded["MT_Free"] = free
            template += (f" (its defect categories only: the split's {free} MT_Free image(s) are "
                         f"left out; `inspector evaluate --split {cfg.val_split}` on this root "
                         f"scores them too, so its figures differ; a copy of the root without "
                         f"MT_Free gives these)")
    if square_fit is not None:
        template += (f" (native images, each padded to a square ({square_fit.align}) and resized to "
                     f"{square_fit.side}x{square_fit.side} as the bundle runs them)")
    desc = template.replace(STAGE2_SLOT, s2).replace(STAGE1_SLOT, s1)
    return TrainingData(stage1, stage2, calib, val, tuple(train_ds.classes), desc, stage1_info, check,
                        has_regions=stage2.has_regions, square_fit=square_fit, stage1_text=s1,
                        stage2_text=s2, template=template, val_excluded=val_excluded)


def _scored_fit(cfg: FolderDataConfig) -> "tuple[SquarePad | None, tuple[int, int] | None]":
    """(the square pad the model sees the calibration and validation frames through, how
    :class:`DatasetFrames` sizes those frames). With ``data.square_pad`` the frames stay native
    (the pad and resize happen at prediction, as on the line); otherwise they are sized as the
    training images are and tiled."""
    fit = cfg.fit()
    if isinstance(fit, SquarePad):
        return fit, None
    return None, fit


def _synthetic_frames(cfg: FolderDataConfig, classes: Sequence[str], channels: int) -> "DatasetFrames":
    """The generated pairs of ``cfg.synthetic_root``: only those its ``manifest.json`` lists, in
    its order (checked against the data set's classes). A folder without the manifest (a
    ``sample`` that failed or was stopped, or not a generator's output) is refused: its pairs may
    be half written or left over from another run."""
    from export.augment.dataset import open_pairs

    root = Path(cfg.synthetic_root)
    try:
        ds, man = open_pairs(root)
    except (FileNotFoundError, ValueError) as e:
        raise TrainingDataError(f"data.synthetic_root: {e}") from None
    if len(ds) == 0:
        raise TrainingDataError(f"data.synthetic_root: {root}: no generated pairs (NEU-Seg layout)")
    got = man.get("classes")
    if got is not None and list(got) != list(classes):
        raise TrainingDataError(f"data.synthetic_root: {root / 'manifest.json'}: classes {got} "
                                f"differ from the data set's {list(classes)}")
    if man.get("training_complete") is False:  # older manifests lack the key: no warning
        # the pairs are not refused (a short run can be a deliberate trial), but ARCD used to
        # take them without a word
        log.warning("data.synthetic_root: %s: its generator (%s) had not finished training "
                    "(%s of %s iterations) when these pairs were sampled; finish it with `inspector "
                    "augment %s train ... --resume` and sample again", root / "manifest.json",
                    man.get("checkpoint", "?"), man.get("checkpoint_step", "?"),
                    man.get("planned_iterations", "?"), man.get("generator", "<generator>"))
    n = len(ds) if not cfg.synthetic_limit else min(cfg.synthetic_limit, len(ds))
    return DatasetFrames(ds, channels, cfg.fit(), list(range(n)))


class MixedFrames:
    """Stage-2 frames: a share ``ratio`` from generated pairs, the rest from real labelled images
    (each draw decided by the sample's own generator, so a sample stays a function of its seed)."""

    def __init__(self, real: "DatasetFrames", synthetic: "DatasetFrames", ratio: float):
        self.real, self.synthetic, self.ratio = real, synthetic, float(ratio)
        self.channels = real.channels
        self.class_names = real.class_names
        # the region is learned from whichever part has labels; frames of the other part get an
        # all-ignored region (SegmentationTileDataset), so a batch stays stackable
        self.has_regions = real.has_regions or synthetic.has_regions
        if real.has_regions != synthetic.has_regions:
            log.info("stage 2: only the %s frames carry region labels; the region of the others "
                     "is ignored", "real" if real.has_regions else "generated")

    def sample(self, rng: np.random.Generator) -> LabeledFrame:
        return self.synthetic.sample(rng) if rng.random() < self.ratio else self.real.sample(rng)

    def describe(self) -> str:
        return (f"{self.real.describe()} mixed with {self.ratio:.0%} generated pairs from "
                f"{self.synthetic.describe()}")


DATA_SOURCES["neu-seg"] = _build_folder
DATA_SOURCES["magnetic-tile"] = _build_folder

DataConfig = Annotated[Union[SyntheticDataConfig, FolderDataConfig], Field(discriminator="source")]
