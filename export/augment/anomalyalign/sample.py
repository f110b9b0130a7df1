"""AnomalyAlign sampling: masks + prompts -> DDIM -> NEU-Seg-layout pairs (spec §2.4).

Masks are the labelled subset's real masks (the images the generator learnt from), randomly
flipped and shifted (the spec's CPU stand-in for AnomalyDiffusion's mask generator); the prompt
is the one the prompt generator chose for the mask's source image (spec §9 default: a training
image's ``j*`` prompt of that defect type). The mask is brought to the model's resolution
(nearest), the image is generated there, then both go back to the data set's size: the image
bicubic, the mask nearest, so the written label is exactly the mask the model was conditioned on.

Pair ``i`` depends only on (``--seed``, ``i``) and the checkpoint: its mask transform, its
source and its noise seed are drawn from a generator seeded with both, and that noise seed drives
the pair's own generator for its initial noise and (``sample.eta`` > 0) the DDIM variance noise
of every step, so the output is deterministic under ``--seed`` whatever the batch size.

The manifest's ``shift`` of a pair is the one applied to its mask: ``[0, 0]`` where the planned
shift would have pushed more than half of the defect off the image and was dropped.

Example::

    inspector augment anomalyalign sample --run-dir runs/anomalyalign-neu-10 \\
        --out runs/synth/anomalyalign-300 --n 300 --seed 0
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch

from export.augment.anomalyalign.nets import build_controlnet, build_unet
from export.augment.anomalyalign.prompts import PromptLibrary
from export.augment.anomalyalign.train import (SEGMENTER, AnomalyAlignConfig, ddim_sample,
                                               grid_image, load_checkpoint, load_segmenter)
from export.augment.cli_common import check_run_dir, unfinished_run
from export.augment.dataset import PairWriter, labelled_subset
from inspector.errors import ConfigError
from export.training import CHECKPOINT, fmt_duration

log = logging.getLogger(__name__)

__all__ = ["SourceMasks", "load_sources", "find_data_root", "plan_pair", "transform_mask", "place_mask", "load_model",
           "AlignmentMeter", "sample", "write_grid", "check_guidance"]


@dataclass
class SourceMasks:
    """The real masks to draw from, at the data set's size, with their stems and prompts."""

    masks: list[np.ndarray]  # HxW uint8 class indices
    stems: list[str]
    prompt_idx: list[int]  # chosen library prompt of each source image
    size: tuple[int, int]  # (H, W) of the written pairs


def is_neu_root(path: Path) -> bool:
    """The NEU-Seg layout's two folders are there (what the reader needs first)."""
    return (path / "images").is_dir() and (path / "annotations").is_dir()


def find_data_root(ck: dict, cfg: AnomalyAlignConfig, ck_path: Path,
                   data_root: str | Path | None = None) -> Path:
    """The NEU-Seg folder the run was trained on. ``data_root`` (``--data-root``) when given;
    else the checkpoint's ``data.root``: absolute as it is, relative first from the folder the
    run was trained in (its ``base_dir``, recorded since this was fixed), then from the working
    directory (all an older checkpoint allows). It used to be taken from the working directory
    only, so ``sample`` worked only from the folder the run was trained in, and the error named
    neither the checkpoint nor the key."""
    if data_root is not None:
        root = Path(data_root).expanduser()
        if not is_neu_root(root):
            from inspector.fileio import missing_folder

            why = "not a NEU-Seg root" if root.is_dir() else missing_folder(root, "NEU-Seg root")
            raise FileNotFoundError(f"--data-root {data_root}: {why} (expected images/ and "
                                    f"annotations/ folders in it)")
        return root
    saved = Path(cfg.data.root).expanduser()
    tried = ([saved] if saved.is_absolute()
             else ([Path(ck["base_dir"]) / saved] if ck.get("base_dir") else []) + [Path.cwd() / saved])
    for root in tried:
        if is_neu_root(root):
            return root
    raise ConfigError(str(ck_path), "data.root",
                      f"{cfg.data.root}: the run's NEU-Seg folder is not found (looked in "
                      f"{' and '.join(dict.fromkeys(os.path.normpath(t) for t in tried))}); pass `sample "
                      "--data-root <NEU-Seg folder>` with the images the run was trained on")


def load_sources(ck: dict, cfg: AnomalyAlignConfig, root: str | Path | None = None) -> SourceMasks:
    """The checkpoint's training images' masks, re-read from the labelled subset of ``root``
    (default: the config's ``data.root``; the checkpoint keeps only their stems, in training
    order)."""
    root = cfg.data.root if root is None else root
    ds = labelled_subset(root, cfg.data.label_fraction, cfg.data.label_seed)
    by_stem = {e.stem: i for i, e in enumerate(ds.entries)}
    masks, stems, pidx = [], [], []
    for stem, j in zip(ck["train_stems"], ck["prompt_idx"]):
        if stem not in by_stem:
            raise ValueError(f"{root}: training image {stem} of the checkpoint is missing; "
                             f"the labelled subset changed since training (or this is not the "
                             f"run's data)")
        m = ds.load(by_stem[stem]).mask
        masks.append(m)
        stems.append(stem)
        pidx.append(int(j))
    return SourceMasks(masks, stems, pidx, masks[0].shape[:2])


def plan_pair(src: SourceMasks, seed: int, i: int, max_shift: float) -> dict:
    """Pair ``i``'s source, flips and shift: a pure function of (seed, i)."""
    rng = np.random.default_rng([int(seed), int(i), 911])
    k = int(rng.integers(len(src.masks)))
    h, w = src.size
    return {"source": k, "hflip": bool(rng.integers(2)), "vflip": bool(rng.integers(2)),
            "dy": int(rng.integers(-int(max_shift * h), int(max_shift * h) + 1)),
            "dx": int(rng.integers(-int(max_shift * w), int(max_shift * w) + 1)),
            "noise_seed": int(rng.integers(2 ** 31 - 1))}


def transform_mask(mask: np.ndarray, plan: dict) -> np.ndarray:
    """Flip, then shift with background fill; a shift that would drop more than half of the
    defect pixels off the edge is not applied (an almost empty label teaches nothing)."""
    return place_mask(mask, plan)[0]


def place_mask(mask: np.ndarray, plan: dict) -> tuple[np.ndarray, list[int]]:
    """:func:`transform_mask`, and the shift ``[dy, dx]`` it applied (``[0, 0]`` when the
    planned one was dropped): what the manifest records."""
    m = mask
    if plan["hflip"]:
        m = m[:, ::-1]
    if plan["vflip"]:
        m = m[::-1, :]
    h, w = m.shape
    dy, dx = plan["dy"], plan["dx"]
    out = np.zeros_like(m)
    ys, yd = (slice(0, h - dy), slice(dy, h)) if dy >= 0 else (slice(-dy, h), slice(0, h + dy))
    xs, xd = (slice(0, w - dx), slice(dx, w)) if dx >= 0 else (slice(-dx, w), slice(0, w + dx))
    out[yd, xd] = m[ys, xs]
    if (out > 0).sum() * 2 < (m > 0).sum():
        return np.ascontiguousarray(m), [0, 0]
    return out, [int(dy), int(dx)]


def load_model(ck: dict, cfg: AnomalyAlignConfig, dev: torch.device):
    """The EMA networks of the checkpoint (the raw ones when the run kept no EMA), in eval."""
    m = cfg.model
    unet = build_unet(cfg.data.resolution, m.widths, m.attention, cfg.prompts.dim, m.layers_per_block,
                      m.head_dim, m.norm_groups)
    controlnet = build_controlnet(unet, len(ck["classes"]) - 1, m.hint_channels)
    src = ck["ema"] if ck.get("ema") else {"unet": ck["unet"], "controlnet": ck["controlnet"]}
    unet.load_state_dict(src["unet"])
    controlnet.load_state_dict(src["controlnet"])
    return unet.to(dev).eval(), controlnet.to(dev).eval()


class AlignmentMeter:
    """Mask alignment (issue #9's measure): per defect class, IoU between the conditioning masks
    and the run's frozen segmenter's argmax on the generated images, pooled over all pairs."""

    def __init__(self, seg, classes: list[str]):
        self.seg, self.classes = seg, classes
        self.inter = np.zeros(len(classes) - 1)
        self.union = np.zeros(len(classes) - 1)

    @torch.no_grad()
    def add(self, images: torch.Tensor, masks: np.ndarray) -> None:
        pred = self.seg((images.cpu().float() + 1) / 2).argmax(1).numpy()
        for c in range(1, len(self.classes)):
            self.inter[c - 1] += ((pred == c) & (masks == c)).sum()
            self.union[c - 1] += ((pred == c) | (masks == c)).sum()

    def result(self) -> dict[str, float | None]:
        return {name: (round(float(i / u), 4) if u else None)
                for name, i, u in zip(self.classes[1:], self.inter, self.union)}


def generate(unet, controlnet, cfg: AnomalyAlignConfig, text_table: torch.Tensor,
             masks_lr: list[np.ndarray], prompt_idx: list[int], noise_seeds: list[int],
             steps: int | None = None, guidance: float | None = None,
             meter: AlignmentMeter | None = None) -> np.ndarray:
    """Images [B, R, R] uint8 for low-resolution masks, prompts and per-pair noise seeds. Each
    pair's generator, seeded with its noise seed, draws its initial noise and then its DDIM
    variance noise (eta > 0), so a pair does not depend on the batch it is in."""
    r = cfg.data.resolution
    gens = [torch.Generator().manual_seed(int(s)) for s in noise_seeds]
    noise = torch.stack([torch.randn((1, r, r), generator=g) for g in gens])
    text = text_table[torch.tensor(prompt_idx)][:, None, :]
    x = ddim_sample(unet, controlnet, torch.from_numpy(np.stack(masks_lr)).long(), text, noise, cfg,
                    steps=steps, guidance=guidance, generators=gens)
    if meter is not None:
        meter.add(x, np.stack(masks_lr))
    return np.clip((x.cpu().numpy()[:, 0] + 1) * 127.5 + 0.5, 0, 255).astype(np.uint8)


def check_guidance(guidance: float) -> float:
    """``--guidance`` as given, refused below 1 (or NaN): classifier-free guidance is off at 1
    and applied above it (spec 000 §2.4: scale 7.5-9); a value under 1 would sample as 1 while
    the manifest recorded the value given."""
    if not guidance >= 1:
        raise ValueError(f"--guidance: must be >= 1 (1 = no classifier-free guidance), got {guidance:g}")
    if not math.isfinite(guidance):  # inf: NaN pixels, written as all-black images
        raise ValueError(f"--guidance: must be a finite number, got {guidance:g}")
    return float(guidance)


def sample(run_dir: Path, out: Path, n: int, seed: int = 0, steps: int | None = None,
           guidance: float | None = None, batch_size: int | None = None,
           threads: int | None = None, sources: SourceMasks | None = None,
           data_root: str | Path | None = None) -> Path:
    """Write ``n`` pairs from the run in ``run_dir`` to ``out``; returns the manifest path.
    ``sources`` replaces the labelled subset's masks (tests); ``data_root`` is where the run's
    training images are (:func:`find_data_root`)."""
    run_dir, out = Path(run_dir), Path(out)
    check_run_dir(run_dir)
    ck_path = run_dir / CHECKPOINT
    ck = load_checkpoint(ck_path)
    cfg = AnomalyAlignConfig.model_validate(ck["config"])
    # the run's thread count by default: more threads than free cores slows sampling many-fold
    torch.set_num_threads(threads or cfg.threads)
    dev = torch.device("cuda" if cfg.device != "cpu" and torch.cuda.is_available() else "cpu")
    src = sources or load_sources(ck, cfg, find_data_root(ck, cfg, ck_path, data_root))
    total = ck.get("total")
    complete = unfinished_run(run_dir, "anomalyalign", int(ck["step"]),
                              None if total is None else int(total), "diffusion iteration")
    lib = PromptLibrary.from_dict(ck["library"])
    unet, controlnet = load_model(ck, cfg, dev)
    text_table = ck["text_emb"].float()
    steps = steps or cfg.sample.steps
    if steps > cfg.diffusion.train_timesteps:  # diffusers' own words named no option
        raise ValueError(f"--steps {steps}: more than the {cfg.diffusion.train_timesteps} diffusion "
                         f"timesteps this run was trained with (diffusion.train_timesteps); DDIM "
                         f"takes at most that many")
    guidance = cfg.sample.guidance_scale if guidance is None else check_guidance(guidance)
    bs = batch_size or cfg.sample.batch_size
    r = cfg.data.resolution
    h, w = src.size
    settings = {"seed": seed, "ddim_steps": steps, "eta": cfg.sample.eta, "guidance_scale": guidance,
                "control_scale": cfg.sample.control_scale, "max_shift": cfg.sample.max_shift,
                "resolution": r}
    seg_path = run_dir / SEGMENTER
    meter = (AlignmentMeter(load_segmenter(seg_path, len(ck["classes"])), list(ck["classes"]))
             if seg_path.is_file() else None)
    log.info("sampling %d pairs from %s (iteration %d of %s) at %d px -> %dx%d, DDIM %d steps, "
             "guidance %g", n, ck_path, ck["step"], total if total is not None else "?", r, w, h,
             steps, guidance)
    t0 = time.monotonic()
    # the pairs go to a temporary folder that close() renames to `out`: an error or Ctrl-C before
    # that leaves no `out` (the writer's exit removes the folder)
    with PairWriter(out, "anomalyalign", config=ck["config"]) as writer:
        for start in range(0, n, bs):
            plans = [plan_pair(src, seed, i, cfg.sample.max_shift) for i in range(start, min(n, start + bs))]
            placed = [place_mask(src.masks[p["source"]], p) for p in plans]
            low = [cv2.resize(m, (r, r), interpolation=cv2.INTER_NEAREST) for m, _ in placed]
            pidx = [src.prompt_idx[p["source"]] for p in plans]
            imgs = generate(unet, controlnet, cfg, text_table, low, pidx, [p["noise_seed"] for p in plans],
                            steps, guidance, meter)
            for p, (_, shift), img, m_lr, j in zip(plans, placed, imgs, low, pidx):
                big = cv2.resize(img, (w, h), interpolation=cv2.INTER_CUBIC)
                mask = cv2.resize(m_lr, (w, h), interpolation=cv2.INTER_NEAREST)
                writer.add(big, mask, prompt=lib.prompts[j], source_mask=src.stems[p["source"]],
                           hflip=p["hflip"], vflip=p["vflip"], shift=shift,
                           noise_seed=p["noise_seed"])
            done = min(n, start + bs)
            el = time.monotonic() - t0
            log.info("%d/%d pairs, %s, eta %s", done, n, fmt_duration(el), fmt_duration(el / done * (n - done)))
        alignment = meter.result() if meter else None
        if alignment:
            log.info("mask alignment (IoU of the run's segmenter on the generated images vs their "
                     "masks, at %d px): %s", r, alignment)
        return writer.close(checkpoint=str(ck_path), checkpoint_step=int(ck["step"]),
                            planned_iterations=total, training_complete=complete,
                            subset=ck.get("data_source"), sampling=settings,
                            mask_alignment_iou=alignment,
                            segmenter_train_iou=ck["segmenter"].get("info", {}).get("train_iou"))


def write_grid(out: Path, path: Path, n: int = 16, cols: int = 4, side: int = 100) -> Path:
    """A PNG of the first ``n`` written pairs (image | coloured mask), each tile ``side`` px."""
    imgs, masks = [], []
    stems = sorted(p.stem for p in (Path(out) / "images" / "training").glob("*.jpg"))[:n]
    for s in stems:
        im = cv2.imread(str(Path(out) / "images" / "training" / f"{s}.jpg"), cv2.IMREAD_GRAYSCALE)
        m = cv2.imread(str(Path(out) / "annotations" / "training" / f"{s}.png"), cv2.IMREAD_GRAYSCALE)
        imgs.append(cv2.resize(im, (side, side), interpolation=cv2.INTER_AREA))
        masks.append(cv2.resize(m, (side, side), interpolation=cv2.INTER_NEAREST))
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), grid_image(np.stack(imgs), np.stack(masks), cols),
                [cv2.IMWRITE_PNG_COMPRESSION, 9])
    return path
