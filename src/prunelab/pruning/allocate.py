"""Turn group scores into exact masks for a target sparsity.

The target is counted over *all* prunable weights: ``zeros = round(sparsity · Σ numel(W))``. Layers where the
granularity has no meaning (the classifier's outputs for ``filter``, the image input for ``channel``) are counted in the
total but never pruned. Every layer keeps at least ``min_keep`` groups so the network stays connected.

Selection is an exact, deterministic top-k (stable sort; ties broken by index), not a percentile with a strict
inequality, so the achieved sparsity is the requested one up to one group.

N:M granularities (e.g. ``2:4``) fix the sparsity at 1 − N/M: every eligible layer keeps the N largest scores of
each block of M, and a requested sparsity whose compression is more than 2 % away from what that gives is an error.
"""

from __future__ import annotations

import math

import torch

from prunelab.pruning import groups

SCOPES = ("global", "layer", "lamp")


class UnreachableCompressionError(ValueError):
    """The requested compression cannot be met at this granularity without emptying a layer."""


def _lowest(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean keep-mask (same shape and device as ``scores``) that drops the ``k`` lowest scores."""
    flat = scores.flatten()
    keep = torch.ones_like(flat, dtype=torch.bool)
    if k > 0:
        keep[torch.argsort(flat, stable=True)[:k]] = False
    return keep.view_as(scores)


def allocate(
    weights: dict[str, torch.Tensor],
    scores: dict[str, torch.Tensor],
    sparsity: float,
    granularity: str,
    scope: str = "global",
    min_keep: int = 1,
    layer_sparsity: dict[str, float] | None = None,
    *,
    min_keep_fraction: float = 0.0,
    round_to: int | None = None,
) -> dict[str, torch.Tensor]:
    """Masks (shaped like each weight, on its device) that zero the lowest-scoring groups.

    Args:
        weights: prunable weight per layer name (only shapes are read).
        scores: group scores per *eligible* layer, shaped as :func:`groups.group_shape`; layers absent here stay dense.
        sparsity: requested fraction of zeros over all of ``weights``.
        granularity: see :mod:`prunelab.pruning.groups`.
        scope: ``global`` ranks groups of all layers together (scores must be comparable across layers);
            ``layer`` prunes every eligible layer at the same ratio, chosen so the total hits the target; ``lamp``
            ranks all layers together by LAMP scores (:func:`lamp_scores`), which are comparable across layers
            whatever their weight scale, and never empty a layer first.
        min_keep: groups every layer keeps.
        layer_sparsity: explicit per-layer fraction of zeros (overrides ``sparsity``/``scope``, and
            ``min_keep_fraction``), as ADMM's per-layer tables.
        min_keep_fraction: share of its groups a layer keeps at least (rounded up), so that a small layer does not
            collapse: floors are granted smallest layer first while they take at most half of the weights kept
            (:func:`fraction_floors`), so they never make a ratio unreachable.
        round_to: kept groups of every pruned layer are a multiple of this (``filter``/``channel``: channel counts
            that GPU kernels like), the total still as close to the target as whole multiples allow.

    Raises:
        UnreachableCompressionError: the target needs more zeros than the eligible layers can give.
    """
    if scope not in SCOPES:
        raise ValueError(f"Unknown scope {scope!r}; valid choices: {', '.join(SCOPES)}")
    nm = groups.parse_nm(granularity)
    if nm is not None:
        return _allocate_nm(weights, scores, sparsity, nm, layer_sparsity)
    scores = {n: s.detach().to(weights[n].device) for n, s in scores.items()}
    sizes = {n: groups.group_size(weights[n], granularity) for n in scores}
    counts = {n: scores[n].numel() for n in scores}
    total = sum(w.numel() for w in weights.values())
    fractions = (
        {}
        if layer_sparsity is not None
        else fraction_floors(
            {n: counts[n] * sizes[n] for n in scores}, min_keep_fraction, total - round(sparsity * total)
        )
    )
    caps = {n: counts[n] - keep_floor(counts[n], min_keep, fractions.get(n, 0.0), round_to) for n in scores}
    if layer_sparsity is not None:
        k = {n: min(round(layer_sparsity.get(n, 0.0) * counts[n]), caps[n]) for n in scores}
        needed = sum(k[n] * sizes[n] for n in scores)
    else:
        needed = round(sparsity * total)
        available = sum(caps[n] * sizes[n] for n in scores)
        if needed > available:
            reachable = total / max(total - available, 1)
            raise UnreachableCompressionError(
                f"pruning.compression={1 / max(1 - sparsity, 1e-300):.4g} cannot be reached: it needs {needed} zeros "
                f"but granularity {granularity!r} can zero at most {available} of {total} prunable weights while "
                f"every layer keeps its floor (max compression ≈ {reachable:.2f}×; pruning.min_keep={min_keep}, "
                f"pruning.min_keep_fraction={min_keep_fraction:g}"
                + (f", pruning.round_to={round_to}" if round_to else "")
                + ")"
            )
        if scope == "layer":
            k = _uniform_counts(counts, sizes, caps, needed)
        else:
            k = _global_counts(lamp_scores(scores) if scope == "lamp" else scores, sizes, caps, needed)
    if round_to:
        k = _round_counts(k, scores, counts, sizes, caps, needed, round_to)
    return {
        n: groups.expand(_lowest(scores[n], k[n]), weights[n], granularity)
        if n in scores
        else torch.ones_like(w, dtype=torch.bool)
        for n, w in weights.items()
    }


def lamp_scores(scores: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """LAMP scores (Lee, Park, Mo, Ahn, Shin; ICLR 2021, arXiv 2010.07611): in each layer, a group's squared score
    divided by the sum of the squared scores of the groups of that layer ranked at or above it. Within a layer the
    order is the score's; across layers the scores are scale-free, and every layer's best group scores 1, so a
    global ranking of them spreads sparsity over the layers instead of emptying those whose weights are small."""
    out = {}
    for name, score in scores.items():
        squared = score.detach().flatten().double() ** 2
        order = torch.argsort(squared, stable=True)
        ranked = squared[order]
        above = torch.flip(torch.cumsum(torch.flip(ranked, [0]), 0), [0])  # Σ over this group and all above it
        lamp = torch.empty_like(squared)
        lamp[order] = ranked / above.clamp_min(torch.finfo(torch.float64).tiny)
        out[name] = lamp.view_as(score)
    return out


def fraction_floors(layer_weights: dict[str, int], fraction: float, kept: int) -> dict[str, float]:
    """The layers granted the keep floor ``fraction``: smallest first, while the floors together take at most half
    of the ``kept`` weights (a large layer's floor would eat the budget, and the ranking serves it anyway)."""
    granted, used = {}, 0.0
    for name in sorted(layer_weights, key=lambda n: (layer_weights[n], n)):
        need = math.ceil(fraction * layer_weights[name])
        if used + need > kept / 2:
            break
        granted[name], used = fraction, used + need
    return granted


def keep_floor(count: int, min_keep: int = 1, min_keep_fraction: float = 0.0, round_to: int | None = None) -> int:
    """Groups a layer of ``count`` groups keeps at least: ``min_keep``, ``min_keep_fraction`` of them (rounded up),
    rounded up to a multiple of ``round_to``; never more than the layer has."""
    floor = max(min_keep, math.ceil(min_keep_fraction * count - 1e-9))
    if round_to:
        floor = -(-floor // round_to) * round_to
    return min(count, floor)


def _allocate_nm(weights, scores, sparsity: float, nm: tuple[int, int], layer_sparsity) -> dict[str, torch.Tensor]:
    """N:M masks on every scored layer; the achieved compression must match the requested one within 2 %."""
    n, m = nm
    if layer_sparsity:
        raise ValueError(f"layer_sparsity does not apply to granularity '{n}:{m}' (its sparsity is fixed by N:M)")
    masks = {
        name: groups.nm_mask(scores[name].reshape(w.shape).to(w.device), n, m, name)
        if name in scores
        else torch.ones_like(w, dtype=torch.bool)
        for name, w in weights.items()
    }
    total = sum(w.numel() for w in weights.values())
    achieved = total / max(sum(int(k.sum()) for k in masks.values()), 1)
    requested = 1.0 / max(1.0 - sparsity, 1e-12)
    if abs(achieved - requested) / requested > 0.02:
        raise ValueError(
            f"granularity '{n}:{m}' fixes the compression at {m / n:g} on the layers it prunes ({achieved:.3f} over "
            f"all {total} prunable weights) but compression {requested:.3f} was requested; set pruning.compression="
            f"{m / n:g}"
        )
    return masks


def _global_counts(scores, sizes, caps, needed: int) -> dict[str, int]:
    """Groups to prune per layer when ranking all layers' groups together, honouring per-layer caps (counted on
    the CPU: the layers may live on different devices)."""
    scores = {n: s.cpu() for n, s in scores.items()}
    fixed: dict[str, int] = {}
    while True:
        free = [n for n in scores if n not in fixed]
        remaining = needed - sum(fixed[n] * sizes[n] for n in fixed)
        if not free or remaining <= 0:
            return {n: fixed.get(n, 0) for n in scores}
        flat = torch.cat([scores[n].flatten().double() for n in free])
        size = torch.cat([torch.full((scores[n].numel(),), sizes[n], dtype=torch.long) for n in free])
        owner = torch.cat([torch.full((scores[n].numel(),), i, dtype=torch.long) for i, n in enumerate(free)])
        order = torch.argsort(flat, stable=True)
        cum = torch.cumsum(size[order], 0)
        # smallest prefix reaching the target; step back one group if that lands closer
        m = int(torch.searchsorted(cum, torch.tensor(remaining))) + 1
        m = min(m, len(order))
        if m > 1 and abs(int(cum[m - 2]) - remaining) < abs(int(cum[m - 1]) - remaining):
            m -= 1
        picked = torch.bincount(owner[order[:m]], minlength=len(free))
        over = [n for i, n in enumerate(free) if int(picked[i]) > caps[n]]
        if not over:
            return {**fixed, **{n: int(picked[i]) for i, n in enumerate(free)}}
        for n in over:
            fixed[n] = caps[n]


def _uniform_counts(counts, sizes, caps, needed: int) -> dict[str, int]:
    """Groups to prune per layer at one common ratio r, found by bisection so the total hits ``needed``."""

    def at(r: float) -> dict[str, int]:
        return {n: min(math.floor(r * counts[n] + 0.5), caps[n]) for n in counts}

    def zeros(k: dict[str, int]) -> int:
        return sum(k[n] * sizes[n] for n in k)

    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if zeros(at(mid)) < needed:
            lo = mid
        else:
            hi = mid
    below, above = at(lo), at(hi)
    return below if abs(zeros(below) - needed) < abs(zeros(above) - needed) else above


def _round_counts(k, scores, counts, sizes, caps, needed: int, step: int) -> dict[str, int]:
    """Groups to prune per layer with every layer's kept count a multiple of ``step`` (or the whole layer when it
    has fewer groups), then whole-``step`` moves, cheapest first by the scores they add or remove, while they bring
    the total closer to ``needed``."""
    k = dict(k)
    for n in k:
        if counts[n] > step:
            kept = max(round((counts[n] - k[n]) / step) * step, counts[n] - caps[n])
            k[n] = min(counts[n] - kept, caps[n])
    ranked = {n: torch.sort(scores[n].flatten().double().cpu(), stable=True).values for n in k}
    zeros = sum(k[n] * sizes[n] for n in k)
    while True:
        more = zeros < needed
        moves = []
        for n in k:
            lo, hi = (k[n], k[n] + step) if more else (k[n] - step, k[n])
            if counts[n] > step and lo >= 0 and hi <= caps[n]:
                cost = float(ranked[n][lo:hi].mean())
                moves.append((cost if more else -cost, n))
        if not moves:
            return k
        _, n = min(moves)
        after = zeros + (step if more else -step) * sizes[n]
        if abs(after - needed) >= abs(zeros - needed):
            return k
        k[n] += step if more else -step
        zeros = after
