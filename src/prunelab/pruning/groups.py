"""Granularity views of a weight tensor: which elements are pruned together.

A Conv2d weight ``W`` of shape ``(N, C, kh, kw)`` (Linear: ``(N, C)``) is viewed as ``(N, C, K)`` with
``K = kh·kw``. The im2col matrix of METHODS.md is ``W₂ = W.view(N, C·K)``, so:

- ``weight``: every element is its own group;
- ``filter``: a row of W₂ — one output filter/neuron ``W[n]``;
- ``channel``: one input channel across all filters ``W[:, c]``;
- ``column``: a column of W₂ ("shape" group) — one position ``(c, i, j)`` across all filters.
"""

from __future__ import annotations

import torch

GRANULARITIES = ("weight", "filter", "channel", "column")

# Dimensions of the (N, C, K) view reduced to get one score per group.
_REDUCED_DIMS = {"weight": (), "filter": (1, 2), "channel": (0, 2), "column": (0,)}


def check_granularity(granularity: str) -> str:
    """Return ``granularity`` or raise a ValueError listing the valid ones."""
    if granularity not in GRANULARITIES:
        raise ValueError(f"Unknown granularity {granularity!r}; valid choices: {', '.join(GRANULARITIES)}")
    return granularity


def _ncK(weight: torch.Tensor) -> torch.Tensor:
    if weight.dim() < 2:
        raise ValueError(f"Cannot group a weight of shape {tuple(weight.shape)}: need at least 2 dims")
    return weight.reshape(weight.shape[0], weight.shape[1], -1)


def group_shape(weight: torch.Tensor, granularity: str) -> tuple[int, ...]:
    """Shape of the tensor of group scores for ``weight``."""
    view = _ncK(weight)
    dims = _REDUCED_DIMS[check_granularity(granularity)]
    return tuple(s for d, s in enumerate(view.shape) if d not in dims)


def group_size(weight: torch.Tensor, granularity: str) -> int:
    """Number of weight elements in one group."""
    view = _ncK(weight)
    size = 1
    for d in _REDUCED_DIMS[check_granularity(granularity)]:
        size *= view.shape[d]
    return size


def group_norms(weight: torch.Tensor, granularity: str, p: float = 2.0) -> torch.Tensor:
    """L``p`` norm of every group (``|w|`` for ``weight`` granularity), shaped as :func:`group_shape`."""
    view = _ncK(weight.detach())
    dims = _REDUCED_DIMS[check_granularity(granularity)]
    if not dims:
        return view.abs()
    return view.norm(p=p, dim=dims)


def expand(group_mask: torch.Tensor, weight: torch.Tensor, granularity: str) -> torch.Tensor:
    """Broadcast a per-group mask back to ``weight``'s shape."""
    view_shape = _ncK(weight).shape
    shape = list(view_shape)
    for d in _REDUCED_DIMS[check_granularity(granularity)]:
        shape[d] = 1
    return group_mask.reshape(shape).expand(view_shape).reshape(weight.shape)


def group_mask_of(mask: torch.Tensor, granularity: str) -> torch.Tensor:
    """Per-group view of a full mask: a group is alive when any of its elements is."""
    view = _ncK(mask)
    dims = _REDUCED_DIMS[check_granularity(granularity)]
    return view.amax(dim=dims) if dims else view.clone()
