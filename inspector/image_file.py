"""Reading one image file, refusing what decoders let through.

Shared by the data-set readers (training, evaluation, calibration) and the replay source.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

#: JPEG end-of-image marker; a file cut short (a copy interrupted, a full disk) lacks it
_JPEG_EOI = b"\xff\xd9"


def decode_file(path: Path, flag: int) -> np.ndarray | None:
    """``cv2.imread`` that also refuses a truncated JPEG (None, as for any unreadable file).

    libjpeg decodes a JPEG cut short without an error: the missing rows come out flat grey and
    the only sign is an unnamed "Premature end of JPEG file" on stderr, so a model would train
    on, or be scored against, pixels that were never in the file."""
    try:
        data = np.fromfile(str(path), np.uint8)
    except OSError:
        return None
    if data.size >= 2 and data[0] == 0xFF and data[1] == 0xD8 and _JPEG_EOI not in data[-64:].tobytes():
        return None  # a few bytes may follow the marker (padding); none at all: truncated
    return cv2.imdecode(data, flag) if data.size else None
