"""``inspector calibrate convergence``: the fuzzy-mask inpainter's convergence threshold ``m``.

Dynamic inference (``../shared/seeds/001_spec.md`` §4.4) iterates ``R[i] = Model(R[i-1])`` until
the MSE (or, with ``conv_metric: D_mean``, the mean of D) of two consecutive reconstructions is
at most ``m``; a tile that converges takes the iterative-generation branch, one that does not
takes the precise-repair branch after up to ``max_iterations`` passes. The paper gives no value for ``m`` (the spec's default 1e-4 is a
guess at "40 dB between iterations") and allows one per category, chosen without test labels.
How fast a network's iteration settles depends on the network and the surface, so a fixed
``m`` either sends every tile to the repair branch after all ``N`` passes (the cost of a
frame then is N engine rounds) or none.

This tool measures it instead: on defect-free frames it iterates every tile ``within`` times
and records the smallest consecutive-reconstruction value each tile reaches at the iterations the
runtime tests, then sets ``m`` to the ``quantile`` of those values over the calibration tiles.
The tiles are iterated by the runtime adapter's own code
(:meth:`~inspector.models.fuzzymask.FuzzymaskAdapter.convergence_values`), so they see what
``infer()`` sees: the adapter's flat field (``--flat-field`` or the camera config's
``preprocess.flat_field``), the bundle's normalisation and ``kind_params.conv_metric`` (the MSE,
or the mean of D), from ``first_check_from`` on. With the defaults (``within`` 2, ``quantile``
0.95) 95 % of normal tiles converge by the second pass, so a normal frame costs two engine
rounds, while a tile whose reconstruction keeps moving (the paper's case for the repair branch)
does not converge. With ``kind_params.apply_line18`` the runtime computes ``R1`` only and tests
convergence once (tile against ``R1``): only that test is measured and counted, whatever
``within`` (the report's ``within_runtime`` is then 1), and ``m`` then changes only the
converged-tile statistics, not the score or the cost. The held-back ``check`` part reports the
share that converge and the engine passes they need; labelled defect images, when given, report
the same for the tiles of their held-back part that hold a defect.

The chosen value is written to the bundle's ``kind_params.m``; the previous value and the
figures go to ``provenance.convergence_calibration``.
"""

from __future__ import annotations

import json
import logging
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import ValidationError

from calibration.frames import CalibrationInputError, FrameSet, iterate
from calibration.outputs import make_out_dir
from inspector.bundle import BundleSpec, load_bundle, write_bundle
from inspector.errors import BundleError
from inspector.fileio import atomic_write_text
from inspector.models.base import ModelAdapter
from inspector.models.fuzzymask import FuzzymaskParams

log = logging.getLogger(__name__)

__all__ = ["conv_sequences", "mse_sequences", "choose_m", "passes_to_converge", "calibrate_convergence",
           "write_m", "save_report"]


def conv_sequences(adapter: ModelAdapter, image: np.ndarray, passes: int,
                   truth: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Iterate the bundle's network ``passes`` times on every tile of ``image``, the way the
    runtime does (the adapter's own code: flat field, tiling, engine chunks and the bundle's
    ``conv_metric``; :meth:`~inspector.models.fuzzymask.FuzzymaskAdapter.convergence_values`).

    Returns ``(seq, has_defect)``: ``seq[t, i]`` is the value the runtime compares with ``m``
    at iteration ``i + 1`` of tile ``t`` (MSE, or the mean of D, between ``R[i]`` and
    ``R[i+1]``, ``R[0]`` the tile itself); ``has_defect[t]`` tells whether ``truth`` (HxW,
    > 0 = defect) marks a pixel inside the tile's kept region.
    """
    if passes < 1:
        raise ValueError(f"passes must be >= 1, got {passes}")
    seq, g = adapter.convergence_values(image, passes)
    has_defect = np.zeros(g.count, bool)
    if truth is not None:
        for t, _, _, (ky0, ky1), (kx0, kx1) in g.tiles():
            has_defect[t] = bool((truth[ky0:ky1, kx0:kx1] > 0).any())
    return seq, has_defect


#: the former name (it measured the MSE only; it now measures the bundle's ``conv_metric``)
mse_sequences = conv_sequences


def choose_m(seqs: np.ndarray, quantile: float, within: int, first_check_from: int = 1) -> float:
    """``m`` such that a share ``quantile`` of the tiles (rows of ``seqs``) reach a value (MSE or
    mean of D) <= m at some iteration from ``first_check_from`` to ``within``."""
    if not 0 < quantile <= 1:
        raise ValueError(f"quantile must be in (0, 1], got {quantile}")
    if not 1 <= first_check_from <= within <= seqs.shape[1]:
        raise ValueError(f"need 1 <= first_check_from ({first_check_from}) <= within ({within}) "
                         f"<= measured passes ({seqs.shape[1]})")
    best = np.sort(seqs[:, first_check_from - 1:within].min(axis=1))
    # the ceil(q n)-th smallest: the least m under which at least q n tiles converge
    k = max(1, int(np.ceil(quantile * len(best) - 1e-9)))
    return float(best[k - 1])


def passes_to_converge(seqs: np.ndarray, m: float, first_check_from: int = 1) -> np.ndarray:
    """Per tile, the iteration at which the runtime would stop (``seqs.shape[1] + 1`` = never
    within the measured passes)."""
    ok = seqs <= m
    ok[:, :first_check_from - 1] = False
    first = np.where(ok.any(axis=1), ok.argmax(axis=1) + 1, seqs.shape[1] + 1)
    return first


def _summary(seqs: np.ndarray, m: float, first_check_from: int, within: int) -> dict[str, Any]:
    if not len(seqs):
        return {"tiles": 0}
    it = passes_to_converge(seqs, m, first_check_from)
    passes = seqs.shape[1]
    return {"tiles": int(len(seqs)),
            "converged_within": float(np.mean(it <= within)),
            "converged_within_measured": float(np.mean(it <= passes)),
            "mean_iterations_capped": float(np.mean(np.minimum(it, passes))),
            "best_value_median": float(np.median(seqs[:, first_check_from - 1:within].min(axis=1)))}


#: how the report names each ``kind_params.conv_metric``
_METRIC = {"mse": "MSE", "D_mean": "mean of D"}


def calibrate_convergence(adapter: ModelAdapter, normals: FrameSet, quantile: float = 0.95,
                          within: int = 2, defects: FrameSet | None = None,
                          passes: int | None = None) -> dict[str, Any]:
    """Measure the normal (and defect) frames and choose ``m`` (see module doc)."""
    p = getattr(adapter, "params", None)
    if adapter.kind != "fuzzymask" or p is None:
        raise CalibrationInputError(f"--bundle {adapter.bundle.path}: kind {adapter.kind}; convergence "
                                    f"calibration is for fuzzymask bundles")
    if within > p.max_iterations:
        raise CalibrationInputError(f"--within: {within} is more than the bundle's "
                                    f"kind_params.max_iterations ({p.max_iterations})")
    # the iterations the runtime tests: first_check_from..max_iterations, only 1 with apply_line18
    checks = adapter.checked_iterations()
    first = p.first_check_from
    if not checks:
        raise CalibrationInputError(
            f"--bundle {adapter.bundle.path}: kind_params.apply_line18 is true, so the runtime "
            f"computes only R1 and tests convergence only at iteration 1, but "
            f"kind_params.first_check_from is {first}: no tile is ever tested and m has no effect")
    if first > within:
        raise CalibrationInputError(f"--within: {within} is below the bundle's "
                                    f"kind_params.first_check_from ({first})")
    # no pass the runtime never runs is measured or counted
    within_rt = min(within, checks[-1])
    passes = min(max(within, passes or within), checks[-1])
    note = None
    if p.apply_line18:
        note = ("kind_params.apply_line18 is true: the runtime computes R1 only and tests convergence "
                "once, between the tile and R1 (every tile scores S_rep, so m changes neither the score "
                "nor the cost, only the converged-tile statistics); m is chosen from that test alone "
                f"and 'converged within {within} passes' means converged at that first test")
        log.warning("%s", note)
    parts: dict[str, list[np.ndarray]] = {"calibration": [], "check": []}
    for part in parts:
        for it, image, _ in iterate(normals.part(part), f"{part} normals", arg=normals.arg):
            try:
                seq, _ = conv_sequences(adapter, image, passes)
            except Exception as e:  # a frame the model cannot take is named, not fatal
                log.warning("%s: skipped: %s", it.name, e)
                continue
            parts[part].append(seq)
    cal = np.concatenate(parts["calibration"]) if parts["calibration"] else np.zeros((0, passes))
    if not len(cal):
        raise CalibrationInputError(f"--normal {normals.source}: no calibration frames (the split "
                                    f"left none; lower --check-fraction)")
    chk = np.concatenate(parts["check"]) if parts["check"] else np.zeros((0, passes))
    m = choose_m(cal, quantile, within_rt, first)
    if not np.isfinite(m):
        # a network that emits inf or NaN on these frames: no m means anything, and the bundle
        # would be refused at the next load
        raise BundleError(f"{adapter.bundle.path}: the model's reconstructions of the calibration "
                          f"frames give m = {m}: nothing written; check the bundle (`inspector "
                          "evaluate`) and the frames")
    metric = _METRIC[p.conv_metric]
    report: dict[str, Any] = {
        "bundle": str(adapter.bundle.path), "kind": "fuzzymask",
        "rule": f"m = the {quantile} quantile over calibration tiles of the smallest {metric} between "
                f"consecutive reconstructions at the iterations the runtime tests, {first}..{within_rt}",
        "conv_metric": p.conv_metric, "apply_line18": p.apply_line18,
        "checked_iterations": [first, checks[-1]], "note": note,
        "quantile": quantile, "within": within, "within_runtime": within_rt, "passes_measured": passes,
        "previous_m": p.m, "m": m, "normal": normals.summary(),
        "calibration": _summary(cal, m, first, within_rt),
        "check": _summary(chk, m, first, within_rt),
        "previous_m_check": _summary(chk, p.m, first, within_rt) if len(chk) else None,
        "_cal": cal, "_chk": chk,
    }
    if defects is not None:
        dseqs = []
        for it, image, truth in iterate(defects.part("check"), "check defect images", arg=defects.arg):
            seq, has = conv_sequences(adapter, image, passes, truth)
            dseqs.append(seq[has])
        d = np.concatenate(dseqs) if dseqs else np.zeros((0, passes))
        report["defect_tiles"] = _summary(d, m, first, within_rt)
        report["_def"] = d
    return report


def write_m(bundle: str | Path, m: float, note: dict[str, Any]) -> dict[str, Any]:
    """Set ``kind_params.m``; the old value and ``note`` go to ``provenance.convergence_calibration``
    (graphs are re-verified first, so a corrupt graph is never rewritten with a fresh sha256)."""
    b = load_bundle(bundle, verify=True)
    spec = b.spec
    ts = datetime.now(timezone.utc).isoformat(timespec="seconds")
    kp = dict(spec.kind_params)
    old = kp.get("m")
    kp["m"] = m
    try:  # what the runtime's adapter will read: refused here, not at the daemon's next start
        FuzzymaskParams.model_validate(kp)
    except ValidationError as e:
        err = e.errors()[0]
        key = ".".join(str(x) for x in err["loc"])
        raise BundleError(f"{b.path}: kind_params.{key}: {err['msg']} (got {err.get('input')!r}): "
                          "nothing written") from None
    prov = dict(spec.provenance)
    hist = list(prov.get("convergence_calibration_history", []))
    if "convergence_calibration" in prov:
        hist.append(prov["convergence_calibration"])
    prov["convergence_calibration"] = {"created": ts, "previous_m": old, "m": m, **note}
    if hist:
        prov["convergence_calibration_history"] = hist
    new = BundleSpec.model_validate({**spec.model_dump(mode="json"), "kind_params": kp,
                                     "provenance": prov})
    path = write_bundle(b.path, new)
    load_bundle(b.path)  # what was written loads and verifies
    return {"bundle_yaml": str(path), "previous_m": old, "m": m, "time": ts}


def save_report(report: dict[str, Any], out_dir: Path) -> dict[str, Path]:
    """``convergence.json`` and ``convergence.png`` (share of tiles converged against m)."""
    make_out_dir(out_dir)  # a folder that cannot be made: one line naming --out, exit 2
    files = {"report": out_dir / "convergence.json", "plot": out_dir / "convergence.png"}
    public = {k: v for k, v in report.items() if not k.startswith("_")}
    public["files"] = {k: str(v) for k, v in files.items()}
    atomic_write_text(files["report"], json.dumps(public, indent=2))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    first = report["checked_iterations"][0]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    w = report["within_runtime"]
    for key, label in (("_cal", "normal tiles (calibration)"), ("_chk", "normal tiles (check)"),
                       ("_def", "tiles holding a defect")):
        s = report.get(key)
        if s is None or not len(s):
            continue
        best = np.sort(s[:, first - 1:w].min(axis=1))
        ax.plot(best, np.arange(1, len(best) + 1) / len(best), label=f"{label}, n={len(best)}")
    ax.axvline(report["m"], color="k", ls="--", label=f"chosen m = {report['m']:.3g}")
    ax.axvline(report["previous_m"], color="grey", ls=":", label=f"previous m = {report['previous_m']:.3g}")
    ax.set_xscale("log")
    ax.set_xlabel(f"smallest {_METRIC[report['conv_metric']]} of consecutive reconstructions "
                  f"at iterations {first}..{w}")
    ax.set_ylabel("share of tiles converged")
    ax.set_title(Path(report["bundle"]).name + ": convergence calibration")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(files["plot"], dpi=110)
    plt.close(fig)
    return files
