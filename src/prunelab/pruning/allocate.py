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

SCOPES = ("global", "layer")


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
) -> dict[str, torch.Tensor]:
    """Masks (shaped like each weight) that zero the lowest-scoring groups.

    Args:
        weights: prunable weight per layer name (only shapes are read).
        scores: group scores per *eligible* layer, shaped as :func:`groups.group_shape`; layers absent here stay dense.
        sparsity: requested fraction of zeros over all of ``weights``.
        granularity: see :mod:`prunelab.pruning.groups`.
        scope: ``global`` ranks groups of all layers together (scores must be comparable across layers);
            ``layer`` prunes every eligible layer at the same ratio, chosen so the total hits the target.
        min_keep: groups every layer keeps.
        layer_sparsity: explicit per-layer fraction of zeros (overrides ``sparsity``/``scope``), as ADMM's
            per-layer tables.

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
    caps = {n: max(counts[n] - min_keep, 0) for n in scores}
    if layer_sparsity is not None:
        k = {n: min(round(layer_sparsity.get(n, 0.0) * counts[n]), caps[n]) for n in scores}
    else:
        total = sum(w.numel() for w in weights.values())
        needed = round(sparsity * total)
        available = sum(caps[n] * sizes[n] for n in scores)
        if needed > available:
            reachable = total / max(total - available, 1)
            raise UnreachableCompressionError(
                f"sparsity {sparsity:.4f} needs {needed} zeros but granularity {granularity!r} can zero at most "
                f"{available} of {total} prunable weights (max compression ≈ {reachable:.1f}×, min_keep={min_keep})"
            )
        k = _global_counts(scores, sizes, caps, needed) if scope == "global" else _uniform_counts(counts, sizes, caps, needed)
    return {
        n: groups.expand(_lowest(scores[n], k[n]), weights[n], granularity) if n in scores else torch.ones_like(w, dtype=torch.bool)
        for n, w in weights.items()
    }  # on each weight's device


def _allocate_nm(weights, scores, sparsity: float, nm: tuple[int, int], layer_sparsity) -> dict[str, torch.Tensor]:
    """N:M masks on every scored layer; the achieved compression must match the requested one within 2 %."""
    n, m = nm
    if layer_sparsity:
        raise ValueError(f"layer_sparsity does not apply to granularity '{n}:{m}' (its sparsity is fixed by N:M)")
    masks = {
        name: groups.nm_mask(scores[name].reshape(w.shape).to(w.device), n, m, name) if name in scores
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
