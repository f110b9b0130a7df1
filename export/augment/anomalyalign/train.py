"""AnomalyAlign training (``../shared/seeds/000_spec.md`` §2-§3, scaled down per §8.2).

Three stages in one run (``--resume`` reloads the first two from a checkpoint of the diffusion
stage; a run stopped before it saved the segmenter's state instead, ``stage: segmenter``, and
``--resume`` goes on training the segmenter from that step, then fits the prompts again):

1. **Segmenter** (the alignment loss's frozen detector): a small U-Net trained on the labelled
   subset's real masks (focal + Dice, as ARCD's D), or loaded from ``segmenter.checkpoint``.
2. **Prompts**: the library (defect words x synonyms x templates), :class:`TinyClip` trained
   contrastively on the same images, and per training image the highest-scoring prompt (eq. 4).
   The chosen prompt's text embedding is that image's cross-attention condition.
3. **Diffusion**: ``L = L_diff + align_weight * L_a`` for the first ``align_frac`` of the planned
   iterations, then ``L_diff`` alone (eq. 7/8). ``L_a = MSE(softmax(Seg(x̂0)), onehot(mask))`` on
   the one-step estimate ``x̂0 = (x_t - sqrt(1-ᾱ) ε̂) / sqrt(ᾱ)`` (pixel space: no VAE to decode).

Data: only :func:`export.augment.dataset.labelled_subset` (the images ARCD sees at
``data.label_fraction``), resized to ``data.resolution``, random flips / 90° turns applied to
image and mask alike. Batch ``i`` and its noise are a pure function of (seed, i), so a resumed
run sees what an uninterrupted one would. Ctrl-C / SIGTERM takes effect between iterations
(the segmenter's and the diffusion's: :func:`export.training.whole_step`), the checkpoint carries the running loss averages, and
``--resume`` refuses another network or another image list (:func:`check_resume`): a resumed run
ends with the weights, optimiser state and ``losses.jsonl`` rows of an uninterrupted one (bit for
bit on the CPU; rows a dead run wrote past its last checkpoint are dropped on resume).

From scratch the base UNet is trained together with the ControlNet (``model.train_unet``): the
paper locks a *pretrained* SD UNet, but a locked random UNet has no prior to keep. With
``model.pretrained`` (a local diffusers folder with ``unet/`` [and ``controlnet/``], or an
AnomalyAlign ``checkpoint.pt``) set ``train_unet: false`` for the paper's locked form.

The run folder: ``config.yaml`` (``kind: anomalyalign``), ``checkpoint.pt``, ``segmenter.pt``,
``prompts.json`` (library and per-image choice), ``losses.jsonl``, ``metrics.json``,
``preview.png`` (DDIM samples from training masks, refreshed at each checkpoint).

Example::

    inspector augment anomalyalign train --config configs/train/anomalyalign-neu-10.yaml \\
        --run-dir runs/anomalyalign-neu-10
"""

from __future__ import annotations

import copy
import json
import logging
import math
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator

from inspector.errors import CheckpointError, ConfigError

from export.augment.anomalyalign.nets import (SegUNet, build_controlnet, build_unet,
                                              count_parameters, denoise, mask_to_cond)
from export.augment.anomalyalign.prompts import (CATEGORIES, SYNONYMS, TEMPLATES, PromptLibrary,
                                                 TinyClip, build_library, select_prompts,
                                                 train_tinyclip)
from export.training import (CHECKPOINT, LOSSES, METRICS, PREVIEW, RunSettings, atomic_save, write_metrics,
                             check_device, check_resume_keys, saved_config, fmt_duration, pick_device,
                             prepare_run_dir, rate_eta, read_checkpoint, read_config, train_main,
                             trim_losses, update_ema, warn_config_changes, whole_step,
                             write_run_config)

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 1
SEGMENTER = "segmenter.pt"
#: ``stage`` of a checkpoint saved when a run was stopped before its diffusion stage (the
#: segmenter's weights and optimiser, no diffusion networks); one of the diffusion stage says
#: ``diffusion`` (older ones say nothing)
SEGMENTER_STAGE, DIFFUSION_STAGE = "segmenter", "diffusion"
#: the keys a run stopped in its segmenter stage must keep on --resume: what picks and orders its
#: images and the segmenter's own (its steps may change, like --max-iters); the diffusion
#: network has not been built yet
SEGMENTER_STAGE_RESUME_KEYS = ("seed", "data.resolution", "data.label_fraction", "data.label_seed",
                               "segmenter.width", "segmenter.batch_size", "segmenter.lr",
                               "segmenter.checkpoint")
PROMPTS = "prompts.json"

__all__ = ["AnomalyAlignConfig", "load_config", "TrainData", "load_train_data", "read_train_data",
           "augment_batch", "SEGMENTER_STAGE", "DIFFUSION_STAGE",
           "train_segmenter", "DiffusionTrainer", "align_weight_at", "train", "main",
           "load_checkpoint", "make_scheduler"]


# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------

class DataConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    root: str = Field("../shared/data/neu_seg", description="NEU-Seg folder (relative: to the cwd)")
    label_fraction: float = Field(0.1, gt=0, le=1, description="ARCD's data.label_fraction")
    label_seed: int = Field(0, description="ARCD's data.label_seed")
    resolution: int = Field(64, ge=16, description="model side in pixels (a multiple of 8)")
    flip: bool = Field(True, description="random horizontal / vertical flips")
    rot90: bool = Field(True, description="random quarter turns (strip textures have no up)")

    @model_validator(mode="after")
    def _div8(self) -> "DataConfig":
        if self.resolution % 8:
            raise ValueError(f"resolution {self.resolution} must be a multiple of 8")
        return self


class SegmenterConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    checkpoint: str | None = Field(None, description="a segmenter.pt or AnomalyAlign checkpoint.pt "
                                                     "to load instead of training one")
    width: int = Field(16, ge=4)
    steps: int = Field(300, ge=0)
    batch_size: int = Field(16, ge=1)
    lr: float = Field(1e-3, gt=0)


class PromptConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    dim: int = Field(64, ge=8, description="text/image embedding size = cross_attention_dim")
    image_width: int = Field(16, ge=4)
    steps: int = Field(200, ge=0)
    batch_size: int = Field(32, ge=2)
    lr: float = Field(2e-3, gt=0)
    synonyms: dict[str, list[str]] | None = Field(None, description="default: the built-in table")
    categories: list[str] | None = None
    templates: list[str] | None = None
    restrict_to_class: bool = Field(True, description="argmax only over the image's class prompts")


class ModelConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    widths: list[int] = Field(default_factory=lambda: [16, 32, 64, 64])
    attention: list[bool] = Field(default_factory=lambda: [False, False, True, True])
    layers_per_block: int = Field(1, ge=1)
    head_dim: int = Field(8, ge=1)
    norm_groups: int = Field(8, ge=1)
    hint_channels: list[int] = Field(default_factory=lambda: [16])
    train_unet: bool = Field(True, description="train the base UNet too (from scratch: yes)")
    pretrained: str | None = Field(None, description="local diffusers folder (unet/[, controlnet/]) "
                                                     "or AnomalyAlign checkpoint.pt")

    @model_validator(mode="after")
    def _lens(self) -> "ModelConfig":
        if len(self.widths) != len(self.attention):
            raise ValueError(f"widths {self.widths} and attention {self.attention} differ in length")
        if any(w % self.norm_groups for w in self.widths):
            raise ValueError(f"every width must be a multiple of norm_groups {self.norm_groups}")
        return self


class DiffusionConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    train_timesteps: int = Field(1000, ge=10)
    beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2"] = "linear"
    beta_start: float = Field(1e-4, gt=0)
    beta_end: float = Field(0.02, gt=0)
    text_dropout: float = Field(0.1, ge=0, le=1, description="share of null prompts (for CFG)")


class OptimConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    lr: float = Field(2e-4, gt=0, description="from scratch; the paper's 1e-5 is for fine-tuning")
    weight_decay: float = Field(0.0, ge=0)
    batch_size: int = Field(8, ge=1)
    epochs: float = Field(30, gt=0, description="passes over the labelled subset")
    warmup: int = Field(50, ge=0, description="linear warm-up iterations")
    grad_clip: float = Field(1.0, ge=0, description="0 = off")
    ema_decay: float = Field(0.995, ge=0, lt=1, description="weight EMA sampled from (0 = off)")
    align_weight: float = Field(0.01, ge=0, description="eq. 8's weight of L_a")
    align_frac: float = Field(0.4, ge=0, le=1, description="L_a during this share of iterations")
    la_max_t: int | None = Field(None, ge=1, description="L_a only for t < this (None: all t, paper)")


class SampleConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    steps: int = Field(20, ge=1, description="DDIM steps")
    eta: float = Field(0.0, ge=0)
    guidance_scale: float = Field(1.0, ge=1, description="classifier-free guidance; 1 = off")
    control_scale: float = Field(1.0, ge=0)
    max_shift: float = Field(0.15, ge=0, lt=1, description="mask shift, share of the side")
    batch_size: int = Field(25, ge=1)


class AnomalyAlignConfig(RunSettings):
    """The whole training YAML of an AnomalyAlign run."""

    kind: Literal["anomalyalign"] = "anomalyalign"
    name: str = "anomalyalign"
    threads: int = Field(1, ge=1, description="torch CPU threads")
    max_minutes: float | None = Field(None, gt=0, description="end cleanly after this wall time")
    log_every: int = Field(25, ge=1)
    checkpoint_every: int = Field(200, ge=1)
    data: DataConfig = Field(default_factory=DataConfig)
    segmenter: SegmenterConfig = Field(default_factory=SegmenterConfig)
    prompts: PromptConfig = Field(default_factory=PromptConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = Field(default_factory=DiffusionConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    sample: SampleConfig = Field(default_factory=SampleConfig)


def load_config(path: Path) -> AnomalyAlignConfig:
    """Read and validate a training YAML; errors name the file and the dotted key."""
    return read_config(Path(path), AnomalyAlignConfig, set_base_dir=False)


def make_scheduler(cfg: DiffusionConfig, kind: Literal["ddpm", "ddim"] = "ddpm"):
    from diffusers import DDIMScheduler, DDPMScheduler

    kw = dict(num_train_timesteps=cfg.train_timesteps, beta_schedule=cfg.beta_schedule,
              beta_start=cfg.beta_start, beta_end=cfg.beta_end, prediction_type="epsilon",
              clip_sample=True)
    if kind == "ddim":
        # set_alpha_to_one: the last DDIM step lands on the clean image, not on ᾱ_0
        return DDIMScheduler(**kw, set_alpha_to_one=True)
    return DDPMScheduler(**kw)


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------

@dataclass
class TrainData:
    """The labelled subset at model resolution."""

    images: torch.Tensor  # [N, 1, R, R] float in [-1, 1]
    masks: torch.Tensor  # [N, R, R] int64 class indices
    labels: list[str]  # dominant defect class per image
    stems: list[str]
    classes: list[str]  # background first
    source: str  # where it came from (for the manifest)

    def __len__(self) -> int:
        return len(self.stems)


def dominant_class(mask: np.ndarray, classes: list[str]) -> str:
    """The defect class with most pixels (the first defect class for an all-background mask)."""
    counts = np.bincount(mask.reshape(-1), minlength=len(classes))[1:]
    return classes[1 + int(counts.argmax())]


def resize_pair(image: np.ndarray, mask: np.ndarray, res: int) -> tuple[np.ndarray, np.ndarray]:
    img = cv2.resize(image, (res, res), interpolation=cv2.INTER_AREA)
    msk = cv2.resize(mask, (res, res), interpolation=cv2.INTER_NEAREST)
    return img, msk


def from_arrays(images: list[np.ndarray], masks: list[np.ndarray], classes: list[str],
                stems: list[str], res: int, source: str) -> TrainData:
    imgs, msks = zip(*(resize_pair(i, m, res) for i, m in zip(images, masks)))
    x = torch.from_numpy(np.stack(imgs).astype(np.float32) / 127.5 - 1.0).unsqueeze(1)
    m = torch.from_numpy(np.stack(msks).astype(np.int64))
    return TrainData(x, m, [dominant_class(mm, classes) for mm in masks], list(stems),
                     list(classes), source)


def read_train_data(cfg: DataConfig, config_path: Path) -> TrainData:
    """:func:`load_train_data`, every image and mask read; a missing root, a folder not in the
    NEU-Seg layout or a file that cannot be read is a :class:`ConfigError` naming
    ``config_path`` and ``data.root`` (one line from the command, exit 2)."""
    try:
        return load_train_data(cfg)
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(str(config_path), "data.root", str(e)) from e
    except KeyboardInterrupt:
        log.warning("interrupted while reading the training data: nothing new saved")
        raise


def load_train_data(cfg: DataConfig) -> TrainData:
    from export.augment.dataset import labelled_subset

    ds = labelled_subset(cfg.root, cfg.label_fraction, cfg.label_seed)
    ds.color = "gray"
    samples = [ds.load(i) for i in range(len(ds))]
    return from_arrays([s.image for s in samples], [s.mask for s in samples], list(ds.classes),
                       [s.entry.stem for s in samples], cfg.resolution,
                       f"{ds.root} {ds.split} ({len(ds)} images)")


def augment_batch(x: torch.Tensor, m: torch.Tensor | None, g: torch.Generator, flip: bool = True,
                  rot90: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The same random flips / quarter turn per sample on image and mask."""
    xs, ms = [], []
    for i in range(x.shape[0]):
        r = torch.randint(0, 8, (1,), generator=g).item()
        xi, mi = x[i], (m[i] if m is not None else None)
        if flip and r & 1:
            xi, mi = xi.flip(-1), (mi.flip(-1) if mi is not None else None)
        if flip and r & 2:
            xi, mi = xi.flip(-2), (mi.flip(-2) if mi is not None else None)
        if rot90 and r & 4:
            xi, mi = xi.rot90(1, (-2, -1)), (mi.rot90(1, (-2, -1)) if mi is not None else None)
        xs.append(xi)
        ms.append(mi)
    return torch.stack(xs), (torch.stack(ms) if m is not None else None)


def step_generator(seed: int, step: int, stream: int = 0) -> torch.Generator:
    """Randomness of iteration ``step``: a pure function of (seed, stream, step), for resume."""
    return torch.Generator().manual_seed((int(seed) * 1_000_003 + stream * 7_919 + step) % (2 ** 63))


# ---------------------------------------------------------------------------------------------
# Stage 1: the segmenter
# ---------------------------------------------------------------------------------------------

def train_segmenter(data: TrainData, cfg: SegmenterConfig, seed: int, flip: bool, rot90: bool,
                    dev: torch.device, resume_from: dict | None = None,
                    progress: dict | None = None, deadline: float | None = None
                    ) -> tuple[SegUNet | None, dict]:
    """A small U-Net on the real masks (focal + Dice, as ARCD's D); returns it frozen, in eval
    mode, and its final train loss and per-class IoU on the (unaugmented) subset.

    Ctrl-C / SIGTERM inside a step takes effect at its end (:func:`export.training.whole_step`).
    ``progress`` (a dict) receives ``"state"``: a function returning the state reached (weights,
    optimiser, loss average, steps done) for the checkpoint of a stopped run; ``resume_from``
    (such a state) goes on from its step. Step ``i``'s batch is a pure function of (seed, i), so
    the resumed segmenter is the uninterrupted one (bit for bit on the CPU).

    ``deadline`` (``time.monotonic()``; the run's max_minutes) stops it before the next step
    once passed: it returns ``(None, {})`` and the caller saves ``progress["state"]()`` as a
    stopped run's (the segmenter stage used to run in full whatever max_minutes said)."""
    from export.arcd.loss import DiceLoss, FocalLoss

    torch.manual_seed(seed)
    net = SegUNet(len(data.classes), cfg.width).to(dev)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    focal, dice = FocalLoss(gamma=2.0), DiceLoss()
    ema: dict[str, float] = {}
    step = 0
    if resume_from is not None:
        net.load_state_dict(resume_from["state_dict"])
        opt.load_state_dict(resume_from["optimizer"])
        ema = dict(resume_from.get("loss_ema") or {})
        step = int(resume_from["step"])
        log.info("resuming the segmenter at step %d of %d", step, cfg.steps)

    def state() -> dict:
        return {"step": step, "steps": cfg.steps, "width": cfg.width, "classes": len(data.classes),
                "state_dict": net.state_dict(), "optimizer": opt.state_dict(), "loss_ema": dict(ema)}

    if progress is not None:
        progress["state"] = state
    net.train()
    t0 = time.monotonic()
    while step < cfg.steps:
        if deadline is not None and time.monotonic() >= deadline:
            return None, {}
        g = step_generator(seed, step, stream=1)
        pick = torch.randint(0, len(data), (min(cfg.batch_size, len(data)),), generator=g)
        x, m = augment_batch(data.images[pick], data.masks[pick], g, flip, rot90)
        x, m = (x.to(dev) + 1) / 2, m.to(dev)
        # the update, the step count and the loss average as one: a stop saves a whole step
        with whole_step():
            logits = net(x)
            loss = focal(logits, m) + dice(logits, m)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            update_ema(ema, {"seg": float(loss.detach())})
            step += 1
            if step % 50 == 0 or step == cfg.steps:
                log.info("segmenter %d/%d loss %.4f", step, cfg.steps, ema["seg"])
    freeze(net)
    iou = segmenter_iou(net, data.images, data.masks, len(data.classes), dev)
    log.info("segmenter trained in %s: train IoU per class %s", fmt_duration(time.monotonic() - t0),
             {c: round(v, 3) for c, v in zip(data.classes[1:], iou)})
    return net, {"loss": ema.get("seg"), "train_iou": iou}


def freeze(net: torch.nn.Module) -> None:
    net.eval()
    for p in net.parameters():
        p.requires_grad_(False)


@torch.no_grad()
def segmenter_iou(net: SegUNet, images: torch.Tensor, masks: torch.Tensor, k: int,
                  dev: torch.device) -> list[float]:
    """IoU per defect class of ``net``'s argmax against ``masks`` ([-1, 1] images)."""
    preds = torch.cat([net((images[i:i + 64].to(dev) + 1) / 2).argmax(1).cpu()
                       for i in range(0, len(images), 64)])
    out = []
    for c in range(1, k):
        inter = ((preds == c) & (masks == c)).sum().item()
        union = ((preds == c) | (masks == c)).sum().item()
        out.append(inter / union if union else float("nan"))
    return out


def load_segmenter(path: Path, classes: int) -> SegUNet:
    ck = read_checkpoint(path)
    if ck.get("kind") == "anomalyalign":
        if ck.get("stage") == SEGMENTER_STAGE:
            raise ValueError(f"{path}: a run stopped while training its segmenter (step "
                             f"{_seg_step(ck)}): no finished segmenter yet; continue the run with "
                             "--resume first")
        ck = ck["segmenter"]
    if ck.get("kind") != "anomalyalign-segmenter":
        raise ValueError(f"{path}: not an AnomalyAlign segmenter (segmenter.pt or checkpoint.pt)")
    if int(ck["classes"]) != classes:
        raise ValueError(f"{path}: segmenter has {ck['classes']} classes, the data {classes}")
    net = SegUNet(classes, int(ck["width"]))
    net.load_state_dict(ck["state_dict"])
    freeze(net)
    return net


def segmenter_record(net: SegUNet, width: int, classes: int, info: dict) -> dict:
    return {"kind": "anomalyalign-segmenter", "width": width, "classes": classes,
            "state_dict": net.state_dict(), "info": info}


# ---------------------------------------------------------------------------------------------
# Stage 2: prompts
# ---------------------------------------------------------------------------------------------

def library_for(cfg: PromptConfig, classes: list[str]) -> PromptLibrary:
    return build_library(classes[1:], cfg.synonyms or SYNONYMS, cfg.categories or CATEGORIES,
                         cfg.templates or TEMPLATES)


def fit_prompts(data: TrainData, cfg: PromptConfig, seed: int, flip: bool, rot90: bool
                ) -> tuple[PromptLibrary, TinyClip, list[int], torch.Tensor, dict]:
    """Library, trained TinyClip, chosen prompt per training image, the library's text
    embeddings [P, dim] (the cross-attention conditions) and a summary."""
    lib = library_for(cfg, data.classes)
    torch.manual_seed(seed)
    clip = TinyClip(len(lib.vocab), lib.max_len, cfg.dim, cfg.image_width)
    t0 = time.monotonic()
    aug = (lambda x, g: augment_batch(x, None, g, flip, rot90)[0])  # noqa: E731
    losses = train_tinyclip(clip, lib, data.images, data.labels, cfg.steps, cfg.batch_size, cfg.lr,
                            seed, augment=aug)
    with torch.no_grad():
        text = clip.encode_text(lib.token_ids())
        img = torch.cat([clip.encode_image(data.images[i:i + 64]) for i in range(0, len(data), 64)])
    allowed = [lib.of_class(c) for c in data.labels] if cfg.restrict_to_class else None
    chosen, scores = select_prompts(img, text, allowed)
    # how well the embedding separates the classes (argmax over the whole library)
    free, _ = select_prompts(img, text, None)
    acc = float(np.mean([lib.classes[j] == c for j, c in zip(free, data.labels)]))
    info = {"library_size": len(lib.prompts), "vocab": len(lib.vocab),
            "clip_loss_first": losses[0] if losses else None,
            "clip_loss_last": float(np.mean(losses[-10:])) if losses else None,
            "class_accuracy_unrestricted": round(acc, 4),
            "distinct_prompts_chosen": len(set(chosen)),
            "mean_score": float(scores.mean())}
    log.info("prompts: %d candidates, TinyClip %d steps in %s (loss %.3f -> %.3f), class accuracy "
             "of the unrestricted argmax %.3f, %d distinct prompts chosen", len(lib.prompts),
             cfg.steps, fmt_duration(time.monotonic() - t0), info["clip_loss_first"] or 0.0,
             info["clip_loss_last"] or 0.0, acc, len(set(chosen)))
    return lib, clip, chosen, text.detach(), info


# ---------------------------------------------------------------------------------------------
# Stage 3: diffusion
# ---------------------------------------------------------------------------------------------

def align_weight_at(step: int, total: int, o: OptimConfig) -> float:
    """Eq. 8's schedule: ``align_weight`` for the first ``align_frac`` of the planned iterations
    (the paper's first 40 of 100 epochs), then 0.

    >>> o = OptimConfig()
    >>> align_weight_at(0, 100, o), align_weight_at(39, 100, o), align_weight_at(40, 100, o)
    (0.01, 0.01, 0.0)
    """
    return o.align_weight if step < o.align_frac * total else 0.0


def alignment_loss(seg: SegUNet, x0_hat: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Eq. 6: MSE between the frozen segmenter's softmax on the generated image (in [-1, 1]) and
    the conditioning mask, one-hot over background + defect classes."""
    probs = torch.softmax(seg((x0_hat.clamp(-1, 1) + 1) / 2), dim=1)
    onehot = F.one_hot(mask.long(), probs.shape[1]).permute(0, 3, 1, 2).to(probs.dtype)
    return F.mse_loss(probs, onehot)


class DiffusionTrainer:
    """Networks, optimiser, EMA and one training iteration."""

    def __init__(self, cfg: AnomalyAlignConfig, unet, controlnet, seg: SegUNet | None,
                 text_table: torch.Tensor, dev: torch.device):
        self.cfg, self.unet, self.controlnet, self.seg, self.dev = cfg, unet, controlnet, seg, dev
        self.num_classes = int(controlnet.config.conditioning_channels)  # defect classes
        self.text_table = text_table.to(dev)
        self.sched = make_scheduler(cfg.diffusion)
        self.alphas = self.sched.alphas_cumprod.to(dev)
        if not cfg.model.train_unet:
            freeze(unet)
        params = list(controlnet.parameters()) + (list(unet.parameters()) if cfg.model.train_unet else [])
        o = cfg.optim
        self.params = params
        self.opt = torch.optim.AdamW(params, lr=o.lr, weight_decay=o.weight_decay)
        self.ema = ({"unet": copy.deepcopy(unet).eval(), "controlnet": copy.deepcopy(controlnet).eval()}
                    if o.ema_decay > 0 else None)
        if self.ema:
            for m in self.ema.values():
                freeze(m)

    def text_for(self, prompt_idx: torch.Tensor, drop: torch.Tensor) -> torch.Tensor:
        """[B, 1, dim] cross-attention input; dropped rows get the null (all-zero) condition."""
        e = self.text_table[prompt_idx.to(self.dev)]
        e = torch.where(drop.to(self.dev)[:, None], torch.zeros_like(e), e)
        return e[:, None, :]

    def step(self, x0: torch.Tensor, mask: torch.Tensor, prompt_idx: torch.Tensor,
             g: torch.Generator, w_align: float, lr: float) -> dict[str, float]:
        cfg, dev = self.cfg, self.dev
        b = x0.shape[0]
        noise = torch.randn(x0.shape, generator=g).to(dev)
        t = torch.randint(0, cfg.diffusion.train_timesteps, (b,), generator=g).to(dev)
        drop = torch.rand(b, generator=g) < cfg.diffusion.text_dropout
        x0, mask = x0.to(dev), mask.to(dev)
        xt = self.sched.add_noise(x0, noise, t)
        cond = mask_to_cond(mask, self.num_classes)
        eps = denoise(self.unet, self.controlnet, xt, t, self.text_for(prompt_idx, drop), cond)
        l_diff = F.mse_loss(eps, noise)
        loss = l_diff
        out = {"diff": float(l_diff.detach())}
        if w_align > 0 and self.seg is not None:
            a = self.alphas[t].view(-1, 1, 1, 1)
            x0_hat = (xt - (1 - a).sqrt() * eps) / a.sqrt()
            keep = torch.ones(b, dtype=torch.bool, device=dev)
            if cfg.optim.la_max_t is not None:
                keep = t < cfg.optim.la_max_t
            if keep.any():
                l_a = alignment_loss(self.seg, x0_hat[keep], mask[keep])
                loss = loss + w_align * l_a
                out["align"] = float(l_a.detach())
        for group in self.opt.param_groups:
            group["lr"] = lr
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.optim.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, cfg.optim.grad_clip)
        self.opt.step()
        self._update_ema()
        out["loss"] = float(loss.detach())
        for k, v in out.items():
            if not math.isfinite(v):
                raise FloatingPointError(f"loss {k} is {v}; lower optim.lr ({cfg.optim.lr})")
        return out

    @torch.no_grad()
    def _update_ema(self) -> None:
        if not self.ema:
            return
        d = self.cfg.optim.ema_decay
        for name, net in (("unet", self.unet), ("controlnet", self.controlnet)):
            for pe, p in zip(self.ema[name].parameters(), net.parameters()):
                pe.mul_(d).add_(p.detach(), alpha=1 - d)


def build_diffusion(cfg: AnomalyAlignConfig, num_classes: int):
    """Base UNet and ControlNet as the config describes, or from ``model.pretrained``."""
    m = cfg.model
    res = cfg.data.resolution
    pre = Path(m.pretrained) if m.pretrained else None
    if pre is not None and pre.is_dir():
        from diffusers import ControlNetModel, UNet2DConditionModel

        unet = UNet2DConditionModel.from_pretrained(pre / "unet" if (pre / "unet").is_dir() else pre)
        if unet.config.in_channels != 1 or unet.config.cross_attention_dim != cfg.prompts.dim:
            raise ConfigError("model.pretrained", "unet", f"{pre}: needs in_channels 1 and "
                              f"cross_attention_dim {cfg.prompts.dim}, has {unet.config.in_channels} "
                              f"and {unet.config.cross_attention_dim}")
        if (pre / "controlnet").is_dir():
            controlnet = ControlNetModel.from_pretrained(pre / "controlnet")
        else:
            controlnet = build_controlnet(unet, num_classes, m.hint_channels)
        log.info("loaded pretrained diffusion weights from %s", pre)
        return unet, controlnet
    unet = build_unet(res, m.widths, m.attention, cfg.prompts.dim, m.layers_per_block, m.head_dim,
                      m.norm_groups)
    controlnet = build_controlnet(unet, num_classes, m.hint_channels)
    if pre is not None:  # an AnomalyAlign checkpoint.pt of the same architecture
        ck = load_checkpoint(pre)
        unet.load_state_dict(ck["ema"]["unet"] if ck.get("ema") else ck["unet"])
        controlnet.load_state_dict(ck["ema"]["controlnet"] if ck.get("ema") else ck["controlnet"])
        log.info("loaded pretrained diffusion weights from %s (step %d)", pre, ck["step"])
    return unet, controlnet


def _seg_step(ck: dict) -> str:
    st = ck.get("segmenter_training") or {}
    return f"{st.get('step', '?')} of {st.get('steps', '?')}"


def load_checkpoint(path: Path, any_stage: bool = False) -> dict:
    """An AnomalyAlign checkpoint. One written when a run was stopped in its first stage (the
    segmenter: ``stage`` :data:`SEGMENTER_STAGE`) holds no diffusion networks and is refused
    unless ``any_stage`` (the trainer's ``--resume``)."""
    ck = read_checkpoint(Path(path))
    if ck.get("format") != CHECKPOINT_FORMAT or ck.get("kind") != "anomalyalign":
        from export.augment.cli_common import not_this_generator

        raise CheckpointError(not_this_generator(Path(path), ck, "anomalyalign", CHECKPOINT_FORMAT))
    if not any_stage and ck.get("stage") == SEGMENTER_STAGE:
        raise CheckpointError(f"{path}: the run was stopped while training its segmenter (step "
                              f"{_seg_step(ck)}), before the diffusion stage: no diffusion weights "
                              "yet; continue it with `inspector augment anomalyalign train "
                              "--resume`")
    return ck


def lr_at(step: int, o: OptimConfig) -> float:
    return o.lr * min(1.0, (step + 1) / o.warmup) if o.warmup else o.lr


def batch_at(data: TrainData, step: int, cfg: AnomalyAlignConfig, prompt_idx: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Generator]:
    """Iteration ``step``'s batch: a permutation per epoch (every image once per epoch), then
    flips / turns; all from (seed, step)."""
    b = min(cfg.optim.batch_size, len(data))
    ipe = max(1, len(data) // b)
    epoch, k = divmod(step, ipe)
    perm = torch.randperm(len(data), generator=step_generator(cfg.seed, epoch, stream=3))
    pick = perm[k * b:(k + 1) * b]
    g = step_generator(cfg.seed, step, stream=2)
    x, m = augment_batch(data.images[pick], data.masks[pick], g, cfg.data.flip, cfg.data.rot90)
    return x, m, prompt_idx[pick], g


# ---------------------------------------------------------------------------------------------
# Sampling (shared with sample.py) and the preview
# ---------------------------------------------------------------------------------------------

@torch.no_grad()
def ddim_sample(unet, controlnet, masks: torch.Tensor, text: torch.Tensor, noise: torch.Tensor,
                cfg: AnomalyAlignConfig, steps: int | None = None, guidance: float | None = None,
                eta: float | None = None, generators: list[torch.Generator] | None = None
                ) -> torch.Tensor:
    """DDIM from ``noise`` [B, 1, R, R] under ``masks`` [B, R, R] and ``text`` [B, 1, dim];
    returns images in [-1, 1]. Classifier-free guidance with the null (zero) text when
    ``guidance`` > 1.

    With ``eta`` > 0 each step adds variance noise, sample ``i``'s drawn from ``generators[i]``
    (one CPU generator per sample, needed then), so a sample does not depend on the others in
    the batch; eta = 0 draws nothing."""
    s = cfg.sample
    steps = steps or s.steps
    guidance = s.guidance_scale if guidance is None else guidance
    eta = s.eta if eta is None else eta
    dev = next(unet.parameters()).device
    if eta > 0 and (generators is None or len(generators) != noise.shape[0]):
        raise ValueError(f"DDIM with eta {eta:g} needs one generator per sample "
                         f"({noise.shape[0]}), got {None if generators is None else len(generators)}")
    sched = make_scheduler(cfg.diffusion, "ddim")
    sched.set_timesteps(steps)
    cond = mask_to_cond(masks.to(dev), int(controlnet.config.conditioning_channels))
    x = noise.to(dev)
    text = text.to(dev)
    for t in sched.timesteps:
        tt = torch.full((x.shape[0],), int(t), device=dev, dtype=torch.long)
        if guidance > 1:
            both = denoise(unet, controlnet, torch.cat([x, x]), torch.cat([tt, tt]),
                           torch.cat([text, torch.zeros_like(text)]), torch.cat([cond, cond]),
                           s.control_scale)
            e_c, e_u = both.chunk(2)
            eps = e_u + guidance * (e_c - e_u)
        else:
            eps = denoise(unet, controlnet, x, tt, text, cond, s.control_scale)
        var = (torch.cat([torch.randn((1, *x.shape[1:]), generator=g) for g in generators]).to(dev)
               if eta > 0 else None)
        x = sched.step(eps, t, x, eta=eta, variance_noise=var).prev_sample
    return x.clamp(-1, 1)


def grid_image(images: np.ndarray, masks: np.ndarray, cols: int = 4) -> np.ndarray:
    """Rows of (image | mask in colour) tiles; uint8 HxWx3 BGR."""
    palette = np.array([[0, 0, 0], [0, 0, 255], [0, 200, 0], [255, 128, 0]], np.uint8)
    tiles = []
    for im, m in zip(images, masks):
        rgb = cv2.cvtColor(im, cv2.COLOR_GRAY2BGR)
        tiles.append(np.concatenate([rgb, palette[np.minimum(m, 3)]], axis=1))
    while len(tiles) % cols:
        tiles.append(np.zeros_like(tiles[0]))
    def pad(t: np.ndarray) -> np.ndarray:
        return cv2.copyMakeBorder(t, 2, 2, 2, 2, cv2.BORDER_CONSTANT, value=(255, 255, 255))

    rows = [np.concatenate([pad(t) for t in tiles[r:r + cols]], axis=1) for r in range(0, len(tiles), cols)]
    return np.concatenate(rows, axis=0)


def _preview(unet, controlnet, data: TrainData, text_table: torch.Tensor, prompt_idx: torch.Tensor,
             cfg: AnomalyAlignConfig, path: Path, n: int = 8) -> None:
    idx = torch.arange(min(n, len(data)))
    noise = torch.randn((len(idx), 1, cfg.data.resolution, cfg.data.resolution),
                        generator=torch.Generator().manual_seed(cfg.seed))
    gens = [torch.Generator().manual_seed(cfg.seed * 1_000_003 + 1 + i) for i in range(len(idx))]
    x = ddim_sample(unet, controlnet, data.masks[idx], text_table[prompt_idx[idx]][:, None, :], noise,
                    cfg, steps=min(cfg.sample.steps, 10), guidance=1.0, generators=gens)
    to8 = lambda a: np.clip((a.cpu().numpy()[:, 0] + 1) * 127.5, 0, 255).astype(np.uint8)  # noqa: E731
    cv2.imwrite(str(path), grid_image(to8(x), data.masks[idx].numpy().astype(np.uint8)))


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------

#: the config keys a resumed run must share with its checkpoint: the networks' shapes, what picks
#: the training images (the checkpoint's prompts are per image, in its order), and the schedule:
#: the alignment loss runs for the first ``align_frac`` of ``epochs`` x batches, so another
#: epoch count, batch size or fraction would switch L_a back on after it had ended (a third stage
#: the paper does not have), and the seed orders the batches
RESUME_KEYS = ("model", "seed", "data.resolution", "data.label_fraction", "data.label_seed",
               "optim.epochs", "optim.batch_size", "optim.align_frac")


def check_resume(ck: dict, cfg: AnomalyAlignConfig, data: TrainData, config_path: Path,
                 ck_path: Path, keys: tuple[str, ...] = RESUME_KEYS) -> None:
    """Refuse to resume ``ck`` with a config or training images other than its own: a
    :class:`ConfigError` naming the key (:data:`RESUME_KEYS`; ``data.root`` when the same
    keys select other images). The checkpoint's per-image prompt choice would otherwise index
    another image list (an IndexError, or images trained with other images' prompts)."""
    check_resume_keys(saved_config(ck["config"], AnomalyAlignConfig), cfg.model_dump(mode="json"), keys,
                      config_path, ck_path)
    saved = list(ck.get("train_stems") or [])
    if saved != list(data.stems):
        n_new, n_gone = len(set(data.stems) - set(saved)), len(set(saved) - set(data.stems))
        raise ConfigError(str(config_path), "data.root",
                          f"{data.source}: {len(data)} training images, but the checkpoint {ck_path} "
                          f"was trained on {len(saved)} ({n_new} new, {n_gone} missing"
                          f"{', other order' if not n_new and not n_gone else ''}); a resumed run "
                          "keeps its images and their prompts (restore the data, or train into a "
                          "new --run-dir)")


def train(config_path: Path, run_dir: Path | None = None, resume: bool = False,
          max_iters: int | None = None, data: TrainData | None = None) -> Path:
    """Train AnomalyAlign from ``config_path`` into ``run_dir``; returns the run folder.

    ``max_iters`` stops the diffusion stage early (smoke runs) without changing the schedule;
    ``data`` replaces the labelled subset (tests on synthetic images).
    """
    config_path = Path(config_path)
    cfg = load_config(config_path)
    t_start = time.monotonic()
    deadline = t_start + cfg.max_minutes * 60 if cfg.max_minutes else None
    check_device(cfg.device, config_path)
    dev = pick_device(cfg.device, 0)
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    # a folder holding a run is refused here (unless resume); the folder is made only once the
    # data has been read: a missing or bad data root leaves no empty run folder behind
    run_dir = prepare_run_dir(run_dir, cfg.name, resume, create=False)
    ck_path = run_dir / CHECKPOINT
    if data is None:
        data = read_train_data(cfg.data, config_path)
    #: the folder a relative data.root (and the other relative paths) was taken from, recorded
    #: with the checkpoint: `sample` run from another folder finds the data through it
    base_dir = str(Path.cwd())
    run_dir.mkdir(parents=True, exist_ok=True)
    log.info("data: %s at %d px; classes %s", data.source, cfg.data.resolution,
             {c: data.labels.count(c) for c in data.classes[1:]})
    k = len(data.classes) - 1

    ck = seg_ck = None  # a diffusion-stage checkpoint / one of a run stopped in its segmenter stage
    if resume and ck_path.exists():
        found = load_checkpoint(ck_path, any_stage=True)
        if found.get("stage") == SEGMENTER_STAGE:
            # no diffusion network yet: only what the segmenter and the image list depend on
            check_resume(found, cfg, data, config_path, ck_path, SEGMENTER_STAGE_RESUME_KEYS)
            seg_ck = found  # train_segmenter logs the step it resumes at
        else:
            check_resume(found, cfg, data, config_path, ck_path)
            ck = found
        found_at = (f"segmenter step {found.get('step', 0)}" if seg_ck is not None
                    else f"iteration {found.get('step', 0)}")
        # relative data roots are taken from the working directory: the checkpoint's (recorded
        # since base_dir was; older ones: assume this one) and today's
        warn_config_changes(saved_config(found["config"], AnomalyAlignConfig),
                            cfg.model_dump(mode="json"), config_path, ck_path, found_at,
                            base_dirs=(found.get("base_dir") or str(Path.cwd()), str(Path.cwd())))
    elif resume:
        log.warning("%s: nothing to resume, starting a new run", ck_path)
    write_run_config(run_dir, cfg)
    seg_elapsed = float(seg_ck["elapsed_s"]) if seg_ck is not None else 0.0  # before this start

    # Stages 1 and 2 and the diffusion networks' set-up: a stop here saves the segmenter's state
    # (stage 1 has steps of its own, each finished before the stop: whole_step); the prompts are
    # fitted again on --resume (a pure function of the seed and the images, and quick)
    seg_progress: dict = {}

    def save_segmenter_stage() -> dict:
        """Save the segmenter's state reached as a ``stage: segmenter`` checkpoint; returns it."""
        st = seg_progress["state"]()
        atomic_save({"format": CHECKPOINT_FORMAT, "kind": "anomalyalign", "stage": SEGMENTER_STAGE,
                     "step": 0, "segmenter_training": st,
                     "elapsed_s": seg_elapsed + time.monotonic() - t_start,
                     "config": cfg.model_dump(mode="json"), "train_stems": data.stems,
                     "train_labels": data.labels, "classes": data.classes,
                     "data_source": data.source, "base_dir": base_dir,
                     "torch": str(torch.__version__)}, ck_path)
        return st

    def out_of_time_before_diffusion() -> bool:
        """max_minutes reached in stage 1 (or right after it): save it as a stop does, say so."""
        if deadline is None or time.monotonic() < deadline or "state" not in seg_progress:
            return False
        st = save_segmenter_stage()
        log.info("max_minutes %g reached at segmenter step %d of %d (stage 1, before the prompts "
                 "and the diffusion stage): stopping cleanly; checkpoint saved, continue with "
                 "--resume", cfg.max_minutes, st["step"], st["steps"])
        return True

    def stopped_before_diffusion() -> None:
        snapshot = seg_progress.get("state")
        if snapshot is None:
            if ck is not None:
                log.warning("interrupted before iteration %d; the checkpoint of iteration %d is kept, "
                            "continue with --resume", int(ck["step"]) + 1, int(ck["step"]))
            elif seg_ck is not None:
                log.warning("interrupted before the segmenter went on; the checkpoint of segmenter "
                            "step %s is kept, continue with --resume", _seg_step(seg_ck))
            else:
                log.warning("interrupted before the first training step (the segmenter is loaded "
                            "from segmenter.checkpoint): nothing saved; start the run again")
            return
        st = save_segmenter_stage()
        if st["step"] < st["steps"]:
            log.warning("interrupted at segmenter step %d of %d (stage 1, before the diffusion "
                        "stage); checkpoint saved, continue with --resume", st["step"], st["steps"])
        else:
            log.warning("interrupted after the segmenter (step %d of %d), before the diffusion "
                        "stage; checkpoint saved, continue with --resume (the prompts are fitted "
                        "again)", st["step"], st["steps"])

    try:
        # stage 1: segmenter
        if ck is not None:
            seg = load_segmenter(ck_path, k + 1)
            seg_info = ck["segmenter"].get("info", {})
        elif cfg.segmenter.checkpoint and seg_ck is None:
            seg = load_segmenter(Path(cfg.segmenter.checkpoint), k + 1)
            seg_info = {"loaded": cfg.segmenter.checkpoint,
                        "train_iou": segmenter_iou(seg, data.images, data.masks, k + 1, torch.device("cpu"))}
            log.info("segmenter loaded from %s: train IoU %s", cfg.segmenter.checkpoint, seg_info["train_iou"])
        else:
            seg, seg_info = train_segmenter(
                data, cfg.segmenter, cfg.seed, cfg.data.flip, cfg.data.rot90, dev,
                resume_from=seg_ck["segmenter_training"] if seg_ck is not None else None,
                progress=seg_progress, deadline=deadline)
            if seg is None:  # max_minutes ran out in stage 1
                out_of_time_before_diffusion()
                return run_dir
            seg = seg.cpu()
        seg_rec = segmenter_record(seg, seg.width, k + 1, seg_info)
        atomic_save(seg_rec, run_dir / SEGMENTER)
        # ran out right after stage 1: stop before the prompts (refitted on --resume anyway)
        if out_of_time_before_diffusion():
            return run_dir

        # stage 2: prompts
        if ck is not None:
            lib = PromptLibrary.from_dict(ck["library"])
            clip = TinyClip(len(lib.vocab), lib.max_len, cfg.prompts.dim, cfg.prompts.image_width)
            clip.load_state_dict(ck["clip"])
            chosen, text_table, prompt_info = list(ck["prompt_idx"]), ck["text_emb"], ck["prompt_info"]
        else:
            lib, clip, chosen, text_table, prompt_info = fit_prompts(
                data, cfg.prompts, cfg.seed, cfg.data.flip, cfg.data.rot90)
        (run_dir / PROMPTS).write_text(json.dumps(
            {"info": prompt_info, "library": lib.prompts,
             "chosen": [{"stem": s, "class": c, "prompt": lib.prompts[j]}
                        for s, c, j in zip(data.stems, data.labels, chosen)]}, indent=1))
        prompt_idx = torch.tensor(chosen, dtype=torch.long)

        # stage 3: diffusion
        unet, controlnet = build_diffusion(cfg, k)
        unet.to(dev), controlnet.to(dev)
        seg.to(dev)
        trainer = DiffusionTrainer(cfg, unet, controlnet, seg, text_table, dev)
        o = cfg.optim
        ipe = max(1, len(data) // min(o.batch_size, len(data)))
        total = max(1, int(round(o.epochs * ipe)))
        step, elapsed, history = 0, 0.0, []
        if ck is not None:
            unet.load_state_dict(ck["unet"])
            controlnet.load_state_dict(ck["controlnet"])
            trainer.opt.load_state_dict(ck["optimizer"])
            if trainer.ema:
                # a checkpoint of a run without the weight EMA (optim.ema_decay 0): the EMA starts
                # from the weights reached, not from the random ones it was copied from at build
                src = ck.get("ema") or {"unet": ck["unet"], "controlnet": ck["controlnet"]}
                trainer.ema["unet"].load_state_dict(src["unet"])
                trainer.ema["controlnet"].load_state_dict(src["controlnet"])
                if not ck.get("ema"):
                    log.warning("%s holds no weight EMA (trained with optim.ema_decay 0): the EMA "
                                "starts from its weights at iteration %d", ck_path, int(ck["step"]))
            step, elapsed, history = int(ck["step"]), float(ck["elapsed_s"]), list(ck.get("history", []))
            log.info("resuming %s at iteration %d of %d", run_dir, step, total)
        else:
            # the first two stages count as training time (over the starts of a stopped stage 1)
            elapsed = seg_elapsed + time.monotonic() - t_start
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM under `inspector augment`
        stopped_before_diffusion()
        raise

    log.info("run %s: UNet %.2f M params (%s), ControlNet %.2f M, segmenter %.3f M, TinyClip %.3f M; "
             "%d px, batch %d, %d iterations (%g epochs of %d), L_a weight %g for the first %d, "
             "device %s, %d thread(s)%s", run_dir, count_parameters(unet) / 1e6,
             "trained" if cfg.model.train_unet else "locked", count_parameters(controlnet) / 1e6,
             count_parameters(seg) / 1e6, count_parameters(clip) / 1e6, cfg.data.resolution,
             o.batch_size, total, o.epochs, ipe, o.align_weight, int(math.ceil(o.align_frac * total)),
             dev, cfg.threads, f", at most {cfg.max_minutes:g} min" if cfg.max_minutes else "")

    def checkpoint() -> dict:
        return {"format": CHECKPOINT_FORMAT, "kind": "anomalyalign", "stage": DIFFUSION_STAGE,
                "step": step, "total": total,
                "elapsed_s": elapsed, "unet": unet.state_dict(), "controlnet": controlnet.state_dict(),
                "ema": ({k_: v.state_dict() for k_, v in trainer.ema.items()} if trainer.ema else None),
                "optimizer": trainer.opt.state_dict(), "segmenter": seg_rec,
                "clip": clip.state_dict(), "library": lib.to_dict(), "prompt_idx": chosen,
                "text_emb": text_table, "prompt_info": prompt_info, "train_stems": data.stems,
                "train_labels": data.labels, "classes": data.classes, "data_source": data.source,
                "base_dir": base_dir, "config": cfg.model_dump(mode="json"), "history": history,
                "epoch_losses": epoch_losses, "loss_ema": dict(ema),
                "epoch_acc": [epoch_sum, epoch_n], "torch": str(torch.__version__)}

    def sampler_nets():
        return (trainer.ema["unet"], trainer.ema["controlnet"]) if trainer.ema else (unet, controlnet)

    stop = total if max_iters is None else min(total, step + max_iters)
    stopped_by = "completed" if stop == total else "max_iters"
    unet.train(), controlnet.train()
    t_rate, first = time.monotonic(), step
    t_prev = t_rate
    # the running loss averages and the current epoch's sum carry over a resume, so losses.jsonl
    # and metrics.json read as an uninterrupted run's (checkpoints of older trainers lack them)
    ema: dict[str, float] = dict(ck.get("loss_ema") or {}) if ck is not None else {}
    epoch_sum, epoch_n = (float(ck["epoch_acc"][0]), int(ck["epoch_acc"][1])) \
        if ck is not None and ck.get("epoch_acc") else (0.0, 0)
    epoch_losses: list = list(ck.get("epoch_losses", [])) if ck is not None else []
    # rows past the step training goes on from (0 without a checkpoint): a run that died after
    # its last checkpoint, or before its first, logged iterations this one logs again
    trim_losses(run_dir / LOSSES, step)
    with open(run_dir / LOSSES, "a") as losses_f:
        try:
            while step < stop:
                if deadline is not None and time.monotonic() >= deadline:
                    stopped_by = "max_minutes"
                    log.info("max_minutes %g reached at iteration %d of %d: stopping cleanly",
                             cfg.max_minutes, step, total)
                    break
                x, m, pidx, g = batch_at(data, step, cfg, prompt_idx)
                lr = lr_at(step, o)
                w = align_weight_at(step, total, o)
                # Ctrl-C / SIGTERM inside takes effect at its end: the checkpoint the interrupt
                # saves is never one update ahead of its step count (or of its losses)
                with whole_step():
                    parts = trainer.step(x, m, pidx, g, w, lr)
                    step += 1
                    now = time.monotonic()
                    elapsed, t_prev = elapsed + (now - t_prev), now  # wall time, summed over resumes
                    update_ema(ema, parts)
                    epoch_sum, epoch_n = epoch_sum + parts["diff"], epoch_n + 1
                    if step % ipe == 0:
                        if epoch_n == ipe:  # a partial epoch (resume of an older checkpoint): no mean
                            epoch_losses.append([step, round(epoch_sum / epoch_n, 5)])
                        epoch_sum, epoch_n = 0.0, 0
                    if step % cfg.log_every == 0 or step == stop:
                        rate, eta = rate_eta(step - first, now - t_rate, stop - step)
                        if deadline is not None:
                            eta = min(eta, max(0.0, deadline - now))
                        losses_f.write(json.dumps({"it": step, "epoch": round(step / ipe, 3), "lr": lr,
                                                   "w_align": w, "elapsed_s": round(elapsed, 1),
                                                   **{k_: round(v, 5) for k_, v in ema.items()}}) + "\n")
                        losses_f.flush()
                        history.append([step, ema["diff"], ema.get("align")])
                        log.info("it %d/%d ep %.1f L_diff %.4f%s lr %.2e %.2f it/s eta %s", step, total,
                                 step / ipe, ema["diff"],
                                 f" L_a {ema['align']:.4f} (w {w:g})" if "align" in ema and w else "",
                                 lr, rate, fmt_duration(eta))
                if step % cfg.checkpoint_every == 0 and step != stop:
                    atomic_save(checkpoint(), ck_path)
                    _preview(*sampler_nets(), data, text_table, prompt_idx, cfg, run_dir / PREVIEW)
                    log.info("checkpoint at %d", step)
        except KeyboardInterrupt:  # Ctrl-C, or SIGTERM under `inspector augment`
            atomic_save(checkpoint(), ck_path)
            log.warning("interrupted at iteration %d; checkpoint saved, continue with --resume", step)
            raise

    atomic_save(checkpoint(), ck_path)
    _preview(*sampler_nets(), data, text_table, prompt_idx, cfg, run_dir / PREVIEW)
    metrics = {
        "name": cfg.name, "kind": "anomalyalign", "iterations": step, "planned_iterations": total,
        "epochs_done": round(step / ipe, 3), "iters_per_epoch": ipe, "stopped_by": stopped_by,
        "final_losses_ema": {k_: round(v, 5) for k_, v in ema.items()},
        "epoch_mean_diff_loss": epoch_losses,
        "first_logged_diff_loss": history[0][1] if history else None,
        "segmenter": seg_info, "prompts": prompt_info,
        "params": {"unet": count_parameters(unet), "controlnet": count_parameters(controlnet),
                   "segmenter": count_parameters(seg), "tinyclip": count_parameters(clip)},
        "train_seconds": round(elapsed, 1), "device": str(dev), "threads": cfg.threads,
        "data": data.source, "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    write_metrics(run_dir, metrics, default=float)
    log.info("done: %d iterations in %s (%s); %s", step, fmt_duration(elapsed), stopped_by,
             run_dir / METRICS)
    return run_dir


def main(argv: list[str] | None = None) -> int:
    from export.augment.cli_common import naming_stops

    # a bare Ctrl-C (outside a step) is named: train_main's line read "training stopped ()"
    return train_main(argv, kind="augment.anomalyalign", doc=__doc__, train=naming_stops(train), log=log,
                      max_iters="iterations")


if __name__ == "__main__":
    sys.exit(main())
