"""Reading one image file, refusing what decoders let through, and saying why it cannot.

Shared by the data-set readers (training, evaluation, calibration) and the replay source.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

#: JPEG end-of-image marker; a file cut short (a copy interrupted, a full disk) lacks it
_JPEG_EOI = b"\xff\xd9"
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class UnreadableImage(ValueError):
    """The file cannot be read as an image; the text says why (for the caller's message)."""


def decode_file(path: Path, flag: int) -> np.ndarray:
    """``cv2.imread`` that also refuses a truncated JPEG, and says why a file cannot be read
    (:class:`UnreadableImage`: ``No such file or directory``, ``Permission denied``, ``truncated
    JPEG ...``, ``not an image OpenCV can decode``) where imread returns a bare None.

    libjpeg decodes a JPEG cut short without an error: the missing rows come out flat grey and
    the only sign is an unnamed "Premature end of JPEG file" on stderr, so a model would train
    on, or be scored against, pixels that were never in the file."""
    try:
        data = np.fromfile(str(path), np.uint8)
    except OSError as e:
        raise UnreadableImage(e.strerror or str(e)) from None
    if data.size == 0:
        raise UnreadableImage("empty file")
    raw = data.tobytes()
    if raw[:2] == b"\xff\xd8" and _jpeg_truncated(raw):
        raise UnreadableImage("truncated JPEG: no end-of-image marker after its image data")
    if raw[:8] == _PNG_SIGNATURE and _png_truncated(raw):
        raise UnreadableImage("truncated PNG: no IEND chunk")
    img = cv2.imdecode(data, flag)
    if img is None:
        raise UnreadableImage("not an image OpenCV can decode")
    return img


def _png_truncated(raw: bytes) -> bool:
    """Whether a PNG's chunks, walked by their lengths, run out before its IEND chunk (the four
    letters alone may occur inside a text chunk or the compressed data of a file cut short)."""
    at = len(_PNG_SIGNATURE)
    while at + 8 <= len(raw):
        length = int.from_bytes(raw[at:at + 4], "big")
        if raw[at + 4:at + 8] == b"IEND":
            return False
        at += 12 + length  # length, type, data, CRC
    return True


def _jpeg_truncated(raw: bytes) -> bool:
    """Whether a JPEG lacks its end-of-image marker after the start of its image data.

    The header's segments are skipped by their lengths (an EXIF thumbnail inside them ends with a
    marker of its own); from the first start-of-scan on, the marker cannot occur inside the coded
    data (byte stuffing), so finding it there means the file reached its end. Bytes after the
    marker (vendor trailers, sector padding) are allowed."""
    pos, n = 2, len(raw)
    while pos + 4 <= n:
        if raw[pos] != 0xFF:
            break  # not a segment boundary: an odd header; let the decoder judge it
        marker = raw[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == 0xDA:  # start of scan: the image data follows
            return raw.find(_JPEG_EOI, pos) < 0
        if 0xD0 <= marker <= 0xD7 or marker == 0x01:  # markers without a length
            pos += 2
            continue
        pos += 2 + ((raw[pos + 2] << 8) | raw[pos + 3])
    else:
        return True  # the header itself was cut short
    return raw.find(_JPEG_EOI, 2) < 0
