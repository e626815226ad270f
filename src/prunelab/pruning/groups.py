"""Granularity views of a weight tensor: which elements are pruned together.

A Conv2d weight ``W`` of shape ``(N, C, kh, kw)`` (Linear: ``(N, C)``) is viewed as ``(N, C, K)`` with
``K = kh·kw``. The im2col matrix (docs/configuration.md, granularities) is ``W₂ = W.view(N, C·K)``, so:

- ``weight``: every element is its own group;
- ``filter``: a row of W₂ — one output filter/neuron ``W[n]``;
- ``channel``: one input channel across all filters ``W[:, c]``;
- ``column``: a column of W₂ ("shape" group) — one position ``(c, i, j)`` across all filters;
- ``N:M`` (e.g. ``2:4``): in every block of M consecutive weights of a row of W₂, N are kept. Scores and masks are
  per element (as ``weight``); the block constraint is applied by :func:`nm_mask`.
"""

from __future__ import annotations

import re

import torch

GRANULARITIES = ("weight", "filter", "channel", "column")
_NM = re.compile(r"^(\d+):(\d+)$")

# Dimensions of the (N, C, K) view reduced to get one score per group.
_REDUCED_DIMS = {"weight": (), "filter": (1, 2), "channel": (0, 2), "column": (0,)}


def parse_nm(granularity: str) -> tuple[int, int] | None:
    """``(N, M)`` for an ``"N:M"`` granularity with 0 < N < M, else ``None``."""
    match = _NM.match(granularity) if isinstance(granularity, str) else None
    if match is None:
        return None
    n, m = int(match.group(1)), int(match.group(2))
    return (n, m) if 0 < n < m else None


def check_granularity(granularity: str) -> str:
    """Return ``granularity`` or raise a ValueError listing the valid ones."""
    if granularity not in GRANULARITIES and parse_nm(granularity) is None:
        hint = ""
        if isinstance(granularity, int):  # YAML 1.1 reads an unquoted 2:4 as the base-60 integer 124
            hint = '; quote N:M in YAML (granularity: "2:4")'
        raise ValueError(
            f"Unknown granularity {granularity!r}; valid choices: {', '.join(GRANULARITIES)}, "
            f"or N:M with 0 < N < M such as 2:4{hint}"
        )
    return granularity


def has_groups(granularity: str, index: int, count: int) -> bool:
    """Whether layer ``index`` of ``count`` (the network's Conv2d/Linear layers in order) has groups of this
    granularity: the classifier's outputs (``filter``) and the image input (``channel``/``column``) are not pruned
    structurally."""
    if granularity == "filter":
        return index < count - 1
    if granularity in ("channel", "column"):
        return index > 0
    return True


def _dims(granularity: str) -> tuple[int, ...]:
    check_granularity(granularity)
    return _REDUCED_DIMS.get(granularity, ())  # N:M: per element, like ``weight``


def _ncK(weight: torch.Tensor) -> torch.Tensor:
    if weight.dim() < 2:
        raise ValueError(f"Cannot group a weight of shape {tuple(weight.shape)}: need at least 2 dims")
    return weight.reshape(weight.shape[0], weight.shape[1], -1)


def group_shape(weight: torch.Tensor, granularity: str) -> tuple[int, ...]:
    """Shape of the tensor of group scores for ``weight``."""
    view = _ncK(weight)
    dims = _dims(granularity)
    return tuple(s for d, s in enumerate(view.shape) if d not in dims)


def group_size(weight: torch.Tensor, granularity: str) -> int:
    """Number of weight elements in one group."""
    view = _ncK(weight)
    size = 1
    for d in _dims(granularity):
        size *= view.shape[d]
    return size


def group_norms(weight: torch.Tensor, granularity: str, p: float = 2.0) -> torch.Tensor:
    """L``p`` norm of every group (``|w|`` for ``weight`` granularity), shaped as :func:`group_shape`."""
    view = _ncK(weight.detach())
    dims = _dims(granularity)
    if not dims:
        return view.abs()
    return view.norm(p=p, dim=dims)


def expand(group_mask: torch.Tensor, weight: torch.Tensor, granularity: str) -> torch.Tensor:
    """Broadcast a per-group mask back to ``weight``'s shape."""
    view_shape = _ncK(weight).shape
    shape = list(view_shape)
    for d in _dims(granularity):
        shape[d] = 1
    return group_mask.reshape(shape).expand(view_shape).reshape(weight.shape)


def group_mask_of(mask: torch.Tensor, granularity: str) -> torch.Tensor:
    """Per-group view of a full mask: a group is alive when any of its elements is."""
    view = _ncK(mask)
    dims = _dims(granularity)
    return view.amax(dim=dims) if dims else view.clone()


def nm_mask(scores: torch.Tensor, n: int, m: int, name: str = "layer") -> torch.Tensor:
    """Keep-mask (shaped like ``scores``) keeping the ``n`` highest scores in every block of ``m`` consecutive
    elements of each row of W₂ (ties: lower index kept).

    Raises:
        ValueError: the row length C·kh·kw of layer ``name`` is not a multiple of ``m``.
    """
    rows = scores.reshape(scores.shape[0], -1)
    if rows.shape[1] % m:
        raise ValueError(
            f"{n}:{m} sparsity needs the input size of every pruned layer to be a multiple of {m}, but layer "
            f"{name!r} (weight {tuple(scores.shape)}) has rows of {rows.shape[1]}; exclude it (pruning.exclude)"
        )
    blocks = rows.reshape(rows.shape[0], -1, m)
    order = torch.argsort(-blocks.double(), dim=-1, stable=True)
    keep = torch.zeros_like(blocks, dtype=torch.bool)
    keep.scatter_(-1, order[..., :n], True)
    return keep.reshape(scores.shape)
