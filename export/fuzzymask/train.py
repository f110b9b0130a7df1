"""Fuzzy-mask inpainter training on defect-free images (``../shared/seeds/001_spec.md`` §2-§4.5).

Per step (spec §3.4): ``batch_size`` native-scale normal crops x, their fuzzy-masked copies x~
(cells complementary within the batch), one forward of ``cat([x, x~])`` and the eq. (5) loss
``[MSE + L_SSIM](x, Model(x)) + lambda [MSE + L_SSIM](x, Model(x~))``; Adam, learning rate
``lr * lr_gamma ** epoch`` (ExponentialLR stepped once per epoch). An epoch is
``iters_per_epoch`` steps (default: training images // batch size).

After training, tau for the runtime's suspicious cells (spec §4.5, ``train_envelope``): the 99th
percentile over ``tau_images`` training crops of max_{h,w} D(Model(x), x), stored in
``metrics.json`` with the step of the checkpoint it belongs to (``checkpoint_step``) and written
into the bundle by the export, which recomputes it when the checkpoint has moved on. The tau
crops have the runtime's tile side (``inference.tile``); with a NEU-Seg source and a tile other
than ``data.crop`` the normal images are loaded a second time for them, so that every tau crop
lies inside a defect-free window of the tile's size (:func:`load_tau_images`). That load happens
before training: a tile no image has a defect-free window for is refused then, naming the keys.
Every image and mask training reads is read before the run folder is created: a missing data
root, an unknown category, an unreadable image or a mask of another size than its image is one
line ``<config>: data.sources.<i>.root: <file>: <problem>`` (exit 2), with no run folder written.

The run folder holds ``config.yaml`` (the resolved config with ``kind: fuzzymask``, which is how
``inspector export onnx`` recognises the run), ``checkpoint.pt`` (network, optimiser, step,
elapsed time; every ``checkpoint_every`` steps and at the end), ``metrics.json``,
``losses.jsonl`` and ``preview.png`` (rows: x | x~ | Model(x) | Model(x~) | D(Model(x), x)).
``--resume`` continues a run; batch ``s`` is a pure function of (seed, rank, s), so a resumed run
sees the data an uninterrupted one would. ``max_minutes`` ends training cleanly (final
checkpoint, tau, metrics) once this invocation has run that long: a time-boxed GPU run.

Multi-GPU: ``torchrun --nproc_per_node=N -m export.fuzzymask.train --config ...``; the network
is wrapped in DistributedDataParallel (gradients averaged, BatchNorm buffers from rank 0), each
rank draws its own crops (batch_size per rank) and rank 0 writes the run folder.

Example::

    inspector train fuzzymask --config configs/train/fuzzymask-mt.yaml --run-dir runs/fuzzymask-mt
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.distributed as dist
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch.utils.data import DataLoader

from inspector.errors import CheckpointError, ConfigError
from inspector.evaluation.datasets import SplitFractions

from export.fuzzymask.data import (DataSource, NoNormalImages, NormalCrops, NormalImage, StepBatches,
                                   TrainingDataError, load_normal_images, worker_init)
from export.fuzzymask.loss import TYPE_WEIGHTS, FuzzyMaskLoss, dissimilarity_map
from export.fuzzymask.masking import FuzzyMaskConfig, fuzzy_mask
from export.fuzzymask.torch_model import FuzzyMaskNet, count_parameters
# the run folder's file names stay importable from here (export.fuzzymask.export takes them so)
from export.training import RunSettings, CHECKPOINT, CONFIG, LOSSES, METRICS, PREVIEW  # noqa: F401
from export.training import (atomic_save, release_held_signals, check_resume_keys, saved_config, write_metrics, end_ranks, fmt_duration, prepare_run_dir, rate_eta,
                             read_checkpoint, read_config, start_ranks, train_main, trim_losses,
                             update_ema, warn_config_changes, whole_step,
                             write_run_config)

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 1
#: crop ids for tau and the preview: far beyond any training step's, from the same images
TAU_START = 2 * 10 ** 9
PREVIEW_START = 10 ** 9

__all__ = ["FuzzymaskTrainConfig", "load_config", "build_model", "ssim_weights", "build_loss",
           "lr_at", "tau_needs_own_images", "load_tau_images", "open_training_images", "compute_tau",
           "load_checkpoint", "train", "main"]


# ---------------------------------------------------------------------------------------------
# Config: every spec value is the default here; configs/train/fuzzymask-*.yaml override for size
# ---------------------------------------------------------------------------------------------

class DataConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    sources: list[DataSource] = Field(..., min_length=1)
    crop: int = Field(256, ge=32, description="training crop side, native scale (spec: 256x256)")
    channels: Literal[1, 3] = Field(3, description="model channels (spec: RGB; 1 for grey surfaces)")
    flip: bool = Field(False, description="random left-right flip (the spec has no augmentation)")
    vflip: bool = False
    split_test: float = Field(0.3, ge=0, le=1, description="hash share held out as test")
    split_val: float = Field(0.2, ge=0, le=1, description="hash share held out as val")

    @model_validator(mode="after")
    def _crop32(self) -> "DataConfig":
        if self.crop % 32:
            raise ValueError(f"crop {self.crop} must be a multiple of 32 (five stride-2 stages)")
        return self


class ModelConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    width: int = Field(64, ge=2, description="encoder base width (spec ResNet34: 64)")
    blocks: tuple[int, int, int, int] = Field((3, 4, 6, 3), description="BasicBlocks per layer")
    skip_layers: tuple[Literal["layer1", "layer2", "layer3"], Literal["layer1", "layer2", "layer3"]] = \
        ("layer2", "layer3")
    fusion: bool = Field(True, description="false: the paper's CAE ablation (no skips)")
    upsample: Literal["bilinear", "convtranspose"] = "bilinear"
    pretrained_encoder: str | None = Field(None, description="local encoder checkpoint (relative to "
                                           "the config file); never downloaded")
    imagenet_norm: bool = Field(False, description="normalise inside forward (for an ImageNet encoder)")


class LossConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    lambda_inpaint: float = Field(0.1, ge=0, description="lambda of eq. (5): repair term weight")
    ssim_type: Literal["I", "II", "III"] = Field("I", description="Table 1 weights: I textures, "
                                                  "II shapes on large backgrounds, III mixed")
    weight_override: tuple[float, float, float] | None = Field(
        None, description="(alpha, beta, gamma) instead of the type's")
    gamma_override: float | None = Field(None, gt=0, description="the text's 1/3 power: 3")
    ssim_structure: Literal["standard", "literal"] = "standard"
    ssim_window: int = Field(11, ge=3)
    ssim_sigma: float = Field(1.5, gt=0)
    c1: float = Field(0.01 ** 2, gt=0)
    c2: float = Field(0.03 ** 2, gt=0)
    c3: float = Field(0.015 ** 2, gt=0)
    use_ssim: bool = Field(True, description="false: MSE only (ablation)")

    @model_validator(mode="after")
    def _odd(self) -> "LossConfig":
        if self.ssim_window % 2 == 0:
            raise ValueError(f"ssim_window must be odd, got {self.ssim_window}")
        return self


class OptimConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    lr: float = Field(2e-4, gt=0)
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = Field(0.0, ge=0)
    batch_size: int = Field(6, ge=1, description="per rank (paper: 6)")
    epochs: float = Field(200, gt=0, description="paper: 200")
    lr_gamma: float = Field(0.98, gt=0, le=1, description="ExponentialLR factor per epoch")
    iters_per_epoch: int | None = Field(None, ge=1, description="default: training images // batch")


class InferenceConfig(BaseModel):
    """Dynamic inference (spec §4) and post-processing written into the bundle."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    tile: int | None = Field(None, ge=32, description="runtime tile side (default: data.crop)")
    overlap: int = Field(32, ge=0)
    max_iterations: int = Field(10, ge=1, description="N")
    m: float = Field(1e-4, ge=0, description="convergence: MSE of consecutive reconstructions")
    conv_metric: Literal["mse", "D_mean"] = "mse"
    first_check_from: int = Field(1, ge=1)
    tau_mode: Literal["train_envelope", "per_image_sigma", "fixed"] = "train_envelope"
    tau: float | None = Field(None, ge=0, description="tau_mode fixed: this value")
    tau_percentile: float = Field(99.0, gt=0, le=100)
    tau_images: int = Field(256, ge=1, description="training crops used for tau (cap)")
    max_mask_frac: float = Field(0.5, gt=0, le=1)
    inference_fill: Literal["zero", "fuzzy"] = "zero"
    iter_target: Literal["inpaint", "last_iterate"] = "inpaint"
    apply_line18: bool = False
    smooth_sigma: float = Field(0.0, ge=0)
    clamp_negative: bool = False
    close_kernel: int = Field(0, ge=0)
    open_kernel: int = Field(0, ge=0)
    min_area_px: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _tile(self) -> "InferenceConfig":
        if self.tile is not None and self.tile % 32:
            raise ValueError(f"tile {self.tile} must be a multiple of 32")
        if self.tau_mode == "fixed" and self.tau is None:
            raise ValueError("tau_mode fixed needs tau")
        return self


class FuzzymaskTrainConfig(RunSettings):
    """The whole training YAML of a fuzzy-mask inpainter run."""

    kind: Literal["fuzzymask"] = "fuzzymask"
    name: str = "fuzzymask"
    data_workers: int = Field(0, ge=0, description="DataLoader worker processes (0 = inline)")
    max_minutes: float | None = Field(None, gt=0, description="end cleanly after this wall time")
    data: DataConfig
    model: ModelConfig = Field(default_factory=ModelConfig)
    mask: FuzzyMaskConfig = Field(default_factory=FuzzyMaskConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    inference: InferenceConfig = Field(default_factory=InferenceConfig)
    #: folder the relative data roots resolve against (the config file's folder)
    base_dir: str = Field(".", description="set by load_config; relative paths start here")

    def tile(self) -> int:
        return self.inference.tile or self.data.crop


def load_config(path: Path) -> FuzzymaskTrainConfig:
    """Read and validate a training YAML; errors name the file and the dotted key."""
    path = Path(path)
    cfg = read_config(path, FuzzymaskTrainConfig)
    enc = cfg.model.pretrained_encoder
    if enc and not (Path(cfg.base_dir) / enc).is_file():
        raise ConfigError(str(path), "model.pretrained_encoder", f"{Path(cfg.base_dir) / enc} not found")
    return cfg


def build_model(cfg: FuzzymaskTrainConfig, load_pretrained: bool = True) -> FuzzyMaskNet:
    mc = cfg.model
    net = FuzzyMaskNet(cfg.data.channels, mc.width, mc.blocks, mc.skip_layers, mc.fusion,
                       mc.upsample, mc.imagenet_norm)
    if load_pretrained and mc.pretrained_encoder:
        net.load_encoder(Path(cfg.base_dir) / mc.pretrained_encoder)
    return net


def ssim_weights(cfg: FuzzymaskTrainConfig) -> tuple[float, float, float]:
    """(alpha, beta, gamma) of the run: the type's, or the override, with gamma_override."""
    lc = cfg.loss
    a, b, g = lc.weight_override or TYPE_WEIGHTS[lc.ssim_type]
    return float(a), float(b), float(lc.gamma_override or g)


def _ssim_kw(cfg: FuzzymaskTrainConfig) -> dict[str, Any]:
    lc = cfg.loss
    return dict(window=lc.ssim_window, sigma=lc.ssim_sigma, structure=lc.ssim_structure,
                c1=lc.c1, c2=lc.c2, c3=lc.c3)


def build_loss(cfg: FuzzymaskTrainConfig) -> FuzzyMaskLoss:
    return FuzzyMaskLoss(*ssim_weights(cfg), lam=cfg.loss.lambda_inpaint, use_ssim=cfg.loss.use_ssim,
                         **_ssim_kw(cfg))


def lr_at(step: int, o: OptimConfig, iters_per_epoch: int) -> float:
    """ExponentialLR stepped once per epoch, as a closed form (a resumed run needs no scheduler state)."""
    return o.lr * o.lr_gamma ** (step // iters_per_epoch)


# ---------------------------------------------------------------------------------------------
# tau (spec §4.5) and the preview
# ---------------------------------------------------------------------------------------------

def tau_needs_own_images(cfg: FuzzymaskTrainConfig) -> bool:
    """Whether the tau crops (``inference.tile``) need the normal images loaded again at the tile
    side: a NEU-Seg image keeps only the corners of its defect-free windows of the side it was
    loaded for (``data.crop``), and a tile-sized crop at such a corner runs past the window (into
    defect pixels, or off the image). Other sources allow crops anywhere: the same images serve."""
    return cfg.tile() != cfg.data.crop and any(s.format == "neu-seg" for s in cfg.data.sources)


def load_tau_images(cfg: FuzzymaskTrainConfig, where: str,
                    images: list[NormalImage] | None = None) -> tuple[list[NormalImage], list[str]]:
    """The normal images tau crops of the tile side are cut from, and their description.

    ``images``: the training images (loaded at ``data.crop``), returned as they are when they
    serve (:func:`tau_needs_own_images`); otherwise (or when None) the sources are loaded at the
    tile side. When no image of the sources has a defect-free window of the tile's size, raises
    :class:`ConfigError` for ``where`` naming ``inference.tile`` (data errors propagate as they are).
    """
    d = cfg.data
    tile = cfg.tile()
    if images is not None and not tau_needs_own_images(cfg):
        return images, []
    try:
        tau_images, desc = load_normal_images(d.sources, Path(cfg.base_dir), d.channels, tile,
                                              SplitFractions(d.split_test, d.split_val))
    except ValueError as e:
        # a bad file or folder (TrainingDataError naming its data.sources key) is the data's
        # fault, not the tile's: only "no defect-free window of the tile's size" names the tile
        bad_file = isinstance(e, TrainingDataError) and not isinstance(e, NoNormalImages)
        if not tau_needs_own_images(cfg) or bad_file:
            raise
        raise ConfigError(where, "inference.tile",
                          f"{tile}: tau (spec §4.5) is computed on {tile}x{tile} crops of defect-free "
                          f"images, and no image of data.sources has a defect-free {tile}x{tile} window "
                          f"(NEU-Seg sources give defect-free windows only; {e}). Set inference.tile to "
                          f"at most the largest defect-free window (data.crop {d.crop} has them), or "
                          f"add a source of defect-free images") from None
    return tau_images, desc


def open_training_images(cfg: FuzzymaskTrainConfig, config_path: Path) -> tuple[list[NormalImage], list[str]]:
    """The training images of ``cfg`` (:func:`export.clgan.data.load_normal_images`: every file
    read once, now); what cannot be used is a :class:`ConfigError` naming ``config_path``, the
    dotted key (``data.sources.<i>.root`` or ``.categories``) and the file or folder."""
    d = cfg.data
    try:
        return load_normal_images(d.sources, Path(cfg.base_dir), d.channels, d.crop,
                                  SplitFractions(d.split_test, d.split_val))
    except TrainingDataError as e:
        raise ConfigError(str(config_path), e.key, str(e)) from e


@torch.no_grad()
def compute_tau(net: FuzzyMaskNet, crops: NormalCrops, cfg: FuzzymaskTrainConfig,
                device: torch.device, batch: int = 16) -> dict[str, Any]:
    """``train_envelope``: the ``tau_percentile`` of max_{h,w} D(Model(x), x) over ``tau_images``
    training crops (eval mode). Returns tau and the distribution of the per-image maxima."""
    ic = cfg.inference
    was_training = net.training
    net.eval()
    a, b, g = ssim_weights(cfg)
    maxima: list[np.ndarray] = []
    n = ic.tau_images
    for s in range(0, n, batch):
        x = crops.stack(range(TAU_START + s, TAU_START + min(n, s + batch))).to(device)
        d = dissimilarity_map(net(x), x, a, b, g, **_ssim_kw(cfg))
        maxima.append(d.flatten(1).amax(dim=1).cpu().numpy())
    net.train(was_training)
    mx = np.concatenate(maxima).astype(np.float64)
    tau = float(np.percentile(mx, ic.tau_percentile))
    return {"tau": round(tau, 6), "tau_mode": "train_envelope", "percentile": ic.tau_percentile,
            "images": int(mx.size), "tile": crops.crop,
            "per_image_max": {"min": round(float(mx.min()), 6), "median": round(float(np.median(mx)), 6),
                              "max": round(float(mx.max()), 6)}}


@torch.no_grad()
def _preview(net: FuzzyMaskNet, crops: NormalCrops, cfg: FuzzymaskTrainConfig, path: Path,
             device: torch.device, n: int = 4) -> float:
    """Rows x | x~ | Model(x) | Model(x~) | D(Model(x), x) (x4) of fixed crops never trained on;
    returns their mean |x - Model(x)| in grey levels."""
    import cv2

    was_training = net.training
    net.eval()
    x = crops.stack(range(PREVIEW_START, PREVIEW_START + n))
    xt, _ = fuzzy_mask(x, cfg.mask, np.random.default_rng([cfg.seed, PREVIEW_START]))
    out = net(torch.cat([x, xt]).to(device)).cpu()
    rec, inp = out[:n], out[n:]
    d = dissimilarity_map(rec, x, *ssim_weights(cfg), **_ssim_kw(cfg))
    net.train(was_training)

    def img(t: torch.Tensor) -> np.ndarray:
        a = np.clip(t.numpy() * 255.0, 0, 255).astype(np.uint8)
        return a.mean(axis=0).astype(np.uint8) if a.ndim == 3 else a  # grey view of RGB

    rows = [np.concatenate([img(x[i]), img(xt[i]), img(rec[i]), img(inp[i]),
                            img((d[i] * 4).clamp(0, 1))], axis=1) for i in range(n)]
    cv2.imwrite(str(path), np.concatenate(rows, axis=0))
    return float((x - rec).abs().mean() * 255.0)


# ---------------------------------------------------------------------------------------------
# Run folder, checkpoints, the loop
# ---------------------------------------------------------------------------------------------

def load_checkpoint(path: Path) -> dict:
    ck = read_checkpoint(path)
    if ck.get("format") != CHECKPOINT_FORMAT or ck.get("kind") != "fuzzymask":
        raise CheckpointError(f"{path}: not a fuzzymask checkpoint of format {CHECKPOINT_FORMAT}")
    return ck


def _any_rank(flag: bool, world: int, dev: torch.device) -> bool:
    """True when ``flag`` is set on any rank: every rank must leave the loop at the same step,
    or the others would wait forever in the next gradient all-reduce."""
    if world <= 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=dev)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def train(config_path: Path, run_dir: Path | None = None, resume: bool = False,
          max_iters: int | None = None) -> Path:
    """Train from ``config_path`` into ``run_dir``; returns the run folder.

    ``max_iters`` stops early (tests, smoke runs) without changing the learning-rate schedule.
    """
    t_start = time.monotonic()
    config_path = Path(config_path)
    cfg = load_config(config_path)
    ranks, dev = start_ranks(cfg.device, cfg.threads, cfg.seed, config_path)
    world, rank, main_rank = ranks.world, ranks.rank, ranks.main
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed crop size: let cuDNN pick its fastest convs
    # the data before the run folder: every image (and mask) training and tau read is read here,
    # so a missing root, an unknown category, an unreadable image or a mask of another size is
    # one line naming the config file, the key and the file, with no run folder written; an
    # existing run without --resume is refused before the data is read
    run_dir = prepare_run_dir(run_dir, cfg.name, resume, create=False)
    images, desc = open_training_images(cfg, config_path)
    # the images tau's tile-sized crops come from, loaded now (on every rank, so that all of them
    # stop alike): a tile without a defect-free window fails before training, not after it
    try:
        tau_images, tau_desc = load_tau_images(cfg, str(config_path), images)
    except TrainingDataError as e:
        raise ConfigError(str(config_path), e.key, str(e)) from e
    run_dir = prepare_run_dir(run_dir, cfg.name, resume, create=main_rank)
    ck_path = run_dir / CHECKPOINT
    if not main_rank:
        tau_images = []
    d = cfg.data
    crops = NormalCrops(images, d.crop, d.channels, cfg.seed, rank, d.flip, d.vflip)
    o = cfg.optim
    ipe = o.iters_per_epoch or max(1, len(images) // o.batch_size)
    total = max(1, int(round(o.epochs * ipe)))

    net = build_model(cfg).to(dev)
    fwd: torch.nn.Module = net
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        fwd = DDP(net, device_ids=[dev.index] if dev.type == "cuda" else None)  # syncs rank 0's init
    opt = torch.optim.Adam(net.parameters(), lr=o.lr, betas=o.betas, weight_decay=o.weight_decay)
    crit = build_loss(cfg)
    step, elapsed, history = 0, 0.0, []
    #: the running loss averages (metrics' final_losses_ema) continue over a resume, so a resumed
    #: run reports what an uninterrupted one would, not an average of its last steps alone
    ema_start: dict[str, float] = {}
    #: likewise the current epoch's loss sum and the last finished epoch's mean (last_epoch_loss)
    epoch_start: dict[str, Any] = {}
    if resume and ck_path.exists():
        ck = load_checkpoint(ck_path)
        check_resume_keys(saved_config(ck["config"], FuzzymaskTrainConfig), cfg.model_dump(mode="json"),
                          ("model", "data.channels"),
                          config_path, ck_path)
        net.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        step, elapsed, history = int(ck["step"]), float(ck["elapsed_s"]), list(ck.get("history", []))
        ema_start = dict(ck.get("ema") or {})  # checkpoints before this record start afresh
        epoch_start = dict(ck.get("epoch_loss") or {})
        if main_rank:
            log.info("resuming %s at step %d of %d", run_dir, step, total)
            warn_config_changes(saved_config(ck["config"], FuzzymaskTrainConfig),
                                cfg.model_dump(mode="json"), config_path, ck_path, f"step {step}")
    elif resume and main_rank:
        log.warning("%s: nothing to resume, starting a new run", ck_path)

    if main_rank:
        # rows a run that died after its last checkpoint wrote are written again from here
        trim_losses(run_dir / LOSSES, step)
        write_run_config(run_dir, cfg)
        for line in desc:
            log.info("data: %s", line)
        for line in tau_desc:
            log.info("tau crops (inference.tile %d, defect-free windows of that side): %s", cfg.tile(), line)
        log.info("run %s: %.3f M params (width %d, skips %s); crop %d, %d channel(s), batch %d x %d "
                 "rank(s), %d steps (%g epochs of %d), cell %d, lambda %g, SSIM type %s %s, device %s, "
                 "%d thread(s), %d data worker(s)%s", run_dir, count_parameters(net) / 1e6,
                 cfg.model.width, list(net.skip_layers) or "off", d.crop, d.channels, o.batch_size,
                 world, total, o.epochs, ipe, cfg.mask.cell, cfg.loss.lambda_inpaint, cfg.loss.ssim_type,
                 ssim_weights(cfg), dev, cfg.threads, cfg.data_workers,
                 f", at most {cfg.max_minutes:g} min" if cfg.max_minutes else "")

    def checkpoint() -> dict:
        return {"format": CHECKPOINT_FORMAT, "kind": "fuzzymask", "step": step, "total": total,
                "elapsed_s": elapsed, "model": net.state_dict(), "optimizer": opt.state_dict(),
                "config": cfg.model_dump(mode="json"), "history": history, "ema": dict(ema),
                # last_epoch_loss's running sums: a resumed run records what an uninterrupted one does
                "epoch_loss": {"sum": epoch_sum, "n": epoch_n, "last": last_epoch_loss,
                               "last_steps": last_epoch_steps},
                "torch": str(torch.__version__)}

    stop = total if max_iters is None else min(total, step + max_iters)
    deadline = t_start + cfg.max_minutes * 60 if cfg.max_minutes else None
    batches = StepBatches(crops, o.batch_size, cfg.mask, total)
    loader = DataLoader(batches, batch_size=None, sampler=range(step, stop),
                        num_workers=cfg.data_workers, worker_init_fn=worker_init,
                        pin_memory=dev.type == "cuda", persistent_workers=False,
                        prefetch_factor=4 if cfg.data_workers else None)
    net.train()
    t_rate, first, ema = time.monotonic(), step, dict(ema_start)
    t_prev = t_rate
    if epoch_start:
        epoch_sum, epoch_n = float(epoch_start["sum"]), int(epoch_start["n"])
        last_epoch_loss = None if epoch_start.get("last") is None else float(epoch_start["last"])
        last_epoch_steps = epoch_start.get("last_steps")
    else:
        # a checkpoint written before the sums were checkpointed: its resume averages the
        # steps from here (metrics.json's last_epoch_loss_steps says how many)
        epoch_sum, epoch_n, last_epoch_loss, last_epoch_steps = 0.0, 0, None, None
        if step and main_rank:
            log.warning("%s holds no epoch loss sums (an older checkpoint): last_epoch_loss covers "
                        "only the steps from %d", ck_path, step)
    stopped_by = "completed" if stop == total else "max_iters"
    losses_f = open(run_dir / LOSSES, "a") if main_rank else None
    try:
        for x, x_tilde in loader:
            # a Ctrl-C or SIGTERM in here stops after the step (the update, the counter, the
            # averages and the losses row): the checkpoint the handler below saves is one of a
            # whole step, and --resume does not repeat the update
            with whole_step():
                lr = lr_at(step, o, ipe)
                for group in opt.param_groups:
                    group["lr"] = lr
                x = x.to(dev, non_blocking=True)
                x_tilde = x_tilde.to(dev, non_blocking=True)
                opt.zero_grad(set_to_none=True)
                loss, parts = crit(fwd, x, x_tilde)
                loss.backward()
                opt.step()
                step += 1
                # one device sync per step for all the parts, not one per part
                vals = dict(zip(parts, torch.stack(list(parts.values())).tolist()))
                if not math.isfinite(vals["loss"]):
                    raise FloatingPointError(f"loss is {vals['loss']} at step {step}; lower optim.lr ({o.lr})")
                now = time.monotonic()
                elapsed, t_prev = elapsed + (now - t_prev), now  # wall time, summed over resumes
                update_ema(ema, vals)
                epoch_sum, epoch_n = epoch_sum + vals["loss"], epoch_n + 1
                if step % ipe == 0:
                    last_epoch_loss, last_epoch_steps = epoch_sum / epoch_n, epoch_n
                    epoch_sum, epoch_n = 0.0, 0
                out_of_time = _any_rank(deadline is not None and now >= deadline, world, dev)
                if main_rank and (step % cfg.log_every == 0 or step == stop or out_of_time):
                    rate, eta = rate_eta(step - first, now - t_rate, stop - step)
                    if deadline is not None:
                        eta = min(eta, max(0.0, deadline - now))
                    losses_f.write(json.dumps({"it": step, "epoch": round(step / ipe, 3), "lr": lr,
                                               "elapsed_s": round(elapsed, 1),
                                               **{k: round(v, 6) for k, v in ema.items()}}) + "\n")
                    losses_f.flush()
                    history.append([step, ema["loss"]])
                    log.info("it %d/%d ep %.1f loss %.4f (rec mse %.4f ssim %.4f | inp mse %.4f ssim %.4f) "
                             "lr %.2e %.2f it/s eta %s", step, total, step / ipe, ema["loss"],
                             ema["mse_rec"], ema["ssim_rec"], ema["mse_inp"], ema["ssim_inp"], lr, rate,
                             fmt_duration(eta))
            if main_rank and step % cfg.checkpoint_every == 0 and step != stop and not out_of_time:
                atomic_save(checkpoint(), ck_path)
                err = _preview(net, crops, cfg, run_dir / PREVIEW, dev)
                log.info("checkpoint at %d: preview crops |x - Model(x)| %.2f grey levels", step, err)
            if out_of_time:
                stopped_by = "max_minutes"
                if main_rank:
                    log.info("max_minutes %g reached at step %d of %d: stopping cleanly",
                             cfg.max_minutes, step, total)
                break
    except KeyboardInterrupt:
        if main_rank:
            atomic_save(checkpoint(), ck_path)
            log.warning("interrupted at step %d; checkpoint saved, continue with --resume", step)
        raise
    finally:
        if losses_f:
            losses_f.close()
        # under torchrun whole_step holds signals between steps; past the last one a Ctrl-C
        # during rank 0's preview and tau must act at once, as without torchrun
        release_held_signals()

    if main_rank:
        atomic_save(checkpoint(), ck_path)
        # tau can take minutes: a stop from here keeps these weights, and the line says so
        log.info("training ended at step %d: checkpoint saved; preview and tau next (a stop now "
                 "loses only those: --resume recomputes them and writes metrics.json)", step)
        err = _preview(net, crops, cfg, run_dir / PREVIEW, dev)
        t_tau = time.monotonic()
        tau_crops = NormalCrops(tau_images, cfg.tile(), d.channels, cfg.seed, 0, d.flip, d.vflip)
        tau = compute_tau(net, tau_crops, cfg, dev)
        log.info("tau (train_envelope, P%g of per-crop max D over %d crops): %.5f  [%.1f s]",
                 cfg.inference.tau_percentile, tau["images"], tau["tau"], time.monotonic() - t_tau)
        metrics = {
            # checkpoint_step: the export compares it with the checkpoint's step (a run stopped
            # after a later --resume leaves this tau beside a newer network)
            "name": cfg.name, "kind": "fuzzymask", "iterations": step, "checkpoint_step": step,
            "planned_iterations": total,
            "epochs_done": round(step / ipe, 3), "iters_per_epoch": ipe, "world_size": world,
            "stopped_by": stopped_by, "final_losses_ema": {k: round(v, 6) for k, v in ema.items()},
            "last_epoch_loss": None if last_epoch_loss is None else round(last_epoch_loss, 6),
            # the steps that mean covers: iters_per_epoch, fewer only after resuming an older
            # checkpoint without the epoch sums mid-epoch
            "last_epoch_loss_steps": last_epoch_steps,
            "final_lr": lr_at(max(0, step - 1), o, ipe),
            "preview_abs_error_grey": round(err, 3), "tau": tau["tau"], "tau_stats": tau,
            "ssim_weights": list(ssim_weights(cfg)), "params": count_parameters(net),
            "train_seconds": round(elapsed, 1), "device": str(dev), "threads": cfg.threads,
            "data_workers": cfg.data_workers, "data": desc,
            "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        write_metrics(run_dir, metrics)
        log.info("done: %d steps (%s) in %s; %s", step, stopped_by, fmt_duration(elapsed), run_dir / METRICS)
    if world > 1:  # DDP applied the same averaged gradients to the same start
        end_ranks(net, world, dev, "network")
    return run_dir


def main(argv: list[str] | None = None) -> int:
    return train_main(argv, kind="fuzzymask", doc=__doc__, train=train, log=log, max_iters="steps")


if __name__ == "__main__":
    sys.exit(main())
