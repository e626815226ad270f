"""Pure functions: training step → target sparsity."""

from __future__ import annotations

import math


def compression_to_sparsity(compression: float) -> float:
    """Fraction of zeros for a compression ratio (weights before / nonzero after)."""
    return 1.0 - 1.0 / compression


def cubic(step: int, begin: int, end: int, final: float, initial: float = 0.0, exponent: float = 3.0) -> float:
    """Zhu & Gupta (2017, arXiv 1710.01878, eq. 1): s_t = s_f + (s_i − s_f)(1 − (t − t₀)/(t_end − t₀))³."""
    if end <= begin:
        return final if step >= begin else initial
    progress = min(max((step - begin) / (end - begin), 0.0), 1.0)
    return final + (initial - final) * (1.0 - progress) ** exponent


def linear(step: int, begin: int, end: int, final: float, initial: float = 0.0) -> float:
    """Linear ramp from ``initial`` at ``begin`` to ``final`` at ``end``."""
    return cubic(step, begin, end, final, initial, exponent=1.0)


def iterative_round_sparsity(round_index: int, rounds: int, final: float) -> float:
    """Sparsity after round ``round_index`` (0-based) of ``rounds``: each round removes the same fraction of the
    weights still alive (Han et al. 2015's prune–retrain loop), ending exactly at ``final``."""
    if round_index >= rounds - 1:
        return final
    return 1.0 - (1.0 - final) ** ((round_index + 1) / rounds)


def round_compression(round_index: int, rounds: int, compression: float) -> float:
    """Compression after round ``round_index`` (0-based) of ``rounds`` when each round removes the same share of what
    is left: compression^((r+1)/R), exactly ``compression`` at the last round."""
    if round_index >= rounds - 1:
        return compression
    return compression ** ((round_index + 1) / rounds)


def update_steps(mode: str, prune_steps: int, rounds: int = 1, frequency: int = 1) -> list[int]:
    """Steps at which the masks are recomputed.

    ``one_shot``: step 0. ``iterative``: ``rounds`` updates spread evenly over ``[0, prune_steps)``.
    ``gradual``: every ``frequency`` steps in ``[0, prune_steps]``, always including ``prune_steps`` itself.
    """
    if mode == "one_shot":
        return [0]
    if mode == "iterative":
        return sorted({(r * prune_steps) // rounds for r in range(rounds)})
    if mode == "gradual":
        return sorted(set(range(0, prune_steps + 1, max(frequency, 1))) | {prune_steps})
    raise ValueError(f"Unknown schedule mode {mode!r}; valid choices: one_shot, iterative, gradual")


def round_steps(total_steps: int, prune_fraction: float, rounds: int) -> list[int]:
    """Steps of ``rounds`` prune rounds spread evenly over the first ``prune_fraction`` of ``total_steps``."""
    return update_steps("iterative", int(prune_fraction * total_steps), rounds)


def progressive_ratios(compression: float, max_step: float) -> list[float]:
    """Ratios of the steps of a progressive prune to ``compression`` (progressive ADMM, Ye et al. 2018, arXiv
    1810.07378): the fewest steps whose ratio to the previous one is at most ``max_step``, all with the same ratio
    (a geometric sequence, so each step removes the same share of the weights still alive), the last exactly
    ``compression``."""
    if compression <= max_step:
        return [float(compression)]
    steps = math.ceil(math.log(compression) / math.log(max_step) - 1e-9)
    return [compression ** ((i + 1) / steps) for i in range(steps - 1)] + [float(compression)]


def stage_bounds(
    units: int, shares: list[float], fraction: float, unit_steps: int = 1, nearest: bool = False
) -> list[tuple[int, int]]:
    """``(start, hard)`` step of every stage of a staged fit of ``units`` units (steps, or epochs of ``unit_steps``
    steps): the units split in proportion to ``shares`` (whole units), each stage's first ``fraction`` before its
    hard event (rounded down, or to the nearest unit with ``nearest``). The last stage ends with the fit."""
    total, bounds, done = sum(shares), [], 0.0
    starts = []
    for share in shares:
        starts.append(int(round(units * done / total)))
        done += share
    for i, start in enumerate(starts):
        end = starts[i + 1] if i + 1 < len(starts) else units
        length = (end - start) * fraction
        hard = start + (int(round(length)) if nearest else int(length))
        bounds.append((start * unit_steps, hard * unit_steps))
    return bounds


def stage_layout(
    total: int, max_epochs: int | None, shares: list[float], fraction: float, update_every: int, unit: str
) -> tuple[int, int, list[tuple[int, int]]]:
    """``(steps per epoch, update period in steps, (start, hard) of every stage)`` of a staged fit of ``total``
    optimizer steps over ``max_epochs`` epochs (:func:`stage_bounds`): with ``unit="epochs"`` the stages fall on
    whole epochs and the period is ``update_every`` epochs, else the period is ``update_every`` steps."""
    per_epoch = max(total // max(int(max_epochs or 1), 1), 1)
    if unit == "epochs":
        epochs = max(int(max_epochs or 1), 1)
        return per_epoch, update_every * per_epoch, stage_bounds(epochs, shares, fraction, per_epoch, nearest=True)
    return per_epoch, update_every, stage_bounds(total, shares, fraction)


def growth_to(start: float, end: float, bound: tuple[int, int], period: int) -> float:
    """The factor per update that takes a value from ``start`` to ``end`` at the last update of a stage
    ``bound = (start step, hard step)``, updates coming every ``period`` steps after its start and before its hard
    event."""
    first, hard = bound
    updates = len(range(first + period, hard, period))
    return (end / start) ** (1.0 / max(updates, 1))
