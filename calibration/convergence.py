"""``inspector calibrate convergence``: the fuzzy-mask inpainter's convergence threshold ``m``.

Dynamic inference (``../shared/seeds/001_spec.md`` §4.4) iterates ``R[i] = Model(R[i-1])`` until
the MSE of two consecutive reconstructions is at most ``m``; a tile that converges takes the
iterative-generation branch, one that does not takes the precise-repair branch after up to
``max_iterations`` passes. The paper gives no value for ``m`` (the spec's default 1e-4 is a
guess at "40 dB between iterations") and allows one per category, chosen without test labels.
How fast a network's iteration settles depends on the network and the surface, so a fixed
``m`` either sends every tile to the repair branch after all ``N`` passes (the cost of a
frame then is N engine rounds) or none.

This tool measures it instead: on defect-free frames it iterates every tile ``within`` times
and records the smallest consecutive-reconstruction MSE each tile reaches (from the iteration
``first_check_from`` on, as the runtime checks), then sets ``m`` to the ``quantile`` of those
values over the calibration tiles. With the defaults (``within`` 2, ``quantile`` 0.95) 95 % of
normal tiles converge by the second pass, so a normal frame costs two engine rounds, while a
tile whose reconstruction keeps moving (the paper's case for the repair branch) does not
converge. The held-back ``check`` part reports the share that converge and the engine passes
they need; labelled defect images, when given, report the same for the tiles of their held-back
part that hold a defect.

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

from calibration.frames import CalibrationInputError, FrameSet, iterate
from inspector.bundle import BundleSpec, load_bundle, write_bundle
from inspector.fileio import atomic_write_text
from inspector.models.base import ModelAdapter

log = logging.getLogger(__name__)

__all__ = ["mse_sequences", "choose_m", "passes_to_converge", "calibrate_convergence",
           "write_m", "save_report"]


def mse_sequences(adapter: ModelAdapter, image: np.ndarray, passes: int,
                  truth: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Iterate the bundle's network ``passes`` times on every tile of ``image``.

    Returns ``(seq, has_defect)``: ``seq[t, i]`` is the MSE between ``R[i]`` and ``R[i+1]`` of
    tile ``t`` (``R[0]`` the tile itself), i.e. the value the runtime compares with ``m`` at
    iteration ``i + 1``; ``has_defect[t]`` tells whether ``truth`` (HxW, > 0 = defect) marks a
    pixel inside the tile's kept region.
    """
    if passes < 1:
        raise ValueError(f"passes must be >= 1, got {passes}")
    batch, g = adapter.fill_batch(image)
    n = g.count
    spec = adapter.bundle.spec
    c = adapter.channels
    mean = np.broadcast_to(np.asarray(spec.input.mean, np.float32), (c,)).reshape(1, c, 1, 1)
    std = np.broadcast_to(np.asarray(spec.input.std, np.float32), (c,)).reshape(1, c, 1, 1)
    rec_name = spec.outputs["reconstruction"]
    step = adapter.batch if adapter.batch > 0 else n
    prev = batch[:n] * std + mean           # tiles in [0, 1]
    seq = np.empty((n, passes), np.float64)
    for i in range(passes):
        feed = ((prev - mean) / std).astype(np.float32)
        out = np.empty_like(prev)
        for s in range(0, n, step):
            chunk = feed[s:s + step]
            if adapter.fixed_batch and len(chunk) < adapter.batch:
                chunk = np.concatenate([chunk, np.zeros((adapter.batch - len(chunk),) + chunk.shape[1:],
                                                        np.float32)])
            res = adapter.engine.run({adapter.input_name: chunk})[rec_name]
            out[s:s + step] = res[:min(step, n - s)]
        seq[:, i] = np.mean((out - prev) ** 2, axis=(1, 2, 3), dtype=np.float64)
        prev = out
    has_defect = np.zeros(n, bool)
    if truth is not None:
        for t, _, _, (ky0, ky1), (kx0, kx1) in g.tiles():
            has_defect[t] = bool((truth[ky0:ky1, kx0:kx1] > 0).any())
    return seq, has_defect


def choose_m(seqs: np.ndarray, quantile: float, within: int, first_check_from: int = 1) -> float:
    """``m`` such that a share ``quantile`` of the tiles (rows of ``seqs``) reach an MSE <= m at
    some iteration from ``first_check_from`` to ``within``."""
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
            "best_mse_median": float(np.median(seqs[:, first_check_from - 1:within].min(axis=1)))}


def calibrate_convergence(adapter: ModelAdapter, normals: FrameSet, quantile: float = 0.95,
                          within: int = 2, defects: FrameSet | None = None,
                          passes: int | None = None) -> dict[str, Any]:
    """Measure the normal (and defect) frames and choose ``m`` (see module doc)."""
    p = getattr(adapter, "params", None)
    if adapter.kind != "fuzzymask" or p is None:
        raise CalibrationInputError(f"--bundle {adapter.bundle.path}: kind {adapter.kind}; convergence "
                                    f"calibration is for fuzzymask bundles")
    first = p.first_check_from
    passes = max(within, passes or within)
    if within > p.max_iterations:
        raise CalibrationInputError(f"--within: {within} is more than the bundle's "
                                    f"kind_params.max_iterations ({p.max_iterations})")
    if first > within:
        raise CalibrationInputError(f"--within: {within} is below the bundle's "
                                    f"kind_params.first_check_from ({first})")
    parts: dict[str, list[np.ndarray]] = {"calibration": [], "check": []}
    for part in parts:
        for it, image, _ in iterate(normals.part(part), f"{part} normals"):
            try:
                seq, _ = mse_sequences(adapter, image, passes)
            except Exception as e:  # a frame the model cannot take is named, not fatal
                log.warning("%s: skipped: %s", it.name, e)
                continue
            parts[part].append(seq)
    cal = np.concatenate(parts["calibration"]) if parts["calibration"] else np.zeros((0, passes))
    if not len(cal):
        raise CalibrationInputError(f"--normal {normals.source}: no calibration frames (the split "
                                    f"left none; lower --check-fraction)")
    chk = np.concatenate(parts["check"]) if parts["check"] else np.zeros((0, passes))
    m = choose_m(cal, quantile, within, first)
    report: dict[str, Any] = {
        "bundle": str(adapter.bundle.path), "kind": "fuzzymask",
        "rule": f"m = the {quantile} quantile over calibration tiles of the smallest MSE between "
                f"consecutive reconstructions at iterations {first}..{within}",
        "quantile": quantile, "within": within, "passes_measured": passes,
        "previous_m": p.m, "m": m, "normal": normals.summary(),
        "calibration": _summary(cal, m, first, within),
        "check": _summary(chk, m, first, within),
        "previous_m_check": _summary(chk, p.m, first, within) if len(chk) else None,
        "_cal": cal, "_chk": chk,
    }
    if defects is not None:
        dseqs = []
        for it, image, truth in iterate(defects.part("check"), "check defect images"):
            seq, has = mse_sequences(adapter, image, passes, truth)
            dseqs.append(seq[has])
        d = np.concatenate(dseqs) if dseqs else np.zeros((0, passes))
        report["defect_tiles"] = _summary(d, m, first, within)
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
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {"report": out_dir / "convergence.json", "plot": out_dir / "convergence.png"}
    public = {k: v for k, v in report.items() if not k.startswith("_")}
    public["files"] = {k: str(v) for k, v in files.items()}
    atomic_write_text(files["report"], json.dumps(public, indent=2))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    first = 1
    fig, ax = plt.subplots(figsize=(7, 4.5))
    w = report["within"]
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
    ax.set_xlabel(f"smallest MSE of consecutive reconstructions within {w} passes")
    ax.set_ylabel("share of tiles converged")
    ax.set_title(Path(report["bundle"]).name + ": convergence calibration")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(files["plot"], dpi=110)
    plt.close(fig)
    return files
