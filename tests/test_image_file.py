"""A JPEG cut short is refused by name, not decoded into flat grey rows (walkthrough F1): by the
data-set readers (training, evaluation, calibration) and by the replay source."""

from __future__ import annotations

import zlib

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
    with pytest.raises(ValueError, match=f"{cut}: cannot read the image \\(truncated JPEG: no end-of-image"):
        read_image(cut)
    for trailer in (b"\0" * 16, b"\0" * 4000, b"SEFT" + bytes(range(256)) * 8):
        padded = tmp_path / "padded.jpg"  # sector padding, a vendor trailer after the end marker
        padded.write_bytes(data + trailer)
        assert np.array_equal(read_image(padded), read_image(good))
    assert read_image(good).shape == (96, 128)
    # a JPEG inside the header (an EXIF thumbnail) ends with a marker of its own: not the image's
    thumb = cv2.imencode(".jpg", np.zeros((8, 8), np.uint8))[1].tobytes()
    payload = b"Exif\0\0" + thumb
    app1 = b"\xff\xe1" + (len(payload) + 2).to_bytes(2, "big") + payload
    with_thumb = data[:2] + app1 + data[2:]
    (tmp_path / "thumb.jpg").write_bytes(with_thumb)
    assert np.array_equal(read_image(tmp_path / "thumb.jpg"), read_image(good))
    (tmp_path / "thumb_cut.jpg").write_bytes(with_thumb[: len(with_thumb) - len(data) // 2])
    with pytest.raises(ValueError, match="truncated JPEG"):
        read_image(tmp_path / "thumb_cut.jpg")
    # the reason, not a guess among three
    with pytest.raises(ValueError, match="gone.jpg: cannot read the image \\(No such file or directory\\)"):
        read_image(tmp_path / "gone.jpg")
    png = cv2.imencode(".png", np.random.default_rng(1).integers(0, 255, (64, 64), dtype=np.uint8))[1].tobytes()
    (tmp_path / "cut.png").write_bytes(png[: len(png) // 2])
    with pytest.raises(ValueError, match="cut.png: cannot read the image \\(truncated PNG: no IEND chunk\\)"):
        read_image(tmp_path / "cut.png")
    # the four letters inside a text chunk ahead of the image data do not make a cut file whole
    text = b"Comment\0an IEND inside"
    chunk = len(text).to_bytes(4, "big") + b"tEXt" + text + zlib.crc32(b"tEXt" + text).to_bytes(4, "big")
    with_text = png[:33] + chunk + png[33:]  # after the signature and IHDR
    (tmp_path / "text_ok.png").write_bytes(with_text)
    assert read_image(tmp_path / "text_ok.png").shape[:2] == (64, 64)
    (tmp_path / "text_cut.png").write_bytes(with_text[: len(with_text) // 2])
    with pytest.raises(ValueError, match="text_cut.png: cannot read the image \\(truncated PNG: no IEND chunk\\)"):
        read_image(tmp_path / "text_cut.png")
    (tmp_path / "text.png").write_text("not an image")
    with pytest.raises(ValueError, match="text.png: cannot read the image \\(not an image OpenCV can decode\\)"):
        read_image(tmp_path / "text.png")


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
        with pytest.raises(FrameError, match="f1.jpg: truncated JPEG: no end-of-image marker"):
            src.read()
        assert src.read().meta["file"] == "f2.jpg"
