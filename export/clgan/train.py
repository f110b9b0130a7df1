"""CLGAN training on defect-free images (``../shared/seeds/002_spec.md`` §1.5-§1.6).

Per iteration (CUT's order): G reconstructs [Real_A; Real_B]; a D step on (Real_B real, Fake_B
fake); a G+H step on ``lambda_GAN * L_GAN + lambda_X * PatchNCE(Real_A, Fake_B) + lambda_Y *
PatchNCE(Real_B, G(Real_B)) [+ lambda_l1 * L1(Fake_B, Real_A), off by default]``. Adam for G, D
and H; constant learning rate for ``n_epochs`` then linear decay to 0 over ``n_epochs_decay``.

The run folder holds ``config.yaml`` (the resolved config, ``kind: clgan``, which is how
``inspector export onnx`` recognises a CLGAN run), ``checkpoint.pt`` (G, D, H, optimisers,
iteration, elapsed time; written every ``checkpoint_every`` iterations and at the end),
``metrics.json`` (with ``checkpoint_step``: the export checks that the figures are those of the
checkpoint it exports), ``losses.jsonl`` and ``preview.png`` (fixed crops, their reconstructions
and residuals, refreshed at each checkpoint). ``--resume`` continues a run; pair ``i`` is a pure
function of (seed, rank, i) and the PatchNCE locations of iteration ``i`` of (seed, i), so a
resumed run computes what an uninterrupted one would (bit for bit on the CPU). A resume that
changes an architecture key (:data:`ARCHITECTURE_KEYS`) is refused naming the key. Every image
and mask training reads is read before the run folder is created: a missing data root, an unknown
category, an unreadable image or a mask of another size than its image is one line
``<config>: data.sources.<i>.root: <file>: <problem>`` (exit 2), with no run folder written.

Multi-GPU: ``torchrun --nproc_per_node=N -m export.clgan.train --config ...``; each rank draws its
own crops (batch_size per rank), gradients are averaged across ranks after every backward pass
(NCCL on GPUs, gloo on CPU), rank 0 writes the run folder.

Example::

    inspector train clgan --config configs/train/clgan-mt.yaml --run-dir runs/clgan-mt
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.distributed as dist
from pydantic import BaseModel, ConfigDict, Field, model_validator

from inspector.errors import CheckpointError, ConfigError
from inspector.evaluation.datasets import SplitFractions
from inspector.models.clgan import check_local_mean_window

from export.clgan.data import CropPairs, DataSource, NormalImage, TrainingDataError, load_normal_images
from export.clgan.loss import GANLoss, PatchNCE
from export.clgan.torch_model import (DEFAULT_NCE_LAYERS, PatchGANDiscriminator, ProjectionHeads,
                                      ResnetGenerator, count_parameters)
# the run folder's file names stay importable from here (export.clgan.export takes them so)
from export.training import RunSettings, CHECKPOINT, CONFIG, LOSSES, METRICS, PREVIEW  # noqa: F401
from export.training import (atomic_save, release_held_signals, write_metrics, check_resume_keys, saved_config, end_ranks, fmt_duration,
                             prepare_run_dir, rate_eta, read_checkpoint, read_config, start_ranks,
                             step_generator, train_main, trim_losses, update_ema, whole_step,
                             warn_config_changes, write_run_config)

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 1
#: config keys that shape G, D or H: a resume must keep them (the checkpoint's tensors have
#: their shapes); num_patches, nce_T, the losses and the optimiser may change
ARCHITECTURE_KEYS = ("data.channels", "generator", "discriminator", "nce.nce_layers",
                     "nce.mlp_layers", "nce.mlp_dim", "nce.mlp_last_relu")
#: stream of :func:`export.training.step_generator` for the PatchNCE locations
NCE_STREAM = 1

__all__ = ["ClganTrainConfig", "load_config", "planned_iterations", "build_networks", "ClganTrainer",
           "open_training_images", "train", "main"]


# ---------------------------------------------------------------------------------------------
# Config (every spec DEFAULT is a default here; configs/train/clgan-mt.yaml overrides for CPU)
# ---------------------------------------------------------------------------------------------

class DataConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    sources: list[DataSource] = Field(..., min_length=1)
    crop: int = Field(256, ge=16, description="training crop side (spec: 256x256 images)")
    channels: Literal[1, 3] = Field(3, description="model channels (spec: RGB; 1 for grey surfaces)")
    real_b_mode: Literal["independent", "same_as_A"] = "independent"
    flip: bool = Field(False, description="random left-right flip (spec: optional for textures)")
    vflip: bool = False
    split_test: float = Field(0.3, ge=0, le=1, description="hash share held out as test")
    split_val: float = Field(0.2, ge=0, le=1, description="hash share held out as val")

    @model_validator(mode="after")
    def _crop_div4(self) -> "DataConfig":
        if self.crop % 4:
            raise ValueError(f"crop {self.crop} must be a multiple of 4 (two stride-2 stages)")
        return self


class GeneratorConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    ngf: int = Field(64, ge=1)
    n_resblocks: int = Field(9, ge=0)
    normG: Literal["instance", "batch", "none"] = "instance"
    antialias: bool = False
    skip: Literal["none", "add", "concat"] = "none"


class DiscriminatorConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    ndf: int = Field(64, ge=1)
    n_layers_D: int = Field(3, ge=1)
    normD: Literal["batch", "instance", "none"] = "batch"
    layout: Literal["standard", "table1_literal"] = "standard"
    first_norm: bool | None = Field(None, description="norm on C1 (default: only in table1_literal)")


class NCEConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    nce_layers: list[str] = Field(default_factory=lambda: list(DEFAULT_NCE_LAYERS))
    num_patches: int = Field(256, ge=2)
    nce_T: float = Field(0.07, gt=0)
    mlp_layers: int = Field(4, ge=1)
    mlp_dim: int = Field(256, ge=1)
    mlp_last_relu: bool = False
    detach_keys: bool = Field(False, description="CUT's code detaches keys; the spec does not")


class LossConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    lambda_X: float = Field(1.0, ge=0)
    lambda_Y: float = Field(1.0, ge=0)
    lambda_GAN: float = Field(1.0, ge=0)
    lambda_l1: float = Field(0.0, ge=0, description="optional extension; the paper has none")
    gan_mode: Literal["vanilla", "lsgan"] = "vanilla"


class OptimConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    lr: float = Field(2e-4, gt=0)
    betas: tuple[float, float] = (0.5, 0.999)
    batch_size: int = Field(1, ge=1, description="per rank")
    n_epochs: float = Field(200, ge=0, description="epochs at constant learning rate")
    n_epochs_decay: float = Field(200, ge=0, description="epochs of linear decay to 0")
    iters_per_epoch: int | None = Field(None, ge=1, description="default: training images / batch")


class DetectionConfig(BaseModel):
    """Run-time detection written into the bundle (spec §2.3)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    tile: tuple[int, int] = (256, 256)
    overlap: int = Field(32, ge=0)
    gauss_ksize: int = Field(3, ge=1)
    gauss_sigma: float = Field(0.0, ge=0, description="0 = OpenCV's choice from the size (0.8 for 3)")
    residual_mode: Literal["abs", "signed", "clip"] = "abs"
    local_mean_window: int = Field(0, ge=0, description="the reconstruction takes the input's mean "
                                   "grey level over this odd Gaussian window before the residual; "
                                   "0 = off (the spec); see inspector.models.clgan")
    k1: float = 3.0
    k2: float = 1.0
    kernel_size: int = Field(3, ge=0, description="closing element side (square)")

    @model_validator(mode="after")
    def _odd(self) -> "DetectionConfig":
        if self.gauss_ksize % 2 == 0:
            raise ValueError(f"gauss_ksize must be odd, got {self.gauss_ksize}")
        try:
            check_local_mean_window(self.local_mean_window)
        except ValueError as e:
            raise ValueError(f"local_mean_window {e}") from None
        if any(t % 4 for t in self.tile):
            raise ValueError(f"tile {list(self.tile)} must be a multiple of 4")
        return self


class ClganTrainConfig(RunSettings):
    """The whole training YAML of a CLGAN run."""

    kind: Literal["clgan"] = "clgan"
    name: str = "clgan"
    data: DataConfig
    generator: GeneratorConfig = Field(default_factory=GeneratorConfig)
    discriminator: DiscriminatorConfig = Field(default_factory=DiscriminatorConfig)
    nce: NCEConfig = Field(default_factory=NCEConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    detection: DetectionConfig = Field(default_factory=DetectionConfig)
    #: folder the relative data roots resolve against (the config file's folder)
    base_dir: str = Field(".", description="set by load_config; relative data roots start here")


def load_config(path: Path) -> ClganTrainConfig:
    """Read and validate a training YAML; errors name the file and the dotted key."""
    path = Path(path)
    cfg = read_config(path, ClganTrainConfig)
    try:
        ResnetGenerator(cfg.data.channels, ngf=1, n_resblocks=cfg.generator.n_resblocks) \
            .feature_channels(cfg.nce.nce_layers)
    except ValueError as e:
        raise ConfigError(str(path), "nce.nce_layers", str(e)) from e
    o = cfg.optim
    if o.n_epochs + o.n_epochs_decay <= 0:
        # a run of 0 iterations would "complete" with no checkpoint to export
        raise ConfigError(str(path), "optim.n_epochs",
                          f"n_epochs {o.n_epochs:g} + n_epochs_decay {o.n_epochs_decay:g} is 0 epochs: "
                          "nothing would be trained; set at least one of them above 0")
    return cfg


def planned_iterations(cfg: ClganTrainConfig, n_images: int, config_path: Path) -> tuple[int, int]:
    """(iterations per epoch, planned iterations) for ``n_images`` training images; a schedule
    that rounds to 0 iterations is a :class:`ConfigError` naming ``optim.n_epochs``."""
    o = cfg.optim
    ipe = o.iters_per_epoch or max(1, n_images // o.batch_size)
    total = int(round((o.n_epochs + o.n_epochs_decay) * ipe))
    if total < 1:
        raise ConfigError(str(config_path), "optim.n_epochs",
                          f"n_epochs {o.n_epochs:g} + n_epochs_decay {o.n_epochs_decay:g} epochs of "
                          f"{ipe} iteration(s) is {total} iterations: nothing would be trained; "
                          "raise them")
    return ipe, total


def build_networks(cfg: ClganTrainConfig) -> tuple[ResnetGenerator, PatchGANDiscriminator, ProjectionHeads]:
    g = cfg.generator
    G = ResnetGenerator(cfg.data.channels, cfg.data.channels, g.ngf, g.n_resblocks, g.normG,
                        g.antialias, g.skip)
    d = cfg.discriminator
    D = PatchGANDiscriminator(cfg.data.channels, d.ndf, d.n_layers_D, d.normD, d.layout, d.first_norm)
    n = cfg.nce
    H = ProjectionHeads(G.feature_channels(n.nce_layers), n.mlp_layers, n.mlp_dim, n.mlp_last_relu)
    return G, D, H


# ---------------------------------------------------------------------------------------------
# One training step
# ---------------------------------------------------------------------------------------------

def _set_requires_grad(m: torch.nn.Module, flag: bool) -> None:
    for p in m.parameters():
        p.requires_grad_(flag)


class ClganTrainer:
    """Networks, optimisers and the per-iteration update. ``world > 1`` averages gradients
    across ranks (the process group must be initialised)."""

    def __init__(self, cfg: ClganTrainConfig, G: ResnetGenerator, D: PatchGANDiscriminator,
                 H: ProjectionHeads, world: int = 1):
        self.cfg, self.G, self.D, self.H, self.world = cfg, G, D, H, world
        o = cfg.optim
        self.opt_G = torch.optim.Adam(G.parameters(), lr=o.lr, betas=o.betas)
        self.opt_D = torch.optim.Adam(D.parameters(), lr=o.lr, betas=o.betas)
        self.opt_H = torch.optim.Adam(H.parameters(), lr=o.lr, betas=o.betas)
        self.gan = GANLoss(cfg.loss.gan_mode)
        self.nce = PatchNCE(cfg.nce.nce_T, cfg.nce.detach_keys)

    @property
    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"G": self.opt_G, "D": self.opt_D, "H": self.opt_H}

    def set_lr(self, lr: float) -> None:
        for opt in self.optimizers.values():
            for group in opt.param_groups:
                group["lr"] = lr

    def _sync(self, *modules: torch.nn.Module) -> None:
        if self.world <= 1:
            return
        for m in modules:
            for p in m.parameters():
                if p.grad is not None:
                    dist.all_reduce(p.grad)
                    p.grad /= self.world

    def nce_loss(self, src: torch.Tensor, tgt: torch.Tensor,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """PatchNCE between an input ``src`` (keys) and its reconstruction ``tgt`` (queries)."""
        layers, n = self.cfg.nce.nce_layers, self.cfg.nce.num_patches
        feat_k = self.G(src, nce_layers=layers)
        feat_q = self.G(tgt, nce_layers=layers)
        k, ids = self.H(feat_k, n, generator=generator)
        q, _ = self.H(feat_q, n, patch_ids=ids)
        return self.nce(q, k, src.shape[0])

    def step(self, real_a: torch.Tensor, real_b: torch.Tensor,
             generator: torch.Generator | None = None) -> dict[str, float]:
        """One D and one G+H update; ``generator`` draws the PatchNCE locations (the training
        loop passes the iteration's own, so a resumed run draws what an uninterrupted one did;
        None: the global torch RNG)."""
        lc = self.cfg.loss
        bs = real_a.shape[0]
        use_idt = lc.lambda_Y > 0
        real = torch.cat([real_a, real_b]) if use_idt else real_a
        fake = self.G(real)
        fake_b = fake[:bs]
        idt_b = fake[bs:] if use_idt else None
        out: dict[str, float] = {}

        # D step: Real_B is real, Fake_B (detached) is fake
        _set_requires_grad(self.D, True)
        self.opt_D.zero_grad(set_to_none=True)
        loss_d = 0.5 * (self.gan(self.D(fake_b.detach()), False) + self.gan(self.D(real_b), True))
        loss_d.backward()
        self._sync(self.D)
        self.opt_D.step()
        out["D"] = float(loss_d.detach())

        # G + H step (D frozen: its gradients are not needed here)
        _set_requires_grad(self.D, False)
        self.opt_G.zero_grad(set_to_none=True)
        self.opt_H.zero_grad(set_to_none=True)
        total = torch.zeros((), device=real_a.device)
        if lc.lambda_GAN > 0:
            g_gan = self.gan(self.D(fake_b), True)
            total = total + lc.lambda_GAN * g_gan
            out["G_GAN"] = float(g_gan.detach())
        if lc.lambda_X > 0:
            nce_x = self.nce_loss(real_a, fake_b, generator)
            total = total + lc.lambda_X * nce_x
            out["NCE_X"] = float(nce_x.detach())
        if use_idt:
            nce_y = self.nce_loss(real_b, idt_b, generator)
            total = total + lc.lambda_Y * nce_y
            out["NCE_Y"] = float(nce_y.detach())
        if lc.lambda_l1 > 0:
            l1 = (fake_b - real_a).abs().mean()
            total = total + lc.lambda_l1 * l1
            out["L1"] = float(l1.detach())
        total.backward()
        self._sync(self.G, self.H)
        self.opt_G.step()
        self.opt_H.step()
        _set_requires_grad(self.D, True)
        out["G"] = float(total.detach())
        for k, v in out.items():
            if not math.isfinite(v):
                raise FloatingPointError(f"loss {k} is {v}; lower optim.lr ({self.cfg.optim.lr})")
        return out


# ---------------------------------------------------------------------------------------------
# Run folder, checkpoints, the loop
# ---------------------------------------------------------------------------------------------

def load_checkpoint(path: Path) -> dict:
    ck = read_checkpoint(path)
    if ck.get("format") != CHECKPOINT_FORMAT or ck.get("kind") != "clgan":
        raise CheckpointError(f"{path}: not a CLGAN checkpoint of format {CHECKPOINT_FORMAT}")
    return ck


def lr_at(it: int, cfg: OptimConfig, iters_per_epoch: int) -> float:
    """Constant for ``n_epochs``, then linear to 0 at the end of ``n_epochs_decay`` (CUT)."""
    const = cfg.n_epochs * iters_per_epoch
    decay = cfg.n_epochs_decay * iters_per_epoch
    if it < const or decay <= 0:
        return cfg.lr
    return cfg.lr * max(0.0, 1.0 - (it - const) / decay)


#: fixed held-out crops in preview.png and in its |I - G(I)| figure: the same number at every
#: checkpoint and in metrics.json's preview_abs_error_grey, so the last checkpoint's log line and
#: the metrics give one figure for one network
PREVIEW_CROPS = 8


def _preview(G: ResnetGenerator, pairs: CropPairs, start: int, path: Path, n: int = PREVIEW_CROPS) -> float:
    """Input | reconstruction | 4x residual for ``n`` fixed crops; returns their mean |I - G(I)|
    in grey levels (how much of a normal surface the generator fails to keep)."""
    import cv2

    crops = np.stack([pairs.pair(start + i)[0] for i in range(n)])
    G.eval()
    with torch.no_grad():
        rec = G(torch.from_numpy(crops).to(next(G.parameters()).device)).cpu().numpy()
    G.train()
    to8 = lambda a: np.clip((a + 1) * 127.5, 0, 255).astype(np.uint8)  # noqa: E731
    rows = []
    for x, r in zip(crops, rec):
        xi, ri = to8(x).transpose(1, 2, 0), to8(r).transpose(1, 2, 0)
        diff = np.clip(np.abs(xi.astype(np.int16) - ri) * 4, 0, 255).astype(np.uint8)
        rows.append(np.concatenate([xi, ri, diff], axis=1))
    grid = np.concatenate(rows, axis=0)
    if grid.shape[2] == 3:
        grid = cv2.cvtColor(grid, cv2.COLOR_RGB2BGR)
    cv2.imwrite(str(path), grid)
    return float(np.abs((crops - rec) * 127.5).mean())


def open_training_images(cfg: ClganTrainConfig, config_path: Path) -> tuple[list[NormalImage], list[str]]:
    """The training images of ``cfg`` (:func:`export.clgan.data.load_normal_images`: every file
    read once, now); what cannot be used is a :class:`ConfigError` naming ``config_path``, the
    dotted key (``data.sources.<i>.root`` or ``.categories``) and the file or folder."""
    fractions = SplitFractions(cfg.data.split_test, cfg.data.split_val)
    try:
        images, desc = load_normal_images(cfg.data.sources, Path(cfg.base_dir), cfg.data.channels,
                                          cfg.data.crop, fractions)
    except TrainingDataError as e:
        raise ConfigError(str(config_path), e.key, str(e)) from e
    check_crop_fits(images, cfg.data.crop, config_path)
    return images, desc


def check_crop_fits(images: list[NormalImage], crop: int, config_path: Path) -> None:
    """Refuse a ``data.crop`` that no training image holds: an image smaller than the crop is
    reflect-padded to it, which is meant for the odd small image, but with a crop larger than
    every image each crop is padding, not the surface, and ``data.crop: 100000`` padded every
    image to 100000 x 100000 px (all the memory, an out-of-memory kill, an empty run folder)."""
    if not images or any(im.windows is not None for im in images):
        return  # neu-seg windows are cut inside their image (defect_free_windows)
    sizes = [im.image.shape[:2] for im in images]
    fit = max(min(h, w) for h, w in sizes)
    if crop <= fit:
        return
    small = min(sizes, key=lambda s: s[0] * s[1])
    raise ConfigError(str(config_path), "data.crop",
                      f"{crop} px is larger than every training image (the smallest is "
                      f"{small[0]}x{small[1]} px, and none holds a {crop}x{crop} window): set it "
                      f"to at most {fit}")


def train(config_path: Path, run_dir: Path | None = None, resume: bool = False,
          max_iters: int | None = None) -> Path:
    """Train CLGAN from ``config_path`` into ``run_dir``; returns the run folder.

    ``max_iters`` stops early (tests, smoke runs) without changing the learning-rate schedule.
    """
    config_path = Path(config_path)
    cfg = load_config(config_path)
    ranks, dev = start_ranks(cfg.device, cfg.threads, cfg.seed, config_path)
    world, rank, main_rank = ranks.world, ranks.rank, ranks.main
    # the data before the run folder: every image (and mask) training reads is read here, so a
    # missing root, an unknown category, an unreadable image or a mask of another size is one
    # line naming the config file, the key and the file, with no run folder written; an existing
    # run without --resume is refused before the data is read
    run_dir = prepare_run_dir(run_dir, cfg.name, resume, create=False)
    images, desc = open_training_images(cfg, config_path)
    o = cfg.optim
    ipe, total = planned_iterations(cfg, len(images), config_path)  # refused before the folder too
    run_dir = prepare_run_dir(run_dir, cfg.name, resume, create=main_rank)
    ck_path = run_dir / CHECKPOINT

    pairs = CropPairs(images, cfg.data.crop, cfg.data.channels, cfg.seed, rank,
                      cfg.data.real_b_mode, cfg.data.flip, cfg.data.vflip)

    G, D, H = build_networks(cfg)
    for m in (G, D, H):
        m.to(dev)
    if world > 1:  # every rank starts from rank 0's weights
        for m in (G, D, H):
            for t in list(m.parameters()) + list(m.buffers()):
                dist.broadcast(t.data, 0)
    trainer = ClganTrainer(cfg, G, D, H, world)
    step, elapsed, history = 0, 0.0, []
    #: the running loss averages (metrics' final_losses_ema) continue over a resume, so a resumed
    #: run reports what an uninterrupted one would, not an average of its last steps alone
    ema_start: dict[str, float] = {}
    if resume and ck_path.exists():
        ck = load_checkpoint(ck_path)
        check_resume_keys(saved_config(ck["config"], ClganTrainConfig), cfg.model_dump(mode="json"), ARCHITECTURE_KEYS,
                          config_path, ck_path)
        G.load_state_dict(ck["G"])
        D.load_state_dict(ck["D"])
        H.load_state_dict(ck["H"])
        for k, opt in trainer.optimizers.items():
            opt.load_state_dict(ck["optimizers"][k])
        step, elapsed, history = int(ck["step"]), float(ck["elapsed_s"]), list(ck.get("history", []))
        ema_start = dict(ck.get("ema") or {})  # checkpoints before this record start afresh
        if main_rank:
            log.info("resuming %s at iteration %d of %d", run_dir, step, total)
            warn_config_changes(saved_config(ck["config"], ClganTrainConfig), cfg.model_dump(mode="json"),
                                config_path, ck_path, f"iteration {step}")
    elif resume and main_rank:
        log.warning("%s: nothing to resume, starting a new run", ck_path)

    if main_rank:
        # rows a run that died after its last checkpoint wrote are written again from here
        trim_losses(run_dir / LOSSES, step)
        write_run_config(run_dir, cfg)
        for line in desc:
            log.info("data: %s", line)
        log.info("run %s: G %.3f M, D %.3f M, H %.3f M params; crop %d, %d channel(s), batch %d x %d "
                 "rank(s), %d iterations (%g + %g epochs of %d), device %s, %d thread(s)", run_dir,
                 count_parameters(G) / 1e6, count_parameters(D) / 1e6, count_parameters(H) / 1e6,
                 cfg.data.crop, cfg.data.channels, o.batch_size, world, total, o.n_epochs,
                 o.n_epochs_decay, ipe, dev, cfg.threads)

    def checkpoint() -> dict:
        return {"format": CHECKPOINT_FORMAT, "kind": "clgan", "step": step, "total": total,
                "elapsed_s": elapsed, "G": G.state_dict(), "D": D.state_dict(), "H": H.state_dict(),
                "optimizers": {k: v.state_dict() for k, v in trainer.optimizers.items()},
                "config": cfg.model_dump(mode="json"), "history": history, "ema": dict(ema),
                "torch": str(torch.__version__)}

    preview_start = 10 ** 9  # pair ids far beyond any training run: crops never trained on
    stop = total if max_iters is None else min(total, step + max_iters)
    G.train(), D.train(), H.train()
    t_rate, first, ema = time.monotonic(), step, dict(ema_start)
    t_prev = t_rate
    losses_f = open(run_dir / LOSSES, "a") if main_rank else None
    try:
        while step < stop:
            a, b = pairs.batch(step, o.batch_size)
            # a Ctrl-C or SIGTERM in here stops after the iteration (the D and the G+H updates,
            # the counter, the losses row): the checkpoint the handler below saves is one of a
            # whole iteration, and --resume does not repeat D's update
            with whole_step():
                lr = lr_at(step, o, ipe)
                trainer.set_lr(lr)
                parts = trainer.step(a.to(dev), b.to(dev), step_generator(cfg.seed, step, NCE_STREAM))
                step += 1
                now = time.monotonic()
                elapsed, t_prev = elapsed + (now - t_prev), now  # wall time, summed over resumes
                update_ema(ema, parts)
                if main_rank and (step % cfg.log_every == 0 or step == stop):
                    rate, eta = rate_eta(step - first, now - t_rate, stop - step)
                    losses_f.write(json.dumps({"it": step, "lr": lr, "elapsed_s": round(elapsed, 1),
                                               **{k: round(v, 5) for k, v in ema.items()}}) + "\n")
                    losses_f.flush()
                    history.append([step, ema.get("G", 0.0), ema.get("D", 0.0)])
                    log.info("it %d/%d %s lr %.2e %.2f it/s eta %s", step, total,
                             " ".join(f"{k} {v:.3f}" for k, v in ema.items()), lr, rate,
                             fmt_duration(eta))
            if not main_rank:
                continue
            if step % cfg.checkpoint_every == 0 or step == stop:
                err = _preview(G, pairs, preview_start, run_dir / PREVIEW)
                atomic_save(checkpoint(), ck_path)
                log.info("checkpoint at %d: preview crops (%d) |I - G(I)| %.2f grey levels", step,
                         PREVIEW_CROPS, err)
    except KeyboardInterrupt:
        if main_rank:
            atomic_save(checkpoint(), ck_path)
            log.warning("interrupted at iteration %d; checkpoint saved, continue with --resume", step)
        raise
    finally:
        if losses_f:
            losses_f.close()
        # under torchrun whole_step holds signals between steps; past the last one a Ctrl-C
        # during rank 0's preview and metrics must act at once, as without torchrun
        release_held_signals()

    if main_rank:
        err = _preview(G, pairs, preview_start, run_dir / PREVIEW)  # = the last checkpoint's line
        final = {k: round(v, 4) for k, v in ema.items()}
        metrics = {
            # checkpoint_step: the export compares it with the checkpoint's step (a run stopped
            # after a later --resume leaves these figures beside a newer checkpoint)
            "name": cfg.name, "kind": "clgan", "iterations": step, "checkpoint_step": step,
            "planned_iterations": total, "stopped_by": "completed" if step >= total else "max_iters",
            "iters_per_epoch": ipe, "world_size": world, "final_losses_ema": final,
            "preview_abs_error_grey": round(err, 3), "preview_crops": PREVIEW_CROPS,
            "params": {"G": count_parameters(G), "D": count_parameters(D), "H": count_parameters(H)},
            "train_seconds": round(elapsed, 1), "device": str(dev), "threads": cfg.threads,
            "data": desc, "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        write_metrics(run_dir, metrics)
        log.info("done: %d iterations in %s; preview crops (%d) |I - G(I)| %.2f grey levels; %s", step,
                 fmt_duration(elapsed), PREVIEW_CROPS, err, run_dir / METRICS)
    if world > 1:
        end_ranks(G, world, dev, "generator", log)
    return run_dir


def main(argv: list[str] | None = None) -> int:
    # a damaged checkpoint (CheckpointError) and bad training data (ConfigError, or a
    # TrainingDataError, a ValueError) are export.training.USER_ERRORS: one line, exit 2
    return train_main(argv, kind="clgan", doc=__doc__, train=train, log=log, max_iters="iterations")


if __name__ == "__main__":
    sys.exit(main())
