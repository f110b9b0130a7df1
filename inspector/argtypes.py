"""argparse types for counts, sizes and durations typed by hand: a value that cannot be meant
(zero frames, a negative timeout, text) is refused with the option's name, never run silently."""

from __future__ import annotations

import argparse
import math
from typing import Callable

__all__ = ["positive_int", "non_negative_int", "positive_float", "non_negative_float",
           "positive_finite_float", "non_negative_finite_float", "finite_float_at_most"]


def _bounded(kind: type, lowest: int, inclusive: bool, noun: str, finite: bool = False,
             highest: float | None = None) -> Callable[[str], int | float]:
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a {noun}: {text!r}") from None
        if not (value >= lowest if inclusive else value > lowest):  # NaN fails both
            raise argparse.ArgumentTypeError(f"must be {'>=' if inclusive else '>'} {lowest}, got {text}")
        if finite and math.isinf(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
        if highest is not None and value > highest:
            raise argparse.ArgumentTypeError(f"must be <= {highest:g}, got {text}")
        return value

    parse.__name__ = noun.replace(" ", "_")
    return parse


positive_int = _bounded(int, 1, True, "whole number")
non_negative_int = _bounded(int, 0, True, "whole number")
#: ``inf`` allowed: ``run --seconds inf`` (run until stopped), ``--parity-tol inf`` (no check)
positive_float = _bounded(float, 0, False, "number")
non_negative_float = _bounded(float, 0, True, "number")
#: ``inf`` refused as ``nan`` is: a rate, a pace or a hold written to a file or a PLC
positive_finite_float = _bounded(float, 0, False, "number", finite=True)
non_negative_finite_float = _bounded(float, 0, True, "number", finite=True)


def finite_float_at_most(highest: float, inclusive_zero: bool = False) -> Callable[[str], float]:
    """A finite number > 0 (``inclusive_zero``: >= 0) and <= ``highest``: a timeout handed to a
    library that takes whole milliseconds, or a hold handed to the clock."""
    return _bounded(float, 0, inclusive_zero, "number", finite=True, highest=highest)
