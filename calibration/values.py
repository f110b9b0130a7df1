"""Checks of the numbers typed on an ``inspector calibrate`` command line, before any work: a value
no calibration can mean (``nan``, ``inf``, zero frames, a negative smoothing, a k of 0) is bad
input, one line naming the option (exit 2), never a crash after minutes of work, a silent
default, or a value written into a bundle or an .npz.

Comma lists of values to try (``--k1 2.5,3``, ``--windows 0,15``) are parsed by
:func:`comma_floats` / :func:`comma_ints`.
"""

from __future__ import annotations

import math

from calibration.frames import CalibrationInputError

__all__ = ["check_number", "check_count", "check_values", "check_k", "comma_floats", "comma_ints",
           "MAX_KERNEL_SIZE", "MAX_AREA_PX"]

#: the largest closing kernel side a threshold search tries (the kernel is a side x side array)
MAX_KERNEL_SIZE = 255
#: the largest min_area_px a search tries (the pixel count of a 46340 x 46340 frame)
MAX_AREA_PX = 2**31 - 1


def _describe(lo: float | None, lo_incl: bool, hi: float | None, hi_incl: bool) -> str:
    parts = []
    if lo is not None:
        parts.append(f"{'>=' if lo_incl else '>'} {lo:g}")
    if hi is not None:
        parts.append(f"{'<=' if hi_incl else '<'} {hi:g}")
    return " and ".join(parts)


def _in_range(v: float, lo: float | None, lo_incl: bool, hi: float | None, hi_incl: bool) -> bool:
    if not math.isfinite(v):
        return False
    if lo is not None and not (v >= lo if lo_incl else v > lo):
        return False
    return hi is None or (v <= hi if hi_incl else v < hi)


def check_number(value: float | None, arg: str, lo: float | None = None, lo_incl: bool = True,
                 hi: float | None = None, hi_incl: bool = True) -> float | None:
    """``value`` (None: not given) is a finite number in the range, or bad input naming ``arg``."""
    if value is None or _in_range(value, lo, lo_incl, hi, hi_incl):
        return value
    rng = _describe(lo, lo_incl, hi, hi_incl)
    raise CalibrationInputError(f"{arg}: must be a finite number{' ' + rng if rng else ''}, got {value:g}")


def check_count(value: int | None, arg: str, lo: int = 1, hi: int | None = None) -> int | None:
    """``value`` (None: not given) is a whole number in [lo, hi], or bad input naming ``arg``."""
    if value is not None and (value < lo or (hi is not None and value > hi)):
        raise CalibrationInputError(f"{arg}: must be {_describe(lo, True, hi, True)}, got {value}")
    return value


def check_values(vals: list[float] | None, arg: str, lo: float | None = None, lo_incl: bool = True,
                 hi: float | None = None, hi_incl: bool = True) -> list[float] | None:
    """Every value of a list in range, or bad input naming ``arg`` and the first outlier."""
    for v in vals or ():
        if not _in_range(v, lo, lo_incl, hi, hi_incl):
            raise CalibrationInputError(f"{arg}: each value must be a finite number "
                                        f"{_describe(lo, lo_incl, hi, hi_incl)}, got {v:g}")
    return vals


def check_k(vals: list[float] | None, arg: str) -> list[float] | None:
    """Dual-threshold coefficients k (threshold = mean + k x std of the residual): finite and
    >= 0, as the bundle's postprocess section takes them."""
    return check_values(vals, arg, 0.0, True)


def comma_floats(text: str | None, arg: str) -> list[float] | None:
    """A comma list of finite numbers (None: not given)."""
    if text is None:
        return None
    items = [t.strip() for t in text.split(",") if t.strip()]
    try:
        vals = [float(t) for t in items]
    except ValueError:
        vals = []
    if not vals:
        raise CalibrationInputError(f"{arg}: expected a comma list of numbers, got {text!r}")
    for t, v in zip(items, vals):
        if not math.isfinite(v):
            raise CalibrationInputError(f"{arg}: expected finite numbers, got {t} in {text!r}")
    return vals


def comma_ints(text: str | None, arg: str) -> list[int] | None:
    """A comma list of whole numbers >= 0 (None: not given)."""
    vals = comma_floats(text, arg)
    if vals is None:
        return None
    if any(v != int(v) or v < 0 for v in vals):
        raise CalibrationInputError(f"{arg}: expected whole numbers >= 0, got {text!r}")
    return [int(v) for v in vals]
