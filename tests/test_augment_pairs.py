"""Folders of generated pairs (export/augment/dataset.py) and who reads them: the writer leaves
no output behind a failed run and never writes into a folder that holds something, ARCD's
``data.synthetic_root`` reads only what a finished run's manifest lists, and ``inspector augment
measure`` refuses a --max-images it cannot use."""

from __future__ import annotations

import json

import numpy as np
import pytest

from test_arcd_neu import neu_folder

torch = pytest.importorskip("torch")

from export.augment.dataset import PairWriter  # noqa: E402
from test_arcd_synthetic import data_for, synthetic_folder  # noqa: E402


def pair(level: int = 200):
    img = np.full((64, 64), level, np.uint8)
    mask = np.zeros((64, 64), np.uint8)
    mask[20:40, 20:40] = 2
    return img, mask


def test_pairs_go_to_the_output_only_when_the_writer_closes(tmp_path):
    out = tmp_path / "out"
    w = PairWriter(out, "g")
    w.add(*pair())
    assert not out.exists()  # written beside it, out of sight of readers
    path = w.close(note="x")
    assert path == out / "manifest.json" and json.loads(path.read_text())["note"] == "x"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # the temporary folder is gone
    from export.augment.dataset import open_pairs

    assert len(open_pairs(out)[0]) == 1

    with pytest.raises(RuntimeError):  # an error inside `with`: nothing is left
        with PairWriter(tmp_path / "failed", "g") as w:
            w.add(*pair())
            raise RuntimeError("boom")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize("holds", ["manifest", "data set", "other"])
def test_an_output_that_holds_something_is_refused_untouched(tmp_path, holds):
    out = tmp_path / "out"
    if holds == "manifest":
        synthetic_folder(out, n=2)
    elif holds == "data set":
        neu_folder(out, n=3)  # a real NEU-Seg root: images/ and annotations/, no manifest
    else:
        out.mkdir()
        (out / "notes.txt").write_text("mine")
    before = sorted((p.relative_to(out), p.read_bytes()) for p in out.rglob("*") if p.is_file())
    with pytest.raises(FileExistsError, match=holds if holds != "other" else "not empty") as e:
        PairWriter(out, "g")
    assert str(out) in str(e.value)
    assert sorted((p.relative_to(out), p.read_bytes()) for p in out.rglob("*") if p.is_file()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_synthetic_root_needs_the_manifest_and_reads_only_its_pairs(tmp_path):
    """A folder of pairs without manifest.json (a sample stopped half-way) was read anyway, and
    so were pairs on disk the manifest does not list (left from another run)."""
    import cv2

    real = neu_folder(tmp_path / "neu", n=20)
    syn = synthetic_folder(tmp_path / "syn", n=3)
    for i in (3, 4):  # stale pairs beside the finished run's
        img, mask = pair(240)
        cv2.imwrite(str(syn / "images" / "training" / f"syn-testgen-{i:06d}.jpg"), img)
        cv2.imwrite(str(syn / "annotations" / "training" / f"syn-testgen-{i:06d}.png"), mask)
    data = data_for(real, synthetic_root=str(syn), synthetic_ratio=0.3)
    assert "3 of 3 images" in data.description, data.description

    (syn / "manifest.json").unlink()
    with pytest.raises(ValueError, match="data.synthetic_root") as e:
        data_for(real, synthetic_root=str(syn))
    assert str(syn) in str(e.value) and "manifest.json" in str(e.value)

    gone = synthetic_folder(tmp_path / "gone", n=3)
    (gone / "images" / "training" / "syn-testgen-000001.jpg").unlink()
    with pytest.raises(ValueError, match="syn-testgen-000001"):
        data_for(real, synthetic_root=str(gone))


def test_measure_refuses_max_images_below_two_naming_it(tmp_path, capsys):
    from inspector.cli import main as inspector_main

    syn = synthetic_folder(tmp_path / "syn", n=4)
    for bad in ("1", "0", "-3", "x"):
        with pytest.raises(SystemExit) as e:
            inspector_main(["augment", "measure", "--pairs", str(syn), "--max-images", bad])
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert "--max-images" in err, err
    assert inspector_main(["augment", "measure", "--pairs", str(syn), "--max-images", "2"]) == 0
    assert json.loads(capsys.readouterr().out)["generated"]["images"] == 2
