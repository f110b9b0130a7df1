"""Two-stage ARCD training from a YAML config (seed spec ``004_spec.md`` §2.5, §2.7).

Stage 1 trains the reconstruction net R on simulated anomalies of normal tiles with
``L_rec = MSE + 0.01 (1 - SSIM)``. Stage 2 freezes R (eval mode, no gradients) and trains the
discrimination net D on labelled defect tiles with the focal loss. Afterwards thresholds are
chosen on held-out calibration frames and IoU per class is measured on held-out validation
frames, tiled as the runtime tiles them (with ``data.square_pad``: each native frame padded to
a square and resized whole, as the bundle's ``input.fit: square_pad`` runs it).

The run folder holds ``config.yaml`` (the resolved config), ``checkpoint.pt`` (both networks,
optimiser and scheduler state, stage and step, the config; written every
``checkpoint_every`` steps and at the end of each stage) and ``metrics.json``. ``resume=True``
continues from the checkpoint; sample ``i`` of each stage is a pure function of (seed, i), so a
resumed run sees the data an uninterrupted one would have.

Example::

    python -m export.arcd.train --config configs/train/arcd-demo.yaml --run-dir runs/arcd-demo
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from torch.utils.data import DataLoader, Dataset, Subset

from inspector.errors import CheckpointError, ConfigError
from inspector.sources.synthetic import CLASS_NAMES

from export.arcd.data import (DataConfig, SyntheticDataConfig, TrainingData, TrainingDataError,
                              build_data, collate)
from export.arcd.evaluate import (choose_region_threshold, choose_thresholds, evaluate,
                                  predict_frame, region_confusion, region_scores)
from export.arcd.loss import (DiceLoss, FocalLoss, ReconstructionLoss, defect_vs_background,
                              reconstruction_accuracy)
from export.arcd.simulation import SimulationConfig
from export.arcd.backbones import (DeepLabV3PlusDiscriminator, PSPNetDiscriminator,
                                   SegNetDiscriminator, input_multiple)
from export.arcd.torch_model import (ARCDInference, DiscriminativeSubNetwork, NoReconstruction,
                                     ReconstructiveSubNetwork, count_parameters,
                                     discriminator_input, split_region_logits)
# the run folder's file names stay importable from here (export.onnx_export takes them so)
from export.training import CHECKPOINT, CONFIG, METRICS  # noqa: F401
from export.training import (RUN_KEYS, atomic_save, check_resume_keys, config_changes, learnt_changes, quiet_worker, saved_config, write_metrics, end_ranks, fmt_duration, prepare_run_dir, rate_eta,
                             read_checkpoint, read_config, start_ranks, train_main, TrainingStopped,
                             validate_config, whole_step, write_run_config)

log = logging.getLogger(__name__)

STAGE1_CHECKPOINT = "checkpoint-stage1.pt"
CHECKPOINT_FORMAT = 1

__all__ = ["ModelConfig", "Stage1Config", "Stage2Config", "EvalConfig", "TrainConfig",
           "load_config", "build_models", "weights_digest", "checkpoint_ref", "train", "main"]


# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------

class MFLMOptions(BaseModel):
    """MFLM's internals (spec §3.1; the defaults are the spec's: SSPCAB's kernel 3 and
    dilation 1, SSMCTB's 5 summed heads of 64, one block, no residual add)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    kernel: int = Field(3, ge=1, description="masked dilated conv: each corner conv's size k")
    dilation: int = Field(1, ge=1, description="gap d between the hidden centre and the corners")
    heads: int = Field(5, ge=1, description="channel transformer: attention heads (summed, eq. 4-7)")
    dim: int = Field(64, ge=1, description="channel transformer: token width")
    layers: int = Field(1, ge=1, description="channel transformer: blocks")
    residual: bool = Field(False, description="add MFLM's input back to its output")


class ModelConfig(BaseModel):
    """Network sizes and the input contract. Defaults are the thesis networks (RGB)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    in_channels: Literal[1, 3] = 3
    classes: list[str] = Field(default_factory=lambda: list(CLASS_NAMES))
    tile: tuple[int, int] = (256, 256)
    r_base_width: int = Field(128, ge=1)
    r_depth: int = Field(5, ge=2, le=8)
    d_base_channels: int = Field(64, ge=1)
    d_depth: int = Field(6, ge=2, le=8)
    #: applied to pixel / 255; the spec's default is no normalisation (mean 0, std 1)
    mean: list[float] = Field(default_factory=lambda: [0.0])
    std: list[float] = Field(default_factory=lambda: [1.0])
    #: False = the thesis's plain U-Net baseline: no R, no stage 1, D on the image alone
    reconstruction: bool = True
    #: spec §3.1: MFLM (masked dilated conv + channel transformer) in R's bottleneck block
    mflm: bool = False
    #: spec §3.2: CALM in place of the second conv of each D encoder block (U-Net D only)
    calm: bool = False
    #: MFLM's internals (used with model.mflm)
    mflm_options: MFLMOptions = Field(default_factory=MFLMOptions)
    #: CALM's channel-attention reduction r (spec default 16; used with model.calm)
    calm_reduction: int = Field(16, ge=1)
    #: spec §2.4: D's backbone. "unet" is the thesis default; "segnet" (VGG16-style, d_depth
    #: pooled stages: 5 is SegNet), "pspnet" and "deeplabv3plus" (ResNet trunk, d_resnet_layers)
    #: are its comparisons. d_base_channels scales every width (64 = the published sizes).
    d_backbone: Literal["unet", "segnet", "pspnet", "deeplabv3plus"] = "unet"
    #: bottleneck blocks per ResNet stage for pspnet / deeplabv3plus ((3, 4, 6, 3) = ResNet-50)
    d_resnet_layers: tuple[int, int, int, int] = (3, 4, 6, 3)
    #: spec §2.4: D's second head, a 2-way softmax over {not region, region} on two more output
    #: channels (the thesis's machine-region map, which may overlap defects). Needs region labels
    #: (neu-seg layout: regions/<subset>/<stem>.png); stage 1 never trains it (spec §2.5)
    region_head: bool = False
    #: what the region is, written into the bundle and every published report
    region_name: str = Field("machine region", min_length=1)

    def d_outputs(self) -> int:
        """D's output channels: one per class, and two more for the region head."""
        return len(self.classes) + (2 if self.region_head else 0)

    def input_multiple(self) -> int:
        """What tile and training-crop sides must be a multiple of (both networks' strides)."""
        r = 2 ** (self.r_depth - 1) if self.reconstruction else 1
        return max(r, input_multiple(self.d_backbone, self.d_depth))

    @field_validator("tile")
    @classmethod
    def _tile_positive(cls, tile: tuple[int, int]) -> tuple[int, int]:
        # a tile of 0 px used to pass the multiple-of check (0 % n == 0), train for the whole
        # schedule, and fail only in export onnx (the runtime refuses it in a bundle too)
        if min(tile) < 1:
            raise ValueError(f"sides must be >= 1 px, got {list(tile)}")
        return tile

    @model_validator(mode="after")
    def _check(self) -> "ModelConfig":
        div = self.input_multiple()
        if any(t % div for t in self.tile):
            raise ValueError(f"tile {list(self.tile)} must be a multiple of {div} "
                             f"(the largest stride of R and the {self.d_backbone} D)")
        if self.calm and self.d_backbone != "unet":
            raise ValueError(f"calm replaces convs of the U-Net D; it does not apply to "
                             f"d_backbone {self.d_backbone!r}")
        if min(self.d_resnet_layers) < 1:
            raise ValueError(f"d_resnet_layers must be counts >= 1, got {list(self.d_resnet_layers)}")
        if len(self.classes) < 2 or self.classes[0] != "background":
            raise ValueError("classes must start with 'background' and name at least one defect")
        for key in ("mean", "std"):
            if len(getattr(self, key)) not in (1, self.in_channels):
                raise ValueError(f"{key} needs 1 or {self.in_channels} values")
        if any(s <= 0 for s in self.std):
            raise ValueError("std values must be > 0")
        return self


class _StageBase(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    steps: int = Field(..., ge=0, description="optimiser steps")
    batch_size: int = Field(8, ge=1)
    lr: float = Field(1e-4, gt=0, description="Adam learning rate (thesis: 1e-4)")
    weight_decay: float = Field(0.0, ge=0)
    #: MultiStepLR milestones as fractions of ``steps`` (spec default 0.8 and 0.9, gamma 0.2)
    milestones: list[float] = Field(default_factory=lambda: [0.8, 0.9])
    lr_gamma: float = Field(0.2, gt=0, le=1)


class Stage1Config(_StageBase):
    steps: int = Field(5000, ge=0)
    ssim_weight: float = Field(0.01, ge=0, description="weight of (1 - SSIM); thesis 1/100")
    #: spec §2.5 / default 10: also train D in stage 1, on the simulated anomaly masks with a
    #: class-agnostic target (defect = 1 - p_background), so that stage 2 starts from a D that
    #: already finds "where the input departs from R's reconstruction" on the unlabelled normals.
    #: R's update is unchanged (D sees R's output detached). Off = the thesis's default.
    train_d: bool = False
    #: D's learning rate in stage 1 (None = stage1.lr); the schedule follows stage 1's
    d_lr: float | None = Field(None, gt=0)
    #: focal gamma of the class-agnostic stage-1 D loss (class-balanced alpha per batch)
    d_focal_gamma: float = Field(2.0, ge=0)


class Stage2Config(_StageBase):
    steps: int = Field(5000, ge=0)
    focal_gamma: float = Field(2.0, ge=0)
    focal_alpha: Literal["balanced"] | list[float] | None = None
    alpha_clamp: tuple[float, float] = (0.25, 0.999)
    #: weight of an extra soft-Dice term (0 = the thesis's focal loss alone); see loss.DiceLoss
    dice_weight: float = Field(0.0, ge=0)
    #: weight of the region head's focal loss (same gamma, class-balanced alpha) beside the
    #: defect head's; the thesis sums the two tasks' Loss2 (model.region_head only)
    region_weight: float = Field(1.0, ge=0)


class EvalConfig(BaseModel):
    """Held-out evaluation and the post-processing written into the bundle."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    overlap: int = Field(32, ge=0, description="tile overlap, as the bundle's tiling.overlap")
    threshold_candidates: list[float] = Field(
        default_factory=lambda: [0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9])
    per_class_thresholds: bool = True
    default_threshold: float = Field(0.5, gt=0, le=1, description="used when no calibration frames")
    open_kernel: int = Field(0, ge=0)
    close_kernel: int = Field(0, ge=0)
    min_area_px: int = Field(16, ge=0)


class TrainConfig(BaseModel):
    """The whole training YAML."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    name: str = "arcd"
    seed: int = 0
    threads: int = Field(2, ge=1, description="torch CPU threads")
    device: str = Field("cpu", description="cpu | cuda | cuda:N | auto (cuda when present)")
    data_workers: int = Field(0, ge=0, description="DataLoader worker processes (0 = inline)")
    #: NHWC tensors; about 2x faster for the narrow networks on CPU (oneDNN), same results
    channels_last: bool = True
    log_every: int = Field(20, ge=1)
    checkpoint_every: int = Field(200, ge=1)
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=SyntheticDataConfig)
    simulation: SimulationConfig = Field(default_factory=SimulationConfig)
    stage1: Stage1Config = Field(default_factory=Stage1Config)
    stage2: Stage2Config = Field(default_factory=Stage2Config)
    evaluation: EvalConfig = Field(default_factory=EvalConfig)

    @model_validator(mode="before")
    @classmethod
    def _default_source(cls, raw: Any) -> Any:
        # configs written before the folder sources existed have no data.source: synthetic
        if isinstance(raw, dict) and isinstance(raw.get("data"), dict) and "source" not in raw["data"]:
            raw = {**raw, "data": {**raw["data"], "source": "synthetic"}}
        return raw

    @model_validator(mode="after")
    def _baseline_has_no_stage1(self) -> "TrainConfig":
        # without R there is nothing for stage 1 to train; the budget goes to stage 2 alone
        if not self.model.reconstruction:
            self.stage1.steps = 0
        return self

    @model_validator(mode="after")
    def _square_pad_takes_the_tile(self) -> "TrainConfig":
        # the runtime resizes the padded square to the bundle's tile: training must see that size
        if getattr(self.data, "square_pad", "none") == "none":
            return self
        th, tw = self.model.tile
        if th != tw:
            raise ValueError(f"data.square_pad needs a square model.tile, got {[th, tw]}")
        if self.data.square_side is None:
            self.data.square_side = th
        elif self.data.square_side != th:
            raise ValueError(f"data.square_side {self.data.square_side} must equal model.tile's "
                             f"side {th}: the runtime resizes each padded frame to the tile")
        crop = self.data.train_crop
        if crop is not None and max(crop) > th:
            raise ValueError(f"data.train_crop {list(crop)} is larger than the padded square "
                             f"({th}x{th})")
        return self

    @model_validator(mode="after")
    def _crops_fit_the_networks(self) -> "TrainConfig":
        div = self.model.input_multiple()
        # stage 1's defect-free windows only matter when there is an R (and so a stage 1)
        keys = ("train_crop", "normal_patch") if self.model.reconstruction else ("train_crop",)
        for key in keys:
            size = getattr(self.data, key, None)
            if size is None:
                continue
            sides = [size] if isinstance(size, int) else list(size)
            if any(v % div for v in sides):
                raise ValueError(f"data.{key} {size if isinstance(size, int) else sides} must be "
                                 f"a multiple of {div}, as model.tile (the networks' largest stride)")
        return self


def load_config(path: Path) -> TrainConfig:
    """Read and validate a training YAML; errors name the file and the dotted key."""
    return read_config(path, TrainConfig, set_base_dir=False)  # ARCD's config has no base_dir


def _validate(raw: dict, where: str) -> TrainConfig:
    return validate_config(TrainConfig, raw, where)


def build_models(cfg: ModelConfig) -> tuple[ReconstructiveSubNetwork | NoReconstruction,
                                             torch.nn.Module]:
    if not cfg.reconstruction:
        r: ReconstructiveSubNetwork | NoReconstruction = NoReconstruction(cfg.in_channels)
        d_in = cfg.in_channels
    else:
        r = ReconstructiveSubNetwork(cfg.in_channels, cfg.in_channels, cfg.r_base_width,
                                     cfg.r_depth, mflm=cfg.mflm,
                                     mflm_options=cfg.mflm_options.model_dump())
        d_in = 2 * cfg.in_channels
    k, base = cfg.d_outputs(), cfg.d_base_channels
    if cfg.d_backbone == "unet":
        d: torch.nn.Module = DiscriminativeSubNetwork(d_in, k, base, cfg.d_depth, calm=cfg.calm,
                                                      calm_reduction=cfg.calm_reduction)
    elif cfg.d_backbone == "segnet":
        d = SegNetDiscriminator(d_in, k, base, cfg.d_depth)
    elif cfg.d_backbone == "pspnet":
        d = PSPNetDiscriminator(d_in, k, base, cfg.d_resnet_layers)
    else:
        d = DeepLabV3PlusDiscriminator(d_in, k, base, cfg.d_resnet_layers)
    return r, d


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------

def _scheduler(opt: torch.optim.Optimizer, stage: _StageBase) -> torch.optim.lr_scheduler.MultiStepLR:
    ms = sorted({max(1, int(round(f * stage.steps))) for f in stage.milestones if 0 < f < 1})
    return torch.optim.lr_scheduler.MultiStepLR(opt, milestones=ms, gamma=stage.lr_gamma)


def _load_following_config(sched: torch.optim.lr_scheduler.MultiStepLR, saved: dict,
                           stage: int, report: bool = True) -> None:
    """Load a stage's scheduler state, but keep the schedule this run's config asks for.

    The learning rate is a function of (config, step): a checkpoint resumed with other step
    counts (a stage-1 checkpoint continued with a longer stage 2, a finished run trained longer)
    takes its milestones, base rates and gamma from the config, not from the run that wrote it,
    and its rate is recomputed for the step it resumes at. Otherwise a copied stage-1 checkpoint
    silently decays the rate at the old run's milestones. ``report``: say so in the log (not for
    a stage that is over, whose schedule no step will use).
    """
    import bisect

    base, milestones, gamma = list(sched.base_lrs), sched.milestones.copy(), sched.gamma
    sched.load_state_dict(saved)
    if (list(sched.base_lrs), sched.milestones, sched.gamma) == (base, milestones, gamma):
        return  # the same schedule: the loaded rate is exactly an uninterrupted run's
    if report:
        log.info("stage %d: resumed schedule follows this config: milestones %s (checkpoint: %s), "
                 "base lr %s, gamma %g", stage, sorted(milestones.elements()),
                 sorted(sched.milestones.elements()), base, gamma)
    sched.base_lrs, sched.milestones, sched.gamma = base, milestones, gamma
    decays = bisect.bisect_right(sorted(milestones.elements()), sched.last_epoch)
    lrs = [b * gamma ** decays for b in base]
    for group, b, lr in zip(sched.optimizer.param_groups, base, lrs):
        group["initial_lr"], group["lr"] = b, lr
    sched._last_lr = lrs


def _dist_rank_world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _State:
    """Everything a checkpoint holds, kept in one place so saving and resuming stay in step."""

    def __init__(self, cfg: TrainConfig, r: torch.nn.Module, d: torch.nn.Module):
        self.cfg = cfg
        self.r, self.d = r, d
        self.stage = 1
        self.step = 0  # steps done in the current stage
        self.done = False
        self.history: dict[str, list[list[float]]] = {"stage1": [], "stage2": []}
        self.elapsed_s = 0.0
        #: what stage 1 learnt from (TrainingData.stage1_info), kept with the weights: a run that
        #: starts from a copied stage-1 checkpoint reports the data that trained its R, not what
        #: its own config would have used. None: a checkpoint older than this record
        self.stage1_data: dict | None = None
        #: each resume whose config differed from the checkpoint's: where it resumed and what
        #: changed, so config.yaml and a bundle's provenance (which show the last config) can be
        #: read against the values the earlier steps were trained with
        self.config_changes: list[dict] = []
        #: the wording of the data each stage trained on, as ``[[first step, text], ...]`` per
        #: stage (more than one entry: a resume changed the data mid-stage), kept with the
        #: weights so metrics.json's ``data`` says what trained them (:func:`_settle_data_text`)
        self.data_text: dict[str, list] = {}
        #: where the last checkpoint.pt this process wrote stands (:func:`_at`); None: none yet.
        #: What a stop reports as saved (:func:`_stop_report`)
        self.saved_at: dict[str, Any] | None = None
        #: where the checkpoint this run resumed from stood; None: a new run
        self.resumed_at: dict[str, Any] | None = None
        # the baseline's pass-through R has no parameters; Adam refuses an empty list, and a
        # stand-in keeps checkpoints of both variants in one format
        r_params = list(r.parameters()) or [torch.nn.Parameter(torch.zeros(1))]
        groups: list[dict[str, Any]] = [{"params": r_params}]
        if cfg.stage1.train_d and cfg.model.reconstruction:
            groups.append({"params": list(d.parameters()), "lr": cfg.stage1.d_lr or cfg.stage1.lr})
        self.opt1 = torch.optim.Adam(groups, lr=cfg.stage1.lr, weight_decay=cfg.stage1.weight_decay)
        self.opt2 = torch.optim.Adam(d.parameters(), lr=cfg.stage2.lr, weight_decay=cfg.stage2.weight_decay)
        self.sched1 = _scheduler(self.opt1, cfg.stage1)
        self.sched2 = _scheduler(self.opt2, cfg.stage2)
        self.rank, self.world = _dist_rank_world()
        #: the modules the loop calls: DDP wrappers of the network a stage trains when world > 1
        self.trained_r: torch.nn.Module = r
        self.trained_d: torch.nn.Module = d

    def wrap_for_stage(self, stage: int) -> None:
        """Under torchrun, wrap the network this stage trains in DistributedDataParallel (its
        gradients are averaged over processes); the frozen one stays a plain module."""
        self.trained_r, self.trained_d = self.r, self.d
        if self.world <= 1:
            return
        from torch.nn.parallel import DistributedDataParallel as DDP

        dev = next(self.d.parameters()).device
        ids = [dev.index] if dev.type == "cuda" else None
        if stage == 1:
            # the U-Net baseline's pass-through R has no parameters (and no stage-1 steps)
            if any(p.requires_grad for p in self.r.parameters()):
                self.trained_r = DDP(self.r, device_ids=ids)
                if self.cfg.stage1.train_d:
                    self.trained_d = DDP(self.d, device_ids=ids)
        else:
            self.trained_d = DDP(self.d, device_ids=ids)

    def state_dict(self) -> dict:
        return {
            "format": CHECKPOINT_FORMAT,
            "stage": self.stage, "step": self.step, "done": self.done,
            "reconstruction": self.r.state_dict(), "discrimination": self.d.state_dict(),
            "optimizer": {"stage1": self.opt1.state_dict(), "stage2": self.opt2.state_dict()},
            "scheduler": {"stage1": self.sched1.state_dict(), "stage2": self.sched2.state_dict()},
            "config": self.cfg.model_dump(mode="json"),
            "history": self.history, "elapsed_s": self.elapsed_s,
            "stage1_data": self.stage1_data,
            "data_text": self.data_text,
            "config_changes": self.config_changes,
            "torch": str(torch.__version__),
        }

    def load(self, ck: dict) -> None:
        self.r.load_state_dict(ck["reconstruction"])
        self.d.load_state_dict(ck["discrimination"])
        self.opt1.load_state_dict(ck["optimizer"]["stage1"])
        self.opt2.load_state_dict(ck["optimizer"]["stage2"])
        for n, sched in ((1, self.sched1), (2, self.sched2)):
            # once stage 2 has begun, stage 1's schedule is never used again
            _load_following_config(sched, ck["scheduler"][f"stage{n}"], n,
                                   report=n == 2 or int(ck["stage"]) == 1)
        self.stage, self.step, self.done = int(ck["stage"]), int(ck["step"]), bool(ck["done"])
        self.history = ck.get("history", self.history)
        self.elapsed_s = float(ck.get("elapsed_s", 0.0))
        self.stage1_data = ck.get("stage1_data")
        self.data_text = {k: [list(e) for e in v] for k, v in (ck.get("data_text") or {}).items()}
        self.config_changes = list(ck.get("config_changes") or [])


def weights_digest(reconstruction: dict, discrimination: dict) -> str:
    """SHA-256 of both networks' state dicts (names, dtypes, shapes, values in logical order).

    metrics.json records it beside the stage and step it was measured at, so the exporter can
    tell a metrics.json of this checkpoint from one of an earlier network of the same run folder
    (a finished smoke run resumed longer and stopped): the step alone misses a rerun that
    stopped at the step the old metrics were taken at.
    """
    h = hashlib.sha256()
    for prefix, sd in (("r.", reconstruction), ("d.", discrimination)):
        for k in sorted(sd):
            t = sd[k].detach().cpu().contiguous()
            h.update(f"{prefix}{k}:{t.dtype}:{tuple(t.shape)};".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())  # any dtype, bf16 too
    return h.hexdigest()


def checkpoint_ref(ck: dict) -> dict[str, Any]:
    """What metrics.json records of the checkpoint its figures belong to (see
    :func:`weights_digest`); ``ck`` is a checkpoint dict (:meth:`_State.state_dict`)."""
    return {"file": CHECKPOINT, "stage": int(ck["stage"]), "step": int(ck["step"]),
            "done": bool(ck["done"]),
            "weights_sha256": weights_digest(ck["reconstruction"], ck["discrimination"])}


def load_checkpoint(path: Path) -> dict:
    """Load ``checkpoint.pt`` (tensors and plain data only)."""
    ck = read_checkpoint(path)
    other = ck.get("kind") if isinstance(ck, dict) else None
    if other not in (None, "arcd"):
        # another trainer's run (clgan, fuzzymask, ...): a resume used to dump this config's model
        # section and say the checkpoint "was trained with None"
        command = (f"inspector augment {other} train" if other in ("defectgan", "anomalyalign")
                   else f"inspector train {other}")
        article = "an" if str(other)[:1].lower() in "aeiou" else "a"
        raise CheckpointError(f"{path}: {article} {other} checkpoint, not an ARCD one; `{command}` "
                              "trains and resumes it (or choose another --run-dir)")
    if ck.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: checkpoint format {ck.get('format')!r}, expected {CHECKPOINT_FORMAT}")
    return ck


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------

def _batches(ds: Dataset, batch: int, start_step: int, steps: int, workers: int,
             rank: int = 0, world: int = 1):
    """Batches for steps ``start_step..steps-1``: step s uses samples s*batch .. s*batch+batch-1.

    Under DistributedDataParallel each of the ``world`` processes takes its own ``batch``
    samples of step s (``(s * world + rank) * batch`` on), so the global batch is
    ``world * batch`` and no two processes see the same sample.
    """
    def first(s: int) -> int:
        return (s * world + rank) * batch

    if workers > 0:
        idx = [i for s in range(start_step, steps) for i in range(first(s), first(s) + batch)]
        loader = DataLoader(Subset(ds, idx), batch_size=batch, shuffle=False,
                            num_workers=workers, collate_fn=collate, persistent_workers=False,
                            worker_init_fn=quiet_worker)
        yield from loader
        return
    for s in range(start_step, steps):
        yield collate([ds[i] for i in range(first(s), first(s) + batch)])


def _save(state: _State, ck_path: Path) -> None:
    """Write the checkpoint (atomically) and note where it stands, for a stop's report."""
    atomic_save(state.state_dict(), ck_path)
    state.saved_at = _at(state)


def _where(at: dict[str, Any]) -> str:
    return f"stage {at['stage']} step {at['step']}" + (" (training finished)" if at["done"] else "")


def _kept(state: _State, ck_path: Path) -> str:
    """What the run folder holds when the process ends at once (a second Ctrl-C in a step)."""
    if state.saved_at is not None:
        return f"{ck_path} keeps the checkpoint of {_where(state.saved_at)}; --resume goes on from it"
    if state.resumed_at is not None:
        return (f"{ck_path} keeps the checkpoint of {_where(state.resumed_at)} this run resumed; "
                "--resume goes on from it")
    return "no checkpoint was saved (none yet): --resume starts the run afresh"


def _run_stage(state: _State, stage: int, data: TrainingData, run_dir: Path, dev: torch.device) -> None:
    cfg = state.cfg
    sc: _StageBase
    dice: torch.nn.Module | None = None
    agnostic: torch.nn.Module | None = None  # stage 1 with train_d: D's class-agnostic loss
    region: torch.nn.Module | None = None  # stage 2 with model.region_head: the region's loss
    if stage == 1:
        sc, ds, opt, sched = cfg.stage1, data.stage1, state.opt1, state.sched1
        crit: torch.nn.Module = ReconstructionLoss(cfg.stage1.ssim_weight, mean=cfg.model.mean,
                                                   std=cfg.model.std).to(dev)
        state.r.train()
        state.d.train(cfg.stage1.train_d)
        if cfg.stage1.train_d:
            agnostic = FocalLoss(cfg.stage1.d_focal_gamma, "balanced", cfg.stage2.alpha_clamp)
    else:
        sc, ds, opt, sched = cfg.stage2, data.stage2, state.opt2, state.sched2
        crit = FocalLoss(cfg.stage2.focal_gamma, cfg.stage2.focal_alpha, cfg.stage2.alpha_clamp,
                         ignore_index=255)
        if cfg.stage2.dice_weight > 0:
            dice = DiceLoss(ignore_index=255)
        if cfg.model.region_head:
            region = FocalLoss(cfg.stage2.focal_gamma, "balanced", cfg.stage2.alpha_clamp,
                               ignore_index=255)
        state.r.eval()  # frozen: BN statistics and weights stay as stage 1 left them
        state.r.requires_grad_(False)
        state.d.train()
    log.info("stage %d: %s, %d steps x batch %d, lr %g (from step %d)", stage,
             ("R on simulated anomalies" + (", D on their masks (class-agnostic)" if agnostic else ""))
             if stage == 1 else "D on labelled defects (R frozen)",
             sc.steps, sc.batch_size, sc.lr, state.step)
    fmt = torch.channels_last if cfg.channels_last else torch.contiguous_format
    state.wrap_for_stage(stage)
    try:
        _loop(state, stage, sc, ds, opt, sched, crit, dice, run_dir, dev, fmt, agnostic, region)
    except KeyboardInterrupt:
        # a new run stopped before its first step has trained nothing: no checkpoint to save
        untrained = state.saved_at is None and state.resumed_at is None and state.stage == 1 \
            and state.step == 0
        if state.rank == 0 and not untrained:  # the other ranks stop after the same step
            _save(state, run_dir / CHECKPOINT)
            log.warning("interrupted at stage %d step %d; checkpoint saved, continue with --resume",
                        stage, state.step)
        raise
    finally:
        if stage == 2:
            state.r.requires_grad_(True)


def _loop(state: _State, stage: int, sc: _StageBase, ds: Dataset, opt: torch.optim.Optimizer,
          sched: torch.optim.lr_scheduler.LRScheduler, crit: torch.nn.Module,
          dice: torch.nn.Module | None, run_dir: Path, dev: torch.device,
          fmt: torch.memory_format, agnostic: torch.nn.Module | None = None,
          region: torch.nn.Module | None = None) -> None:
    cfg = state.cfg
    hist = state.history[f"stage{stage}"]
    t0 = time.monotonic()
    t_base = state.elapsed_s
    first = state.step
    ema: float | None = None
    r_fwd, d_fwd = state.trained_r, state.trained_d
    for batch in _batches(ds, sc.batch_size, state.step, sc.steps, cfg.data_workers,
                          state.rank, state.world):
        # a Ctrl-C or SIGTERM in here stops after the step (the forward pass, whose BatchNorm
        # statistics the checkpoint holds, the update, the schedule, the counter, the history):
        # the checkpoint _run_stage then saves is one of a whole step, and --resume does not
        # repeat the update
        with whole_step(kept=lambda: _kept(state, run_dir / CHECKPOINT)):
            x = batch["image"].to(dev, memory_format=fmt)
            if stage == 1:
                rec = r_fwd(x)
                loss, parts = crit(rec, batch["target"].to(dev))
                if agnostic is not None:
                    logits = d_fwd(discriminator_input(state.r, rec.detach(), x))
                    if cfg.model.region_head:  # simulated anomalies carry no region (§2.5)
                        logits = split_region_logits(logits)[0]
                    target = (batch["anomaly_mask"][:, 0] > 0.5).long().to(dev)
                    dl = agnostic(defect_vs_background(logits), target)
                    parts = {**parts, "d_focal": float(dl.detach())}
                    loss = loss + dl
            else:
                with torch.no_grad():
                    rec = state.r(x)
                logits = d_fwd(discriminator_input(state.r, rec, x))
                if region is not None:
                    logits, region_logits = split_region_logits(logits)
                mask = batch["mask"].to(dev)
                loss = crit(logits, mask)
                parts = {}
                if dice is not None or region is not None:
                    parts["focal"] = float(loss.detach())
                if dice is not None:
                    dl = dice(logits, mask)
                    parts["dice"] = float(dl.detach())
                    loss = loss + cfg.stage2.dice_weight * dl
                if region is not None:
                    rl = region(region_logits, batch["region"].to(dev))
                    parts["region"] = float(rl.detach())
                    loss = loss + cfg.stage2.region_weight * rl
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            state.step += 1
            lv = float(loss.detach())
            if not math.isfinite(lv):
                raise FloatingPointError(f"stage {stage} step {state.step}: loss is {lv}; lower the "
                                         f"learning rate (stage{stage}.lr = {sc.lr})")
            hist.append([state.step, lv])
            ema = lv if ema is None else 0.95 * ema + 0.05 * lv
            state.elapsed_s = t_base + time.monotonic() - t0
            if state.rank == 0 and (state.step % cfg.log_every == 0 or state.step == sc.steps):
                rate, eta = rate_eta(state.step - first, time.monotonic() - t0, sc.steps - state.step)
                extra = "".join(f" {k} {v:.4f}" for k, v in parts.items())
                log.info("stage %d step %d/%d loss %.5f (avg %.5f)%s lr %.2e %.2f it/s eta %s",
                         stage, state.step, sc.steps, lv, ema, extra, opt.param_groups[0]["lr"], rate,
                         fmt_duration(eta))
        if state.rank == 0 and state.step % cfg.checkpoint_every == 0 and state.step < sc.steps:
            _save(state, run_dir / CHECKPOINT)


def _final(hist: list[list[float]], n: int = 20) -> float | None:
    if not hist:
        return None
    return float(np.mean([v for _, v in hist[-n:]]))


def _frame_fit(data: TrainingData) -> dict[str, str]:
    """:func:`predict_frame`'s ``fit`` / ``pad_align`` for the held-out frames: what the exported
    bundle's ``input.fit`` will do with them (tiling: nothing to pass, the calls stay as they were)."""
    sq = data.square_fit
    return {} if sq is None else {"fit": "square_pad", "pad_align": sq.align}


def _evaluate(state: _State, data: TrainingData) -> dict:
    """Thresholds from the calibration frames, IoU per class on the validation frames, both
    predicted as the bundle will run them (tiled, or whole native frames squared)."""
    cfg = state.cfg
    mc, ec = cfg.model, cfg.evaluation
    model = ARCDInference(state.r, state.d, region_head=mc.region_head).eval()
    names = list(mc.classes)
    fit = _frame_fit(data)
    if fit:
        log.info("thresholds and validation on the native frames, each padded to a square (%s) "
                 "and resized to %dx%d as the bundle runs it", fit["pad_align"], *mc.tile)

    def probs_of(frames):
        return [predict_frame(model, f.image, mc.tile, ec.overlap, mc.in_channels, mc.mean, mc.std,
                              **fit)
                for f in frames]

    t0 = time.monotonic()
    calib = data.calib()
    if calib:
        cp = probs_of(calib)
        g, per, s = choose_thresholds(cp, [f.truth for f in calib], ec.threshold_candidates,
                                      ec.per_class_thresholds, ec.open_kernel, ec.close_kernel,
                                      [f.valid for f in calib])
        del cp
        log.info("thresholds from %d calibration frames: global %.2f, per class %s (mean defect "
                 "IoU %.3f there)", len(calib), g, per, s)
    else:
        g, per = ec.default_threshold, [ec.default_threshold] * (len(names) - 1)
    val = data.val()
    vp = probs_of(val)
    res = evaluate(vp, val, names, per, ec.open_kernel, ec.close_kernel)
    excluded = "".join(f", {n} {cat} image(s) of split '{state.cfg.data.val_split}' left out"
                       for cat, n in data.val_excluded.items())
    log.info("validation on %d frames%s: IoU %s, mean defect IoU %.3f (argmax %.3f)", len(val),
             excluded, {k: (round(v, 3) if v is not None else None) for k, v in res.iou.items()},
             res.mean_defect_iou, res.mean_defect_iou_argmax)
    out = res.as_dict()
    if data.val_excluded:
        # images of the split these figures leave out (magnetic-tile: MT_Free, which D has no
        # class for); `inspector evaluate --split val` on the same root scores them too
        out["excluded"] = dict(data.val_excluded)
    if fit:
        # a square-pad run's figures are of the native frames, as `inspector evaluate` scores
        # the bundle (runs before this key scored the padded, resized squares); tiled runs
        # always scored native frames and keep their metrics.json as it was
        out["scored_on"] = "native"
    if mc.region_head:
        out["region"] = _evaluate_region(model, calib, val, cfg, fit)
    out.update(global_threshold=g, calibration_frames=len(calib), seconds=round(time.monotonic() - t0, 1))
    return out


def _evaluate_region(model: ARCDInference, calib: list, val: list, cfg: TrainConfig,
                     fit: dict[str, str] | None = None) -> dict:
    """The region head's threshold (best region MIoU on the calibration frames, else
    evaluation.default_threshold) and its
    Table 3.3 figures (MPA, MIoU, IoU) on the validation frames, as the bundle will run it
    (``fit``: :func:`_frame_fit`)."""
    mc, ec = cfg.model, cfg.evaluation
    fit = fit or {}

    def region_of(frames: list) -> list[np.ndarray]:
        return [predict_frame(model, f.image, mc.tile, ec.overlap, mc.in_channels, mc.mean,
                              mc.std, output=2, **fit)[0] for f in frames]

    rc = [f for f in calib if f.region is not None]
    thr = ec.default_threshold
    if rc:
        thr, best = choose_region_threshold(region_of(rc), [f.region for f in rc],
                                            ec.threshold_candidates)
        log.info("region threshold from %d calibration frames: %.2f (region MIoU %.3f there)",
                 len(rc), thr, best)
    rv = [f for f in val if f.region is not None]
    scores = region_scores(region_confusion(region_of(rv), [f.region for f in rv], thr)) if rv \
        else {"mpa": None, "miou": None, "iou": None}
    log.info("region '%s' on %d validation frames: MPA %s, MIoU %s, IoU %s", mc.region_name,
             len(rv), *(None if v is None else round(v, 3) for v in scores.values()))
    return {"name": mc.region_name, "threshold": thr, **scores, "frames": len(rv),
            "calibration_frames": len(rc)}


def reconstruction_holdout(r: torch.nn.Module, items, crit: ReconstructionLoss) -> dict:
    """R's reconstruction of held-out stage-1 samples, told apart by kind.

    ``items`` are stage-1 samples (``image``, ``target``, ``anomaly_mask``). Besides the mean over
    all of them (``mse``, ``ssim``, ``ra``: the thesis's RA, eq. 4-9), the figures are split into
    ``clean`` samples (input = target, where copying the input would score RA 1) and ``anomalous``
    ones, and ``copy_input`` scores the trivial reconstruction, the input itself, on the anomalous
    samples: an R whose ``anomalous`` loss is not below it (``beats_copy`` false) loses more of
    the surface than it repairs, so its residual carries texture as well as defects.
    """
    weight = next(r.parameters(), None)
    dev = weight.device if weight is not None else torch.device("cpu")
    crit = crit.to(dev)
    kinds: dict[str, list[tuple[float, float, float]]] = {"clean": [], "anomalous": [], "copy_input": []}
    r.eval()
    with torch.no_grad():
        for item in items:
            x, y = item["image"][None].to(dev), item["target"][None].to(dev)
            loss, parts = crit(r(x), y)
            kind = "anomalous" if float(item["anomaly_mask"].sum()) > 0 else "clean"
            kinds[kind].append((float(loss), parts["mse"], parts["ssim"]))
            if kind == "anomalous":
                loss, parts = crit(x, y)
                kinds["copy_input"].append((float(loss), parts["mse"], parts["ssim"]))

    def summary(rows: list[tuple[float, float, float]]) -> dict | None:
        if not rows:
            return None
        loss, mse, s = (float(np.mean(c)) for c in zip(*rows))
        return {"loss": loss, "mse": mse, "ssim": s, "ra": reconstruction_accuracy(mse, s), "samples": len(rows)}

    out = summary(kinds["clean"] + kinds["anomalous"]) or {}
    for kind, rows in kinds.items():
        out[kind] = summary(rows)
    a, c = out["anomalous"], out["copy_input"]
    out["beats_copy"] = None if a is None else bool(a["loss"] < c["loss"])
    return out


def training_data(cfg: TrainConfig, world: int = 1) -> TrainingData:
    """The two stages' data of ``cfg``, indexed as training draws them."""
    return build_data(cfg.data, tile=tuple(cfg.data.train_crop or cfg.model.tile), channels=cfg.model.in_channels,
                      mean=cfg.model.mean, std=cfg.model.std, simulation=cfg.simulation,
                      # under torchrun every rank draws its own batch of each step
                      stage1_length=cfg.stage1.steps * cfg.stage1.batch_size * world,
                      stage2_length=cfg.stage2.steps * cfg.stage2.batch_size * world,
                      seed=cfg.seed)


def open_training_data(cfg: TrainConfig, config_path: Path, world: int = 1) -> TrainingData:
    """:func:`training_data`, every file it will read checked once, and its classes compared
    with ``model.classes``; what is wrong is a :class:`ConfigError` naming ``config_path`` and
    the key to change (``data.root`` for a missing root or a bad file in it)."""
    where = str(config_path)
    try:
        data = training_data(cfg, world)
        if data.check is not None:
            data.stage1_info = {**data.stage1_info, **data.check()}
    except TrainingDataError as e:
        raise ConfigError(where, e.key, str(e)) from e
    except FileNotFoundError as e:  # the readers: no root, no images/ folder, a missing mask
        raise ConfigError(where, "data.root", str(e)) from e
    # D has one output channel per class of model.classes and the masks hold the data's class
    # indices: fewer classes failed hours later in stage 2 (index out of bounds), the same ones
    # in another order trained fine and put the wrong names into the bundle
    got = list(data.class_names)
    if list(cfg.model.classes) != got:
        source = cfg.data.source + (f" {root}" if (root := getattr(cfg.data, "root", None)) else "")
        raise ConfigError(where, "model.classes",
                          f"{list(cfg.model.classes)}, but the {source} data has classes {got} "
                          f"(mask index i is class i, D's output i); set model.classes to {got}")
    if cfg.model.region_head and not getattr(data, "has_regions", False):
        # found now, not in stage 2 hours later: the region head needs a label for every image
        source = cfg.data.source + (f" {root}" if (root := getattr(cfg.data, "root", None)) else "")
        raise ConfigError(where, "model.region_head",
                          f"true, but the {source} data has no region labels (neu-seg layout: "
                          f"regions/<subset>/<stem>.png beside annotations/, nonzero = region); "
                          f"add them or set model.region_head: false")
    return data


def _settle_stage1_data(state: _State, data: TrainingData) -> None:
    """Record what stage 1 learns from in ``state`` (so in checkpoints and metrics.json), or,
    resuming after stage-1 steps were run, keep the checkpoint's record and warn where this
    config's data for stage 1 differs from it."""
    if not state.cfg.model.reconstruction:
        # the plain U-Net has no R and no stage 1: nothing learnt from any stage-1 data (its
        # data text says "stage 1: none"; a record here read as a stage 1 that never ran)
        state.stage1_data = None
        return
    now = dict(data.stage1_info)
    if state.stage == 1 and state.step == 0:
        state.stage1_data = now
        return
    if state.stage1_data is None:  # a checkpoint written before this record
        state.stage1_data = {**now, "note": "as this config gives it; the checkpoint holds no "
                                            "record of the data its stage 1 used"}
        return
    keys = ("normal_source", "windows", "mask_images")
    if any(state.stage1_data.get(k) != now.get(k) for k in keys):
        log.warning("stage 1 of this checkpoint learnt from %s, this config's stage 1 would use "
                    "%s; %s", {k: state.stage1_data.get(k) for k in keys},
                    {k: now.get(k) for k in keys},
                    "its remaining steps use this config's (metrics.json keeps the checkpoint's "
                    "record)" if state.stage == 1 else "R is not retrained (metrics.json records "
                                                       "the checkpoint's)")


def _settle_data_text(state: _State, data: TrainingData) -> None:
    """Word the data each stage trained on in ``state.data_text`` (kept in the checkpoint).

    A stage not begun yet will train on this config's data. A stage begun keeps the checkpoint's
    wording: a copied stage-1 checkpoint's R learnt from the data of the run that wrote it, and a
    finished run resumed with another ``data.root`` trained nothing on it; where a resume goes
    on training a stage with other data, the new wording is added from the next step on. A
    checkpoint older than this record is worded from this config, saying so (stage 1: from its
    ``stage1_data`` record where that differs from this config's)."""
    cfg = state.cfg
    for key, n, now, total in (("stage1", 1, data.stage1_text, cfg.stage1.steps),
                               ("stage2", 2, data.stage2_text, cfg.stage2.steps)):
        begun = state.stage > n or (state.stage == n and state.step > 0)
        if not begun:
            state.data_text[key] = [[1, now]]
            continue
        segs = state.data_text.get(key) or []
        if not segs:
            segs = [[1, _unrecorded_text(state, key, now, data.stage1_info)]]
        trains = not state.done and state.stage == n and state.step < total
        if trains and segs[-1][1] != now:
            segs.append([state.step + 1, now])
        state.data_text[key] = segs


def _unrecorded_text(state: _State, key: str, now: str, now_info: dict) -> str:
    """A begun stage's data wording for a checkpoint that holds none (written before the
    record): this config's, saying so, or for stage 1 its ``stage1_data`` record where that
    names other data than this config would use."""
    rec = state.stage1_data or {}
    keys = ("normal_source", "windows", "mask_images")
    if (key == "stage1" and "note" not in rec and rec.get("normal_source") == "defect-free-regions"
            and any(rec.get(k) != now_info.get(k) for k in keys)):
        return (f"defect-free windows placed by the masks of {rec.get('mask_images')} images "
                f"(data.stage1_windows {rec.get('windows')}; the checkpoint's record) plus "
                "simulated anomalies")
    return (f"{now} (as this config gives it: the checkpoint holds no record of the data its "
            f"{'stage 1' if key == 'stage1' else 'stage 2'} used)")


def _data_text(state: _State, key: str, ran: int) -> str:
    """One stage's data wording for metrics.json: each entry of ``state.data_text[key]`` with
    the steps it trained, where there is more than one."""
    segs = [e for i, e in enumerate(state.data_text.get(key) or []) if i == 0 or e[0] <= ran]
    if len(segs) <= 1:
        return segs[0][1] if segs else ""
    parts = []
    for i, (first, text) in enumerate(segs):
        last = segs[i + 1][0] - 1 if i + 1 < len(segs) else ran
        parts.append(f"{text} (steps {first}-{last})")
    return ", then ".join(parts)


def _stage1_steps_run(state: _State) -> int:
    """Stage-1 steps this run has trained (not the config's count: see train's resume)."""
    if state.stage == 1:
        return state.step
    hist = state.history["stage1"]
    return int(hist[-1][0]) if hist else 0


def stage1_holdout(cfg: TrainConfig, r: torch.nn.Module, data: TrainingData, n: int,
                   world: int = 1) -> dict:
    """:func:`reconstruction_holdout` on ``n`` simulated samples past stage 1's training range."""
    sc = cfg.stage1
    crit = ReconstructionLoss(sc.ssim_weight, mean=cfg.model.mean, std=cfg.model.std)
    # indices past the training range are draws of the same distribution never trained on
    base = sc.steps * sc.batch_size * world
    return reconstruction_holdout(r, (data.stage1.sample(base + i) for i in range(n)), crit)


def _stage1_holdout(state: _State, data: TrainingData, n: int = 64) -> dict:
    """The trainer's hold-out at the end of stage 1: :func:`stage1_holdout`, logged."""
    res = stage1_holdout(state.cfg, state.r, data, n, state.world)

    def line(part: dict | None) -> str:
        return "-" if part is None else f"mse {part['mse']:.5f} ssim {part['ssim']:.4f} RA {part['ra']:.3g}"

    log.info("stage 1 hold-out (%d simulated samples): %s (thesis eq. 4-9); clean windows %s; "
             "with anomalies %s; copying the input there %s", n, line(res), line(res["clean"]),
             line(res["anomalous"]), line(res["copy_input"]))
    if res["beats_copy"] is False:
        log.warning("R reconstructs the simulated anomalies worse than copying its input would "
                    "(loss %.5f against %.5f): its residual carries the surface's texture as well "
                    "as defects, and D may gain little from it over a plain D (README: 'R in the "
                    "thesis's own terms')", res["anomalous"]["loss"], res["copy_input"]["loss"])
    return res


def _at(state: _State) -> dict[str, Any]:
    return {"stage": state.stage, "step": state.step, "done": state.done}


def _record_config_changes(state: _State, changed: dict[str, list], config_path: Path,
                           ck_path: Path) -> None:
    """Warn of, and keep with the weights, what a resume changed in the config.

    The resumed run trains on with this config, and config.yaml, the checkpoint and the bundle's
    ``provenance.training_config`` then show it; the steps before the resume were trained with
    the checkpoint's values. The record (``config_changes``: where it resumed, each key's old and
    new value, whether any step trained after it) keeps that readable. Used to be silent: a
    finished run resumed with another ``stage2.lr`` rewrote config.yaml, trained nothing, and its
    bundle kept the old rate.
    """
    text = learnt_changes(changed)
    if not text:
        if changed:  # how the run executes (threads, device): nothing to record
            log.info("resumed with other run settings: %s",
                     ", ".join(f"{k} {v[0]!r} -> {v[1]!r}" for k, v in changed.items()))
        return
    learnt = {k: v for k, v in changed.items() if k.split(".")[0] not in RUN_KEYS}
    # a stopped run resumed with no more steps than it ran trains nothing either
    trains = not state.done and (state.stage == 1 or state.step < state.cfg.stage2.steps)
    state.config_changes.append({"resumed_at": _at(state), "trained_after": trains,
                                 "changed": learnt})
    if not trains:
        log.warning("%s: %s is at stage %d step %d, so nothing is left to train: %s change(s) "
                    "nothing in the weights; metrics.json is computed again with this config's "
                    "data and evaluation keys. config.yaml and the checkpoint now hold this config, "
                    "the change is recorded in config_changes", config_path, ck_path, state.stage,
                    state.step, text)
    else:
        log.warning("%s differs from the config of %s: %s; the steps from stage %d step %d on use "
                    "the new value(s), the earlier ones were trained with the old; recorded in "
                    "the checkpoint's and metrics.json's config_changes (and the bundle's "
                    "provenance)", config_path, ck_path, text, state.stage, state.step)


def train(config_path: Path, run_dir: Path | None = None, resume: bool = False) -> Path:
    """Train ARCD from ``config_path`` into ``run_dir``; returns the run folder.

    ``run_dir`` defaults to ``runs/<name>-<UTC time>``. An existing checkpoint is only continued
    with ``resume=True`` (never silently overwritten); the network sizes of the config must match
    the checkpoint's, while step counts may change (to train longer, or a copied stage-1
    checkpoint with another stage 2); the learning-rate schedule always follows this config.
    A stop (Ctrl-C, SIGTERM) raises :class:`TrainingStopped`, whose ``saved`` (also the last line
    logged) says what the run folder holds: no checkpoint yet (a folder this run made is removed
    again), the checkpoint of which step, or a finished checkpoint whose metrics.json is still to
    be written by ``--resume``.
    """
    config_path = Path(config_path)
    cfg = load_config(config_path)
    if cfg.stage1.steps + cfg.stage2.steps == 0:
        # it trained nothing, exited 0, and export onnx made a bundle of the untrained networks
        # (clgan's optim.n_epochs and defectgan's optim.iterations refuse a schedule of 0 too)
        keys = "stage2.steps" if not cfg.model.reconstruction else "stage1.steps and stage2.steps"
        raise ConfigError(str(config_path), "stage2.steps",
                          f"{keys} are 0: nothing would be trained; set stage2.steps (the "
                          "labelled defect stage) above 0" if cfg.model.reconstruction else
                          f"{keys} is 0 (a plain U-Net has no stage 1): nothing would be trained; "
                          "set it above 0")
    # before the run folder exists: a device this machine lacks is refused by name; under torchrun
    # each process joins the group and drives GPU LOCAL_RANK; one seed on every rank, so DDP
    # starts from identical weights
    ranks, dev = start_ranks(cfg.device, cfg.threads, cfg.seed, config_path)
    # the data before the run folder: a missing root, an unreadable image or mask, an empty split
    # or classes other than the model's are refused with nothing written (they used to fail
    # after the folder existed, some only after training, when the validation images were read)
    run_dir = prepare_run_dir(run_dir, cfg.name, resume, create=False)  # refuses an existing
    run = _RunStop(run_dir)  # run before reading data; what a stop reports (_stop_report)
    try:
        return _train(cfg, config_path, run, resume, ranks, dev)
    except KeyboardInterrupt as e:
        raise _stopped(e, run) from None


class _RunStop:
    """What :func:`_stop_report` needs to say truthfully what a stopped run left behind."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        self.made_dir = False  # this run created the folder
        self.state: _State | None = None
        self.metrics_written = False
        #: config.yaml written by this run: "new" (none was there), "replaced", or None
        self.config_written: str | None = None


def _stopped(e: KeyboardInterrupt, run: _RunStop) -> TrainingStopped:
    """The trainer's last line for a stop (Ctrl-C, SIGTERM), logged, as the exception the
    commands report: what was saved and how to go on, and a run folder this run made and left
    nothing in removed again."""
    reason = str(e) or "Ctrl-C"
    if isinstance(e, TrainingStopped):
        return e
    saved = _stop_report(run)
    log.warning("stopped (%s): %s", reason, saved)
    return TrainingStopped(reason, saved)


def _stop_report(run: _RunStop) -> str:
    st, ck_path = run.state, run.run_dir / CHECKPOINT
    if st is not None and st.rank != 0:
        return "rank 0 reports what was saved"
    at = st.saved_at if st is not None else None
    if at is None and st is not None and st.resumed_at is not None:
        at = st.resumed_at
        if at["done"] and not run.metrics_written:
            return (f"no new checkpoint: {ck_path} holds the finished training ({_where(at)}); "
                    f"the final validation was not written: --resume (trains nothing) writes "
                    f"{METRICS}")
        return f"no new checkpoint: {ck_path} still holds {_where(at)}; continue with --resume"
    if at is None:
        what = "no checkpoint saved (stopped before the first step)"
        if run.config_written == "new":  # this run's, nothing else had been there
            with contextlib.suppress(OSError):
                (run.run_dir / CONFIG).unlink()
        if run.made_dir:
            # the folder holds nothing this run did not put there: take it away again, so no
            # empty run folder is left that looks like a run
            try:
                run.run_dir.rmdir()
                return f"{what}; the run folder {run.run_dir} it had made was removed"
            except OSError:
                return f"{what}; {run.run_dir} holds no checkpoint"
        if not run.run_dir.exists():
            return f"{what}; no run folder was made"
        if run.config_written == "replaced":
            return f"{what}; {run.run_dir / CONFIG} now holds this config"
        return f"{what}; {run.run_dir} was left as it was"
    if at["done"] and not run.metrics_written:
        return (f"training finished and its checkpoint ({_where(at)}) was saved in {ck_path}, but "
                f"the final validation was not written: --resume (trains nothing) writes {METRICS}")
    if at["done"]:
        return f"checkpoint of {_where(at)} and {METRICS} saved in {run.run_dir}"
    return f"checkpoint of {_where(at)} saved in {ck_path}; continue with --resume"


def _train(cfg: TrainConfig, config_path: Path, run: _RunStop, resume: bool, ranks: Any,
           dev: torch.device) -> Path:
    run_dir = run.run_dir
    data = open_training_data(cfg, config_path, ranks.world)
    run.made_dir = not run_dir.exists()
    run_dir = prepare_run_dir(run_dir, cfg.name, resume)
    ck_path = run_dir / CHECKPOINT
    if dev.type == "cuda":
        # fixed crop sizes per stage: cuDNN times its algorithms once per shape and keeps the fastest
        torch.backends.cudnn.benchmark = True
    r, d = build_models(cfg.model)
    fmt = torch.channels_last if cfg.channels_last else torch.contiguous_format
    r.to(dev, memory_format=fmt)
    d.to(dev, memory_format=fmt)
    state = _State(cfg, r, d)
    run.state = state
    if resume and ck_path.exists():
        ck = load_checkpoint(ck_path)
        saved_cfg = saved_config(ck["config"], TrainConfig)
        check_resume_keys(saved_cfg, cfg.model_dump(mode="json"), ("model",), config_path, ck_path)
        if len(ck["optimizer"]["stage1"]["param_groups"]) != len(state.opt1.param_groups):
            # the stage-1 optimiser holds D only with train_d; a checkpoint of the other setting
            # cannot continue stage 1 with this config
            raise ConfigError(str(config_path), "stage1.train_d",
                              f"{'on' if cfg.stage1.train_d else 'off'} here, but the checkpoint "
                              f"{ck_path} was trained with it {'off' if cfg.stage1.train_d else 'on'}")
        state.load(ck)
        state.resumed_at = _at(state)
        prev = (cfg.stage1.steps if state.stage == 1 else cfg.stage2.steps)
        if state.done and state.step < prev:
            state.done = False  # the config asks for more steps than were run
        log.info("resuming %s at stage %d step %d", run_dir, state.stage, state.step)
        ran1 = _stage1_steps_run(state)
        if state.stage == 2 and cfg.stage1.steps != ran1:
            # stage 2 trains D on this R: going back to stage 1 would invalidate what D learnt,
            # so a changed stage1.steps is not acted on (it used to be reported as if it were)
            log.warning("stage1.steps is %d, but stage 1 of this checkpoint ended after %d steps "
                        "and stage 2 has begun: stage 1 is not %s; metrics.json records the %d "
                        "steps run. To train R for %d steps, start a new run folder.",
                        cfg.stage1.steps, ran1,
                        "extended" if cfg.stage1.steps > ran1 else "shortened", ran1,
                        cfg.stage1.steps)
        if state.stage == 2 and state.done and state.step > cfg.stage2.steps:
            log.warning("stage2.steps is %d, but this checkpoint already ran %d stage-2 steps: "
                        "nothing is undone; metrics.json records the %d steps run",
                        cfg.stage2.steps, state.step, state.step)
        _record_config_changes(state, config_changes(saved_cfg, cfg.model_dump(mode="json")),
                               config_path, ck_path)
    elif resume:
        log.warning("%s: nothing to resume, starting a new run", ck_path)
    run.config_written = "replaced" if (run_dir / CONFIG).exists() else "new"
    write_run_config(run_dir, cfg)
    if state.done and state.rank == 0 and resume and ck_path.exists():
        # nothing left to train, so no later save would give the checkpoint this config: save it
        # now (same weights, so metrics.json still matches), and config.yaml, the checkpoint and
        # an exported bundle agree, the change recorded beside them
        if state.config_changes and state.config_changes[-1].get("resumed_at") == _at(state):
            _save(state, ck_path)
    if cfg.stage1.train_d and not cfg.model.reconstruction:
        log.info("stage1.train_d is ignored: the plain U-Net baseline has no stage 1")
    log.info("run %s: R %.3f M params, D %.3f M params, tile %s, %d channel(s)", run_dir,
             count_parameters(r) / 1e6, count_parameters(d) / 1e6, list(cfg.model.tile),
             cfg.model.in_channels)

    log.info("data: %s", data.description)
    _settle_stage1_data(state, data)
    _settle_data_text(state, data)
    if not state.done:
        if state.stage == 1:
            _run_stage(state, 1, data, run_dir, dev)
            state.stage, state.step = 2, 0
            if state.rank == 0:
                _save(state, ck_path)
            if state.rank == 0 and cfg.stage1.steps:
                # kept apart: stage 1 sees normal images only, so runs that differ only in
                # stage 2 (labelled-data rates) can start from this file (copy it to
                # checkpoint.pt, --resume) instead of training the same R again
                atomic_save(state.state_dict(), run_dir / STAGE1_CHECKPOINT)
        _run_stage(state, 2, data, run_dir, dev)
        state.done = True
        if state.rank == 0:
            _save(state, ck_path)
    if state.world > 1:
        # same weights on every rank (DDP averaged the gradients of what each stage trained),
        # then leave the group together: rank 0 evaluates alone
        end_ranks(torch.nn.ModuleList([state.r, state.d]), state.world,
                  next(state.d.parameters()).device, "R+D weight", log)
    if state.rank != 0:
        # rank 0 alone evaluates and writes metrics; the others are done
        return run_dir

    # the steps actually run (a resumed run's config may ask for other counts; see above)
    ran1, ran2 = _stage1_steps_run(state), state.step
    metrics: dict[str, Any] = {
        "name": cfg.name,
        # which network these figures are of: the exporter refuses a metrics.json whose
        # checkpoint is not the one it exports (export.onnx_export)
        "checkpoint": checkpoint_ref(state.state_dict()),
        "stage1": {"steps": ran1, "final_loss": _final(state.history["stage1"]),
                   "first_loss": state.history["stage1"][0][1] if state.history["stage1"] else None,
                   "holdout": _stage1_holdout(state, data) if ran1 else None,
                   "data": state.stage1_data},
        "stage2": {"steps": ran2, "final_loss": _final(state.history["stage2"]),
                   "first_loss": state.history["stage2"][0][1] if state.history["stage2"] else None},
        "validation": _evaluate(state, data),
        "params": {"reconstruction": count_parameters(r), "discrimination": count_parameters(d)},
        "train_seconds": round(state.elapsed_s, 1),
        # what trained these weights (a copied stage-1 checkpoint's R, a finished run resumed
        # with another root: the checkpoint's record), scored as this config says
        "data": data.describe(_data_text(state, "stage1", ran1), _data_text(state, "stage2", ran2)),
        **({"config_changes": state.config_changes} if state.config_changes else {}),
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    for key, ran in (("stage1", ran1), ("stage2", ran2)):
        if getattr(cfg, key).steps != ran:
            metrics[key]["config_steps"] = getattr(cfg, key).steps
    write_metrics(run_dir, metrics)
    run.metrics_written = True
    log.info("done: %s (train time %s)", run_dir / METRICS, fmt_duration(state.elapsed_s))
    return run_dir


def main(argv: list[str] | None = None) -> int:
    # no --max-iters here; a damaged or foreign checkpoint is one line (CheckpointError), and so
    # is a data file that goes bad during training (TrainingDataError: the up-front check read
    # it fine), while any other ValueError keeps its traceback (a bug in the trainer, not the
    # user's input)
    return train_main(argv, kind="arcd", doc=__doc__, train=train, log=log,
                      errors=(ConfigError, CheckpointError, TrainingDataError, FileExistsError,
                              FileNotFoundError))


if __name__ == "__main__":
    sys.exit(main())
