"""ARCD against its plain baseline, per D backbone: the measured pairs in the thesis's form.

The thesis (``../shared/seeds/004_spec.md``, Tables 3.2 and 3.4) reports, for each D backbone,
ARCD(D) and the plain D at 100 % and 30 % labelled data. This keeps this project's measured
NEU-Seg pairs in one file, ``benchmarks/arcd-pairs-neu.json``, and draws from it:

* a Markdown table (stdout) in the thesis's form: per backbone and labelled-data rate, the plain
  network, ARCD and ARCD − plain, mean ± standard deviation over the seeds trained; and
* a PNG: ARCD − plain MIoU per backbone and rate, each seed a dot, next to the thesis's gain.

A new pair enters from the JSON that ``inspector evaluate --json`` printed, so no figure is
typed by hand::

    inspector evaluate --bundle B --data ../shared/data/neu_seg --format neu-seg --split val \\
        --json > arcd-segnet-30.eval.json
    python benchmarks/arcd_pairs.py --add arcd-segnet-30.eval.json --backbone segnet \\
        --model arcd --labels 0.3 --seed 1 --config configs/train/arcd-neu-d12-segnet-30.yaml \\
        --train "stage 1 18 min, stage 2 95 min"
    python benchmarks/arcd_pairs.py --out bench-out/arcd-pairs     # table + arcd-pairs.png

A pair counts only where both models of one backbone, rate and seed are present; a row whose
backbone, model or rate is unknown, or a second row for the same cell, is refused naming it.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("benchmarks.arcd_pairs")

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_JSON = ROOT / "benchmarks" / "arcd-pairs-neu.json"
BACKBONES = ("unet", "segnet", "pspnet", "deeplabv3plus")
MODELS = ("plain", "arcd")
METRICS = ("miou", "miou_defects", "mpa", "pixel_auroc", "f1")
LABELS = {"unet": "U-Net", "segnet": "SegNet", "pspnet": "PSPNet", "deeplabv3plus": "DeepLabV3+"}


class PairsError(ValueError):
    """The pairs file or a row to add is malformed; the message names the file and the row."""


@dataclass(frozen=True)
class Cell:
    backbone: str
    labels: float
    seed: int


def load(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise PairsError(f"{path}: no such file") from None
    except json.JSONDecodeError as exc:
        raise PairsError(f"{path}: not JSON ({exc})") from None
    validate(data, path)
    return data


def validate(data: object, path: Path) -> None:
    """Refuse a malformed file or row, naming the file and the row."""
    if not isinstance(data, dict) or not isinstance(data.get("runs"), list):
        raise PairsError(f"{path}: expected an object with a 'runs' list")
    seen: set[tuple] = set()
    for i, run in enumerate(data["runs"]):
        name = run.get("name", "?") if isinstance(run, dict) else repr(run)
        where = f"{path}: runs[{i}] ({name})"
        if not isinstance(run, dict):
            raise PairsError(f"{where}: not an object")
        if run.get("backbone") not in BACKBONES:
            raise PairsError(f"{where}: backbone {run.get('backbone')!r} is not one of {BACKBONES}")
        if run.get("model") not in MODELS:
            raise PairsError(f"{where}: model {run.get('model')!r} is not one of {MODELS}")
        if not isinstance(run.get("labels"), (int, float)) or not 0 < run["labels"] <= 1:
            raise PairsError(f"{where}: labels must be a fraction in (0, 1], got {run.get('labels')!r}")
        if not isinstance(run.get("seed"), int):
            raise PairsError(f"{where}: seed must be an integer, got {run.get('seed')!r}")
        metrics = run.get("metrics")
        if not isinstance(metrics, dict) or not isinstance(metrics.get("miou"), (int, float)):
            raise PairsError(f"{where}: metrics.miou missing")
        key = (run["backbone"], run["model"], float(run["labels"]), run["seed"])
        if key in seen:
            raise PairsError(f"{where}: a second row for {key}")
        seen.add(key)


def pairs(data: dict) -> dict[Cell, dict[str, dict]]:
    """Every (backbone, rate, seed) with both models present: {cell: {"plain": run, "arcd": run}}."""
    cells: dict[Cell, dict[str, dict]] = {}
    for run in data["runs"]:
        cell = Cell(run["backbone"], float(run["labels"]), run["seed"])
        cells.setdefault(cell, {})[run["model"]] = run
    return {c: m for c, m in cells.items() if set(m) == set(MODELS)}


def _mean_sd(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def table(data: dict) -> str:
    """The thesis-form Markdown table: plain, ARCD and their difference per backbone and rate."""
    complete = pairs(data)
    thesis = data.get("thesis", {})
    lines = ["| D | labelled | seeds | plain MIoU | ARCD MIoU | ARCD − plain: MIoU | MIoU defects "
             "| MPA | AUROC | thesis ARCD − plain MIoU |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for backbone in BACKBONES:
        for labels in sorted({c.labels for c in complete if c.backbone == backbone}, reverse=True):
            cells = sorted((c for c in complete if c.backbone == backbone and c.labels == labels),
                           key=lambda c: c.seed)

            def values(model: str, metric: str) -> list[float]:
                return [complete[c][model]["metrics"].get(metric) for c in cells]

            def delta(metric: str) -> str:
                a, p = values("arcd", metric), values("plain", metric)
                if any(v is None for v in a + p):
                    return "–"
                return _mean_sd([x - y for x, y in zip(a, p)])

            gain = thesis.get(backbone, {}).get(f"{round(labels * 100)}", None)
            lines.append(
                f"| {LABELS[backbone]} | {labels:.0%} | {', '.join(str(c.seed) for c in cells)} "
                f"| {_mean_sd(values('plain', 'miou'))} | {_mean_sd(values('arcd', 'miou'))} "
                f"| {_signed(delta('miou'))} | {_signed(delta('miou_defects'))} "
                f"| {_signed(delta('mpa'))} | {_signed(delta('pixel_auroc'))} "
                f"| {'–' if gain is None else f'{gain:+.3f}'} |")
    return "\n".join(lines)


def _signed(text: str) -> str:
    return text if text.startswith(("-", "–")) else "+" + text


def plot(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    complete = pairs(data)
    thesis = data.get("thesis", {})
    rates = sorted({c.labels for c in complete}, reverse=True)
    if not rates:
        raise PairsError("no complete pair (ARCD and plain of one backbone, rate and seed) to plot")
    fig, axes = plt.subplots(1, len(rates), figsize=(5 * len(rates), 4), sharey=True, squeeze=False)
    for ax, labels in zip(axes[0], rates):
        # each kind labelled once per panel, on the first thing drawn of it
        legend = {"measured": "measured, one seed each", "thesis": "thesis (its private data)"}
        for x, backbone in enumerate(BACKBONES):
            cells = [c for c in complete if c.backbone == backbone and c.labels == labels]
            deltas = [complete[c]["arcd"]["metrics"]["miou"] - complete[c]["plain"]["metrics"]["miou"]
                      for c in cells]
            if deltas:
                ax.scatter([x] * len(deltas), deltas, color="tab:blue", zorder=3,
                           label=legend.pop("measured", None))
            gain = thesis.get(backbone, {}).get(f"{round(labels * 100)}")
            if gain is not None:
                ax.bar(x, gain, width=0.5, color="tab:orange", alpha=0.5,
                       label=legend.pop("thesis", None))
        ax.axhline(0.0, color="black", linewidth=0.8)
        ax.set_xticks(range(len(BACKBONES)), [LABELS[b] for b in BACKBONES])
        ax.set_title(f"{labels:.0%} labelled")
        ax.set_ylabel("ARCD − plain MIoU")
        ax.legend(loc="upper left", fontsize=8)
    fig.suptitle("ARCD − plain MIoU per D backbone: measured on NEU-Seg val, and the thesis's gain",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def add(path: Path, eval_json: Path, backbone: str, model: str, labels: float, seed: int,
        config: str, train: str | None) -> dict:
    """Append one evaluated run, its figures read from ``inspector evaluate --json`` output."""
    data = load(path)
    try:
        result = json.loads(eval_json.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise PairsError(f"{eval_json}: cannot read an evaluate JSON ({exc})") from None
    missing = [m for m in METRICS if not isinstance(result.get(m), (int, float))]
    if missing:
        raise PairsError(f"{eval_json}: not an `inspector evaluate --json` result "
                         f"(missing {', '.join(missing)})")
    run = {"name": Path(config).stem, "backbone": backbone, "model": model, "labels": labels,
           "seed": seed, "config": config,
           "metrics": {m: round(result[m], 4) for m in METRICS}
           | {"per_class_iou": {k: None if v is None else round(v, 4)  # None: class absent
                                for k, v in result.get("per_class_iou", {}).items()}},
           "images": result.get("images"), "split": (result.get("data") or {}).get("split"),
           "engine": result.get("engine"), "source": f"inspector evaluate --json ({eval_json.name})"}
    if train:
        run["train"] = train
    data["runs"].append(run)
    validate(data, path)  # a duplicate cell is refused before the file is touched
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n")
    tmp.replace(path)
    return run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=Path, default=DEFAULT_JSON, help="the pairs JSON")
    parser.add_argument("--out", type=Path, help="folder for arcd-pairs.png (and the table as .md)")
    parser.add_argument("--add", type=Path, metavar="EVAL_JSON",
                        help="append a run from `inspector evaluate --json` output")
    parser.add_argument("--backbone", choices=BACKBONES)
    parser.add_argument("--model", choices=MODELS)
    parser.add_argument("--labels", type=float, help="labelled-data fraction, e.g. 0.3")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--config", help="the training config the run used")
    parser.add_argument("--train", help="how long training took, in words")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if args.add:
            needed = {"--backbone": args.backbone, "--model": args.model,
                      "--labels": args.labels, "--seed": args.seed, "--config": args.config}
            absent = [k for k, v in needed.items() if v is None]
            if absent:
                parser.error(f"--add needs {', '.join(absent)}")
            run = add(args.pairs, args.add, args.backbone, args.model, args.labels, args.seed,
                      args.config, args.train)
            log.info("added %s (%s, %s, %.0f%%, seed %d): MIoU %.4f", run["name"], args.backbone,
                     args.model, args.labels * 100, args.seed, run["metrics"]["miou"])
        data = load(args.pairs)
        text = table(data)
        sys.stdout.write(text + "\n")
        if args.out:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "arcd-pairs.md").write_text(text + "\n")
            plot(data, args.out / "arcd-pairs.png")
            log.info("wrote %s and %s", args.out / "arcd-pairs.md", args.out / "arcd-pairs.png")
    except PairsError as exc:
        log.error("%s", exc)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
