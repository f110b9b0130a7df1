"""The unit that flows from a source into the pipeline."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class Frame:
    """One grabbed image of the strip.

    ``image`` is HxW (mono) or HxWxC (C = 3, RGB order) uint8. ``truth`` is only set by sources
    that know the defects they show (the synthetic strip): a uint8 class-index mask, HxW.
    """

    camera_id: str
    frame_id: int
    t_capture_ns: int
    image: np.ndarray
    strip_pos_mm: float = 0.0
    truth: np.ndarray | None = None
    meta: dict = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.image.shape)
