"""Compression counted in MACs: the parameter sparsity whose masks, once compacted, cut MACs by the requested ratio.

For structured granularities the MACs saved by a group depend on its layer's input size and on what compaction can
remove downstream, so the global ranking that meets a parameter ratio misses a MACs ratio (channel pruning of
ResNet-20 at 4× fewer weights gives 1.5× fewer MACs). As Torch-Pruning's and NNI's FLOPs-budget pruners do, we keep
the method's ranking and search the global threshold: bisection over the parameter sparsity, each point measured
exactly by compacting a masked copy (:func:`prunelab.measure.compact`) and counting its MACs.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable

import torch
from torch import nn

from prunelab.measure import compact, count_macs
from prunelab.pruning.masks import Dependent

log = logging.getLogger(__name__)
TARGETS = ("params", "macs")
MACS_GRANULARITIES = ("filter", "channel")


@torch.no_grad()
def masked_copy(net: nn.Module, masks: dict[str, torch.Tensor], dependents: dict[str, list[Dependent]]) -> nn.Module:
    """A copy of ``net`` with ``masks`` (layer name → weight mask) and their filter dependents applied."""
    names = {m: n for n, m in net.named_modules()}
    clone = copy.deepcopy(net).eval()
    for name, mask in masks.items():
        clone.get_submodule(name).weight.mul_(mask)
        alive = mask.reshape(mask.shape[0], -1).any(dim=1)
        for owner, param in dependents.get(name, ()):
            getattr(clone.get_submodule(names[owner]), param).mul_(alive)
    return clone


def compacted_macs(net: nn.Module, masks: dict[str, torch.Tensor], dependents: dict[str, list[Dependent]],
                   example_input: torch.Tensor) -> int:
    """MACs of ``net`` with ``masks`` applied and every removable channel removed."""
    return count_macs(compact(masked_copy(net, masks, dependents), example_input).net, example_input)


def sparsity_for_macs(
    macs_at: Callable[[float], int], dense_macs: int, compression: float, max_sparsity: float, steps: int = 12,
    min_sparsity: float = 0.0,
) -> tuple[float, float]:
    """Parameter sparsity whose MACs reduction is closest to ``compression``, and that reduction.

    The masks move one group at a time along the method's ranking, so on a small network a single group can cut
    more than 2 % of the MACs: the result is the closest the ranking reaches, and a warning says when that is
    more than 2 % away.

    Args:
        macs_at: sparsity → MACs of the compacted masked network (non-increasing in the sparsity).
        dense_macs: MACs of the dense network.
        compression: requested dense MACs / pruned MACs.
        max_sparsity: the largest sparsity the allocation accepts.
        steps: bisection steps (enough to resolve one group: about log2 of the number of groups).
        min_sparsity: the lowest sparsity to consider (a schedule that already pruned this much: weights it zeroed
            count as removed in ``macs_at``, but a lower sparsity would unmask them and let them grow back).

    Raises:
        ValueError: even ``max_sparsity`` does not reach the requested MACs reduction.
    """
    target = dense_macs / compression
    hi_macs = macs_at(max_sparsity)
    if hi_macs > target * 1.02:
        raise ValueError(
            f"pruning.compression={compression:g} with pruning.target=macs cannot be reached: pruning every group "
            f"this granularity allows leaves {dense_macs / hi_macs:.2f}× fewer MACs"
        )
    lo, hi = min(min_sparsity, max_sparsity), max_sparsity
    best = (abs(hi_macs - target), hi, hi_macs)
    for _ in range(steps):
        mid = (lo + hi) / 2
        macs = macs_at(mid)
        best = min(best, (abs(macs - target), mid, macs))
        if macs > target:
            lo = mid
        else:
            hi = mid
    _, sparsity, macs = best
    reached = dense_macs / max(macs, 1)
    if abs(reached - compression) / compression > 0.02:
        log.warning("pruning.target=macs: the closest MACs reduction this ranking reaches is %.3fx (requested %gx): "
                    "single groups are coarse on this network", reached, compression)
    return sparsity, reached
