"""Argument checks shared by the pruning methods: every message names the config key and the bad value."""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable
from typing import Any


def check_compression(compression: Any) -> float:
    """Return ``compression`` as a float, or raise naming the bad value (must be a finite number > 1)."""
    if isinstance(compression, bool) or not isinstance(compression, numbers.Real):
        raise ValueError(f"pruning.compression={compression!r} is not a number; give a ratio > 1, e.g. 8")
    if not math.isfinite(compression) or compression <= 1:
        raise ValueError(
            f"pruning.compression={compression!r} must be a finite ratio > 1 "
            "(prunable weights before / nonzero after; 8 keeps 1/8 of them)"
        )
    return float(compression)


def check_number(
    key: str, value: Any, low: float, high: float = math.inf, low_open: bool = True, high_open: bool = False
) -> float:
    """``value`` as a float if it is a finite number in the interval, else a ValueError naming ``pruning.<key>``."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    inside = (
        ok and ((value > low) if low_open else (value >= low)) and ((value < high) if high_open else (value <= high))
    )
    if not inside:
        bound = f"{'>' if low_open else '>='} {low:g}"
        if high != math.inf:
            bound += f" and {'<' if high_open else '<='} {high:g}"
        raise ValueError(f"pruning.{key}={value!r} must be a number {bound}")
    return float(value)


def check_int(key: str, value: Any, low: int = 1) -> int:
    """``value`` if it is an integer ≥ ``low``, else a ValueError naming ``pruning.<key>``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ValueError(f"pruning.{key}={value!r} must be an integer >= {low}")
    return int(value)


def check_choice(key: str, value: Any, choices: Iterable[str]) -> str:
    """``value`` if it is one of ``choices``, else a ValueError naming ``pruning.<key>`` and listing them."""
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"pruning.{key}={value!r} is not one of: {', '.join(choices)}")
    return value


def check_known(method: str, given: Iterable[str], valid: Iterable[str]) -> None:
    """Reject options a method does not have (a typo in a config key), listing the valid ones."""
    valid = list(valid)
    unknown = sorted(set(given) - set(valid))
    if unknown:
        raise ValueError(f"Unknown {method} option(s) {unknown}; valid: {', '.join(valid)}")


def check_table_compression(compression: float, masks: dict, implied: float | None = None) -> None:
    """Raise when the masks an explicit ``pruning.layer_sparsity`` table gives (layer → bool mask) are more than
    2 % away from ``pruning.compression``, naming the compression the table does give (``implied``, when the
    caller counts it otherwise, e.g. on the compacted model)."""
    if implied is None:
        implied = sum(m.numel() for m in masks.values()) / max(sum(int(m.sum()) for m in masks.values()), 1)
    if abs(implied - compression) / compression > 0.02:
        raise ValueError(
            f"pruning.compression={compression:g} disagrees with pruning.layer_sparsity, which gives "
            f"{implied:.2f}× on this model; set compression to {implied:.2f}"
        )
