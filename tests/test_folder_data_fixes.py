"""Folder data as users point at it. A .png beside a same-name image is that image's mask (the
magnetic-tile layout), not a frame: replay, `evaluate --format folder` and `calibrate --normal`
all leave it out, and say so. A missing NEU-Seg root, and a bad `--set` value of a kind key."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np

from conftest import ROOT, run_cli


def _folder(root: Path) -> Path:
    """a.jpg with its mask a.png (another size, all black: what MT_Free holds), b.jpg, and a
    lone c.png, which is an image."""
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in ("a.jpg", "b.jpg", "c.png"):
        cv2.imwrite(str(root / name), rng.integers(90, 140, (64, 96), dtype=np.uint8))
    cv2.imwrite(str(root / "a.png"), np.zeros((40, 50), np.uint8))
    return root


def test_folder_dataset_and_calibration_leave_out_the_masks(tmp_path):
    from calibration.frames import Split, normal_folder
    from inspector.evaluation.datasets import image_folder

    root = _folder(tmp_path / "imgs")
    ds = image_folder(root)
    assert sorted(e.image.name for e in ds.entries) == ["a.jpg", "b.jpg", "c.png"]
    assert ds.notes == ["1 .png file(s) beside a same-name image taken as masks and skipped"]
    fs = normal_folder(root, Split())
    assert sorted(Path(it.path).name for it in fs.items) == ["a.jpg", "b.jpg", "c.png"]
    assert fs.notes == ds.notes


def test_replay_does_not_play_the_masks(tmp_path, caplog):
    from inspector.sources.replay import ReplayConfig, ReplaySource

    root = _folder(tmp_path / "imgs")
    with caplog.at_level("WARNING"):
        with ReplaySource(ReplayConfig(path=str(root), fps=0), camera_id="c1") as src:
            shapes = [f.image.shape for f in src]
            assert "(3 images)" in src.describe()
    assert shapes == [(64, 96)] * 3  # the 40x50 mask used to be played and dropped as bad
    assert any("1 .png file(s) beside a same-name image taken as its mask and not played"
               in r.getMessage() for r in caplog.records)


def test_evaluate_format_folder_counts_each_image_once(tmp_path):
    root = _folder(tmp_path / "imgs")
    done = run_cli("evaluate", "--bundle", str(ROOT / "deploy" / "models" / "fuzzymask-mt"),
                   "--data", str(root), "--format", "folder", "--json")
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["images"] == 3  # it was 4: the mask scored as a defect-free frame
    assert out["data"]["notes"] == ["1 .png file(s) beside a same-name image taken as masks and skipped"]


def test_a_neu_seg_root_that_is_not_there_is_named_as_missing(tmp_path, monkeypatch):
    """Not as a layout problem: the usual cause is a relative path from another folder."""
    import pytest

    from inspector.evaluation.datasets import neu_seg

    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError) as e:
        neu_seg("../shared/data/neu_seg")
    assert str(e.value) == ("../shared/data/neu_seg: NEU-Seg root not found (expected images/ and "
                            f"annotations/ folders in it; a relative path is taken from {tmp_path})")


def test_set_with_a_bad_value_of_a_kind_key_says_what_is_wrong_with_the_value(tmp_path):
    """`--set ssim_window=10` on a fuzzymask bundle: the key exists, its value is refused; the
    message used to say the key was neither a post-processing nor a kind key."""
    root = _folder(tmp_path / "imgs")
    args = ("evaluate", "--bundle", str(ROOT / "deploy" / "models" / "fuzzymask-mt"), "--data", str(root),
            "--format", "folder")
    done = run_cli(*args, "--set", "ssim_window=10")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == "inspector: error: --set ssim_window: must be odd (got 10)"
    done = run_cli(*args, "--set", "no_such_key=1")
    assert done.returncode == 2 and "--set no_such_key: neither a post-processing key" in done.stderr
