"""argparse types and checks of the offline commands' options (evaluate, export, augment): a
value that cannot be meant is refused with the option's name before any work is done."""

from __future__ import annotations

import argparse
from typing import Any

__all__ = ["resize_size", "onnx_opset", "opset_range", "check_record_key", "RESIZE_MAX_SIDE",
           "evaluation_record"]

#: the largest side ``evaluate --resize`` takes: 16384 px is 16x a 1024-px camera line; a frame
#: of 16384x16384 is already 256 MiB a channel before the model runs
RESIZE_MAX_SIDE = 16384


def resize_size(text: str) -> tuple[int, int]:
    """``--resize HxW``: two whole numbers, each 1..RESIZE_MAX_SIDE."""
    parts = str(text).strip().lower().split("x")
    try:
        if len(parts) != 2:
            raise ValueError
        h, w = (int(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HxW in whole pixels, e.g. 256x256, got {text!r}") from None
    if not (1 <= h <= RESIZE_MAX_SIDE and 1 <= w <= RESIZE_MAX_SIDE):
        raise argparse.ArgumentTypeError(f"each side must be 1..{RESIZE_MAX_SIDE} px, got {text}")
    return h, w


resize_size.__name__ = "HxW size"


def opset_range() -> tuple[int, int]:
    """The ONNX opsets the exporters can write: torch's TorchScript exporter (``dynamo=False``, what
    every exporter here uses) from its minimum to its maximum, and no lower than 11 (the Resize
    and Pad forms the networks' upsampling and padding export to)."""
    try:
        from torch.onnx import _constants as c
        lo = max(11, int(getattr(c, "ONNX_MIN_OPSET", 7)))
        hi = int(getattr(c, "ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET", getattr(c, "ONNX_MAX_OPSET", 17)))
    except Exception:  # no torch here (the command refuses that itself): the versions torch 2.x takes
        lo, hi = 11, 20
    return lo, hi


def onnx_opset(text: str) -> int:
    """``--opset``: a whole number in :func:`opset_range`."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    lo, hi = opset_range()
    if not lo <= value <= hi:
        raise argparse.ArgumentTypeError(f"must be {lo}..{hi} (the ONNX opsets this torch exports "
                                         f"these networks to), got {text}")
    return value


onnx_opset.__name__ = "opset"


def evaluation_record(entry: Any) -> bool:
    """Whether a ``provenance.metrics`` entry was written by ``evaluate --record``
    (:func:`inspector.evaluation.evaluate.record_metrics` always writes ``measured`` and
    ``data_root``); the exporters' entries (the trainer's ``validation``, ``stage1``, ``params``,
    ...) are not."""
    return isinstance(entry, dict) and "measured" in entry and "data_root" in entry


def check_record_key(key: str | None, metrics: Any, bundle: str) -> None:
    """Refuse a ``--record-key`` that is empty, holds control characters, or names an entry of
    ``provenance.metrics`` that ``evaluate --record`` did not write (the training record the
    exporter copied from metrics.json): ValueError naming --record-key."""
    if key is None:
        return
    if not key.strip():
        raise ValueError("--record-key: empty; leave it out for the default key <format>/<split>")
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in key):
        raise ValueError(f"--record-key {key!r}: holds a control character (newline, tab, ...)")
    held = metrics.get(key) if isinstance(metrics, dict) else None
    if held is not None and not evaluation_record(held):
        raise ValueError(f"--record-key {key}: {bundle}/bundle.yaml provenance.metrics.{key} is "
                         "the training record the exporter wrote, not an evaluate record; choose "
                         "another key")
