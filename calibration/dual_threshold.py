"""Calibrate the dual-threshold coefficients (k1 or k2) of a residual-model bundle.

The CLGAN paper sweeps the first threshold's k over 2.0-3.0 and finds F1 and IoU still rising at
3.0, the edge of its range (spec §3.5), so the default sweep here runs 2.0-4.0. The bundle runs
once per image (adapter and engine as at run time); the residuals are kept and only the
post-processing is repeated for each k, so a sweep costs one evaluation plus cheap numpy work.
Each k goes through the runtime's own :class:`~inspector.postprocess.Postprocessor` with the
bundle's section and only k replaced: its ``min_residual`` floor, ``min_area_px`` and
connectivity apply as in ``inspector evaluate``, whose figures the row of the bundle's own k
repeats.

For each k: the per-image P, R, F1, IoU, ACC averaged over defective images (the paper's
figures) and the false-alarm figures on defect-free images, from the same accumulators as
``inspector evaluate``. The best k by the chosen objective is reported; ``write_k`` stores it in
the bundle's ``postprocess`` and keeps the previous section in ``postprocess_history``. A
``min_residual`` floor was calibrated on the components of the old k (``inspector calibrate
thresholds``), so a change of k resets it to 0, as ``calibrate residual-window`` does; calibrate
the floor again afterwards.

Calibrate on a split the final evaluation does not use (``--split val``), or the reported
figures are tuned on their own test data.

Example::

    inspector calibrate dual-threshold --bundle deploy/models/clgan-mt \
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
from calibration.outputs import make_out_dir
from calibration.postprocess_history import replace_postprocess, reset_floor, warn_floor_reset
from inspector.bundle import BUNDLE_FILE, BundleSpec, load_bundle, write_bundle
from inspector.evaluation.datasets import Dataset
from inspector.evaluation.evaluate import Runner
from inspector.evaluation.metrics import DefectPixelMetrics, FalseAlarm, FrameResult
from inspector.fileio import atomic_write_text
from inspector.postprocess import Postprocessor

log = logging.getLogger(__name__)

__all__ = ["parse_range", "sweep", "plot_sweep", "write_k", "save_result", "DEFAULT_RANGE", "MAX_RANGE_VALUES"]

DEFAULT_RANGE = "2.0:4.0:0.1"
#: the most values one --range may hold
MAX_RANGE_VALUES = 1000


def parse_range(text: str) -> list[float]:
    """``start:stop:step`` (inclusive stop) or a comma list, e.g. ``2:4:0.25`` or ``2.5,3,3.5``.

    Each value is a k (threshold = mean + k x std): finite and >= 0. At most
    :data:`MAX_RANGE_VALUES` values: every one is a pass of the post-processing over every image,
    and ``2:100000:0.0001`` (10^9 values) used to fill the memory before anything was printed."""
    if ":" in text:
        try:
            start, stop, step = (float(t) for t in text.split(":"))
        except ValueError:
            raise ValueError(f"--range {text!r}: expected start:stop:step (three numbers) or a comma "
                             f"list of numbers") from None
        if not all(np.isfinite((start, stop, step))):
            raise ValueError(f"--range {text!r}: start, stop and step must be finite numbers")
        if not step > 0:
            raise ValueError(f"--range {text!r}: step {step:g} must be > 0")
        if stop < start:
            raise ValueError(f"--range {text!r}: start {start:g} is above stop {stop:g} "
                             f"(start:stop:step counts up from start to stop)")
        count = np.floor((stop - start) / step + 1e-9) + 1  # a float: inf for a step of 1e-320
        if not count <= MAX_RANGE_VALUES:
            raise ValueError(f"--range {text!r}: {count:.4g} values; at most {MAX_RANGE_VALUES} "
                             f"(use a larger step)")
        vals = [round(start + i * step, 6) for i in range(int(count))]
    else:
        try:
            vals = [float(t) for t in text.split(",") if t.strip()]
        except ValueError:
            vals = []
        if not vals:
            raise ValueError(f"--range {text!r}: expected start:stop:step with step > 0 or a comma list "
                             f"of numbers")
        if len(vals) > MAX_RANGE_VALUES:
            raise ValueError(f"--range: {len(vals)} values; at most {MAX_RANGE_VALUES}")
    bad = [v for v in vals if not (np.isfinite(v) and v >= 0)]
    if bad:
        # nan was swept and, with --write, stored as k1: .nan (the model then found nothing)
        raise ValueError(f"--range {text!r}: every k must be a finite number >= 0, got {bad[0]:g}")
    return vals

def sweep(bundle: str | Path, dataset: Dataset, values: Sequence[float],
          param: Literal["k1", "k2"] = "k1", objective: Literal["f1", "iou"] = "f1") -> dict[str, Any]:
    """Metrics of the bundle's post-processing for each value of ``param`` (everything else,
    the ``min_residual`` floor and ``min_area_px`` included, stays as the bundle has it)."""
    if param not in ("k1", "k2"):
        raise ValueError(f"param must be k1 or k2, got {param!r}")
    runner = Runner(bundle)
    pp = runner.pp_config
    if pp.type != "dual_threshold":
        raise ValueError(f"{runner.bundle.path / BUNDLE_FILE}: postprocess.type is {pp.type}; "
                         f"dual-threshold calibration needs a residual model (clgan)")
    if len(dataset) == 0:
        raise ValueError(f"{dataset.root}: no images in split '{dataset.split}'")
    t0 = time.perf_counter()
    cache: list[tuple[str, np.ndarray, np.ndarray, np.ndarray]] = []
    for i in range(len(dataset)):
        s = dataset.load(i)
        out = runner.adapter.infer(s.image)
        try:
            # the score map too: the floor gates components by it, as at run time
            cache.append((s.name, np.array(out.residual, copy=True), np.array(out.score_map, copy=True),
                          s.mask))
        finally:
            if out.release:
                out.release()
        if (i + 1) % 50 == 0:
            log.info("residuals of %d/%d images", i + 1, len(dataset))
    t_infer = time.perf_counter() - t0
    rows = []
    for v in values:
        post = Postprocessor(pp.model_copy(update={param: float(v)}), runner.bundle.spec.classes)
        dm, fa = DefectPixelMetrics(), FalseAlarm()
        for name, residual, score, truth in cache:
            label = post.mask(None, residual, score)
            defects, _ = post.defects(label, score)
            fr = FrameResult(label=label, score_map=score, defects=defects)
            dm.update(truth, fr, name)
            fa.update(truth, fr, name)
        r = dm.result()
        rows.append({param: float(v), **{k: r[k] for k in ("precision", "recall", "f1", "iou", "acc")},
                     **fa.result()})
    # a k that scores 0 is no choice: a tie of zeros (a floor that gates every component on
    # these images, say) would otherwise name the first k as best, and --write would store it
    scored = [r for r in rows if r[objective]]
    best = max(scored, key=lambda r: r[objective]) if scored else None
    return {
        "bundle": str(runner.bundle.path), "param": param, "objective": objective,
        "fixed": {"k1": pp.k1, "k2": pp.k2, "kernel_size": pp.kernel_size, "min_residual": pp.min_residual,
                  "min_area_px": pp.min_area_px, "connectivity": pp.connectivity},
        "data": dataset.summary(), "rows": rows,
        "best": best, "best_value": best[param] if best else None,
        "at_edge": bool(best and best[param] in (min(values), max(values))),
        "seconds_inference": round(t_infer, 1), "seconds": round(time.perf_counter() - t0, 1),
    }


def plot_sweep(result: dict[str, Any], path: Path) -> Path:
    """PNG of P, R, F1, IoU against k, with defect pixels per megapixel on normals on a second axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    param = result["param"]
    rows = result["rows"]
    x = [r[param] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    for key, style in (("f1", "-o"), ("iou", "-s"), ("precision", "--"), ("recall", ":")):
        y = [r[key] if r[key] is not None else np.nan for r in rows]
        ax.plot(x, np.array(y, float) * 100, style, label=key.upper() if len(key) <= 3 else key, ms=3)
    ax.set_xlabel(f"{param} (threshold = mean + {param} * std)")
    ax.set_ylabel("% (per-image mean over defective images)")
    ax.grid(alpha=0.3)
    if any(r["false_alarm_px_per_mpx"] is not None for r in rows):
        ax2 = ax.twinx()
        ax2.plot(x, [r["false_alarm_px_per_mpx"] or np.nan for r in rows], color="grey", alpha=0.7,
                 label="defect px / Mpx on normals")
        ax2.set_ylabel("defect px per Mpx on defect-free images", color="grey")
        ax2.set_yscale("log")
        h2, l2 = ax2.get_legend_handles_labels()
    else:
        h2, l2 = [], []
    if result.get("best_value") is not None:
        ax.axvline(result["best_value"], color="tab:red", alpha=0.4, lw=1)
    h1, l1 = ax.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, fontsize=8, loc="best")
    return finish_sweep_plot(fig, ax, result, f"{param} sweep", path)


def finish_sweep_plot(fig, ax, result: dict[str, Any], what: str, path: Path) -> Path:
    """Title a sweep plot with the bundle and data it measured, save it as ``path``, close it."""
    import matplotlib.pyplot as plt

    d = result["data"]
    ax.set_title(f"{Path(result['bundle']).name}: {what} on {d['format']} split {d['split']} "
                 f"({d['images']} images)", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def write_k(bundle: str | Path, param: Literal["k1", "k2"], value: float, note: dict[str, Any]) -> Path:
    """Set ``postprocess.<param>`` of the bundle; the previous section goes to
    ``postprocess_history`` with the calibration's provenance. A ``min_residual`` floor is reset
    to 0 when the value changes (see module doc)."""
    b = load_bundle(bundle)
    spec = b.spec
    old = spec.postprocess.model_dump(mode="json")
    pp = None
    why = f"it was calibrated with {param} {old[param]:g}"
    if float(value) != float(old[param]):
        pp = reset_floor(spec, b.path / BUNDLE_FILE, why)
    floor_reset = pp is not None
    pp = {**(pp or old), param: float(value)}
    update = replace_postprocess(
        spec, pp, f"calibrate dual-threshold {param}={value}"
        + (" (min_residual reset to 0: calibrated on the old components)" if floor_reset else ""),
        datetime.now(timezone.utc).isoformat(timespec="seconds"), calibration=note)
    new = BundleSpec.model_validate({**spec.model_dump(mode="json"), **update})
    path = write_bundle(b.path, new)
    if floor_reset:
        warn_floor_reset(spec, path, why)
    return path


def save_result(result: dict[str, Any], out_dir: Path) -> dict[str, Path]:
    make_out_dir(out_dir)  # a folder that cannot be made: one line naming --out, exit 2
    j = out_dir / f"sweep_{result['param']}.json"
    atomic_write_text(j, json.dumps(result, indent=2))
    png = plot_sweep(result, out_dir / f"sweep_{result['param']}.png")
    return {"json": j, "png": png}

