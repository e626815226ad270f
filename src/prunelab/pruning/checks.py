"""Argument checks shared by the pruning methods: every message names the config key and the bad value."""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable
from typing import Any

from prunelab.pruning import macs_target
from prunelab.pruning.allocate import SCOPES

BASE_OPTIONS = (  # the options every method takes (PruningCallback's), for check_known
    "granularity",
    "scope",
    "layers",
    "exclude",
    "layer_sparsity",
    "min_keep",
    "min_keep_fraction",
    "round_to",
    "target",
)


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


def check_table_layers(layer_sparsity: dict[str, float] | None, layers: list[str]) -> None:
    """Reject names of an explicit ``pruning.layer_sparsity`` table that are not among the pruned ``layers``."""
    unknown = sorted(set(layer_sparsity or {}) - set(layers))
    if unknown:
        raise ValueError(f"Unknown layer(s) {unknown} in pruning.layer_sparsity; pruned layers: {layers}")


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


def check_allocation_options(
    granularity: str,
    scope: str,
    min_keep: Any,
    min_keep_fraction: Any,
    round_to: Any,
    target: Any,
    layer_sparsity: dict[str, float] | None,
    auto_scope: str,
) -> dict[str, Any]:
    """The allocation settings of :class:`~prunelab.pruning.base.PruningCallback` (``granularity`` already
    checked), checked in the order given and resolved: ``scope=auto``, ``min_keep=auto`` and ``round_to=auto``
    (``round_to_auto``: set from the accelerator once it is known)."""
    if scope not in (*SCOPES, "auto"):
        raise ValueError(f"pruning.scope={scope!r} is not one of: {', '.join(SCOPES)}, auto")
    if min_keep != "auto":
        check_int("min_keep", min_keep)
    min_keep_fraction = check_number("min_keep_fraction", min_keep_fraction, 0.0, 1.0, low_open=False, high_open=True)
    target = check_choice("target", target, macs_target.TARGETS)
    structured = granularity in macs_target.MACS_GRANULARITIES
    if target == "macs" and not structured:
        kinds = ", ".join(macs_target.MACS_GRANULARITIES)
        raise ValueError(
            f"pruning.target=macs needs a granularity that removes channels ({kinds}), not "
            f"pruning.granularity={granularity!r}: other zeros leave the layers' MACs as they are "
            "(add pruning.granularity=filter)"
        )
    round_to_auto = round_to == "auto" and structured
    if round_to == "auto":
        round_to = None
    elif round_to is not None:
        check_int("round_to", round_to)
        if not structured:
            raise ValueError(
                f"pruning.round_to={round_to!r} rounds channel counts: it needs granularity "
                f"filter or channel, not {granularity!r}"
            )
    for name, frac in (layer_sparsity or {}).items():
        if not 0.0 <= float(frac) < 1.0:
            raise ValueError(f"pruning.layer_sparsity.{name}={frac!r} must be in [0, 1)")
    return {
        "scope": ("layer" if target == "macs" else auto_scope) if scope == "auto" else scope,
        "min_keep": (2 if target == "macs" else 1) if min_keep == "auto" else min_keep,
        "min_keep_fraction": min_keep_fraction,
        "round_to": round_to,
        "round_to_auto": round_to_auto,
        "target": target,
        "counts_compacted": granularity in macs_target.COMPACTED_GRANULARITIES,
    }
