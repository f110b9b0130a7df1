"""Two class-index bundles on the same images: the MIoU difference and how far the images decide it.

A difference of 0.015 MIoU between two bundles on 699 images may be the images, not the models:
a few hard images scored differently can move a pooled MIoU that much. This reads the
``per_image.jsonl`` that ``inspector evaluate --out DIR`` writes for each bundle (one K x K pixel
confusion per image), checks that both saw the same images, and reports

* B − A for MIoU, MIoU over the defect classes, MPA and each class's IoU, computed exactly as
  ``inspector evaluate`` does (one confusion matrix summed over all images);
* a paired bootstrap over images: the images are drawn with replacement ``--resamples`` times
  (the same draw for A and B), and for each draw B − A is recomputed from the summed matrices;
  the 2.5 / 97.5 percentiles give a 95 % interval, and ``share_b_ahead`` the fraction of draws
  in which B leads.

The interval measures how much the *evaluation images* decide the comparison; it says nothing
of training: another seed of either model can move the difference by more (see
``benchmarks/arcd_pairs.py`` for the spread over seeds).

    inspector evaluate --bundle A --data ROOT --format neu-seg --split val --out eval-a
    inspector evaluate --bundle B --data ROOT --format neu-seg --split val --out eval-b
    python benchmarks/compare_bundles.py eval-a/per_image.jsonl eval-b/per_image.jsonl \\
        --names plain arcd --out bench-out/compare      # compare.json + compare.png
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from inspector.evaluation.metrics import class_scores  # noqa: E402

log = logging.getLogger("benchmarks.compare_bundles")

#: the figures compared, as named in ``class_scores``
FIGURES = ("miou", "miou_defects", "mpa")


class CompareError(ValueError):
    """An input file is missing, malformed or does not match the other; names the file and line."""


def read_confusions(path: Path) -> tuple[list[str], np.ndarray]:
    """Image names and their N x K x K confusion matrices from one ``per_image.jsonl``."""
    if not path.is_file():
        raise CompareError(f"{path}: no such file (inspector evaluate --out DIR writes DIR/per_image.jsonl)")
    names: list[str] = []
    mats: list[np.ndarray] = []
    with path.open() as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise CompareError(f"{path}:{n}: not JSON ({e.msg})") from None
            if not isinstance(row, dict) or "confusion" not in row:
                raise CompareError(f"{path}:{n}: no 'confusion' (written for class-probability "
                                   "bundles, e.g. arcd, by this version of inspector evaluate)")
            names.append(str(row.get("image")))
            try:
                a = np.asarray(row["confusion"], np.int64)
            except (TypeError, ValueError):  # ragged rows, text, null
                a = np.zeros(0)
            if a.ndim != 2 or a.shape[0] != a.shape[1] or (a < 0).any():
                raise CompareError(f"{path}:{n}: image {names[-1]}: confusion is not a square "
                                   "matrix of pixel counts")
            mats.append(a)
    if not mats:
        raise CompareError(f"{path}: no images")
    k = max(len(a) for a in mats)
    return names, np.stack([_pad(a, k) for a in mats])


def _pad(a: np.ndarray, k: int) -> np.ndarray:
    """A K' x K' matrix (or a stack of them) grown to K x K with zero counts."""
    if a.shape[-1] == k:
        return a
    out = np.zeros(a.shape[:-2] + (k, k), a.dtype)
    out[..., :a.shape[-1], :a.shape[-1]] = a
    return out


def _figures(cm: np.ndarray) -> dict[str, float | None]:
    s = class_scores(cm)
    return {f: s[f] for f in FIGURES}


def compare(path_a: Path, path_b: Path, resamples: int = 2000, seed: int = 0) -> dict:
    """The comparison as a JSON-ready dict (see the module doc)."""
    names_a, ca = read_confusions(path_a)
    names_b, cb = read_confusions(path_b)
    if names_a != names_b:
        if len(names_a) != len(names_b):
            raise CompareError(f"{path_a} has {len(names_a)} images, {path_b} {len(names_b)}: "
                               "evaluate both on the same data and split")
        i = next(i for i, (x, y) in enumerate(zip(names_a, names_b)) if x != y)
        raise CompareError(f"{path_a} and {path_b} differ at image {i + 1}: {names_a[i]} vs "
                           f"{names_b[i]}: evaluate both on the same data and split")
    for p, c in ((path_a, ca), (path_b, cb)):
        empty = np.flatnonzero(c.sum(axis=(1, 2)) == 0)
        if empty.size:
            raise CompareError(f"{p}: image {names_a[int(empty[0])]}: empty confusion")
    k = max(ca.shape[1], cb.shape[1])
    ca, cb = _pad(ca, k), _pad(cb, k)
    # row sums are the true pixels per class: equal unless the masks (the data) differ
    differ = np.flatnonzero((ca.sum(axis=2) != cb.sum(axis=2)).any(axis=1))
    if differ.size:
        raise CompareError(f"{path_a} and {path_b}: image {names_a[int(differ[0])]} has different "
                           "ground truth in the two files: evaluate both on the same data")
    a, b = _figures(ca.sum(0)), _figures(cb.sum(0))
    iou_a, iou_b = class_scores(ca.sum(0))["per_class_iou"], class_scores(cb.sum(0))["per_class_iou"]

    n = len(names_a)
    rng = np.random.default_rng(seed)
    flat_a, flat_b = ca.reshape(n, -1), cb.reshape(n, -1)
    deltas = {f: np.empty(resamples) for f in FIGURES}
    for r in range(resamples):
        w = np.bincount(rng.integers(0, n, n), minlength=n)  # how often each image is drawn
        fa = _figures((w @ flat_a).reshape(k, k))
        fb = _figures((w @ flat_b).reshape(k, k))
        for f in FIGURES:
            deltas[f][r] = np.nan if fa[f] is None or fb[f] is None else fb[f] - fa[f]
    diff: dict[str, dict] = {}
    for f in FIGURES:
        d = deltas[f][~np.isnan(deltas[f])]
        diff[f] = {"a": a[f], "b": b[f],
                   "b_minus_a": None if a[f] is None or b[f] is None else b[f] - a[f],
                   "ci95": [float(np.percentile(d, 2.5)), float(np.percentile(d, 97.5))] if d.size else None,
                   "share_b_ahead": float(np.mean(d > 0)) if d.size else None}
    return {"a": str(path_a), "b": str(path_b), "images": n, "resamples": resamples, "seed": seed,
            "figures": diff,
            "per_class_iou": [{"class": c, "a": x, "b": y,
                               "b_minus_a": None if x is None or y is None else y - x}
                              for c, (x, y) in enumerate(zip(iou_a, iou_b))],
            "bootstrap_miou_deltas": deltas["miou"].tolist()}


def plot(result: dict, names: tuple[str, str], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    d = np.asarray(result["bootstrap_miou_deltas"], float)
    d = d[~np.isnan(d)]
    m = result["figures"]["miou"]
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    ax.hist(d, bins=40, color="#8aa6c1")
    ax.axvline(0.0, color="black", lw=1)
    ax.axvline(m["b_minus_a"], color="#c0392b", lw=2, label=f"measured {m['b_minus_a']:+.4f}")
    lo, hi = m["ci95"]
    ax.axvspan(lo, hi, color="#c0392b", alpha=0.12, label=f"95 % over images [{lo:+.4f}, {hi:+.4f}]")
    ax.set_xlabel(f"MIoU {names[1]} − {names[0]}")
    ax.set_ylabel(f"resamples of the {result['images']} images")
    ax.set_title(f"{names[1]} ahead in {m['share_b_ahead'] * 100:.1f} % of {len(d)} resamples")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summary(result: dict, names: tuple[str, str]) -> str:
    lines = [f"{result['images']} images, {result['resamples']} paired resamples (seed {result['seed']})",
             f"| figure | {names[0]} | {names[1]} | {names[1]} − {names[0]} | 95 % over images | "
             f"{names[1]} ahead in |", "|---|---|---|---|---|---|"]
    for f, v in result["figures"].items():
        if v["b_minus_a"] is None:
            continue
        lo, hi = v["ci95"]
        lines.append(f"| {f} | {v['a']:.4f} | {v['b']:.4f} | {v['b_minus_a']:+.4f} | "
                     f"[{lo:+.4f}, {hi:+.4f}] | {v['share_b_ahead'] * 100:.1f} % |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("a", type=Path, help="per_image.jsonl of bundle A (the reference)")
    parser.add_argument("b", type=Path, help="per_image.jsonl of bundle B")
    parser.add_argument("--names", nargs=2, default=("A", "B"), metavar=("NAME_A", "NAME_B"))
    parser.add_argument("--resamples", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="folder for compare.json and compare.png")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.resamples < 100:
        parser.error("--resamples: at least 100 for a 95 % interval")
    try:
        res = compare(args.a, args.b, args.resamples, args.seed)
    except CompareError as exc:
        log.error("%s", exc)
        return 2
    names = tuple(args.names)
    sys.stdout.write(summary(res, names) + "\n")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "compare.json").write_text(json.dumps({**res, "names": list(names)}, indent=1))
        plot(res, names, args.out / "compare.png")
        log.info("wrote %s and %s", args.out / "compare.json", args.out / "compare.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
