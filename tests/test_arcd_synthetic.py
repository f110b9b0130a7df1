"""ARCD stage 2 with generated pairs mixed in (``data.synthetic_root``, issue #9)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from test_arcd_neu import neu_folder

torch = pytest.importorskip("torch")

from export.arcd.data import FolderDataConfig, build_data  # noqa: E402
from export.arcd.simulation import SimulationConfig  # noqa: E402
from export.augment.dataset import PairWriter, labelled_subset  # noqa: E402


def synthetic_folder(root, n: int = 10, size: int = 64, level: int = 240):
    """Generated pairs in the NEU layout: bright images (so a test can tell them from the dark-
    defect real ones), a class-2 square each."""
    w = PairWriter(root, "testgen", config={"why": "test"})
    for _ in range(n):
        img = np.full((size, size), level, np.uint8)
        mask = np.zeros((size, size), np.uint8)
        mask[20:40, 20:40] = 2
        w.add(img, mask, source="test")
    w.close()
    return root


def data_for(real, **kw):
    cfg = FolderDataConfig(source="neu-seg", root=str(real), calib_images=2, normal_patch=32,
                           train_crop=(32, 32), focus_prob=0.0, **kw)
    return build_data(cfg, tile=(32, 32), channels=1, mean=[0.0], std=[1.0],
                      simulation=SimulationConfig(clean_prob=0.0), stage1_length=4,
                      stage2_length=400, seed=0)


def test_a_share_of_stage2_frames_comes_from_the_generated_pairs(tmp_path):
    real = neu_folder(tmp_path / "neu", n=40)
    syn = synthetic_folder(tmp_path / "syn")
    data = data_for(real, synthetic_root=str(syn), synthetic_ratio=0.3)
    assert "mixed with 30% generated pairs" in data.description
    bright = [float(data.stage2[i]["image"].mean()) > 0.85 for i in range(300)]
    assert 0.2 < np.mean(bright) < 0.4
    # none at ratio 0; the real data alone without synthetic_root
    data0 = data_for(real, synthetic_root=str(syn), synthetic_ratio=0.0)
    assert not any(float(data0.stage2[i]["image"].mean()) > 0.85 for i in range(100))
    # synthetic_limit keeps the first pairs only
    limited = data_for(real, synthetic_root=str(syn), synthetic_limit=3)
    assert "3 of 10 images" in limited.description


def test_bad_synthetic_folders_are_errors_naming_the_key(tmp_path):
    real = neu_folder(tmp_path / "neu", n=20)
    with pytest.raises(ValueError, match="data.synthetic_root"):
        data_for(real, synthetic_root=str(tmp_path / "nope"))
    syn = synthetic_folder(tmp_path / "syn", n=2)
    man = json.loads((syn / "manifest.json").read_text())
    man["classes"] = ["background", "crack"]
    (syn / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(ValueError, match="classes"):
        data_for(real, synthetic_root=str(syn))
    with pytest.raises(ValueError, match="synthetic_root is for source 'neu-seg'"):
        FolderDataConfig(source="magnetic-tile", root="x", synthetic_root=str(syn))


def test_pair_writer_checks_pairs_and_refuses_to_overwrite(tmp_path):
    w = PairWriter(tmp_path / "out", "g")
    with pytest.raises(ValueError, match="differ in size"):
        w.add(np.zeros((8, 8), np.uint8), np.zeros((8, 9), np.uint8))
    with pytest.raises(ValueError, match="beyond"):
        w.add(np.zeros((8, 8), np.uint8), np.full((8, 8), 4, np.uint8))
    stem = w.add(np.zeros((8, 8), np.uint8), np.ones((8, 8), np.uint8))
    assert stem.startswith("syn-g-")
    w.close()
    with pytest.raises(FileExistsError, match="manifest"):
        PairWriter(tmp_path / "out", "g")


def test_labelled_subset_is_the_one_arcd_trains_on(tmp_path):
    real = neu_folder(tmp_path / "neu", n=40)
    neu_folder(real, n=10, subset="test", first=1000)  # NEU-Seg's own test folder: never trained on
    sub = labelled_subset(real, 0.3, seed=0)
    data = data_for(real, label_fraction=0.3)
    assert f"{len(sub)} of" in data.description
    assert {e.category for e in sub.entries} == {"training"}


def test_measure_cli_reports_diversity_against_real_images(tmp_path):
    from conftest import run_cli

    real = neu_folder(tmp_path / "neu", n=12)
    syn = synthetic_folder(tmp_path / "syn", n=6)
    r = run_cli("augment", "measure", "--pairs", str(syn), "--reference", str(real),
                "--reference-split", "all", "--out", str(tmp_path / "m.json"))
    assert r.returncode == 0, r.stderr
    res = json.loads((tmp_path / "m.json").read_text())
    # the generated images here are all the same flat image: no diversity at all
    assert res["generated"]["diversity"] == 0.0 and res["reference"]["diversity"] > 0
    assert res["ratio"] == 0.0
    r = run_cli("augment", "measure", "--pairs", str(tmp_path / "nope"))
    assert r.returncode == 2 and "--pairs" in r.stderr
