"""Post-processing thresholds from the line's own normal frames, at a chosen false-alarm rate.

The false-alarm rate (FPR) here is what the PLC sees: the share of normal frames whose defect
list is not empty (after ``min_area_px``). The bundle's model runs once over every frame, as at
run time (adapter, tiling, flat-field when configured); only the post-processing is repeated.

**Residual models** (``postprocess.type: dual_threshold``: clgan). The paper's dual
threshold (mean + k·std of each image itself) flags the upper tail of *every* image, so on its own
it cannot hold any false-alarm rate: on defect-free magnetic tiles it marks something on nearly
every image. The calibrated setting therefore adds an absolute floor, ``min_residual``: a
component the recipe found is reported only if its highest residual reaches the floor
(:func:`inspector.postprocess.keep_components_reaching`). Per image, the decision reduces to one
number, the highest peak among its components of at least ``min_area_px`` pixels; the floor is
set just above the (⌊target·n⌋+1)-th highest of these over the n calibration frames, so at most
⌊target·n⌋ calibration frames alarm. k1, k2, the closing kernel and ``min_area_px`` shape the
components; they keep the bundle's values unless grids are given (``--k1 2.5,3,3.5`` ...), and
then the setting with the highest detection recall on the calibration part of the labelled
defects wins (each one at its own floor, so every candidate meets the target).

**Probability models** (``postprocess.type: probability``: arcd). An image alarms if any pixel
of any defect class reaches its class threshold, so per image the decision reduces to each
class's highest probability. Every class gets the same share of false alarms: the largest
per-class allowance k is searched for which the thresholds just above each class's (k+1)-th
highest calibration peak keep the union of alarming frames at or below ⌊target·n⌋. Thresholds
never go below ``--min-threshold`` (default 0.5). With an opening or ``min_area_px`` this
count is an upper bound (they can only remove alarms), so the target still holds.

**Score-threshold models** (``postprocess.type: score_threshold``: fuzzymask). A pixel is a
defect pixel where the model's anomaly score reaches ``score_threshold``; the optional opening and
closing and ``min_area_px`` follow. All three are increasing operations, so the set of reported
defects can only shrink as the threshold rises, and each image reduces to one number: the highest
threshold at which it still reports a defect (its peak score when there is no opening and no area
filter, else found by bisection over its own score values). The threshold is set just above the
(⌊target·n⌋+1)-th highest of these over the n calibration frames, as for the residual floor;
``--min-area-px`` may give a grid (chosen by detection recall on labelled defects). Scores may be
negative (the converged branch of dynamic inference), and so may the threshold.

How many calibration frames may alarm: by default ⌊target·n⌋, the empirical rule, whose FPR on
new frames lands around the target (above it about as often as below). ``--confidence 0.9``
asks instead that the true FPR be at most the target with 90 % probability (binomial bound,
:func:`allowed_alarms`): a higher floor, less recall, and it needs enough frames (with 143
frames and a 2 % target it allows no alarm at all; below 114 frames it is not reachable).

Held-back normal frames (:class:`calibration.frames.Split`) are run through the real
:class:`~inspector.postprocess.Postprocessor` at the chosen setting: their FPR, with a 95 %
Wilson interval, is the honest estimate for new frames. With labelled defects the report gives
the detection recall (a reported defect overlaps the truth), the alarm rate on defect images and
the pixel figures (``inspector.evaluation.metrics``), on the calibration and the check part, and
the trade-off curve (FPR against recall as the floor moves).

The result goes into the bundle as a new post-processing section (the old one is appended to
``postprocess_history`` with its version number and the time it was replaced), plus
``thresholds.json``, ``score_hist.png`` and ``fpr_recall.png`` in the report folder.

Example::

    inspector calibrate thresholds --bundle deploy/models/clgan-mt \\
        --normal ../shared/data/magnetic_tile/MT_Free/Imgs --target-fpr 0.02 \\
        --check-fraction 0.3 --calib-fraction 0.2 \\
        --defects ../shared/data/magnetic_tile --format magnetic-tile --out calib-out/thresholds
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Sequence

import cv2
import numpy as np

from calibration.postprocess_history import replace_postprocess
from inspector.bundle import BUNDLE_FILE, Bundle, BundleSpec, load_bundle, write_bundle
from inspector.evaluation.metrics import Counts, DefectPixelMetrics, FalseAlarm, FrameResult, scores
from inspector.fileio import atomic_write_text
from inspector.models import ModelAdapter
from inspector.postprocess import PostprocessConfig, Postprocessor, dual_threshold

from calibration.frames import CalibrationInputError, FrameItem, FrameSet, iterate
from calibration.outputs import make_out_dir

log = logging.getLogger(__name__)

__all__ = ["CalibModel", "SearchGrid", "calibrate_thresholds", "write_postprocess_section",
           "floor_for", "wilson", "residual_table", "score_table", "score_floor"]

NO_SCORE = -np.inf  # an image without any (large enough) component


# -- small numeric helpers ------------------------------------------------------------------------
def _above(v: float, step: float) -> float:
    """The smallest multiple of ``step`` strictly above ``v`` (a readable value for the YAML)."""
    t = round((math.floor(v / step) + 1) * step, 12)
    while t <= v:  # float rounding at the boundary
        t = round(t + step, 12)
    return t


def _step(v: float) -> float:
    """Four significant digits of ``v``: fine enough to sit between neighbouring scores."""
    return 10.0 ** (math.floor(math.log10(abs(v))) - 3) if v != 0 else 1e-4


def _f32_above(t: float, v: float) -> float:
    """``t``, or if float32 rounds it down onto or below ``v``, the smallest float32 above ``v``.

    The runtime compares float32 scores with ``np.float32(threshold)``
    (:func:`inspector.postprocess.keep_components_reaching`, :func:`~inspector.postprocess.
    threshold_score`, the class thresholds), so a threshold "just above" a float32 peak in
    float64 (118.7 above 118.69999695) can become that very peak at run time and let the frame
    that calibration silenced alarm. Readable values are kept where float32 keeps them above.
    """
    t32, v32 = np.float32(t), np.float32(v)
    if t32 > v32:
        return t
    while t32 <= v32:
        t32 = np.nextafter(t32, np.float32(np.inf))
    return float(t32)


def _reaches(score: np.ndarray, threshold: float | np.ndarray) -> np.ndarray:
    """``score >= threshold`` as the runtime decides it: both in float32."""
    return np.asarray(score, np.float32) >= np.asarray(threshold, np.float32)


def _passes(score: np.ndarray, floor: float) -> np.ndarray:
    """Which image scores alarm at ``floor`` (0 = no floor: any component alarms)."""
    s = np.asarray(score, np.float64)
    return np.isfinite(s) & ((floor <= 0) | _reaches(s, floor))


def binom_cdf(k: int, n: int, p: float) -> float:
    """P(X <= k) for X ~ Binomial(n, p)."""
    if k < 0:
        return 0.0
    if k >= n:
        return 1.0
    lp, lq = math.log(p), math.log1p(-p)
    terms = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * lp + (n - i) * lq
             for i in range(k + 1)]
    m = max(terms)
    return min(1.0, math.exp(m) * sum(math.exp(t - m) for t in terms))


def allowed_alarms(n: int, target: float, confidence: float | None = None) -> int:
    """How many of ``n`` calibration frames may alarm.

    Without ``confidence``: ⌊target·n⌋, the empirical rule (the FPR on new frames then lands
    around the target, above it about as often as below). With ``confidence`` c: the largest k
    such that a setting letting k of n frames alarm has a true FPR above the target with
    probability at most 1 - c. For exchangeable frames the true FPR of the floor just above the
    (k+1)-th highest score is Beta(k+1, n-k), and P(FPR > target) = P(Binomial(n, target) <= k).
    -1 when even k = 0 is not enough (too few frames for that confidence).
    """
    if confidence is None:
        return int(math.floor(target * n + 1e-9))
    k = -1
    while k + 1 <= n and binom_cdf(k + 1, n, target) <= 1 - confidence:
        k += 1
    return k


def _first_refused(scores_: Sequence[float], target: float, confidence: float | None
                   ) -> tuple[np.ndarray, float | None, int]:
    """The scores as an array, the (allowed+1)-th highest finite score (the first image a floor
    must silence; ``inf`` when the confidence asks for more frames than there are, None when few
    enough images report anything for every floor to meet the target) and, for None, how many
    images report."""
    s = np.asarray(scores_, np.float64)
    allowed = allowed_alarms(len(s), target, confidence)
    if allowed < 0:
        return s, math.inf, 0
    finite = np.sort(s[np.isfinite(s)])[::-1]
    if len(finite) <= allowed:
        return s, None, int(len(finite))
    return s, float(finite[allowed]), 0


def floor_for(scores_: Sequence[float], target: float, confidence: float | None = None) -> tuple[float, int]:
    """The lowest floor at which at most :func:`allowed_alarms` of ``scores_`` alarm, and how
    many do. 0.0 when no floor is needed (few enough images have any component at all);
    ``inf`` when the confidence asks for more frames than there are.

    >>> floor_for([1.0, 5.0, 2.0, 9.0, NO_SCORE], 0.2)   # n = 5: one image may alarm
    (5.001, 1)
    """
    s, v, reporting = _first_refused(scores_, target, confidence)
    if v is None or math.isinf(v):
        return (0.0 if v is None else v), reporting
    t = _above(v, _step(v)) if v > 0 else _above(v, 1e-4)
    if t <= 0:  # all scores negative (signed residuals): any positive floor removes them all
        t = 1e-4
    t = _f32_above(t, v)
    return t, int(_passes(s, t).sum())


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float] | None:
    """95 % Wilson score interval of a proportion k/n."""
    if n == 0:
        return None
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return (round(max(0.0, c - h), 4), round(min(1.0, c + h), 4))


# -- the model ------------------------------------------------------------------------------------
@dataclass
class CalibModel:
    """What calibration needs of a loaded model: the adapter and the post-processing it starts from."""

    bundle: Bundle
    adapter: ModelAdapter
    pp: PostprocessConfig
    overrides: dict[str, Any] = field(default_factory=dict)  # camera-config overrides in force
    config_file: str | None = None  # the camera config the overrides come from

    @property
    def recipe(self) -> str:
        return self.pp.type

    @property
    def classes(self) -> list[str]:
        return list(self.bundle.spec.classes)


# -- per-image statistics -------------------------------------------------------------------------
@dataclass(frozen=True)
class Shape:
    """Dual-threshold parameters that decide the components (the floor only gates them)."""

    k1: float
    k2: float
    kernel_size: int


@dataclass
class CompTable:
    """Components of one image's dual-threshold mask: area, highest score, truth pixels inside."""

    area: np.ndarray
    peak: np.ndarray
    tp: np.ndarray | None
    truth_px: int
    pixels: int

    def alarm_score(self, min_area: int) -> float:
        sel = self.area >= max(min_area, 1)
        return float(self.peak[sel].max()) if sel.any() else NO_SCORE

    def detect_score(self, min_area: int) -> float:
        if self.tp is None:
            return NO_SCORE
        sel = (self.area >= max(min_area, 1)) & (self.tp > 0)
        return float(self.peak[sel].max()) if sel.any() else NO_SCORE

    def counts_at(self, floor: float) -> Counts:
        """Pixel counts of the gated mask (the published mask: min_area does not thin it)."""
        kept = np.ones(len(self.peak), bool) if floor <= 0 else self.peak >= floor
        pred = int(self.area[kept].sum())
        tp = int(self.tp[kept].sum()) if self.tp is not None else 0
        fp, fn = pred - tp, self.truth_px - tp
        return Counts(tp, fp, fn, self.pixels - tp - fp - fn)


def residual_table(residual: np.ndarray, score: np.ndarray, shape: Shape, connectivity: int,
                   truth: np.ndarray | None) -> CompTable:
    """The :class:`CompTable` of one image for one dual-threshold shape (same components as the
    runtime's mask: same recipe, same connectivity)."""
    mask = dual_threshold(residual, shape.k1, shape.k2, shape.kernel_size)
    n, cc, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=connectivity)
    truth_px = int(np.count_nonzero(truth)) if truth is not None else 0
    if n <= 1:
        empty = np.zeros(0, np.int64)
        return CompTable(empty, np.zeros(0, np.float32), empty if truth is not None else None,
                         truth_px, mask.size)
    sel = cc > 0
    lab = cc[sel]
    val = score[sel]
    order = np.argsort(lab, kind="stable")
    lab, val = lab[order], val[order]
    starts = np.searchsorted(lab, np.arange(1, n))
    peak = np.maximum.reduceat(val, starts).astype(np.float32)
    area = stats[1:, cv2.CC_STAT_AREA].astype(np.int64)
    tp = None
    if truth is not None:
        tp = np.bincount(cc[truth > 0], minlength=n)[1:].astype(np.int64)
    return CompTable(area, peak, tp, truth_px, mask.size)


@dataclass
class PeakRow:
    """Probability models: each defect class's highest probability in the image (and inside the
    truth, for defect images)."""

    peak: np.ndarray
    peak_in: np.ndarray | None


def probability_row(probs: np.ndarray, truth: np.ndarray | None) -> PeakRow:
    k = probs.shape[0]
    flat = probs.reshape(k, -1)[1:]
    peak = flat.max(axis=1).astype(np.float32)
    peak_in = None
    if truth is not None:
        inside = (truth > 0).reshape(-1)
        peak_in = (flat[:, inside].max(axis=1).astype(np.float32) if inside.any()
                   else np.full(k - 1, NO_SCORE, np.float32))
    return PeakRow(peak, peak_in)


# -- the search grid ------------------------------------------------------------------------------
@dataclass
class SearchGrid:
    """Values tried for the parameters that shape residual-model components (None = the bundle's)."""

    k1: list[float] | None = None
    k2: list[float] | None = None
    kernel_size: list[int] | None = None
    min_area_px: list[int] | None = None

    def given(self) -> list[str]:
        return [k for k in ("k1", "k2", "kernel_size", "min_area_px") if getattr(self, k)]

    def shapes(self, pp: PostprocessConfig) -> list[Shape]:
        out: list[Shape] = []
        for a in self.k1 or [pp.k1]:
            for b in self.k2 or [pp.k2]:
                for c in self.kernel_size or [pp.kernel_size]:
                    s = Shape(float(a), float(b), int(c))
                    if s not in out:
                        out.append(s)
        base = Shape(pp.k1, pp.k2, pp.kernel_size)
        # the bundle's own setting first: it wins ties
        return sorted(out, key=lambda s: s != base)

    def areas(self, pp: PostprocessConfig) -> list[int]:
        vals = list(dict.fromkeys(int(a) for a in (self.min_area_px or [pp.min_area_px])))
        return sorted(vals, key=lambda a: a != pp.min_area_px)


# -- the calibration ------------------------------------------------------------------------------
def _run(model: CalibModel, image: np.ndarray, fn):
    """Run the model on one image and hand its output to ``fn`` before the buffers go back."""
    out = model.adapter.infer(image)
    try:
        return fn(out)
    finally:
        if out.release:
            out.release()


class _PixelHist:
    """Score histograms of normal pixels and of defect (truth) pixels."""

    def __init__(self, recipe: str):
        if recipe == "probability":
            self.edges = np.linspace(0.0, 1.0, 101)
        elif recipe == "score_threshold":
            # fuzzymask scores: D maps lie in [0, 2], converged-branch scores go below 0
            self.edges = np.linspace(-2.0, 2.0, 201)
        else:
            self.edges = np.concatenate([[0.0], np.geomspace(1e-2, 256.0, 120)])
        self.normal = np.zeros(len(self.edges) - 1, np.int64)
        self.defect = np.zeros(len(self.edges) - 1, np.int64)

    def add(self, score: np.ndarray, truth: np.ndarray | None) -> None:
        s = np.clip(score, self.edges[0], self.edges[-1])
        if truth is None:
            self.normal += np.histogram(s, self.edges)[0]
        else:
            t = truth > 0
            self.defect += np.histogram(s[t], self.edges)[0]


def _real_outcome(post: Postprocessor, out, truth: np.ndarray | None) -> tuple[FrameResult, bool, bool | None]:
    """The runtime's own post-processing of one output: (frame result, alarmed, detected)."""
    label = post.mask(out.probs, out.residual, out.score_map)
    defects, total = post.defects(label, out.score_map)
    fr = FrameResult(label=label, score_map=out.score_map, defects=defects)
    detected = None
    if truth is not None:
        detected = False
        if total:
            n, cc, stats, _ = cv2.connectedComponentsWithStats((label > 0).astype(np.uint8),
                                                               connectivity=post.cfg.connectivity)
            hit = np.unique(cc[truth > 0])
            hit = hit[hit > 0]
            detected = bool((stats[hit, cv2.CC_STAT_AREA] >= max(post.cfg.min_area_px, 1)).any())
    return fr, total > 0, detected


def _rate(flags: Sequence[bool]) -> float | None:
    return round(float(np.mean(flags)), 4) if len(flags) else None


#: post-processing keys that change no alarm (how many defects a message lists at most)
NEUTRAL_KEYS = frozenset({"max_defects"})


def check_recipe(model: CalibModel) -> None:
    """Refuse a camera config whose ``model.postprocess.type`` overrides the bundle's recipe: the
    calibrated keys of one recipe mean nothing in a section of another. Names the config file."""
    own = model.bundle.spec.postprocess
    if model.pp.type != own.type:
        where = f"{model.config_file}: " if model.config_file else ""
        raise CalibrationInputError(f"{where}model.postprocess.type: the camera config overrides the "
                                    f"recipe {own.type} of {model.bundle.path / BUNDLE_FILE} with "
                                    f"{model.pp.type}; calibration writes the bundle's own section: "
                                    f"remove the override or calibrate a bundle of that recipe")


def calibrate_thresholds(model: CalibModel, normals: FrameSet, target_fpr: float,
                         defects: FrameSet | None = None, grid: SearchGrid | None = None,
                         min_threshold: float = 0.5, confidence: float | None = None) -> dict[str, Any]:
    """Choose the post-processing for ``target_fpr`` (see module doc); returns the report dict
    (``chosen`` is the new post-processing section of the bundle: its own section with the
    calibrated keys replaced, ``None`` when the target cannot be met; ``effective`` is that
    under the camera's ``model.postprocess`` overrides, what this camera runs with).
    ``confidence`` (e.g. 0.9) asks for the true FPR to be at most the target with that
    probability (:func:`allowed_alarms`) instead of the empirical rule."""
    if not 0 < target_fpr < 1:
        raise CalibrationInputError(f"--target-fpr: must be in (0, 1), got {target_fpr}")
    if confidence is not None and not 0 < confidence < 1:
        raise CalibrationInputError(f"--confidence: must be in (0, 1), got {confidence}")
    grid = grid or SearchGrid()
    check_recipe(model)
    own = model.bundle.spec.postprocess
    t0 = time.perf_counter()
    calib_n, check_n = normals.part("calibration"), normals.part("check")
    if not calib_n:
        raise CalibrationInputError(f"{normals.source}: no image falls in the calibration part "
                                    f"({len(normals.items)} images); use more frames")
    if not check_n:
        log.warning("%s: no image falls in the held-back check part; the FPR is only measured "
                    "on the calibration frames", normals.source)
    calib_d = defects.part("calibration") if defects else []
    check_d = defects.part("check") if defects else []
    if model.recipe == "dual_threshold":
        res = _ResidualCalibration(model, target_fpr, grid, confidence)
    elif model.recipe == "score_threshold":
        bad = [k for k in grid.given() if k != "min_area_px"]
        if bad:
            raise CalibrationInputError(f"--{bad[0].replace('_', '-')}: applies to residual models "
                                        f"(dual_threshold); this bundle's recipe is score_threshold "
                                        f"(only --min-area-px may give a grid)")
        res = _ScoreCalibration(model, target_fpr, grid, confidence)
    else:
        if grid.given():
            raise CalibrationInputError(f"--{grid.given()[0].replace('_', '-')}: search grids apply to "
                                        f"residual models (dual_threshold); this bundle's recipe is "
                                        f"{model.recipe}")
        res = _ProbabilityCalibration(model, target_fpr, min_threshold, confidence)
    if len(res.candidates()) > 1 and not calib_d:
        raise CalibrationInputError("choosing among several k1/k2/kernel/min-area values needs labelled "
                                    "defects in the calibration part (--defects); without them give "
                                    "one value each")
    hist = _PixelHist(model.recipe)
    # phase 1: calibration part -> statistics of every candidate setting
    for it, image, truth in iterate(calib_n, "calibration normals", arg=normals.arg):
        res.add("calibration", it, image, None, hist)
    for it, image, truth in iterate(calib_d, "calibration defects", arg=defects.arg if defects else None):
        if truth is None or not truth.any():
            continue
        res.add("calibration", it, image, truth, hist)
    chosen = res.choose()
    report: dict[str, Any] = {
        "bundle": str(model.bundle.path), "kind": model.bundle.spec.kind, "recipe": model.recipe,
        "target_fpr": target_fpr, "confidence": confidence,
        "rule": ("at most floor(target x n) calibration frames alarm" if confidence is None else
                 f"P(true FPR > target) <= {1 - confidence:g} (binomial bound on the calibration frames)"),
        "fpr_definition": "share of normal frames whose defect list is not empty (after min_area_px)",
        "normal": normals.summary(), "defects": defects.summary() if defects else None,
        "base_postprocess": model.pp.model_dump(mode="json"),
        "bundle_postprocess": own.model_dump(mode="json"),
        "camera_overrides": model.overrides or None,
        "search": res.search_report(),
    }
    if chosen is None:
        log.error("no setting meets the target: %s", res.infeasible_reason)
        report.update(chosen=None, feasible=False, reason=res.infeasible_reason,
                      seconds=round(time.perf_counter() - t0, 1))
        return report
    # The bundle is shared by every camera: it gets only the calibrated keys, on top of its own
    # section, never this camera's model.postprocess overrides. `chosen` (overrides included) is
    # what this camera runs with, so the check below uses it.
    to_write = PostprocessConfig.model_validate(
        own.model_dump(mode="json") | {k: v for k, v in chosen.model_dump(mode="json").items()
                                       if k in res.calibrated_keys(grid)})
    post = Postprocessor(chosen, model.classes)
    # The calibrated values were chosen under the camera's overrides; where those change what
    # alarms (a min_area_px, a k1 no grid searched), the bundle's own section, which every other
    # camera runs, gets values set for another shape: it is measured too (below), and the caller
    # writes it only if it meets the target there as well (it alarmed on 25 % for a 5 % target).
    own_json = own.model_dump(mode="json")
    shape_overrides = {k: v for k, v in model.overrides.items()
                       if k not in res.calibrated_keys(grid) and k not in NEUTRAL_KEYS
                       and own_json.get(k) != v}
    post_own = Postprocessor(to_write, model.classes) if shape_overrides else None
    own_alarm: list[bool] = []
    # phase 2: held-back part -> the runtime's own post-processing at the chosen setting
    fa, dm = FalseAlarm(), DefectPixelMetrics()
    check_alarm: list[bool] = []
    check_det: list[bool] = []
    check_def_alarm: list[bool] = []
    worst: list[tuple[float, str]] = []
    for part_items, is_defect in ((check_n, False), (check_d, True)):
        for it, image, truth in iterate(part_items, "check defects" if is_defect else "check normals",
                                         arg=defects.arg if is_defect and defects else normals.arg):
            if is_defect and (truth is None or not truth.any()):
                continue

            def both(out, it=it, truth=truth):
                res.add_output("check", it, out, truth if is_defect else None, hist)
                if post_own is not None and not is_defect:
                    own_alarm.append(_real_outcome(post_own, out, None)[1])
                return _real_outcome(post, out, truth if is_defect else None)
            fr, alarmed, detected = _run(model, image, both)
            t = truth if is_defect else np.zeros(fr.label.shape, np.uint8)
            fa.update(t, fr, it.name)
            dm.update(t, fr, it.name)
            if is_defect:
                check_det.append(bool(detected))
                check_def_alarm.append(alarmed)
            else:
                check_alarm.append(alarmed)
                if alarmed:
                    worst.append((max(d["score"] for d in fr.defects), it.name))
    calib_fig = res.figures_at_choice()
    n_chk, k_chk = len(check_alarm), int(sum(check_alarm))
    pix = dm.result()
    report.update({
        "feasible": True,
        "chosen": to_write.model_dump(mode="json"),
        "effective": chosen.model_dump(mode="json"),
        "changed": {k: v for k, v in to_write.model_dump(mode="json").items()
                    if own.model_dump(mode="json").get(k) != v},
        "calibration": calib_fig,
        "check": {
            "normal_images": n_chk, "alarmed": k_chk,
            "fpr": round(k_chk / n_chk, 4) if n_chk else None,
            "fpr_ci95": wilson(k_chk, n_chk),
            "fpr_any_mask_pixel": fa.result()["false_alarm_rate"],
            "false_alarm_px_per_mpx": fa.result()["false_alarm_px_per_mpx"],
            "meets_target": (k_chk / n_chk <= target_fpr) if n_chk else None,
            "alarmed_images": [n for _, n in sorted(worst, reverse=True)[:20]],
            "defect_images": len(check_det),
            "recall": _rate(check_det),
            "recall_ci95": wilson(int(sum(check_det)), len(check_det)),
            "alarm_rate_on_defect_images": _rate(check_def_alarm),
            "pixel": ({k: (round(pix[k], 4) if pix[k] is not None else None)
                       for k in ("precision", "recall", "f1", "iou")} if check_det else None),
        },
        "curve": res.curve(),
        "seconds": round(time.perf_counter() - t0, 1),
    })
    if shape_overrides:
        n_own, k_own = len(own_alarm), int(sum(own_alarm))
        report["check"]["bundle_setting"] = {
            "camera_overrides_that_shape": shape_overrides,
            "normal_images": n_own, "alarmed": k_own,
            "fpr": round(k_own / n_own, 4) if n_own else None,
            "meets_target": (k_own / n_own <= target_fpr) if n_own else None}
    report["_hist"] = {"edges": hist.edges.tolist(), "normal": hist.normal.tolist(),
                       "defect": hist.defect.tolist()}
    report["_scores"] = res.image_scores()
    return report


class _Calibration:
    """What the residual and score searches share: per-part tables of normal and defect images,
    the report of the chosen row, the FPR/recall curve as the chosen parameter moves."""

    def __init__(self, model: CalibModel, target: float, confidence: float | None):
        self.model = model
        self.target = target
        self.confidence = confidence
        # part -> kind -> list of (image name, the recipe's per-image table)
        self.tables: dict[str, dict[str, list[tuple[str, Any]]]] = {
            p: {"normal": [], "defect": []} for p in ("calibration", "check")}
        self.rows: list[dict[str, Any]] = []
        self.best_row: dict[str, Any] = {}
        self.infeasible_reason = ""

    def add(self, part: str, it: FrameItem, image: np.ndarray, truth: np.ndarray | None,
            hist: _PixelHist) -> None:
        _run(self.model, image, lambda out: self.add_output(part, it, out, truth, hist))

    def _figures(self) -> dict[str, Any]:
        r = self.best_row
        n = len(self.tables["calibration"]["normal"])
        d = self.tables["calibration"]["defect"]
        return {"normal_images": n, "alarmed": r["alarmed"], "fpr": r["fpr"],
                "fpr_ci95": wilson(r["alarmed"], n), "defect_images": len(d), "recall": r["recall"],
                "alarm_rate_on_defect_images": r["alarm_rate_on_defect_images"]}

    def _curve(self, parameter: str, scores_of: Callable[[str, str, bool], np.ndarray],
               chosen: float, values: np.ndarray, digits: int,
               passes: Callable[[np.ndarray, float], np.ndarray] = _passes) -> dict[str, Any]:
        """FPR (normals) and recall (defects) of both parts at each value of ``parameter``
        (``passes`` says which image scores alarm at a value)."""
        out: dict[str, Any] = {"parameter": parameter, "values": [round(float(v), digits) for v in values]}
        for p in ("calibration", "check"):
            for k, det in (("normal", False), ("defect", True)):
                sc = scores_of(p, k, det)
                out[f"{'recall' if det else 'fpr'}_{p}"] = [
                    None if not len(sc) else round(float(passes(sc, v).mean()), 4) for v in values]
        out["chosen"] = chosen
        return out

    @staticmethod
    def _candidate_values(all_scores: list[np.ndarray], chosen: float) -> np.ndarray:
        allv = np.concatenate([v[np.isfinite(v)] for v in all_scores] + [np.array([chosen])])
        return np.unique(np.quantile(allv, np.linspace(0, 1, 241))) if allv.size else np.array([chosen])

    def _image_scores(self, scores_of: Callable[[str, str], np.ndarray], threshold: float
                      ) -> dict[str, list[float | None]]:
        return {f"{p}_{k}": [float(x) if np.isfinite(x) else None for x in scores_of(p, k)]
                for p in ("calibration", "check") for k in ("normal", "defect")} | {"threshold": [threshold]}


class _ResidualCalibration(_Calibration):
    """Statistics and choice for dual-threshold (residual) models."""

    #: the keys the choice sets (all of them: the floor holds only with the shape it was set for)
    KEYS = ("k1", "k2", "kernel_size", "min_area_px", "min_residual")

    @staticmethod
    def calibrated_keys(grid: SearchGrid) -> tuple[str, ...]:
        """The keys this calibration chose: the floor, and those a grid searched. The others
        are the camera's or the bundle's as they were; the bundle must not get an override of
        one camera (a camera's min_area_px used to be written as if calibrated)."""
        return ("min_residual", *grid.given())

    def __init__(self, model: CalibModel, target: float, grid: SearchGrid, confidence: float | None):
        super().__init__(model, target, confidence)  # tables: (name, {shape: CompTable})
        self.shapes = grid.shapes(model.pp)
        self.areas = grid.areas(model.pp)
        self.conn = model.pp.connectivity
        self.best: tuple[Shape, int, float] | None = None

    def candidates(self) -> list[tuple[Shape, int]]:
        return [(s, a) for s in self.shapes for a in self.areas]

    def add_output(self, part: str, it: FrameItem, out, truth: np.ndarray | None, hist: _PixelHist) -> None:
        if out.residual is None:
            raise CalibrationInputError(f"{self.model.bundle.path / BUNDLE_FILE}: postprocess.type is "
                                        f"dual_threshold but the model gives no residual")
        shapes = self.shapes if part == "calibration" else [self.best[0]]
        tabs = {s: residual_table(out.residual, out.score_map, s, self.conn, truth) for s in shapes}
        self.tables[part]["defect" if truth is not None else "normal"].append((it.name, tabs))
        hist.add(out.score_map, truth)

    def _scores(self, part: str, kind: str, shape: Shape, area: int, detect: bool = False) -> np.ndarray:
        return np.array([(t[shape].detect_score(area) if detect else t[shape].alarm_score(area))
                         for _, t in self.tables[part][kind]], np.float64)

    def _pixel_f1(self, part: str, shape: Shape, floor: float) -> float | None:
        rows = self.tables[part]["defect"]
        if not rows:
            return None
        return float(np.mean([scores(t[shape].counts_at(floor))["f1"] for _, t in rows]))

    def choose(self) -> PostprocessConfig | None:
        for shape, area in self.candidates():
            s = self._scores("calibration", "normal", shape, area)
            floor, alarmed = floor_for(s, self.target, self.confidence)
            if math.isinf(floor):
                self.infeasible_reason = _too_few(len(s), self.target, self.confidence)
                return None
            det = self._scores("calibration", "defect", shape, area, detect=True)
            alarm_d = self._scores("calibration", "defect", shape, area)
            self.rows.append({
                "k1": shape.k1, "k2": shape.k2, "kernel_size": shape.kernel_size, "min_area_px": area,
                "min_residual": floor, "alarmed": alarmed, "fpr": round(alarmed / len(s), 4),
                "recall": _rate(_passes(det, floor)) if len(det) else None,
                "alarm_rate_on_defect_images": _rate(_passes(alarm_d, floor)) if len(det) else None,
                "pixel_f1": self._pixel_f1("calibration", shape, floor),
            })
        # highest recall, then pixel F1; the bundle's own values come first and win ties
        best_i = max(range(len(self.rows)), key=lambda i: (self.rows[i]["recall"] or 0.0,
                                                          self.rows[i]["pixel_f1"] or 0.0, -i))
        r = self.rows[best_i]
        self.best = (Shape(r["k1"], r["k2"], r["kernel_size"]), r["min_area_px"], r["min_residual"])
        self.best_row = r
        return self.model.pp.model_copy(update={"k1": r["k1"], "k2": r["k2"],
                                                "kernel_size": r["kernel_size"],
                                                "min_area_px": r["min_area_px"],
                                                "min_residual": r["min_residual"]})

    def search_report(self) -> dict[str, Any]:
        return {"method": "absolute floor on component peaks (min_residual) over the dual-threshold "
                          "components; one floor per candidate from the calibration normals",
                "candidates": self.rows}

    def figures_at_choice(self) -> dict[str, Any]:
        f1 = self.best_row["pixel_f1"]
        return self._figures() | {"pixel_f1": None if f1 is None else round(f1, 4)}

    def curve(self) -> dict[str, Any]:
        """FPR and recall of the chosen shape and min area as the floor moves."""
        shape, area, chosen = self.best

        def scores(p: str, k: str, det: bool) -> np.ndarray:
            return self._scores(p, k, shape, area, det)
        floors = self._candidate_values([scores(p, k, k == "defect") for p in ("calibration", "check")
                                         for k in ("normal", "defect")], chosen)
        floors = np.unique(np.concatenate([[0.0], floors, [chosen]]))
        return self._curve("min_residual", scores, chosen, floors, 4)

    def image_scores(self) -> dict[str, list[float | None]]:
        shape, area, thr = self.best
        return self._image_scores(lambda p, k: self._scores(p, k, shape, area), thr)


def score_table(score: np.ndarray, pp: PostprocessConfig, areas: Sequence[int],
                truth: np.ndarray | None) -> dict[int, tuple[float, float]]:
    """Per min area: (alarm score, detect score) of one image for the score-threshold recipe.

    The alarm score is the highest threshold at which the image still reports a defect (a
    component of at least ``area`` pixels after opening and closing); the detect score the
    highest at which such a component overlaps the truth (``NO_SCORE`` without truth or when
    none ever does). Both are among the image's own score values; reporting is monotone in the
    threshold, so a bisection over the sorted values finds them.
    """
    from inspector.postprocess import threshold_score

    conn = pp.connectivity
    t_mask = (truth > 0) if truth is not None else None

    def reports(t: float, area: int, detect: bool) -> bool:
        m = threshold_score(score, t, pp.open_kernel, pp.close_kernel)
        if not m.any():
            return False
        if area <= 1 and not detect:
            return True
        n, cc, stats, _ = cv2.connectedComponentsWithStats(m, connectivity=conn)
        big = stats[:, cv2.CC_STAT_AREA] >= max(area, 1)
        big[0] = False
        if not detect:
            return bool(big.any())
        hit = np.unique(cc[t_mask])
        return bool(big[hit[hit > 0]].any())

    vals: np.ndarray | None = None

    def highest(area: int, detect: bool) -> float:
        nonlocal vals
        if detect and (t_mask is None or not t_mask.any()):
            return NO_SCORE
        if not detect and pp.open_kernel <= 1 and area <= 1:
            return float(score.max())  # thresholding alone (closing only adds to a non-empty mask)
        if vals is None:
            vals = np.unique(score)
        if not reports(float(vals[0]), area, detect):
            return NO_SCORE
        lo, hi = 0, len(vals) - 1  # reports at vals[lo]; find the last index that does
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if reports(float(vals[mid]), area, detect):
                lo = mid
            else:
                hi = mid - 1
        return float(vals[lo])

    return {a: (highest(a, False), highest(a, True)) for a in areas}


def score_floor(scores_: Sequence[float], target: float, confidence: float | None = None
                ) -> tuple[float | None, int]:
    """Like :func:`floor_for` for score thresholds of any sign: the threshold just above the
    (allowed+1)-th highest image score, and how many images alarm there. ``None`` when any
    threshold meets the target (too few images ever report anything), ``inf`` when the
    confidence asks for more frames than there are.

    >>> score_floor([-0.5, -0.2, -0.31, -0.9, NO_SCORE], 0.2)
    (-0.3099, 1)
    """
    s, v, reporting = _first_refused(scores_, target, confidence)
    if v is None or math.isinf(v):
        return v, reporting
    t = _f32_above(_above(v, _step(v)), v)
    return t, int((np.isfinite(s) & _reaches(s, t)).sum())


class _ScoreCalibration(_Calibration):
    """Statistics and choice for score-threshold models (fuzzymask): one threshold on the score."""

    KEYS = ("score_threshold", "min_area_px")

    @staticmethod
    def calibrated_keys(grid: SearchGrid) -> tuple[str, ...]:
        """The threshold, and min_area_px where a grid searched it (see the residual one)."""
        return ("score_threshold", *grid.given())

    def __init__(self, model: CalibModel, target: float, grid: SearchGrid, confidence: float | None):
        super().__init__(model, target, confidence)  # tables: (name, {area: (alarm, detect score)})
        self.areas = grid.areas(model.pp)
        self.best: tuple[int, float] | None = None

    def candidates(self) -> list[int]:
        return list(self.areas)

    def add_output(self, part: str, it: FrameItem, out, truth: np.ndarray | None, hist: _PixelHist) -> None:
        if out.score_map is None:
            raise CalibrationInputError(f"{self.model.bundle.path / BUNDLE_FILE}: postprocess.type is "
                                        f"score_threshold but the model gives no score map")
        areas = self.areas if part == "calibration" else [self.best[0]]
        tab = score_table(out.score_map, self.model.pp, areas, truth)
        self.tables[part]["defect" if truth is not None else "normal"].append((it.name, tab))
        hist.add(out.score_map, truth)

    def _scores(self, part: str, kind: str, area: int, detect: bool = False) -> np.ndarray:
        return np.array([t[area][1 if detect else 0] for _, t in self.tables[part][kind]], np.float64)

    @staticmethod
    def _passes(s: np.ndarray, t: float) -> np.ndarray:
        return np.isfinite(s) & _reaches(s, t)

    def choose(self) -> PostprocessConfig | None:
        for area in self.areas:
            s = self._scores("calibration", "normal", area)
            thr, alarmed = score_floor(s, self.target, self.confidence)
            if thr is not None and math.isinf(thr):
                self.infeasible_reason = _too_few(len(s), self.target, self.confidence)
                return None
            if thr is None:  # no calibration frame reports anything: any threshold does
                thr = float(self.model.pp.score_threshold)
                alarmed = int(self._passes(s, thr).sum())
            det = self._scores("calibration", "defect", area, detect=True)
            alarm_d = self._scores("calibration", "defect", area)
            self.rows.append({"min_area_px": area, "score_threshold": thr, "alarmed": alarmed,
                              "fpr": round(alarmed / len(s), 4),
                              "recall": _rate(self._passes(det, thr)) if len(det) else None,
                              "alarm_rate_on_defect_images": _rate(self._passes(alarm_d, thr))
                              if len(det) else None})
        # highest recall; the bundle's own min area comes first and wins ties
        best_i = max(range(len(self.rows)), key=lambda i: (self.rows[i]["recall"] or 0.0, -i))
        r = self.best_row = self.rows[best_i]
        self.best = (r["min_area_px"], r["score_threshold"])
        return self.model.pp.model_copy(update={"score_threshold": r["score_threshold"],
                                                "min_area_px": r["min_area_px"]})

    def search_report(self) -> dict[str, Any]:
        return {"method": "threshold on the anomaly score just above the allowed share of the "
                          "calibration normals' alarm scores (highest threshold at which each image "
                          "still reports a defect); one threshold per min_area_px candidate",
                "candidates": self.rows}

    def figures_at_choice(self) -> dict[str, Any]:
        return self._figures()

    def curve(self) -> dict[str, Any]:
        """FPR and recall of the chosen min area as the threshold moves."""
        area, chosen = self.best

        def scores(p: str, k: str, det: bool) -> np.ndarray:
            return self._scores(p, k, area, det)
        ts = self._candidate_values([scores(p, k, k == "defect") for p in ("calibration", "check")
                                     for k in ("normal", "defect")], chosen)
        return self._curve("score_threshold", scores, chosen, np.unique(np.concatenate([ts, [chosen]])),
                           5, self._passes)

    def image_scores(self) -> dict[str, list[float | None]]:
        area, thr = self.best
        return self._image_scores(lambda p, k: self._scores(p, k, area), thr)


class _ProbabilityCalibration:
    """Statistics and choice for class-probability models (one threshold per defect class)."""

    KEYS = ("threshold", "class_thresholds")

    @staticmethod
    def calibrated_keys(grid: SearchGrid) -> tuple[str, ...]:
        return _ProbabilityCalibration.KEYS

    def __init__(self, model: CalibModel, target: float, min_threshold: float, confidence: float | None):
        if not 0 < min_threshold <= 1:
            raise CalibrationInputError(f"--min-threshold: must be in (0, 1], got {min_threshold}")
        self.model = model
        self.target = target
        self.confidence = confidence
        self.lo = min_threshold
        self.names = model.classes[1:]
        self.rows: dict[str, dict[str, list[tuple[str, PeakRow]]]] = {
            p: {"normal": [], "defect": []} for p in ("calibration", "check")}
        self.k = 0
        self.thr: np.ndarray | None = None
        self.saturated: list[str] = []  # classes whose chosen threshold is 1.0
        self.infeasible_reason = ""
        self.exact = model.pp.open_kernel <= 1 and model.pp.min_area_px <= 1

    def candidates(self) -> list[int]:
        return [0]

    def add(self, part: str, it: FrameItem, image: np.ndarray, truth: np.ndarray | None,
            hist: _PixelHist) -> None:
        _run(self.model, image, lambda out: self.add_output(part, it, out, truth, hist))

    def add_output(self, part: str, it: FrameItem, out, truth: np.ndarray | None, hist: _PixelHist) -> None:
        if out.probs is None:
            raise CalibrationInputError(f"{self.model.bundle.path / BUNDLE_FILE}: postprocess.type is "
                                        f"probability but the model gives no class probabilities")
        self.rows[part]["defect" if truth is not None else "normal"].append((it.name, probability_row(out.probs, truth)))
        hist.add(out.score_map, truth)

    def _matrix(self, part: str, kind: str, inside: bool = False) -> np.ndarray:
        rows = self.rows[part][kind]
        if not rows:
            return np.zeros((0, len(self.names)), np.float32)
        return np.stack([(r.peak_in if inside else r.peak) for _, r in rows])

    def thresholds(self, k: int) -> np.ndarray:
        """Per class: just above the (k+1)-th highest calibration peak, at least ``lo``."""
        m = self._matrix("calibration", "normal")
        srt = -np.sort(-m, axis=0)
        out = np.empty(len(self.names))
        for c in range(len(self.names)):
            if k >= len(srt):
                out[c] = self.lo
            else:
                v = float(srt[k, c])
                out[c] = _f32_above(max(self.lo, _above(v, 1e-4)), v)
        return out

    @staticmethod
    def _alarms(m: np.ndarray, thr: np.ndarray) -> np.ndarray:
        return _reaches(m, thr[None, :]).any(axis=1) if len(m) else np.zeros(0, bool)

    def choose(self) -> PostprocessConfig | None:
        m = self._matrix("calibration", "normal")
        n = len(m)
        allowed = allowed_alarms(n, self.target, self.confidence)
        if allowed < 0:
            self.infeasible_reason = _too_few(n, self.target, self.confidence)
            return None
        # k = 0 puts every class above its highest normal peak; only peaks of exactly 1.0
        # (saturated softmax) can still alarm there, as no threshold may exceed 1
        if self._alarms(m, np.minimum(self.thresholds(0), 1.0)).sum() > allowed:
            bad = [self.names[c] for c in range(len(self.names)) if (m[:, c] >= 1.0).any()]
            self.infeasible_reason = (f"defect probabilities reach 1.0 on too many normal frames "
                                      f"(classes {bad}); no threshold <= 1 meets the target")
            return None
        lo, hi = 0, n  # the largest k with at most `allowed` alarms; alarms grow with k
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self._alarms(m, np.minimum(self.thresholds(mid), 1.0)).sum() <= allowed:
                lo = mid
            else:
                hi = mid - 1
        self.k = lo
        self.thr = np.minimum(self.thresholds(lo), 1.0)
        self.saturated = [c for c, t in zip(self.names, self.thr) if t >= 1.0]
        if self.saturated:
            # not an error (the target is met), but a class that can all but never alarm again
            # is what normal frames holding that defect produce: said, not written silently
            log.warning("class(es) %s: threshold 1.0, so only a probability of exactly 1 alarms "
                        "and the class will hardly ever be reported; the normal frames show it "
                        "with high probability: are they defect-free?", self.saturated)
        return self.model.pp.model_copy(update={
            "threshold": float(min(self.thr)) if len(self.thr) else self.model.pp.threshold,
            "class_thresholds": {c: float(t) for c, t in zip(self.names, self.thr)}})

    def search_report(self) -> dict[str, Any]:
        return {"method": "per-class thresholds, equal false-alarm share per class; largest share k "
                          "whose union of alarming calibration frames stays within the target",
                "per_class_allowance": self.k, "min_threshold": self.lo,
                "classes_at_1": self.saturated,
                "exact": self.exact,
                "note": None if self.exact else "opening/min_area_px can only remove alarms: the "
                                                "calibration FPR is an upper bound"}

    def figures_at_choice(self) -> dict[str, Any]:
        m = self._matrix("calibration", "normal")
        d = self._matrix("calibration", "defect", inside=True)
        da = self._matrix("calibration", "defect")
        alarmed = int(self._alarms(m, self.thr).sum())
        return {"normal_images": len(m), "alarmed": alarmed, "fpr": round(alarmed / len(m), 4),
                "fpr_ci95": wilson(alarmed, len(m)), "defect_images": len(d),
                "recall": _rate(self._alarms(d, self.thr)) if len(d) else None,
                "alarm_rate_on_defect_images": _rate(self._alarms(da, self.thr)) if len(d) else None,
                "class_thresholds": {c: float(t) for c, t in zip(self.names, self.thr)}}

    def curve(self) -> dict[str, Any]:
        n = len(self._matrix("calibration", "normal"))
        ks = np.unique(np.linspace(0, n, min(n + 1, 241)).astype(int))
        ks = np.unique(np.concatenate([ks, [self.k]]))
        out: dict[str, Any] = {"parameter": "per-class allowance k (thresholds above the (k+1)-th "
                                            "highest normal peak)", "values": ks.tolist()}
        mats = {(p, kind, inside): self._matrix(p, kind, inside)
                for p in ("calibration", "check") for kind, inside in (("normal", False), ("defect", True))}
        for (p, kind, inside), mat in mats.items():
            key = f"{'recall' if inside else 'fpr'}_{p}"
            out[key] = [None if not len(mat) else
                        round(float(self._alarms(mat, np.minimum(self.thresholds(int(k)), 1.0)).mean()), 4)
                        for k in ks]
        out["chosen"] = self.k
        return out

    def image_scores(self) -> dict[str, list[float]]:
        # one number per image for the histogram: the highest defect-class probability
        out = {f"{p}_{k}": [float(r.peak.max()) for _, r in self.rows[p][k]]
               for p in ("calibration", "check") for k in ("normal", "defect")}
        out["threshold"] = [float(t) for t in self.thr]
        return out


def _too_few(n: int, target: float, confidence: float | None) -> str:
    need = math.ceil(math.log(1 - confidence) / math.log(1 - target)) if confidence else n
    return (f"{n} calibration frames cannot show FPR <= {target} at confidence {confidence}: even with no "
            f"alarm that needs at least {need} frames")


# -- writing --------------------------------------------------------------------------------------
def write_postprocess_section(bundle: str | Path, new_pp: PostprocessConfig, note: dict[str, Any]) -> dict[str, Any]:
    """Make ``new_pp`` the bundle's post-processing; the old section goes to
    ``postprocess_history`` with its version number and replacement time.

    Versions count sections: the first section is 1, each replacement adds one, so the current
    section's version is ``len(postprocess_history) + 1`` (also kept in
    ``provenance.postprocess_version``). Graphs are re-verified before the rewrite, so a corrupt
    graph is never blessed with a fresh sha256.
    """
    b = load_bundle(bundle, verify=True)
    spec = b.spec
    ts = datetime.now(timezone.utc).isoformat(timespec="seconds")
    old_version = len(spec.postprocess_history) + 1
    new_version = old_version + 1
    update = replace_postprocess(spec, new_pp.model_dump(mode="json"),
                                 f"inspector calibrate thresholds (version {new_version})", ts)
    update["provenance"]["calibration"] = {"version": new_version, "created": ts, **note}
    new = BundleSpec.model_validate({**spec.model_dump(mode="json"), **update})
    path = write_bundle(b.path, new)
    load_bundle(b.path)  # what was written loads and verifies
    return {"bundle_yaml": str(path), "version": new_version, "previous_version": old_version,
            "time": ts}


def plot_report(report: dict[str, Any], out_dir: Path) -> dict[str, Path]:
    """``score_hist.png`` (per-image and per-pixel scores, normal vs defect) and
    ``fpr_recall.png`` (the trade-off as the threshold moves)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    files: dict[str, Path] = {}
    sc = report["_scores"]
    hist = report["_hist"]
    residual = report["recipe"] == "dual_threshold"
    scored = report["recipe"] == "score_threshold"
    unit = ("residual (grey levels)" if residual else "anomaly score" if scored
            else "highest defect-class probability")
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), dpi=110)
    ax = axes[0]
    groups = [("calibration_normal", "normal, calibration", "tab:blue"),
              ("check_normal", "normal, held back", "tab:cyan"),
              ("calibration_defect", "defect, calibration", "tab:red"),
              ("check_defect", "defect, held back", "tab:orange")]
    vals = [v for k, *_ in groups for v in sc.get(k, []) if v is not None]
    if vals:
        lo, hi = min(vals), max(vals)
        if residual and lo > 0:
            bins = np.geomspace(max(lo, 1e-3), hi * 1.01 + 1e-6, 50)
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        else:
            bins = np.linspace(lo, hi + 1e-6, 50)
        for key, label, color in groups:
            v = [x for x in sc.get(key, []) if x is not None]
            none = len(sc.get(key, [])) - len(v)
            if sc.get(key):
                ax.hist(v, bins=bins, histtype="step", lw=1.4, color=color,
                        label=f"{label} ({len(sc[key])}" + (f", {none} without component" if none else "")
                        + ")")
    for t in sc.get("threshold", []):
        if t > 0 or scored:
            ax.axvline(t, color="k", ls="--", lw=1)
    prefix = ("highest component peak, " if residual else
              "highest threshold still reporting a defect, " if scored else "")
    ax.set_xlabel(f"per image: {prefix}{unit}")
    ax.set_ylabel("images")
    ax.set_title("image scores (dashed: calibrated threshold)", fontsize=9)
    ax.legend(fontsize=7)
    ax = axes[1]
    edges = np.asarray(hist["edges"])
    centers = (edges[:-1] + edges[1:]) / 2
    for key, label, color in (("normal", "pixels of normal images", "tab:blue"),
                              ("defect", "defect pixels (truth)", "tab:red")):
        h = np.asarray(hist[key], float)
        if h.sum():
            ax.plot(centers, h / h.sum(), color=color, label=label)
    if residual:
        ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(f"per pixel: {unit if residual or scored else 'score (1 - p(background))'}")
    ax.set_ylabel("fraction of pixels")
    ax.set_title("pixel scores", fontsize=9)
    ax.legend(fontsize=7)
    fig.suptitle(f"{Path(report['bundle']).name}: target FPR {report['target_fpr']}", fontsize=10)
    fig.tight_layout()
    files["score_hist"] = out_dir / "score_hist.png"
    fig.savefig(files["score_hist"])
    plt.close(fig)

    c = report["curve"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), dpi=110)
    ax = axes[0]
    have_recall = any(v is not None for v in c.get("recall_calibration", []) + c.get("recall_check", []))
    if have_recall:
        for p, style in (("calibration", "-"), ("check", "--")):
            f, r = c.get(f"fpr_{p}", []), c.get(f"recall_{p}", [])
            pts = [(a, b) for a, b in zip(f, r) if a is not None and b is not None]
            if pts:
                ax.plot([a for a, _ in pts], [b for _, b in pts], style, label=f"{p} part")
        ch, ck = report["calibration"], report["check"]
        if ch.get("recall") is not None:
            ax.plot([ch["fpr"]], [ch["recall"]], "o", color="tab:blue", label="chosen (calibration)")
        if ck.get("recall") is not None and ck.get("fpr") is not None:
            ax.plot([ck["fpr"]], [ck["recall"]], "s", color="tab:orange", label="chosen (held back)")
        ax.set_ylabel("detection recall on defect images")
    else:
        ax.text(0.5, 0.5, "no labelled defects given (--defects)", ha="center", va="center",
                transform=ax.transAxes)
    ax.axvline(report["target_fpr"], color="k", ls=":", lw=1, label="target FPR")
    ax.set_xlabel("FPR (normal images with any defect)")
    ax.set_xscale("symlog", linthresh=0.01)
    ax.set_xlim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title("trade-off", fontsize=9)
    ax = axes[1]
    x = np.asarray(c["values"], float)
    for key, label, style in (("fpr_calibration", "FPR, calibration", "-"), ("fpr_check", "FPR, held back", "--"),
                              ("recall_calibration", "recall, calibration", "-"),
                              ("recall_check", "recall, held back", "--")):
        y = c.get(key)
        if y and any(v is not None for v in y):
            ax.plot(x, [np.nan if v is None else v for v in y], style, label=label)
    ax.axhline(report["target_fpr"], color="k", ls=":", lw=1)
    ax.axvline(c["chosen"], color="k", ls="--", lw=1)
    ax.set_xlabel(c["parameter"] if len(c["parameter"]) < 40 else "per-class allowance k")
    if residual and (x > 0).any():
        ax.set_xscale("symlog", linthresh=max(float(x[x > 0].min()), 1e-3))
    ax.set_ylabel("rate")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title("rates against the threshold (dashed: chosen)", fontsize=9)
    fig.tight_layout()
    files["fpr_recall"] = out_dir / "fpr_recall.png"
    fig.savefig(files["fpr_recall"])
    plt.close(fig)
    return files


def save_report(report: dict[str, Any], out_dir: Path) -> dict[str, Path]:
    make_out_dir(out_dir)  # a folder that cannot be made: one line naming --out, exit 2
    files: dict[str, Path] = {}
    if report.get("feasible"):
        files.update(plot_report(report, out_dir))
    public = {k: v for k, v in report.items() if not k.startswith("_")}
    public["image_scores"] = report.get("_scores")
    public["files"] = {k: str(v) for k, v in files.items()} | {"report": str(out_dir / "thresholds.json")}
    files["report"] = out_dir / "thresholds.json"
    atomic_write_text(files["report"], json.dumps(public, indent=2, default=_json_default))
    return files


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, float) and not math.isfinite(o):
        return None
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
