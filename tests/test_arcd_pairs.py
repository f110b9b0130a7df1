"""benchmarks/arcd_pairs.py: the thesis-form table of ARCD against the plain D per backbone.

A pair enters from real ``inspector evaluate --json`` output (the hand-built dark-spot bundle on a
tiny NEU-layout folder); the table's differences follow from the rows; bad rows are refused
naming the file and the row, and the pairs file is left as it was.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, run_cli
from test_arcd_neu import neu_folder

sys.path.insert(0, str(ROOT / "benchmarks"))
import arcd_pairs  # noqa: E402


def _pairs_file(path: Path, runs: list[dict]) -> Path:
    path.write_text(json.dumps({"what": "test", "thesis": {"unet": {"30": 0.0613}}, "runs": runs}))
    return path


def _run(backbone: str, model: str, labels: float, seed: int, miou: float, **extra) -> dict:
    metrics = {"miou": miou, "miou_defects": miou - 0.05, "mpa": 0.9, "pixel_auroc": 0.99, "f1": 0.8}
    return {"name": f"{model}-{seed}", "backbone": backbone, "model": model, "labels": labels,
            "seed": seed, "metrics": metrics | extra}


@pytest.fixture(scope="module")
def eval_json(tmp_path_factory, toy_bundle) -> Path:
    """What `inspector evaluate --json` prints for a real bundle on a tiny NEU-layout folder."""
    tmp = tmp_path_factory.mktemp("pairs-eval")
    root = neu_folder(tmp / "neu", n=4, size=128, n_classes=1)
    p = run_cli("evaluate", "--bundle", str(toy_bundle), "--data", str(root), "--format", "neu-seg",
                "--split", "all", "--json", "--threads", "1")
    assert p.returncode == 0, p.stderr[-2000:]
    out = tmp / "toy.eval.json"
    out.write_text(p.stdout)
    return out


def test_shipped_pairs_file_loads_and_every_cell_is_a_pair():
    data = arcd_pairs.load(arcd_pairs.DEFAULT_JSON)
    complete = arcd_pairs.pairs(data)
    assert complete, "the shipped file holds no complete pair"
    cells = {(r["backbone"], float(r["labels"]), r["seed"]) for r in data["runs"]}
    assert cells == {(c.backbone, c.labels, c.seed) for c in complete}, "a run without its twin"
    assert "| U-Net | 30% |" in arcd_pairs.table(data)


def test_table_gives_mean_and_spread_of_the_per_seed_differences(tmp_path):
    path = _pairs_file(tmp_path / "p.json", [
        _run("unet", "plain", 0.3, 1, 0.78), _run("unet", "arcd", 0.3, 1, 0.80),
        _run("unet", "plain", 0.3, 2, 0.79), _run("unet", "arcd", 0.3, 2, 0.77),
        _run("segnet", "arcd", 0.3, 1, 0.70),          # no plain twin: not a pair, not in the table
    ])
    data = arcd_pairs.load(path)
    rows = [line for line in arcd_pairs.table(data).splitlines() if line.startswith("| U-Net")]
    assert len(rows) == 1
    cols = [c.strip() for c in rows[0].strip("|").split("|")]
    # differences +0.02 and -0.02: mean 0, sample standard deviation 0.028
    assert cols[1:6] == ["30%", "1, 2", "0.785 ± 0.007", "0.785 ± 0.021", "+0.000 ± 0.028"]
    assert cols[-1] == "+0.061"
    assert "SegNet" not in arcd_pairs.table(data)


def test_add_reads_evaluate_json_and_draws_table_and_plot(tmp_path, eval_json):
    path = _pairs_file(tmp_path / "p.json", [_run("segnet", "plain", 0.3, 1, 0.5)])
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "arcd_pairs.py"), "--pairs",
                        str(path), "--add", str(eval_json), "--backbone", "segnet", "--model", "arcd",
                        "--labels", "0.3", "--seed", "1", "--config", "configs/x.yaml",
                        "--train", "1 min", "--out", str(tmp_path / "out")],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    evaluated = json.loads(eval_json.read_text())
    added = json.loads(path.read_text())["runs"][-1]
    assert added["metrics"]["miou"] == round(evaluated["miou"], 4)
    assert added["metrics"]["per_class_iou"]["inclusion"] == round(
        evaluated["per_class_iou"]["inclusion"], 4)
    assert added["engine"] == evaluated["engine"] and added["train"] == "1 min"
    assert added["split"] == "all" and added["images"] == 4
    assert "| SegNet | 30% | 1 |" in p.stdout
    assert (tmp_path / "out" / "arcd-pairs.png").stat().st_size > 1000
    assert (tmp_path / "out" / "arcd-pairs.md").read_text().strip() == p.stdout.strip()


def test_bad_rows_are_refused_naming_them_and_the_file_is_kept(tmp_path, eval_json):
    path = _pairs_file(tmp_path / "p.json", [_run("unet", "arcd", 0.3, 1, 0.7)])
    before = path.read_text()
    # the same cell twice
    with pytest.raises(arcd_pairs.PairsError, match=r"a second row for \('unet', 'arcd', 0.3, 1\)"):
        arcd_pairs.add(path, eval_json, "unet", "arcd", 0.3, 1, "c.yaml", None)
    # not an evaluate result
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"miou": 0.5}))
    with pytest.raises(arcd_pairs.PairsError, match=r"other.json: not an `inspector evaluate --json`"):
        arcd_pairs.add(path, other, "unet", "plain", 0.3, 1, "c.yaml", None)
    assert path.read_text() == before and not path.with_suffix(".tmp").exists()

    bad = _pairs_file(tmp_path / "bad.json", [_run("resnet", "arcd", 0.3, 1, 0.7)])
    with pytest.raises(arcd_pairs.PairsError, match=r"bad.json: runs\[0\] \(arcd-1\): backbone 'resnet'"):
        arcd_pairs.load(bad)
    (tmp_path / "broken.json").write_text("{")
    assert arcd_pairs.main(["--pairs", str(tmp_path / "broken.json")]) == 2
    assert arcd_pairs.main(["--pairs", str(tmp_path / "absent.json")]) == 2
    # runs without their twin: a table with no rows, and no plot rather than a crash
    lone = _pairs_file(tmp_path / "lone.json", [_run("segnet", "arcd", 0.3, 1, 0.7)])
    assert arcd_pairs.main(["--pairs", str(lone), "--out", str(tmp_path / "lone-out")]) == 2
    assert not (tmp_path / "lone-out" / "arcd-pairs.png").exists()
