"""A JPEG cut short is refused by name, not decoded into flat grey rows (walkthrough F1): by the
data-set readers (training, evaluation, calibration) and by the replay source."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from inspector.errors import FrameError
from inspector.evaluation.datasets import open_dataset, read_image
from inspector.sources.replay import ReplayConfig, ReplaySource


def jpeg(path, h=96, w=128, seed=0):
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 255, (h, w), dtype=np.uint8)
    ok, buf = cv2.imencode(".jpg", img)
    assert ok
    path.write_bytes(buf.tobytes())
    return img


def test_a_truncated_jpeg_is_an_error_naming_it_and_a_padded_one_reads(tmp_path):
    good = tmp_path / "good.jpg"
    jpeg(good)
    data = good.read_bytes()
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(data[: len(data) // 2])
    # what OpenCV alone makes of it: an image, its lower half invented
    assert cv2.imread(str(cut), cv2.IMREAD_GRAYSCALE) is not None
    with pytest.raises(ValueError, match=f"{cut}: cannot read the image \\(missing, truncated"):
        read_image(cut)
    padded = tmp_path / "padded.jpg"
    padded.write_bytes(data + b"\0" * 16)  # some writers pad after the end marker
    assert np.array_equal(read_image(padded), read_image(good))
    assert read_image(good).shape == (96, 128)


def test_a_folder_data_set_with_a_truncated_jpeg_names_it_on_load(tmp_path):
    (tmp_path / "normal").mkdir()
    for i in range(3):
        jpeg(tmp_path / "normal" / f"n{i}.jpg", seed=i)
    data = (tmp_path / "normal" / "n1.jpg").read_bytes()
    (tmp_path / "normal" / "n1.jpg").write_bytes(data[:-200])
    ds = open_dataset("folder", tmp_path / "normal")
    i = [e.stem for e in ds.entries].index("n1")
    with pytest.raises(ValueError, match="n1.jpg: cannot read the image"):
        ds.load(i)


def test_the_replay_source_drops_a_truncated_frame_naming_its_file(tmp_path):
    for i in range(3):
        jpeg(tmp_path / f"f{i}.jpg", seed=i)
    data = (tmp_path / "f1.jpg").read_bytes()
    (tmp_path / "f1.jpg").write_bytes(data[: len(data) // 3])
    src = ReplaySource(ReplayConfig(path=str(tmp_path), fps=0), "cam")
    with src:
        assert src.read().meta["file"] == "f0.jpg"
        with pytest.raises(FrameError, match="f1.jpg: missing, truncated or not an image"):
            src.read()
        assert src.read().meta["file"] == "f2.jpg"
