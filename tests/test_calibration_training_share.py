"""Calibrating on the model's own training images is warned about (walkthrough F13): with the
default --calib-fraction the calibration part of --normal takes every image not held back,
which holds the hash 'train' share a clgan / fuzzymask model was trained on."""

from __future__ import annotations

import shutil

import cv2
import numpy as np
import yaml

from calibration.frames import Split, training_share_warning
from conftest import run_cli

CLGAN_PROV = {"data": ["magnetic-tile /data/mt split=train: 321 images"],
              "training_config": {"data": {"sources": [{"format": "magnetic-tile", "root": "mt",
                                                        "split": "train"}],
                                           "split_test": 0.3, "split_val": 0.2}}}


def test_the_default_calibration_part_is_warned_and_the_readme_recipe_is_not():
    said = training_share_warning(CLGAN_PROV, Split(0.3, None), "--normal mt/MT_Free/Imgs")
    assert said.startswith("--normal mt/MT_Free/Imgs: if this is the model's training folder "
                           "(magnetic-tile /data/mt split=train: 321 images): the calibration part is "
                           "every image not held back, which includes the hash share(s) 'train' [0.5, 1)")
    assert said.endswith("pass --calib-fraction 0.2 to stop short of it")
    assert training_share_warning(CLGAN_PROV, Split(0.3, 0.2), "--normal x") is None  # README recipe
    # holding back test + val leaves the calibration part all 'train' (the first version said nothing)
    assert "'train' [0.5, 1)" in training_share_warning(CLGAN_PROV, Split(0.5, None), "--normal x")
    # the model's own fractions decide where its train share starts
    other = {**CLGAN_PROV, "split_fractions": {"test": 0.2, "val": 0.1}}
    assert "'train' [0.3, 1)" in training_share_warning(other, Split(0.1, None), "--normal x")
    # a model not trained on normal-image sources (ARCD: labelled defects), or none recorded
    assert training_share_warning({"training_config": {"data": {"source": "neu-seg"}}}, Split(), "n") is None
    assert training_share_warning({}, Split(), "n") is None


def _prov(split):
    return {**CLGAN_PROV, "training_config": {"data": {**CLGAN_PROV["training_config"]["data"], "sources": [
        {"format": "folder", "root": "normal", "split": split}]}}}


def test_a_model_trained_on_other_shares_is_warned_by_the_share_it_trained_on():
    # split all: every image is a training image, whatever the fractions (the advice to stop
    # short of 'train' would have silenced the warning and still calibrated on training images)
    for sp in (Split(0.3, None), Split(0.3, 0.2)):
        said = training_share_warning(_prov("all"), sp, "--normal n")
        assert "trained on every image of its sources (split all" in said and "--calib-fraction" not in said
    # split val: the README recipe's calibration part is exactly that share
    said = training_share_warning(_prov("val"), Split(0.3, 0.2), "--normal n")
    assert "hash [0.3, 0.5), which includes the hash share(s) 'val' [0.3, 0.5)" in said
    assert said.endswith("choose --check-fraction / --calib-fraction clear of those shares")
    # split test: the held-back check part is the training share (the first version said nothing)
    said = training_share_warning(_prov("test"), Split(0.3, 0.2), "--normal n")
    assert "the calibration part" not in said
    assert "the held-back check part (hash [0, 0.3)) includes the hash share(s) 'test' [0, 0.3)" in said


def test_calibrate_thresholds_says_it_before_it_runs(tmp_path, toy_bundle):
    bundle = tmp_path / "b"
    shutil.copytree(toy_bundle, bundle)
    meta = yaml.safe_load((bundle / "bundle.yaml").read_text())
    meta["provenance"] = CLGAN_PROV
    (bundle / "bundle.yaml").write_text(yaml.safe_dump(meta, sort_keys=False))
    normal = tmp_path / "normal"
    normal.mkdir()
    rng = np.random.default_rng(0)
    for i in range(12):
        cv2.imwrite(str(normal / f"n{i:02d}.png"), rng.integers(120, 136, (128, 128), dtype=np.uint8))
    done = run_cli("calibrate", "thresholds", "--bundle", str(bundle), "--normal", str(normal),
                   "--target-fpr", "0.1", "--dry-run", "--out", str(tmp_path / "out"))
    assert f"--normal {normal}: if this is the model's training folder" in done.stderr, done.stderr
    assert "the calibration part is every image not held back" in done.stderr
    done = run_cli("calibrate", "thresholds", "--bundle", str(bundle), "--normal", str(normal),
                   "--target-fpr", "0.1", "--dry-run", "--out", str(tmp_path / "out2"),
                   "--check-fraction", "0.3", "--calib-fraction", "0.2")
    assert "training folder" not in done.stderr
