"""Defect-GAN training on the labelled NEU-Seg subset (``../shared/seeds/003_spec.md`` §2-§4).

Per iteration (one critic step; G every ``n_critic``-th): normals n and defect crops d with
their multi-hot labels c' from :mod:`export.augment.defectgan.data`, defacement targets c drawn
from the empirical label distribution. Both cycles run: ``n -> d~ -> n^`` (deface with c,
restore with A = 0) and ``d -> n~ -> d^`` (restore, re-deface with c').

* critic: ``-E[D_src(n, d)] + E[D_src(d~, n~)] + lambda_gp * GP + lambda_cls_real * BCE(D_cls(n, d),
  (0, c'))``
* G: ``-E[D_src(d~, n~)] + lambda_cls_fake * BCE(D_cls(d~, n~), (c, 0)) + lambda_rec * (|n - n^| +
  |d - d^|) + lambda_sd_cyc * (|m_d~ - m_n^| + |m_n~ - m_d^|) + lambda_sd_con * mean(m of all four)``

Adam (0.5, 0.999) for both; learning rate constant, then linear to ``lr_end`` from
``decay_start`` of the planned iterations on (spec §4 default: the second half).

The run folder holds ``config.yaml`` (``kind: defectgan``), ``checkpoint.pt`` (G, D, optimisers,
iteration, elapsed time), ``metrics.json``, ``losses.jsonl`` and ``preview.png`` (rows: normal |
defaced per class | its map; defect | restored | map). ``--resume`` continues a run: batch ``s``
is a pure function of (seed, s) and so are its noise and gradient-penalty draws (per-iteration
generators, not the global torch RNG, whose state no checkpoint holds), so a resumed run
computes what an uninterrupted one would (bit for bit on the CPU). ``max_minutes`` ends it
cleanly with a usable checkpoint.

Example::

    inspector augment defectgan train --config configs/train/defectgan-neu-10.yaml \\
        --run-dir runs/defectgan-neu-10
"""

from __future__ import annotations

import hashlib
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
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from inspector.errors import CheckpointError, ConfigError
from inspector.evaluation.datasets import SPLITS

from export.augment.defectgan.data import (CropSampler, DataError, LabelledImages, from_tensor_range,
                                           load_subset)
from export.augment.defectgan.model import (DefectDiscriminator, DefectGenerator,
                                            count_parameters, gradient_penalty)
from export.training import RunSettings, CHECKPOINT, LOSSES, METRICS, PREVIEW
from export.training import (atomic_save, check_resume_keys, saved_config, write_metrics, fmt_duration,
                             prepare_run_dir, rate_eta, read_checkpoint, read_config, start_ranks,
                             step_generator, train_main, trim_losses, update_ema, whole_step,
                             warn_config_changes, write_run_config)

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 1
KIND = "defectgan"
#: streams of :func:`export.training.step_generator`: G's noise (on the training device) and the
#: gradient penalty's mixing weights (on the CPU, where gradient_penalty draws them)
NOISE_STREAM, GP_STREAM = 1, 2
#: config keys a resume must keep (dotted; a section means all of it): the networks' shapes, and
#: what decides the data and the schedule of iteration ``s`` (the subset, its crops and labels,
#: the seed of the crops and draws, the planned iterations the learning rate decays over, the
#: batch and the G cadence). A changed one used to go on silently with other data or another
#: schedule; the learning rates and loss weights may change (lower optim.lr after a NaN)
RESUME_KEYS = ("model", "seed", "data.size", "data.window", "data.label_fraction", "data.label_seed",
               "data.splits", "data.min_class_px", "data.normal_stride", "data.flip",
               "optim.iterations", "optim.batch_size", "optim.n_critic")

__all__ = ["DefectGanConfig", "load_config", "build_networks", "DefectGanTrainer", "train",
           "load_checkpoint", "lr_at", "main"]


# ---------------------------------------------------------------------------------------------
# Config: every spec value is the default; configs/train/defectgan-neu-10.yaml shrinks for CPU
# ---------------------------------------------------------------------------------------------

class DataConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    root: str = Field(..., description="NEU-Seg folder (relative: to the config file's folder)")
    label_fraction: float = Field(0.1, gt=0, le=1, description="ARCD's data.label_fraction")
    label_seed: int = Field(0, description="ARCD's data.label_seed")
    splits: list[str] = Field(default_factory=lambda: ["train", "test"],
                              description="ARCD's data.train_splits")
    size: int = Field(128, ge=16, description="model resolution (spec: 128)")
    window: int | None = Field(None, ge=16, description="native crop side, resized to size "
                                                        "(default: size, native scale)")
    min_class_px: int = Field(24, ge=1, description="pixels of a class in a crop for its label")
    normal_stride: int = Field(8, ge=1, description="grid of the defect-free windows")
    flip: bool = True

    @field_validator("splits")
    @classmethod
    def _known_splits(cls, v: list[str]) -> list[str]:
        # found when the config is read (it used to be a bare error after the run folder was made)
        unknown = [s for s in v if s not in SPLITS]
        if unknown or not v:
            raise ValueError(f"{v}: {'unknown split(s) ' + str(unknown) if unknown else 'no split'}; "
                             f"list one or more of {', '.join(SPLITS)} (hash shares of the "
                             "NEU-Seg folders, as ARCD's data.train_splits)")
        return v

    @property
    def crop(self) -> int:
        return self.window or self.size


class ModelConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    ngf: int = Field(64, ge=1)
    n_res_enc: int = Field(3, ge=0)
    n_res_dec: int = Field(3, ge=0)
    spade_hidden: int = Field(128, ge=1)
    ani: bool = Field(True, description="adaptive noise injection")
    lwc: bool = Field(True, description="layer-wise composition (needed for sampling masks)")
    ndf: int = Field(64, ge=1)
    d_layers: int = Field(6, ge=1, description="critic stride-2 layers (spec: 6 at 128 px)")


class LossConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    lambda_cls_real: float = Field(2.0, ge=0)
    lambda_cls_fake: float = Field(5.0, ge=0)
    lambda_rec: float = Field(5.0, ge=0)
    lambda_sd_cyc: float = Field(5.0, ge=0)
    lambda_sd_con: float = Field(1.0, ge=0)
    lambda_gp: float = Field(10.0, ge=0)


class OptimConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    lr: float = Field(2e-4, gt=0)
    lr_end: float = Field(1e-6, ge=0)
    decay_start: float = Field(0.5, ge=0, le=1, description="share of iterations at constant lr")
    betas: tuple[float, float] = (0.5, 0.999)
    batch_size: int = Field(4, ge=1)
    n_critic: int = Field(5, ge=1)
    iterations: int = Field(500_000, ge=1, description="critic iterations (spec: 500K)")


class SampleConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    threshold: float = Field(0.5, gt=0, lt=1, description="distribution map -> mask")
    min_defect_px: int = Field(20, ge=1, description="a paste whose mask is smaller is redrawn")
    tries: int = Field(6, ge=1, description="redraws (noise, place) before accepting a small one")


class DefectGanConfig(RunSettings):
    """The whole training YAML of a Defect-GAN run."""

    kind: Literal["defectgan"] = KIND
    name: str = "defectgan"
    max_minutes: float | None = Field(None, gt=0, description="end cleanly after this wall time")
    data: DataConfig
    model: ModelConfig = Field(default_factory=ModelConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    sample: SampleConfig = Field(default_factory=SampleConfig)
    base_dir: str = Field(".", description="set by load_config; relative data roots start here")

    @model_validator(mode="after")
    def _sizes(self) -> "DefectGanConfig":
        if self.data.size % 4:
            raise ValueError(f"data.size {self.data.size} must be a multiple of 4 (G's stride 4)")
        if self.data.size % 2 ** self.model.d_layers:
            raise ValueError(f"data.size {self.data.size} must be divisible by 2**model.d_layers "
                             f"({2 ** self.model.d_layers})")
        return self

    def data_root(self) -> Path:
        r = Path(self.data.root)
        return r if r.is_absolute() else Path(self.base_dir) / r


def load_config(path: Path) -> DefectGanConfig:
    """Read and validate a training YAML; errors name the file and the dotted key."""
    return read_config(Path(path), DefectGanConfig)


def build_networks(cfg: DefectGanConfig, n_classes: int) -> tuple[DefectGenerator, DefectDiscriminator]:
    m = cfg.model
    G = DefectGenerator(1, n_classes, m.ngf, m.n_res_enc, m.n_res_dec, m.spade_hidden, m.ani, m.lwc)
    D = DefectDiscriminator(cfg.data.size, 1, n_classes, m.ndf, m.d_layers)
    return G, D


def lr_at(it: int, o: OptimConfig) -> float:
    """Constant until ``decay_start * iterations``, then linear to ``lr_end`` at the end."""
    start = int(o.decay_start * o.iterations)
    if it < start or o.iterations <= start:
        return o.lr
    t = min(1.0, (it - start) / (o.iterations - start))
    return o.lr + (o.lr_end - o.lr) * t


# ---------------------------------------------------------------------------------------------
# One iteration
# ---------------------------------------------------------------------------------------------

def _requires_grad(m: torch.nn.Module, flag: bool) -> None:
    for p in m.parameters():
        p.requires_grad_(flag)


class DefectGanTrainer:
    """Networks, optimisers and the critic / generator updates."""

    def __init__(self, cfg: DefectGanConfig, G: DefectGenerator, D: DefectDiscriminator):
        self.cfg, self.G, self.D = cfg, G, D
        o = cfg.optim
        self.opt_G = torch.optim.Adam(G.parameters(), lr=o.lr, betas=o.betas)
        self.opt_D = torch.optim.Adam(D.parameters(), lr=o.lr, betas=o.betas)

    @property
    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"G": self.opt_G, "D": self.opt_D}

    def set_lr(self, lr: float) -> None:
        for opt in self.optimizers.values():
            for g in opt.param_groups:
                g["lr"] = lr

    def d_step(self, n: torch.Tensor, d: torch.Tensor, c_real: torch.Tensor,
               c_tgt: torch.Tensor, noise: torch.Generator | None = None,
               gp_gen: torch.Generator | None = None) -> dict[str, float]:
        """One critic update; ``noise`` draws G's noise (a generator on G's device), ``gp_gen`` the
        penalty's mixing weights (a CPU generator); None: the global torch RNG."""
        lc = self.cfg.loss
        zeros = torch.zeros_like(c_real)
        with torch.no_grad():
            d_fake = self.G(n, c_tgt, noise)[0]
            n_fake = self.G(d, zeros, noise)[0]
        real, fake = torch.cat([n, d]), torch.cat([d_fake, n_fake])
        _requires_grad(self.D, True)
        self.opt_D.zero_grad(set_to_none=True)
        src_r, cls_r = self.D(real)
        src_f, _ = self.D(fake)
        w_dist = src_r.mean() - src_f.mean()
        gp = gradient_penalty(self.D, real, fake, gp_gen)
        # normals carry the all-zero label (spec: normal = the zero vector)
        cls = F.binary_cross_entropy_with_logits(cls_r, torch.cat([zeros, c_real]),
                                                 reduction="sum") / real.shape[0]
        loss = -w_dist + lc.lambda_gp * gp + lc.lambda_cls_real * cls
        loss.backward()
        self.opt_D.step()
        return {"D": float(loss.detach()), "D_wdist": float(w_dist.detach()),
                "D_gp": float(gp.detach()), "D_cls": float(cls.detach())}

    def g_losses(self, n: torch.Tensor, d: torch.Tensor, c_real: torch.Tensor,
                 c_tgt: torch.Tensor, noise: torch.Generator | None = None
                 ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """G's total loss and its parts (both cycles); the critic is only evaluated. ``noise``
        as in :meth:`d_step`."""
        lc = self.cfg.loss
        zeros = torch.zeros_like(c_real)
        d_fake, _, m_d = self.G(n, c_tgt, noise)          # cycle 1: deface
        n_hat, _, m_nh = self.G(d_fake, zeros, noise)     # restore
        n_fake, _, m_n = self.G(d, zeros, noise)          # cycle 2: restore
        d_hat, _, m_dh = self.G(n_fake, c_real, noise)    # re-deface with the real label
        src_f, cls_f = self.D(torch.cat([d_fake, n_fake]))
        adv = -src_f.mean()
        cls = F.binary_cross_entropy_with_logits(cls_f, torch.cat([c_tgt, zeros]),
                                                 reduction="sum") / cls_f.shape[0]
        rec = (n - n_hat).abs().mean() + (d - d_hat).abs().mean()
        sd_cyc = (m_d - m_nh).abs().mean() + (m_n - m_dh).abs().mean()
        sd_con = m_d.mean() + m_nh.mean() + m_n.mean() + m_dh.mean()
        total = (adv + lc.lambda_cls_fake * cls + lc.lambda_rec * rec + lc.lambda_sd_cyc * sd_cyc
                 + lc.lambda_sd_con * sd_con)
        return total, {"G": total, "G_adv": adv, "G_cls": cls, "G_rec": rec, "G_sd_cyc": sd_cyc,
                       "G_sd_con": sd_con, "m_deface": m_d.mean()}

    def g_step(self, n: torch.Tensor, d: torch.Tensor, c_real: torch.Tensor,
               c_tgt: torch.Tensor, noise: torch.Generator | None = None) -> dict[str, float]:
        _requires_grad(self.D, False)  # the critic's weight gradients are not needed here
        self.opt_G.zero_grad(set_to_none=True)
        total, parts = self.g_losses(n, d, c_real, c_tgt, noise)
        total.backward()
        self.opt_G.step()
        _requires_grad(self.D, True)
        return {k: float(v.detach()) for k, v in parts.items()}


# ---------------------------------------------------------------------------------------------
# Checkpoints, preview, the loop
# ---------------------------------------------------------------------------------------------

def load_checkpoint(path: Path) -> dict:
    from export.augment.cli_common import not_this_generator

    ck = read_checkpoint(Path(path))
    if ck.get("format") != CHECKPOINT_FORMAT or ck.get("kind") != KIND:
        raise CheckpointError(not_this_generator(Path(path), ck, KIND, CHECKPOINT_FORMAT))
    return ck


def _preview(G: DefectGenerator, sampler: CropSampler, path: Path, n: int = 4) -> float:
    """Rows of fixed crops: normal | defaced as each class | their maps, then defect | restored |
    map. Returns the mean defacement map (how much of a normal crop G repaints)."""
    import cv2

    dev = next(G.parameters()).device
    nb, db, _ = sampler.batch(10 ** 9, n)  # a step far beyond training: crops not drawn in order
    C = sampler.n_classes
    # its own noise: the same picture at every checkpoint, and no draw from the global RNG
    gen = torch.Generator().manual_seed(0)
    G.eval()
    rows, ms = [], []
    with torch.no_grad():
        x_n = torch.from_numpy(nb).to(dev)
        x_d = torch.from_numpy(db).to(dev)
        outs, maps = [], []
        for c in range(C):
            lab = torch.zeros((n, C), device=dev)
            lab[:, c] = 1
            y, _, m = G(x_n, lab, gen)
            outs.append(y.cpu().numpy())
            maps.append(m.cpu().numpy() * 2 - 1)
            ms.append(float(m.mean()))
        r, _, mr = G(x_d, torch.zeros((n, C), device=dev), gen)
    G.train()
    for i in range(n):
        row = [nb[i, 0]] + [o[i, 0] for o in outs] + [m[i, 0] for m in maps]
        row += [db[i, 0], r.cpu().numpy()[i, 0], mr.cpu().numpy()[i, 0] * 2 - 1]
        rows.append(np.concatenate(row, axis=1))
    cv2.imwrite(str(path), from_tensor_range(np.concatenate(rows, axis=0)))
    return float(np.mean(ms))


def read_data(cfg: DefectGanConfig, config_path: Path) -> tuple[LabelledImages, CropSampler]:
    """The labelled subset, every image and mask read, and its crop sampler; what is wrong with
    them is a :class:`ConfigError` naming ``config_path`` and the key to change (``data.root``
    for a missing root, a folder not in the NEU-Seg layout or a file that cannot be read)."""
    d = cfg.data
    try:
        data = load_subset(cfg.data_root(), d.label_fraction, d.label_seed, tuple(d.splits))
        return data, CropSampler(data, d.crop, d.size, cfg.seed, d.min_class_px, d.normal_stride,
                                 d.flip)
    except DataError as e:
        raise ConfigError(str(config_path), e.key, str(e)) from e
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(str(config_path), "data.root", str(e)) from e
    except KeyboardInterrupt:
        log.warning("interrupted while reading the training data: nothing new saved")
        raise


def subset_digests(data: LabelledImages) -> list[str]:
    """Per subset image, a digest of its pixels and its mask (in :attr:`LabelledImages.names`
    order): what ``--resume`` compares besides the names, so a same-named image whose content
    changed is found. Decoded pixels, not file bytes: a copy re-saved losslessly is the same
    data. About a millisecond per image (the subset is the small labelled share)."""
    return [hashlib.sha1(np.ascontiguousarray(img).tobytes() + b"|"
                         + np.ascontiguousarray(m).tobytes()).hexdigest()[:16]
            for img, m in zip(data.images, data.masks)]


def check_subset(ck: dict, data: LabelledImages, digests: list[str], cfg: DefectGanConfig,
                 config_path: Path, ck_path: Path) -> None:
    """Refuse to resume ``ck`` on a subset other than its own: other image names, or (for a
    checkpoint that recorded them) the same names with other pixels or masks (``digests``:
    :func:`subset_digests` of ``data``). A
    :class:`ConfigError` naming ``config_path`` and ``data.root``; a checkpoint without the
    digests (older trainers) is checked by name only."""
    saved = ck.get("subset")
    if saved is not None and list(saved) != list(data.names):
        # same keys, other images: data.root names another folder
        raise ConfigError(str(config_path), "data.root",
                          f"{cfg.data_root()} gives a subset of {len(data.names)} image(s) other "
                          f"than the {len(saved)} the checkpoint {ck_path} was trained on; "
                          "point it at that run's data, or train into a new --run-dir")
    old = ck.get("subset_digests")
    if saved is not None and old is not None:
        changed = [n for n, a, b in zip(data.names, old, digests) if a != b]
        if changed:
            raise ConfigError(str(config_path), "data.root",
                              f"{cfg.data_root()}: {len(changed)} of the {len(data.names)} subset "
                              f"image(s) the checkpoint {ck_path} was trained on have the same name "
                              f"but other pixels or masks (first: {changed[0]}); point it at that "
                              "run's data, or train into a new --run-dir")


def train(config_path: Path, run_dir: Path | None = None, resume: bool = False,
          max_iters: int | None = None) -> Path:
    """Train Defect-GAN from ``config_path`` into ``run_dir``; returns the run folder.

    ``max_iters`` stops early (tests, smoke runs) without changing the learning-rate schedule.
    """
    config_path = Path(config_path)
    t_start = time.monotonic()
    cfg = load_config(config_path)
    _, dev = start_ranks(cfg.device, cfg.threads, cfg.seed, config_path)
    # a folder holding a run is refused here (unless resume); the folder is made only once the
    # data has been read: a missing or bad data root leaves no empty run folder behind
    run_dir = prepare_run_dir(run_dir, cfg.name, resume, create=False)
    ck_path = run_dir / CHECKPOINT
    d = cfg.data
    data, sampler = read_data(cfg, config_path)
    digests = subset_digests(data)  # recorded in the checkpoint, compared on --resume
    run_dir.mkdir(parents=True, exist_ok=True)
    G, D = build_networks(cfg, data.n_classes)
    G.to(dev), D.to(dev)
    trainer = DefectGanTrainer(cfg, G, D)
    o = cfg.optim
    step, elapsed, history = 0, 0.0, []
    # loss averages and the first G step's losses carry over a resume (metrics.json compares them)
    ema: dict[str, float] = {}
    first_g: dict[str, float] | None = None
    if resume and ck_path.exists():
        ck = load_checkpoint(ck_path)
        check_resume_keys(saved_config(ck["config"], DefectGanConfig), cfg.model_dump(mode="json"), RESUME_KEYS, config_path,
                          ck_path)
        check_subset(ck, data, digests, cfg, config_path, ck_path)
        G.load_state_dict(ck["G"])
        D.load_state_dict(ck["D"])
        for k, opt in trainer.optimizers.items():
            opt.load_state_dict(ck["optimizers"][k])
        step, elapsed, history = int(ck["step"]), float(ck["elapsed_s"]), list(ck.get("history", []))
        ema, first_g = dict(ck.get("ema") or {}), ck.get("first_g")
        log.info("resuming %s at iteration %d of %d", run_dir, step, o.iterations)
        warn_config_changes(saved_config(ck["config"], DefectGanConfig), cfg.model_dump(mode="json"),
                            config_path, ck_path, f"iteration {step}")
    elif resume:
        log.warning("%s: nothing to resume, starting a new run", ck_path)
    # rows a run that died after its last checkpoint wrote are written again from here
    trim_losses(run_dir / LOSSES, step)

    write_run_config(run_dir, cfg)
    log.info("data: %s", data.describe())
    log.info("data: %s", sampler.describe())
    log.info("run %s: G %.3f M, D %.3f M params; %d px (window %d), batch %d, %d critic iterations, "
             "G every %d, device %s, %d thread(s)%s", run_dir, count_parameters(G) / 1e6,
             count_parameters(D) / 1e6, d.size, d.crop, o.batch_size, o.iterations, o.n_critic,
             dev, cfg.threads, f", at most {cfg.max_minutes:g} min" if cfg.max_minutes else "")

    def checkpoint() -> dict:
        return {"format": CHECKPOINT_FORMAT, "kind": KIND, "step": step, "total": o.iterations,
                "elapsed_s": elapsed, "G": G.state_dict(), "D": D.state_dict(),
                "optimizers": {k: v.state_dict() for k, v in trainer.optimizers.items()},
                "config": cfg.model_dump(mode="json"), "n_classes": data.n_classes,
                "classes": list(data.dataset.classes), "subset": data.names,
                "subset_digests": digests,
                "history": history, "ema": ema, "first_g": first_g, "torch": str(torch.__version__)}

    stop = o.iterations if max_iters is None else min(o.iterations, step + max_iters)
    deadline = t_start + cfg.max_minutes * 60 if cfg.max_minutes else None
    stopped_by = "completed" if stop == o.iterations else "max_iters"
    G.train(), D.train()
    t_rate, first = time.monotonic(), step
    t_prev = t_rate
    losses_f = open(run_dir / LOSSES, "a")
    try:
        while step < stop:
            nb, db, lab = sampler.batch(step, o.batch_size)
            tgt = sampler.target_labels(step, o.batch_size)
            # a Ctrl-C or SIGTERM in here stops after the iteration (both updates, the counter,
            # the averages and the losses row): the checkpoint the handler below saves is then
            # one of a whole iteration, and --resume does not repeat the critic's update
            with whole_step():
                lr = lr_at(step, o)
                trainer.set_lr(lr)
                n, x_d = torch.from_numpy(nb).to(dev), torch.from_numpy(db).to(dev)
                c_real, c_tgt = torch.from_numpy(lab).to(dev), torch.from_numpy(tgt).to(dev)
                # this iteration's own random draws (see the module doc: resumes are exact)
                noise = step_generator(cfg.seed, step, NOISE_STREAM, dev)
                parts = trainer.d_step(n, x_d, c_real, c_tgt, noise,
                                       step_generator(cfg.seed, step, GP_STREAM))
                if (step + 1) % o.n_critic == 0:
                    g_parts = trainer.g_step(n, x_d, c_real, c_tgt, noise)
                    if first_g is None:
                        first_g = g_parts
                    parts.update(g_parts)
                step += 1
                for k, v in parts.items():
                    if not math.isfinite(v):
                        raise FloatingPointError(f"loss {k} is {v} at iteration {step}; lower optim.lr ({o.lr})")
                now = time.monotonic()
                elapsed, t_prev = elapsed + (now - t_prev), now  # wall time, summed over resumes
                update_ema(ema, parts)
                out_of_time = deadline is not None and now >= deadline
                if step % cfg.log_every == 0 or step == stop or out_of_time:
                    rate, eta = rate_eta(step - first, now - t_rate, stop - step)
                    if deadline is not None:
                        eta = min(eta, max(0.0, deadline - now))
                    losses_f.write(json.dumps({"it": step, "lr": lr, "elapsed_s": round(elapsed, 1),
                                               **{k: round(v, 5) for k, v in ema.items()}}) + "\n")
                    losses_f.flush()
                    history.append([step, ema.get("G", 0.0), ema.get("D", 0.0), ema.get("G_rec", 0.0)])
                    log.info("it %d/%d %s lr %.2e %.2f it/s eta %s", step, o.iterations,
                             " ".join(f"{k} {v:.3f}" for k, v in ema.items()), lr, rate, fmt_duration(eta))
            if step % cfg.checkpoint_every == 0 and step != stop and not out_of_time:
                atomic_save(checkpoint(), ck_path)
                m = _preview(G, sampler, run_dir / PREVIEW)
                log.info("checkpoint at %d: preview mean defacement map %.3f", step, m)
            if out_of_time:
                stopped_by = "max_minutes"
                log.info("max_minutes %g reached at iteration %d of %d: stopping cleanly",
                         cfg.max_minutes, step, o.iterations)
                break
    except KeyboardInterrupt:
        atomic_save(checkpoint(), ck_path)
        log.warning("interrupted at iteration %d; checkpoint saved, continue with --resume", step)
        raise
    finally:
        losses_f.close()

    atomic_save(checkpoint(), ck_path)
    m_mean = _preview(G, sampler, run_dir / PREVIEW)
    metrics = {
        "name": cfg.name, "kind": KIND, "iterations": step, "planned_iterations": o.iterations,
        "g_updates": step // o.n_critic, "stopped_by": stopped_by,
        "final_losses_ema": {k: round(v, 5) for k, v in ema.items()},
        "first_g_losses": None if first_g is None else {k: round(v, 5) for k, v in first_g.items()},
        "preview_mean_defacement_map": round(m_mean, 4), "final_lr": lr_at(max(0, step - 1), o),
        "params": {"G": count_parameters(G), "D": count_parameters(D)},
        "train_seconds": round(elapsed, 1), "device": str(dev), "threads": cfg.threads,
        "data": [data.describe(), sampler.describe()],
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    write_metrics(run_dir, metrics)
    log.info("done: %d iterations in %s (%s); %s", step, fmt_duration(elapsed), stopped_by,
             run_dir / METRICS)
    return run_dir


def main(argv: list[str] | None = None) -> int:
    from export.augment.cli_common import naming_stops

    # a bare Ctrl-C (outside a step) is named: train_main's line read "training stopped ()"
    return train_main(argv, kind="augment.defectgan", doc=__doc__, train=naming_stops(train), log=log,
                      max_iters="iterations")


if __name__ == "__main__":
    sys.exit(main())
