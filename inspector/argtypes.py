"""argparse types for counts, sizes and durations typed by hand: a value that cannot be meant
(zero frames, a negative timeout, text) is refused with the option's name, never run silently."""

from __future__ import annotations

import argparse
from typing import Callable

__all__ = ["positive_int", "non_negative_int", "positive_float", "non_negative_float"]


def _bounded(kind: type, lowest: int, inclusive: bool, noun: str) -> Callable[[str], int | float]:
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a {noun}: {text!r}") from None
        if not (value >= lowest if inclusive else value > lowest):  # NaN fails both
            raise argparse.ArgumentTypeError(f"must be {'>=' if inclusive else '>'} {lowest}, got {text}")
        return value

    parse.__name__ = noun.replace(" ", "_")
    return parse


positive_int = _bounded(int, 1, True, "whole number")
non_negative_int = _bounded(int, 0, True, "whole number")
positive_float = _bounded(float, 0, False, "number")
non_negative_float = _bounded(float, 0, True, "number")
