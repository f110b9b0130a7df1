"""The one interface every frame source implements."""

from __future__ import annotations

import abc
from typing import Iterator

from inspector.frame import Frame


class Source(abc.ABC):
    """A frame source: open once, read frames, close.

    ``read()`` returns the next frame, or ``None`` when the source is finished (a replay that does
    not loop). It raises :class:`~inspector.errors.SourceError` when the device is gone, and
    :class:`~inspector.errors.FrameError` for a single frame that arrived broken (incomplete
    buffer), after which reading can go on.

    Example::

        with make_source(cfg.source, camera_id="cam1") as src:
            for frame in src:
                ...
    """

    camera_id: str

    def prepare(self) -> None:
        """Connect and apply the configuration without streaming yet (``open()`` then starts).

        The pipeline calls it before the model's warm-up, so that a value the camera refuses is
        reported at once instead of after the warm-up; sources with nothing to set up do nothing.
        """

    @abc.abstractmethod
    def open(self) -> None: ...

    @abc.abstractmethod
    def read(self) -> Frame | None: ...

    @abc.abstractmethod
    def close(self) -> None: ...

    def describe(self) -> str:
        """One line for logs and `inspector check`."""
        return type(self).__name__

    def __enter__(self) -> "Source":
        self.open()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __iter__(self) -> Iterator[Frame]:
        while True:
            frame = self.read()
            if frame is None:
                return
            yield frame
