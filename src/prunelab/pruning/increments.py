"""The rank-based increment shared by SPP and IncReg, and the ranking it is applied to.

Both methods move a per-group quantity (SPP: pruning probability p; IncReg: regularization factor λ) by an amount
that depends only on the group's rank r among the groups still alive, ascending by importance, and on N_p, the
number of groups the layer still has to prune. The centrally-symmetric exponential (SPP, Wang et al. BMVC 2018,
arXiv 1709.06994, eqs. 3–4; the same function in the authors' Caffe code for both methods, MingSun-Tse/Caffe_IncReg):

    α = ln(2/u) / N_p,   N₁ = ln(1/u) / α
    Δ(r) = A·e^{−αr}                 for r < N₁
    Δ(r) = 2uA − A·e^{−α(2N₁ − r)}    for r ≥ N₁

so Δ(0) = A, Δ(N₁) = uA (the centre of symmetry), Δ(N_p) = 0, and Δ < 0 beyond N_p: the least important N_p groups
are pushed towards pruning, the others pulled back. ``linear`` is the authors' alternative Δ(r) = A − (A/N_p)·r.
"""

from __future__ import annotations

import math

import torch

SHAPES = ("exponential", "linear")


def increment(
    rank: torch.Tensor, to_prune: int, amplitude: float, u: float = 0.25, shape: str = "exponential"
) -> torch.Tensor:
    """Δ(r) for every entry of ``rank`` (float tensor of 0-based ranks among live groups).

    Args:
        rank: rank of each group, 0 = least important.
        to_prune: N_p ≥ 1, groups the layer still has to prune.
        amplitude: A, the largest increment (given to rank 0).
        u: Δ(N₁)/A, in (0, 0.5).
        shape: ``exponential`` (default) or ``linear``.
    """
    if to_prune < 1:
        raise ValueError(f"to_prune={to_prune} must be >= 1 (a layer with nothing left to prune is done)")
    rank = rank.to(torch.float64)
    if shape == "linear":
        return amplitude - amplitude / to_prune * rank
    alpha = math.log(2.0 / u) / to_prune
    n1 = math.log(1.0 / u) / alpha
    near = amplitude * torch.exp(-alpha * rank)
    # far from the pruned end the negative branch grows like e^{αr}: clamp the exponent, the result is clipped anyway
    far = 2 * u * amplitude - amplitude * torch.exp((-alpha * (2 * n1 - rank)).clamp(max=80.0))
    return torch.where(rank < n1, near, far)


def live_ranks(scores: torch.Tensor, live: torch.Tensor) -> torch.Tensor:
    """0-based rank of every live group by ascending score (stable: ties keep index order); dead groups get −1.

    Args:
        scores: one score per group (any shape).
        live: bool tensor of the same shape, True for groups not yet pruned.
    """
    flat, alive = scores.flatten().to(torch.float64), live.flatten()
    keyed = torch.where(alive, flat, torch.full_like(flat, math.inf))  # dead groups sort last
    order = torch.argsort(keyed, stable=True)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel(), device=order.device)
    return torch.where(alive, rank, torch.full_like(rank, -1)).view_as(scores)
