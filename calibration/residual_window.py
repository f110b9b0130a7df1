"""Calibrate a clgan bundle's ``kind_params.local_mean_window`` on labelled images.

The spec's residual ``|Gauss(I) - Gauss(I_r)|`` assumes the reconstruction keeps the frame's grey
level. The spec's generator cannot: it normalises every feature map per image, so its output is
blind to brightness and contrast, and on a surface whose illumination drifts across the frame
the residual maps the illumination (README, CLGAN). ``local_mean_window`` w makes the
reconstruction take the input's local mean first, ``I_r - Gauss_w(I_r) + Gauss_w(I)``; the
residual then compares structure finer than about w pixels. Which w suits a surface depends on
its defects (small pits want a small window, wide smears a wide one) and is not in the paper,
so it is measured here, on a split the final evaluation does not use.

The bundle reconstructs each image once; for every candidate w (0 = off, the spec) the residual,
the published score and the paper's dual-threshold mask (the bundle's k1, k2, closing; no
absolute floor, since a floor is in residual units and belongs to the old residual) are
recomputed. Per w: pixel AUROC of the score (defect pixels against all other pixels, every
``stride``-th pixel), the same per defect class (that class's pixels against all defect-free
pixels) and its mean over the classes present (``class_mean_auroc``: on magnetic tile the pooled
figure is three quarters one class, wide low-contrast ``Uneven`` areas, and says little about
pits and cracks), the paper's per-image P, R, F1, IoU, ACC over defect images and the
false-alarm figures on defect-free images. The best w by ``objective`` is reported;
``write_window`` stores it in the bundle, keeps the old value in the provenance and, because an
absolute floor from ``inspector calibrate thresholds`` no longer applies to the new residual,
resets ``postprocess.min_residual`` to 0 (the old section goes to ``postprocess_history``):
recalibrate the floor afterwards.

    inspector calibrate residual-window --bundle deploy/models/clgan-mt \\
        --data ../shared/data/magnetic_tile --format magnetic-tile --split val --out calib-out
"""

from __future__ import annotations

import json
import logging
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np

from calibration.cli import comma_ints
from calibration.dual_threshold import finish_sweep_plot
from calibration.outputs import make_out_dir
from calibration.postprocess_history import replace_postprocess, reset_floor, warn_floor_reset
from inspector.bundle import BUNDLE_FILE, BundleSpec, load_bundle, write_bundle
from inspector.evaluation.datasets import Dataset
from inspector.evaluation.evaluate import Runner
from inspector.evaluation.metrics import DefectPixelMetrics, FalseAlarm, FrameResult, auroc
from inspector.fileio import atomic_write_text
from inspector.models.clgan import ClganAdapter, check_local_mean_window, clgan_residual, residual_score
from inspector.postprocess import dual_threshold

log = logging.getLogger(__name__)

__all__ = ["parse_windows", "sweep_window", "write_window", "save_result", "DEFAULT_WINDOWS"]

DEFAULT_WINDOWS = "0,15,31,63"
#: the widest local_mean_window tried
MAX_WINDOW = 4095
Objective = Literal["class_mean_auroc", "pixel_auroc", "f1", "iou"]
OBJECTIVES = ("class_mean_auroc", "pixel_auroc", "f1", "iou")


def parse_windows(text: str) -> list[int]:
    """Comma list of window sides, each 0 (off) or odd >= 3 and at most :data:`MAX_WINDOW`,
    e.g. ``0,15,31,63``."""
    vals = comma_ints(text, "--windows")
    for v in vals:
        try:
            check_local_mean_window(v)
        except ValueError as e:
            raise ValueError(f"--windows {text!r}: {e}") from None
        if v > MAX_WINDOW:  # a Gaussian that side is a flat mean of any frame; far larger crashed OpenCV
            raise ValueError(f"--windows {text!r}: a side of at most {MAX_WINDOW}, got {v}")
    return sorted(set(vals))


def sweep_window(bundle: str | Path, dataset: Dataset, windows: Sequence[int],
                 objective: Objective = "class_mean_auroc", stride: int = 2) -> dict[str, Any]:
    """Figures of the residual for each ``local_mean_window`` in ``windows``."""
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
    if stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    runner = Runner(bundle)
    adapter = runner.adapter
    if not isinstance(adapter, ClganAdapter):
        raise ValueError(f"{runner.bundle.path / BUNDLE_FILE}: kind is {runner.bundle.spec.kind}; the "
                         f"residual window belongs to clgan bundles")
    if len(dataset) == 0:
        raise ValueError(f"{dataset.root}: no images in split '{dataset.split}'")
    p, pp = adapter.params, runner.pp_config
    acc = {w: (DefectPixelMetrics(), FalseAlarm()) for w in windows}
    scores: dict[int, list[np.ndarray]] = {w: [] for w in windows}
    truths: list[np.ndarray] = []
    t0 = time.perf_counter()
    for i in range(len(dataset)):
        s = dataset.load(i)
        rec = adapter.reconstruct(s.image)
        img = adapter.model_image(s.image, rec.shape)
        for w in windows:
            residual = clgan_residual(img, rec.copy(), p.gauss_ksize, p.gauss_sigma, p.residual_mode,
                                      local_mean_window=w)
            label = dual_threshold(residual, pp.k1, pp.k2, pp.kernel_size)
            score = residual_score(residual)
            # the defect list too: false_alarm_rate_reported counts normal images with a reported
            # defect (after min_area_px, as the runtime reports them), and was 0 without it
            fr = FrameResult(label=label, score_map=score, defects=runner.post.defects(label, score)[0])
            for m in acc[w]:
                m.update(s.mask, fr, s.name)
            scores[w].append(fr.score_map.ravel()[::stride].copy())
        truths.append(s.mask.ravel()[::stride].copy())
        if (i + 1) % 50 == 0:
            log.info("residuals of %d/%d images", i + 1, len(dataset))
    truth = np.concatenate(truths)
    rows = []
    for w in windows:
        dm, fa = (m.result() for m in acc[w])
        rows.append({"local_mean_window": int(w),
                     **ranking(np.concatenate(scores[w]), truth, dataset.classes),
                     **{k: dm[k] for k in ("precision", "recall", "f1", "iou", "acc")}, **fa})
    scored = [r for r in rows if r[objective] is not None]
    best = max(scored, key=lambda r: r[objective]) if scored else None
    return {
        "bundle": str(runner.bundle.path), "objective": objective, "pixel_stride": stride,
        "previous": p.local_mean_window,
        "fixed": {"k1": pp.k1, "k2": pp.k2, "kernel_size": pp.kernel_size, "min_residual": 0.0,
                  "gauss_ksize": p.gauss_ksize, "residual_mode": p.residual_mode},
        "data": dataset.summary(), "rows": rows,
        "best": best, "best_value": best["local_mean_window"] if best else None,
        "at_edge": bool(best and len(windows) > 1
                        and best["local_mean_window"] in (min(windows), max(windows))),
        "seconds": round(time.perf_counter() - t0, 1),
    }


def ranking(score: np.ndarray, truth: np.ndarray, classes: Sequence[str]) -> dict[str, Any]:
    """Pooled pixel AUROC (defect against the rest), AUROC per defect class (its pixels against
    all background pixels) and the mean of the per-class figures."""
    normal = truth == 0
    per_class = {}
    for c in np.unique(truth):
        if c == 0:
            continue
        keep = normal | (truth == c)
        name = classes[c] if c < len(classes) else str(int(c))
        per_class[name] = auroc(score[keep], (truth[keep] == c).astype(np.uint8))
    vals = [v for v in per_class.values() if v is not None]
    return {"pixel_auroc": auroc(score, (truth > 0).astype(np.uint8)), "per_class_auroc": per_class,
            "class_mean_auroc": float(np.mean(vals)) if vals else None}


def write_window(bundle: str | Path, value: int, note: dict[str, Any]) -> dict[str, Any]:
    """Set ``kind_params.local_mean_window``; reset an absolute floor that was calibrated on the old
    residual (graphs are verified first, so a corrupt graph is never rewritten)."""
    b = load_bundle(bundle, verify=True)
    spec = b.spec
    ts = datetime.now(timezone.utc).isoformat(timespec="seconds")
    kp = dict(spec.kind_params)
    old = int(kp.get("local_mean_window", 0))
    kp["local_mean_window"] = int(value)
    prov = dict(spec.provenance)
    hist = list(prov.get("residual_window_calibration_history", []))
    if "residual_window_calibration" in prov:
        hist.append(prov["residual_window_calibration"])
    prov["residual_window_calibration"] = {"created": ts, "previous": old, "local_mean_window": int(value),
                                           **note}
    if hist:
        prov["residual_window_calibration_history"] = hist
    update: dict[str, Any] = {"kind_params": kp, "provenance": prov}
    why = f"it was calibrated on the residual with window {old}"
    pp = reset_floor(spec, b.path / BUNDLE_FILE, why) if int(value) != old else None
    floor_reset = pp is not None
    if floor_reset:
        update |= replace_postprocess(spec.model_copy(update={"provenance": prov}), pp,
                                      f"calibrate residual-window {old} -> {value}: the floor was "
                                      "calibrated on the old residual", ts)
    new = BundleSpec.model_validate({**spec.model_dump(mode="json"), **update})
    path = write_bundle(b.path, new)
    if floor_reset:
        warn_floor_reset(spec, path, why)
    load_bundle(b.path)  # what was written loads and verifies
    return {"bundle_yaml": str(path), "previous": old, "local_mean_window": int(value),
            "min_residual_reset": floor_reset, "time": ts}


def plot_sweep(result: dict[str, Any], path: Path) -> Path:
    """PNG: pixel AUROC and the dual-threshold F1 / IoU against the window side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    x = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    labels = {"class_mean_auroc": "pixel AUROC, mean over defect classes", "pixel_auroc": "pixel AUROC, pooled",
              "f1": "F1 (dual threshold)", "iou": "IoU (dual threshold)"}
    for key, style in (("class_mean_auroc", "-o"), ("pixel_auroc", "-D"), ("f1", "-s"), ("iou", "-^")):
        ax.plot(x, [np.nan if r[key] is None else r[key] for r in rows], style, ms=4, label=labels[key])
    for i, name in enumerate(rows[0]["per_class_auroc"] if rows else ()):
        ax.plot(x, [np.nan if r["per_class_auroc"].get(name) is None else r["per_class_auroc"][name]
                    for r in rows], ":", lw=1.2, color=f"C{4 + i % 6}", label=f"AUROC {name}")
    ax.set_xticks(x, [("off" if r["local_mean_window"] == 0 else str(r["local_mean_window"]))
                      for r in rows])
    ax.set_xlabel("local_mean_window (px)")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    if result.get("best_value") is not None:
        ax.axvline([r["local_mean_window"] for r in rows].index(result["best_value"]),
                   color="tab:red", alpha=0.4, lw=1)
    ax.legend(fontsize=8, loc="best")
    return finish_sweep_plot(fig, ax, result, "residual window", path)


def save_result(result: dict[str, Any], out_dir: Path) -> dict[str, Path]:
    out_dir = Path(out_dir)
    make_out_dir(out_dir)  # a folder that cannot be made: one line naming --out, exit 2
    j = out_dir / "sweep_local_mean_window.json"
    atomic_write_text(j, json.dumps(result, indent=2))
    png = plot_sweep(result, out_dir / "sweep_local_mean_window.png")
    return {"json": j, "png": png}
