"""How much of what a Defect-GAN paste changes lies outside its label (JSON + PNG).

A pair's defect is composed as ``x·(1−m) + f·m`` over its whole window, and labelled where the
map ``m`` exceeds ``--threshold`` (``sample.threshold``, 0.5 by default). Where ``m`` fades out
softly, pixels beyond the label change too: a faint defect under a background label, the very
thing ``min_defect_px`` keeps out. Per threshold this samples ``--n`` pairs of a trained run (as
``inspector augment defectgan sample`` does, into a temporary folder) and records the manifest's
``halo``: the pixels outside the labels whose grey level moved by >= 2 and by >= 8, per labelled
pixel. For the first threshold it also bins the clear (>= 8) halo by distance to the label, to
tell a soft rim from changes spread over the window.

    python benchmarks/defectgan_halo.py --run-dir runs/defectgan-neu-10 --thresholds 0.5,0.25,0.1 \\
        --out bench-out/defectgan-halo
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from inspector.bench import (benchmark_out, machine_caption, machine_under_load, refuse, save_figure,  # noqa: E402
                             script_command, write_benchmark)

#: bin edges (px) of the distance from a clear halo pixel to the nearest labelled pixel
DISTANCE_BINS = (1, 2, 3, 5, 9, 17, 33, 65)


def rim_histogram(run_dir: Path, threshold: float, n: int, seed: int) -> dict:
    """Where the clear halo lies: its share by distance to the label, over ``n`` pastes drawn as
    the sampler draws them (defect-free windows of the run's subset, classes in turn)."""
    import cv2
    import torch

    from export.augment.defectgan.data import load_subset
    from export.augment.defectgan.sample import DefectPainter
    from inspector.evaluation.datasets import defect_free_windows

    painter = DefectPainter(run_dir)
    d = painter.cfg.data
    data = load_subset(painter.cfg.data_root(), d.label_fraction, d.label_seed, tuple(d.splits))
    rng = np.random.default_rng([seed, 7])
    gen = torch.Generator().manual_seed(seed)
    counts = np.zeros(len(DISTANCE_BINS) + 1)
    pastes, win = 0, painter.window
    for k in range(4 * n):
        if pastes >= n:
            break
        i = int(rng.integers(len(data.images)))
        cand = defect_free_windows(data.masks[i], win, 4)
        if len(cand) == 0:
            continue
        y, x = (int(v) for v in cand[rng.integers(len(cand))])
        window = data.images[i][y:y + win, x:x + win]
        painted, m = painter.paint(window, 1 + k % painter.n_classes, gen)
        label = m > threshold
        if label.sum() < painter.cfg.sample.min_defect_px:
            continue
        pastes += 1
        clear = ~label & (np.abs(painted.astype(np.int16) - window.astype(np.int16)) >= 8)
        dist = cv2.distanceTransform((~label).astype(np.uint8), cv2.DIST_L2, 5)
        counts += np.bincount(np.digitize(dist[clear], DISTANCE_BINS), minlength=len(counts))
    share = counts / max(counts.sum(), 1)
    edges = (0,) + DISTANCE_BINS
    return {"pastes": pastes, "threshold": threshold,
            "share_by_distance_px": {f"{edges[j]}-{edges[j + 1] if j + 1 < len(edges) else 'inf'}":
                                     round(float(share[j]), 4) for j in range(len(counts))}}


def measure(run_dir: Path, thresholds: list[float], n: int, seed: int) -> dict:
    from export.augment.defectgan.sample import sample

    rows = []
    with tempfile.TemporaryDirectory(prefix="halo-") as tmp:
        for t in thresholds:
            out = Path(tmp) / f"t{t:g}"
            sample(run_dir, out, n, seed, threshold=t)
            man = json.loads((out / "manifest.json").read_text())
            rows.append({"threshold": t, "rejected_attempts": man["rejected_attempts"],
                         "per_class": man["per_class"], **man["halo"]})
    return {"rows": rows, "rim": rim_histogram(run_dir, thresholds[0], min(n, 100), seed)}


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    xs = np.arange(len(rows))
    a.bar(xs - 0.2, [r["halo_per_labelled_px"] for r in rows], 0.4, label=">= 2 grey levels")
    a.bar(xs + 0.2, [r["halo_ge8_per_labelled_px"] for r in rows], 0.4, label=">= 8 grey levels")
    a.set_xticks(xs, [f"{r['threshold']:g}" for r in rows])
    a.set_xlabel("label threshold on the map m")
    a.set_ylabel("changed px outside the label\nper labelled px")
    a.legend()
    rim = result["rim"]
    keys = list(rim["share_by_distance_px"])
    b.bar(range(len(keys)), [rim["share_by_distance_px"][k] for k in keys])
    b.set_xticks(range(len(keys)), keys, rotation=45)
    b.set_xlabel(f"distance to the label, px (threshold {rim['threshold']:g})")
    b.set_ylabel("share of the >= 8 grey-level halo")
    fig.suptitle(f"Defect-GAN paste halo, {rows[0]['defects']} pastes per threshold "
                 f"({machine_caption(result['machine'])})")
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run-dir", required=True, type=Path, help="a trained Defect-GAN run")
    ap.add_argument("--thresholds", default="0.5,0.25,0.1")
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="bench-out/defectgan-halo")
    a = ap.parse_args(argv)
    try:
        thresholds = [float(v) for v in a.thresholds.split(",")]
    except ValueError:
        refuse(f"--thresholds {a.thresholds}: expected a comma list of numbers in (0, 1)")
    if not all(0 < t < 1 for t in thresholds):
        refuse(f"--thresholds {a.thresholds}: each must lie in (0, 1)")
    if not (a.run_dir / "checkpoint.pt").is_file():
        refuse(f"--run-dir {a.run_dir}: no checkpoint.pt (train one with inspector augment defectgan train)")
    out = benchmark_out(a.out)
    load = os.getloadavg()
    result = {"what": "Defect-GAN paste halo: pixels changed outside the label, per labelled pixel",
              "command": script_command("defectgan_halo.py", argv), "run_dir": str(a.run_dir),
              **measure(a.run_dir, thresholds, a.n, a.seed), "machine": machine_under_load(load)}
    write_benchmark(out, "defectgan-halo", result, plot)
    print(json.dumps(result["rows"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
