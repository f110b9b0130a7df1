"""Replay of recorded frames: a folder of images or a video file, at a set frame rate.

Replay lets the whole pipeline run on recordings from the line (or on a data set) exactly as it
runs on a camera: same Frame contract, same pacing, same handling of a broken frame.

Example::

    from inspector.sources.replay import ReplayConfig, ReplaySource
    cfg = ReplayConfig(path="recordings/coil_4711", pattern="*.png", fps=0, loop=False)
    with ReplaySource(cfg, camera_id="cam1") as src:
        for frame in src:          # frame.image: HxW uint8, frame.meta["file"]: the image name
            ...

Images in a folder play in natural name order (``f2.png`` before ``f10.png``), so numbered
recordings play in order whether or not their numbers are zero-padded.
"""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path
from typing import Literal

import cv2
import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from inspector.errors import FrameError, SourceError
from inspector.frame import Frame
from inspector.image_file import UnreadableImage, decode_file
from inspector.sources.base import Source

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})


class ReplayConfig(BaseModel):
    """Settings of a replay source (``source.type: replay``)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # fps: .inf passed ge=0

    type: Literal["replay"] = "replay"
    path: str = Field(..., description="folder of images or a video file; relative to the config file")
    pattern: str = Field("*", description="glob for image files inside a folder")
    fps: float = Field(10.0, ge=0, description="0 = as fast as the pipeline takes them")
    loop: bool = False
    color: Literal["gray", "rgb"] = "gray"
    mm_per_px_across: float | None = Field(None, gt=0)
    mm_per_px_along: float | None = Field(None, gt=0)
    frames: int | None = Field(None, ge=1, description="stop after this many frames; None = all")


def _natural_key(path: Path) -> list:
    """Sort key that orders embedded numbers by value: ``f2`` before ``f10``."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.as_posix())]


def has_images(folder: Path, pattern: str = "*") -> bool:
    """Whether ``folder`` holds an image file matching ``pattern`` (stops at the first)."""
    return any(p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS for p in folder.glob(pattern))


def list_images(folder: Path, pattern: str = "*") -> list[Path]:
    """Image files in ``folder`` matching ``pattern``, in natural name order."""
    found = [p for p in folder.glob(pattern) if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]
    return sorted(found, key=lambda p: _natural_key(p.relative_to(folder)))


def without_mask_twins(files: list[Path]) -> tuple[list[Path], int]:
    """``files`` less each ``.png`` that has an image of another type with the same name in the
    same folder, and how many were left out.

    Such a ``.png`` is that image's mask (the magnetic-tile layout keeps ``<stem>.jpg`` and
    ``<stem>.png`` side by side), not a second frame: played, evaluated or calibrated on as
    one, it doubled the frame count with black frames (a false-alarm rate halved) or, replayed,
    frames of another size dropped as bad. The one rule for replay, ``--format folder`` and
    ``calibrate --normal``.
    """
    others = {(p.parent, p.stem) for p in files if p.suffix.lower() != ".png"}
    kept = [p for p in files if p.suffix.lower() != ".png" or (p.parent, p.stem) not in others]
    return kept, len(files) - len(kept)


class _ImageFolder:
    """Reads a list of image files one by one; a file that does not decode is a FrameError."""

    def __init__(self, files: list[Path], color: str):
        self.files = files
        self._flag = cv2.IMREAD_GRAYSCALE if color == "gray" else cv2.IMREAD_COLOR
        self._rgb = color == "rgb"
        self._pos = 0

    def rewind(self) -> None:
        self._pos = 0

    def next(self) -> tuple[np.ndarray, dict] | None:
        """Next image and its meta, or None at the end. Advances past a broken file before raising."""
        if self._pos >= len(self.files):
            return None
        path = self.files[self._pos]
        self._pos += 1
        try:
            img = decode_file(path, self._flag)
        except cv2.error as e:
            raise FrameError(f"cannot decode image {path}: {e}") from e
        except UnreadableImage as e:
            raise FrameError(f"cannot read image {path}: {e}") from None
        if self._rgb:
            cv2.cvtColor(img, cv2.COLOR_BGR2RGB, dst=img)  # in place: no second buffer per frame
        return img, {"file": path.name}

    def describe(self) -> str:
        return f"{len(self.files)} images"

    def close(self) -> None:
        pass


class _Video:
    """Reads frames of a video file through OpenCV; the end of the stream is the end of replay."""

    def __init__(self, path: Path, color: str):
        self.path = path
        self._color = color
        self._cap: cv2.VideoCapture | None = None
        self._pos = 0
        self.rewind()
        # Some backends "open" any file; only a decoded first frame proves it is a video.
        if self.next() is None:
            self.close()
            raise SourceError(f"video {path} (source.path) has no frames OpenCV can decode")
        self.rewind()

    def rewind(self) -> None:
        # Reopening is more reliable than seeking back to frame 0, which some codecs ignore.
        self.close()
        cap = cv2.VideoCapture(str(self.path))
        if not cap.isOpened():
            cap.release()
            raise SourceError(f"cannot open video {self.path} (source.path): not a video OpenCV can "
                              "decode, or not an image folder")
        self._cap = cap
        self._pos = 0

    def next(self) -> tuple[np.ndarray, dict] | None:
        assert self._cap is not None
        ok, bgr = self._cap.read()
        if not ok or bgr is None:
            return None
        index = self._pos
        self._pos += 1
        if self._color == "gray":
            img = bgr if bgr.ndim == 2 else cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY)
        else:
            img = cv2.cvtColor(bgr, cv2.COLOR_GRAY2RGB) if bgr.ndim == 2 else \
                cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB, dst=bgr)
        return img, {"file": self.path.name, "video_frame": index}

    def describe(self) -> str:
        n = int(self._cap.get(cv2.CAP_PROP_FRAME_COUNT)) if self._cap is not None else 0
        return f"video, {n} frames" if n > 0 else "video"

    def close(self) -> None:
        if self._cap is not None:
            self._cap.release()
            self._cap = None


def video_problem(path: Path) -> str | None:
    """Why ``path`` (a file, not an image) cannot be replayed as a video; None when OpenCV
    decodes its first frame. Asked when the config is loaded, so a file that is not a video is
    bad input (exit 2, naming source.path), not a camera fault that systemd restarts for ever."""
    try:
        with open(path, "rb"):
            pass
    except OSError as e:
        return f"cannot read {path}: {e.strerror or e}"
    try:
        video = _Video(path, "gray")
    except SourceError:
        return (f"{path} is not a video OpenCV can decode (expected a video file, or a folder of "
                f"images: {', '.join(sorted(IMAGE_EXTENSIONS))})")
    video.close()
    return None


class ReplaySource(Source):
    """Frames from a folder of images or a video file (see module docs).

    Frame ids start at 0 and keep rising across loops and across a close and reopen (a reopen
    starts the recording over), so ids stay unique for subscribers. A broken image takes an id
    too, like a broken camera buffer; ``frames`` counts ids.
    """

    def __init__(self, cfg: ReplayConfig, camera_id: str, base_dir: Path | None = None):
        self.cfg = cfg
        self.camera_id = camera_id
        self.base_dir = base_dir
        self._reader: _ImageFolder | _Video | None = None
        self._next_id = 0
        self._loops = 0
        self._finished = False
        self._t_next = 0.0

    def resolved_path(self) -> Path:
        """``cfg.path`` resolved against ``base_dir`` (the config file's folder)."""
        path = Path(self.cfg.path).expanduser()
        if not path.is_absolute() and self.base_dir is not None:
            path = Path(self.base_dir) / path
        return path

    def open(self) -> None:
        """Find the recording and get ready to play it from the start."""
        if self._reader is not None:
            return
        path = self.resolved_path()
        if not path.exists():
            raise SourceError(f"replay path not found: {path} (source.path)")
        if path.is_dir():
            files, twins = without_mask_twins(list_images(path, self.cfg.pattern))
            if twins:
                log.warning("%s (source.path): %d .png file(s) beside a same-name image taken as "
                            "its mask and not played", path, twins)
            if not files:
                raise SourceError(f"no images matching {self.cfg.pattern!r} (source.pattern) in {path} "
                                  f"(source.path); expected {', '.join(sorted(IMAGE_EXTENSIONS))}")
            self._reader = _ImageFolder(files, self.cfg.color)
        elif path.suffix.lower() in IMAGE_EXTENSIONS:
            self._reader = _ImageFolder([path], self.cfg.color)
        else:
            self._reader = _Video(path, self.cfg.color)
        self._loops = 0
        self._finished = False
        self._t_next = time.monotonic()
        log.info("opened %s", self.describe())

    def read(self) -> Frame | None:
        """Next frame, paced at ``cfg.fps``; None at the end (unless looping) or after ``frames``."""
        if self._reader is None:
            # SourceError, not None: the pipeline then reopens rather than ending the stream.
            raise SourceError(f"replay {self.resolved_path()} is not open (closed, or the last open failed)")
        if self._finished or (self.cfg.frames is not None and self._next_id >= self.cfg.frames):
            return None
        self._pace()
        frame_id = self._next_id
        try:
            item = self._next_item()
        except FrameError:
            path = self.resolved_path()
            # an unmounted drive leaves its (empty) mount folder behind
            if not path.exists() or (path.is_dir() and not has_images(path, self.cfg.pattern)):
                # the recording itself is gone (a drive unmounted, a folder moved): that is a
                # lost camera (reopened with backoff, camera_down), not one bad file per frame
                self.close()
                raise SourceError(f"replay path {path} (source.path) is gone") from None
            self._next_id += 1
            raise
        if item is None:
            self._finished = True
            return None
        self._next_id += 1
        image, meta = item
        meta["loop"] = self._loops
        if self.cfg.mm_per_px_across:
            meta["mm_per_px_across"] = self.cfg.mm_per_px_across
        if self.cfg.mm_per_px_along:
            meta["mm_per_px_along"] = self.cfg.mm_per_px_along
        along = self.cfg.mm_per_px_along
        return Frame(camera_id=self.camera_id, frame_id=frame_id, t_capture_ns=time.time_ns(),
                     image=image, strip_pos_mm=frame_id * image.shape[0] * along if along else 0.0,
                     meta=meta)

    def _next_item(self) -> tuple[np.ndarray, dict] | None:
        """Next image, wrapping around once at the end when looping."""
        assert self._reader is not None
        item = self._reader.next()
        if item is None and self.cfg.loop:
            self._reader.rewind()
            self._loops += 1
            item = self._reader.next()
        return item

    def _pace(self) -> None:
        """Hold the frame until it is due; when late deliver now and schedule from now.

        Scheduling from the actual delivery when late means a slow consumer never gets a burst of
        frames to catch up, which a camera would not deliver either.
        """
        if self.cfg.fps <= 0:
            return
        now = time.monotonic()
        if self._t_next > now:
            time.sleep(self._t_next - now)
        self._t_next = max(self._t_next, now) + 1.0 / self.cfg.fps

    def close(self) -> None:
        """Release the video (if any); safe to call twice."""
        reader, self._reader = self._reader, None
        if reader is not None:
            reader.close()

    def describe(self) -> str:
        c = self.cfg
        what = self._reader.describe() if self._reader is not None else "not open"
        pace = f"{c.fps:g} fps" if c.fps > 0 else "unpaced"
        return f"replay {self.resolved_path()} ({what}), {c.color}, {pace}{', loop' if c.loop else ''}"
