"""ReplaySource on real image files and a real video written with OpenCV."""

from __future__ import annotations

import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from inspector.errors import FrameError, SourceError
from inspector.sources import make_source
from inspector.sources.replay import ReplayConfig, ReplaySource


def write_images(folder: Path, names: list[str], h: int = 24, w: int = 32) -> None:
    """PNG i is filled with grey level 10*(i+1), so order can be checked from the pixels."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        img = np.full((h, w, 3), 10 * (i + 1), np.uint8)
        img[:, :, 2] = 200  # red in OpenCV's BGR: lets the rgb test see the channel order
        assert cv2.imwrite(str(folder / name), img)


def levels(frames) -> list[int]:
    return [int(f.image[0, 0]) if f.image.ndim == 2 else int(f.image[0, 0, 1]) for f in frames]


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    d = tmp_path / "rec"
    write_images(d, ["f1.png", "f2.png", "f3.png"])
    (d / "notes.txt").write_text("not an image")
    (d / "masks").mkdir()
    return d


def replay(path: Path | str, **kw) -> ReplaySource:
    return ReplaySource(ReplayConfig(path=str(path), fps=0, **kw), camera_id="cam1")


def test_folder_plays_once_in_name_order(folder: Path):
    with replay(folder) as src:
        frames = list(src)
        assert src.read() is None
    assert [f.meta["file"] for f in frames] == ["f1.png", "f2.png", "f3.png"]
    assert [f.frame_id for f in frames] == [0, 1, 2]
    assert frames[0].image.shape == (24, 32) and frames[0].image.dtype == np.uint8
    assert frames[0].strip_pos_mm == 0.0


def test_natural_order_and_pattern(tmp_path: Path):
    write_images(tmp_path, ["f10.png", "f2.png", "f1.png", "skip.png"])
    with replay(tmp_path, pattern="f*") as src:
        assert [f.meta["file"] for f in src] == ["f1.png", "f2.png", "f10.png"]


def test_rgb_is_rgb_order(folder: Path):
    with replay(folder, color="rgb") as src:
        frame = src.read()
    assert frame.image.shape == (24, 32, 3)
    assert frame.image[0, 0, 0] == 200  # red first
    assert frame.image[0, 0, 2] == 10


def test_loop_keeps_ids_rising_and_frames_limit(folder: Path):
    cfg = ReplayConfig(path="rec", fps=0, loop=True, frames=7, mm_per_px_along=0.5)
    src = make_source(cfg, camera_id="cam1", base_dir=folder.parent)
    with src:
        frames = list(src)
    assert [f.frame_id for f in frames] == list(range(7))
    assert [f.meta["file"] for f in frames] == ["f1.png", "f2.png", "f3.png"] * 2 + ["f1.png"]
    assert [f.meta["loop"] for f in frames] == [0, 0, 0, 1, 1, 1, 2]
    assert frames[2].strip_pos_mm == pytest.approx(2 * 24 * 0.5)


def test_corrupt_image_is_a_frame_error_then_replay_goes_on(folder: Path):
    (folder / "f2.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with replay(folder) as src:
        assert src.read().meta["file"] == "f1.png"
        with pytest.raises(FrameError, match="f2.png"):
            src.read()
        nxt = src.read()
        assert nxt.meta["file"] == "f3.png" and nxt.frame_id == 2
        assert src.read() is None


def test_a_recording_that_goes_away_is_a_lost_camera_and_comes_back_with_it(folder: Path):
    # one missing file stays a bad frame; the whole folder gone is the camera gone (the pipeline
    # reopens with backoff and the camera_down alarm can fire), not a dropped frame per read
    gone = folder.with_name("moved")
    with replay(folder, loop=True) as src:
        assert src.read().meta["file"] == "f1.png"
        folder.rename(gone)
        with pytest.raises(SourceError, match=r"replay path .* \(source.path\) is gone"):
            src.read()
        with pytest.raises(SourceError, match="not found"):
            src.open()
        gone.rename(folder)
        src.open()
        assert src.read().meta["file"] == "f1.png"
        # an unmounted drive leaves its mount folder behind, empty: gone all the same
        for f in folder.iterdir():
            f.rename(gone.parent / f"moved-{f.name}")
        with pytest.raises(SourceError, match="is gone"):
            src.read()


def test_missing_path_and_empty_folder(tmp_path: Path):
    with pytest.raises(SourceError, match=r"source.path"):
        replay(tmp_path / "nope").open()
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("x")
    with pytest.raises(SourceError) as err:
        replay(empty).open()
    assert "source.path" in str(err.value) and str(empty) in str(err.value)


def test_file_that_is_not_a_video(tmp_path: Path):
    bogus = tmp_path / "clip.avi"
    bogus.write_bytes(b"definitely not a video")
    with pytest.raises(SourceError, match="source.path"):
        replay(bogus).open()


def test_pacing_and_no_burst_after_a_stall(folder: Path, monkeypatch):
    import types

    import inspector.sources.replay as replay_module
    slept: list[float] = []  # the source's waits, seen through its clock (real time all the same)

    def sleep(s):
        slept.append(s)
        time.sleep(s)
    clock = types.SimpleNamespace(**{k: getattr(time, k) for k in dir(time) if not k.startswith("_")})
    clock.sleep = sleep
    monkeypatch.setattr(replay_module, "time", clock)
    with replay(folder, loop=True) as src:  # fps=0 first: must not sleep
        for _ in range(6):
            src.read()
    assert slept == []
    src = ReplaySource(ReplayConfig(path=str(folder), fps=20.0, loop=True), camera_id="cam1")
    with src:
        src.read()
        time.sleep(0.3)  # consumer stalls for 6 frame periods
        before = len(slept)
        # t0 before the late read: frame k after it is due k periods after that read's own clock
        # reading, so the bound below holds however long a decode or a preemption takes
        t0 = time.monotonic()
        src.read()  # late: delivered at once
        assert len(slept) == before, slept
        for _ in range(3):
            src.read()
        # the next frames keep the cadence instead of catching up with a burst (1e-6: float rounding)
        assert time.monotonic() - t0 >= 3 / 20 - 1e-6
    # held until due, never longer (three reads: one that comes a whole period late, preempted,
    # sleeps 0; all three late is not a load a test box sees)
    assert slept and all(0 < s <= 1 / 20 for s in slept), slept


def test_close_idempotent_and_reopen_restarts(folder: Path):
    src = replay(folder)
    with pytest.raises(SourceError, match="not open"):
        src.read()
    src.open()
    assert src.read().meta["file"] == "f1.png"
    src.close()
    src.close()
    with pytest.raises(SourceError, match="not open"):  # the pipeline reopens on SourceError
        src.read()
    src.open()
    again = src.read()
    assert again.meta["file"] == "f1.png" and again.frame_id == 1
    src.close()


def test_video_file(tmp_path: Path):
    path = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10.0, (64, 48))
    if not writer.isOpened():
        pytest.skip("this OpenCV build cannot write MJPG/.avi")
    for i in range(4):
        writer.write(np.full((48, 64, 3), 40 * (i + 1), np.uint8))
    writer.release()
    with replay(path, loop=True, frames=6) as src:
        frames = list(src)
    assert [f.frame_id for f in frames] == list(range(6))
    assert [f.meta["video_frame"] for f in frames] == [0, 1, 2, 3, 0, 1]
    assert frames[0].image.shape == (48, 64)
    got = levels(frames[:4])
    assert all(abs(g - 40 * (i + 1)) <= 6 for i, g in enumerate(got)), got  # JPEG is lossy
    with replay(path, color="rgb") as src:
        assert src.read().image.shape == (48, 64, 3)


def test_replay_with_a_camera_sized_flat_field_starts_and_publishes(tmp_path: Path):
    # A replay source does not say its frame size, so warm-up used one model tile, which the
    # flat-field maps (computed at the camera's 800x256) refused: `inspector run` exited 2
    # blaming the maps while `inspector check` passed.
    from conftest import ROOT
    from inspector.config import parse_config
    from inspector.flatfield import FlatField
    from inspector.pipeline import Pipeline
    from plc_servers import free_port

    rec = tmp_path / "rec"
    rec.mkdir()
    for i in range(3):
        assert cv2.imwrite(str(rec / f"f{i}.png"), np.full((256, 800), 120, np.uint8))
    FlatField(np.ones((256, 800), np.float32), np.zeros((256, 800), np.float32)).save(tmp_path / "ff.npz")
    raw = {"camera_id": "ff", "source": {"type": "replay", "path": "rec", "fps": 0},
           "model": {"bundle": str(ROOT / "deploy/models/demo-arcd")},
           "preprocess": {"flat_field": "ff.npz"},
           "publish": {"endpoint": f"tcp://127.0.0.1:{free_port()}"}}
    cfg = parse_config(raw, str(tmp_path / "cam.yaml"), base_dir=tmp_path)
    with Pipeline(cfg) as p:
        c = p.run(frames=3)
    assert c["grabbed"] == 3 and c["published"] == 3
