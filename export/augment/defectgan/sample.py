"""Defect-GAN sampling: synthetic defects pasted onto real labelled NEU-Seg images.

Each output pair is one real 200x200 image of the subset the generator learnt from, with one or
more synthetic defects: a defect-free ``window`` x ``window`` place of the image (never over a
real defect) is defaced by G with the chosen class as its control map, and the composed window
goes back in place. The label is the image's real mask plus the defacement distribution map
thresholded at ``threshold`` (default: the run's ``sample.threshold``), written as that class's
index. A defect whose mask has fewer than ``min_defect_px`` pixels is redrawn (new place, new
noise) up to ``tries`` times; if it never reaches that size it is not pasted at all (a faint
defect under a background label would teach a detector the wrong thing) and the next attempt
takes the next class, so classes the generator draws well are not held up.

Everything random comes from ``seed`` (image order, classes, places, G's injected noise), so
one seed gives the same folder twice on one machine. Written with
:class:`export.augment.dataset.PairWriter` (NEU-Seg layout + ``manifest.json``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

import cv2
import numpy as np
import torch

from inspector.evaluation.datasets import defect_free_windows, open_dataset

from export.augment.cli_common import check_run_dir, unfinished_run
from export.augment.dataset import MANIFEST, PairWriter
from export.augment.defectgan.data import LabelledImages, from_tensor_range, load_subset, to_tensor_range
from export.augment.defectgan.model import DefectGenerator
from export.augment.defectgan.train import (DefectGanConfig, KIND, build_networks,
                                            load_checkpoint)
from export.training import CHECKPOINT

log = logging.getLogger(__name__)

__all__ = ["DefectPainter", "sample", "write_grid", "parse_classes"]

#: overlay colours (BGR) for class indices 1.. (inclusion red, patches green, scratches blue)
CLASS_BGR = ((0, 0, 255), (0, 200, 0), (255, 80, 0), (0, 200, 255), (255, 0, 255))


def parse_classes(text: str | None, names: Sequence[str]) -> list[int]:
    """``inclusion,scratches`` -> class indices (1-based mask values); None -> every class."""
    defects = list(names[1:])
    if text is None:
        return list(range(1, len(names)))
    out = []
    for t in (s.strip() for s in text.split(",")):
        if not t:
            continue
        if t not in defects:
            raise ValueError(f"--classes: unknown class {t!r}; expected some of {', '.join(defects)}")
        out.append(defects.index(t) + 1)
    if not out:
        raise ValueError(f"--classes: no class given; expected some of {', '.join(defects)}")
    return out


class DefectPainter:
    """A trained G plus the run's config: defaces one window of a grey image at a time."""

    def __init__(self, run_dir: Path, device: str = "cpu"):
        run_dir = Path(run_dir)
        check_run_dir(run_dir)
        self.run_dir = run_dir
        self.ck_path = run_dir / CHECKPOINT
        ck = load_checkpoint(self.ck_path)
        self.cfg = DefectGanConfig.model_validate(ck["config"])
        if not self.cfg.model.lwc:
            raise ValueError(f"{self.ck_path}: trained without layer-wise composition (model.lwc "
                             f"false): it has no distribution map to label a defect with")
        self.n_classes = int(ck["n_classes"])
        self.classes: list[str] = list(ck["classes"])
        self.G: DefectGenerator = build_networks(self.cfg, self.n_classes)[0]
        self.G.load_state_dict(ck["G"])
        self.G.eval().to(device)
        self.device = torch.device(device)
        self.step = int(ck["step"])
        #: the planned critic iterations (older checkpoints: the config's)
        self.total = int(ck.get("total") or self.cfg.optim.iterations)

    @property
    def window(self) -> int:
        return self.cfg.data.crop

    def paint(self, window: np.ndarray, cls: int, gen: torch.Generator) -> tuple[np.ndarray, np.ndarray]:
        """(defaced window uint8, distribution map in [0, 1]) for grey ``window`` and class index
        ``cls`` (1-based), both at the window's native size."""
        size = self.cfg.data.size
        x = window if window.shape[0] == size else cv2.resize(window, (size, size),
                                                              interpolation=cv2.INTER_AREA)
        xt = torch.from_numpy(to_tensor_range(x))[None, None].to(self.device)
        lab = torch.zeros((1, self.n_classes), device=self.device)
        lab[0, cls - 1] = 1.0
        with torch.no_grad():
            _, f, m = self.G(xt, lab, gen)
        f_np, m_np = f[0, 0].cpu().numpy(), m[0, 0].cpu().numpy()
        if window.shape[0] != size:
            f_np = cv2.resize(f_np, window.shape[::-1], interpolation=cv2.INTER_LINEAR)
            m_np = cv2.resize(m_np, window.shape[::-1], interpolation=cv2.INTER_LINEAR)
        # compose on the native window (eq. 2), so pixels the map leaves alone keep their values
        out = to_tensor_range(window) * (1 - m_np) + f_np * m_np
        return from_tensor_range(out), m_np


def sample(run_dir: Path, out: Path, n: int, seed: int, classes: str | None = None,
           threshold: float | None = None, defects_per_image: int = 1, place_stride: int = 4,
           threads: int = 1, grid: Path | None = None, min_defect_px: int | None = None) -> Path:
    """Write ``n`` pairs into ``out`` (module doc); returns the manifest path. ``grid`` also
    writes a PNG of the first 16 pairs with their masks (:func:`write_grid`)."""
    if n < 1:
        raise ValueError(f"--n: must be at least 1, got {n}")
    if defects_per_image < 1:
        raise ValueError(f"--defects-per-image: must be at least 1, got {defects_per_image}")
    torch.set_num_threads(threads)  # one fixed thread count keeps the float sums reproducible
    painter = DefectPainter(run_dir)
    cfg: DefectGanConfig = painter.cfg
    thr = cfg.sample.threshold if threshold is None else threshold
    if not 0 < thr < 1:
        raise ValueError(f"--threshold: must lie in (0, 1), got {thr}")
    want = parse_classes(classes, painter.classes)
    win = painter.window
    min_px = cfg.sample.min_defect_px if min_defect_px is None else min_defect_px
    if min_px > win * win:
        # no paste can reach it: every image would be tried in vain before an error blaming
        # --threshold
        where = ("--min-defect-px" if min_defect_px is not None
                 else f"{painter.ck_path}: sample.min_defect_px")
        raise ValueError(f"{where} {min_px}: at most {win * win} (a defect is drawn in the run's "
                         f"{win}x{win}-px window)")
    complete = unfinished_run(painter.run_dir, KIND, painter.step, painter.total, "critic iteration")
    d = cfg.data
    data: LabelledImages = load_subset(cfg.data_root(), d.label_fraction, d.label_seed, tuple(d.splits))
    rng = np.random.default_rng([seed, 101])
    gen = torch.Generator().manual_seed(int(seed))
    # the pairs go to a temporary folder, renamed to `out` by close(): an error or Ctrl-C
    # before that leaves no `out` (PairWriter's exit removes the folder)
    with PairWriter(Path(out), KIND, config={
        "train_config": cfg.model_dump(mode="json"), "seed": seed, "threshold": thr,
        "classes": [painter.classes[c] for c in want], "defects_per_image": defects_per_image,
        "place_stride": place_stride, "window": win, "n": n, "min_defect_px": min_px},
        classes=painter.classes) as writer:
        order = rng.permutation(len(data.images))
        visits, attempts, rejected = 0, 0, 0
        max_visits = 20 * n + 2 * len(order)  # bounds a generator that draws nothing at this threshold
        while len(writer.pairs) < n:
            if visits >= max_visits:
                raise ValueError(f"--threshold {thr:g} / --min-defect-px {min_px}: only "
                                 f"{len(writer.pairs)} of {n} pairs after {visits} images; the "
                                 f"generator's maps rarely exceed the threshold over that many "
                                 f"pixels of its {win}x{win} window (lower --threshold or "
                                 "--min-defect-px, or train longer)")
            i = int(order[visits % len(order)])
            visits += 1
            img, mask = data.images[i].copy(), data.masks[i].copy()
            placed: list[dict[str, Any]] = []
            for _ in range(defects_per_image):
                # classes in turn per attempt: a class the generator fails on does not stall the others
                cls = want[attempts % len(want)]
                attempts += 1
                best = None
                for t in range(cfg.sample.tries):
                    cand = defect_free_windows(mask, win, place_stride)
                    if len(cand) == 0:
                        break
                    y, x = (int(v) for v in cand[rng.integers(len(cand))])
                    painted, m = painter.paint(img[y:y + win, x:x + win], cls, gen)
                    px = int((m > thr).sum())
                    if px >= min_px:
                        best = (px, y, x, painted, m, t + 1)
                        break
                if best is None:
                    # nothing (or too little) over the threshold: pasting it would put a faint
                    # defect under a background label, so nothing is pasted
                    rejected += 1
                    continue
                px, y, x, painted, m, tries = best
                halo = paste_halo(img[y:y + win, x:x + win], painted, m > thr)
                img[y:y + win, x:x + win] = painted
                region = mask[y:y + win, x:x + win]
                region[(m > thr) & (region == 0)] = cls
                placed.append({"class": painter.classes[cls], "y": y, "x": x, "size": win,
                               "defect_px": px, "map_mean": round(float(m.mean()), 4), "tries": tries,
                               **halo})
            if placed:
                writer.add(img, mask, source=data.names[i], defects=placed)
        per_class = {painter.classes[c]: sum(d["class"] == painter.classes[c] for it in writer.pairs
                                             for d in it["defects"]) for c in want}
        if rejected:
            log.warning("%d of %d defect attempts drew under %d px over threshold %g in %d tries and "
                        "were not pasted; written per class: %s", rejected, attempts, min_px, thr,
                        cfg.sample.tries, per_class)
        halo = halo_summary([d for it in writer.pairs for d in it["defects"]])
        log.info("paste halo (pixels the paste changed but labelled background): %s", halo)
        if halo.get("halo_ge8_per_labelled_px", 0) > HALO_WARN:
            # the soft map fades out beyond its thresholded label: faint defect under a
            # background label, which the min_defect_px rule was meant to keep out
            log.warning("the pasted defects changed %.2f pixels by 8 grey levels or more outside their "
                        "labels per labelled pixel (label threshold %g on the map; warned above %g): "
                        "faint defect under background labels; a lower --threshold labels more of "
                        "what was painted (manifest: halo)", halo["halo_ge8_per_labelled_px"], thr, HALO_WARN)
        path = writer.close(rejected_attempts=rejected, attempts=attempts, per_class=per_class, halo=halo,
                            checkpoint=str(painter.ck_path), checkpoint_step=painter.step,
                            planned_iterations=painter.total, training_complete=complete,
                            subset={"root": str(data.dataset.root), "split": data.dataset.split,
                                    "images": len(data.images)})
    if grid is not None:
        write_grid(Path(out), Path(grid))
    return path


#: grey-level changes counted as a halo: any visible change, and a clear one
HALO_GL = (2, 8)
#: clear halo pixels per labelled pixel above which sampling warns
HALO_WARN = 0.5


def paste_halo(before: np.ndarray, after: np.ndarray, labelled: np.ndarray) -> dict[str, int]:
    """What a paste changed outside its label: the pixels of the window whose grey level moved by
    at least 2 and by at least 8 (``x·(1−m) + f·m`` changes every pixel where m > 0, and only
    m > threshold is labelled), and the largest such change. Measured on the composition, before
    the JPEG that writes the pair adds its own noise everywhere."""
    diff = np.abs(after.astype(np.int16) - before.astype(np.int16))
    outside = diff[~labelled]
    return {"halo_px": int((outside >= HALO_GL[0]).sum()), "halo_px_ge8": int((outside >= HALO_GL[1]).sum()),
            "halo_max_gl": int(outside.max()) if outside.size else 0}


def halo_summary(defects: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The paste halo over the pasted defects: totals against the labelled pixels, the share of
    defects with a clear (>= 8 grey levels) halo, and the median halo per defect."""
    if not defects:
        return {"defects": 0}
    labelled = sum(d["defect_px"] for d in defects)
    halo = [d["halo_px"] for d in defects]
    clear = [d["halo_px_ge8"] for d in defects]
    return {"defects": len(defects), "labelled_px": labelled,
            "halo_px": int(sum(halo)), "halo_px_ge8": int(sum(clear)),
            "halo_per_labelled_px": round(sum(halo) / max(labelled, 1), 4),
            "halo_ge8_per_labelled_px": round(sum(clear) / max(labelled, 1), 4),
            "defects_with_halo_ge8": round(sum(c > 0 for c in clear) / len(defects), 4),
            "median_halo_px": float(np.median(halo)), "max_gl": max(d["halo_max_gl"] for d in defects)}


def _overlay(img: np.ndarray, mask: np.ndarray, boxes: Sequence[dict[str, Any]]) -> np.ndarray:
    """Grey image in BGR with each class tinted and outlined, synthetic places boxed in yellow."""
    bgr = cv2.cvtColor(img, cv2.COLOR_GRAY2BGR) if img.ndim == 2 else img.copy()
    out = bgr.astype(np.float32)
    for c in range(1, int(mask.max()) + 1):
        sel = mask == c
        if sel.any():
            out[sel] = 0.55 * out[sel] + 0.45 * np.array(CLASS_BGR[(c - 1) % len(CLASS_BGR)], np.float32)
    out = out.astype(np.uint8)
    for c in range(1, int(mask.max()) + 1):
        cnts, _ = cv2.findContours((mask == c).astype(np.uint8), cv2.RETR_EXTERNAL,
                                   cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(out, cnts, -1, CLASS_BGR[(c - 1) % len(CLASS_BGR)], 1)
    for b in boxes:
        cv2.rectangle(out, (b["x"], b["y"]), (b["x"] + b["size"] - 1, b["y"] + b["size"] - 1),
                      (0, 230, 255), 1)
    return out


def write_grid(out: Path, path: Path, n: int = 16, cols: int = 4, tile: int = 128) -> Path:
    """A PNG of the first ``n`` pairs of the folder ``out``: each cell is the image and the image
    with its mask overlaid (class colours; synthetic places boxed), ``tile`` px each. Palette
    PNG so the figure stays small for the README."""
    import json

    from PIL import Image

    man = json.loads((Path(out) / MANIFEST).read_text())
    items = {it["stem"]: it for it in man["items"]}
    ds = open_dataset("neu-seg", out, split="all")
    cells = []
    for s in list(ds)[:n]:
        img = s.image if s.image.ndim == 2 else cv2.cvtColor(s.image, cv2.COLOR_RGB2GRAY)
        ov = _overlay(img, s.mask, items.get(s.entry.stem, {}).get("defects", []))
        a = cv2.resize(cv2.cvtColor(img, cv2.COLOR_GRAY2BGR), (tile, tile), interpolation=cv2.INTER_AREA)
        b = cv2.resize(ov, (tile, tile), interpolation=cv2.INTER_AREA)
        cells.append(np.concatenate([a, np.full((tile, 2, 3), 255, np.uint8), b], axis=1))
    if not cells:
        raise ValueError(f"{out}: no pairs to draw")
    blank = np.full_like(cells[0], 255)
    rows = []
    for r in range(0, len(cells), cols):
        row = cells[r:r + cols] + [blank] * (cols - len(cells[r:r + cols]))
        rows.append(np.concatenate([np.pad(c, ((2, 2), (2, 2), (0, 0)), constant_values=255)
                                    for c in row], axis=1))
    grid = np.concatenate(rows, axis=0)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(cv2.cvtColor(grid, cv2.COLOR_BGR2RGB)).quantize(colors=128).save(path, optimize=True)
    log.info("%s: grid of %d pairs from %s", path, len(cells), out)
    return path
