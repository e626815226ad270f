"""Structured compression counted on the compacted model: the parameter sparsity whose masks, once compacted, give
the requested ratio of prunable weights (``target=params``) or of MACs (``target=macs``).

Removing a filter also removes every weight that reads its channel in the next layer, which the masks leave nonzero:
counted on the masks, filter pruning of LeNet-5 "at 8×" is 17× fewer weights once compacted, and 300× "at 32×"
(bench/robustness.py). The MACs saved by a group depend on its layer's input size as well, so a ranking that meets a
parameter ratio misses a MACs ratio (channel pruning of ResNet-20 at 4× fewer weights gives 1.5× fewer MACs). As
Torch-Pruning's and NNI's FLOPs-budget pruners do, we keep the method's ranking and search the global threshold:
bisection over the masks' parameter sparsity, each point measured exactly by compacting a masked copy
(:func:`prunelab.measure.compact`) and counting its weights or MACs.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable

import torch
from torch import nn

from prunelab.measure import compact, count_macs
from prunelab.measure.sparsity import layer_table
from prunelab.pruning.allocate import UnreachableCompressionError
from prunelab.pruning.masks import Dependent

log = logging.getLogger(__name__)
TARGETS = ("params", "macs")
MACS_GRANULARITIES = ("filter", "channel")  # target=macs: the groups whose removal takes whole channels
# compression counted on the compacted model: a column is one input of every filter, and a channel none of the next
# layer's filters reads any more (all its columns pruned) is removed with its producer
COMPACTED_GRANULARITIES = ("filter", "channel", "column")


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


def compacted_cost(net: nn.Module, masks: dict[str, torch.Tensor], dependents: dict[str, list[Dependent]],
                   example_input: torch.Tensor, target: str, layers: list[str]) -> int:
    """MACs (``target=macs``) or nonzero weights of ``layers`` (``params``; a compacted ``column`` mask keeps the
    zeros of columns whose channel still has a reader) of ``net`` with ``masks`` applied and every removable channel
    removed."""
    compacted = compact(masked_copy(net, masks, dependents), example_input).net
    if target == "macs":
        return count_macs(compacted, example_input)
    return sum(row["nonzero"] for row in layer_table(compacted, layers))


def sparsity_for_target(
    cost_at: Callable[[float], int], dense_cost: int, compression: float, max_sparsity: float, steps: int = 12,
    min_sparsity: float = 0.0, target: str = "macs",
) -> tuple[float, float]:
    """Parameter sparsity of the masks whose compacted cost is closest to ``dense_cost / compression``, and the
    ratio reached.

    The masks move one group at a time along the method's ranking, so on a small network a single group can change
    the cost by more than 2 %: the result is the closest the ranking reaches, and a warning says when that is
    more than 2 % away.

    Args:
        cost_at: sparsity of the masks → cost (MACs or weights) of the compacted masked network (non-increasing).
        dense_cost: cost of the dense network.
        compression: requested dense cost / pruned cost.
        max_sparsity: the largest sparsity the allocation accepts.
        steps: bisection steps (enough to resolve one group: about log2 of the number of groups).
        min_sparsity: the lowest sparsity to consider (a schedule that already pruned this much: weights it zeroed
            count as removed in ``cost_at``, but a lower sparsity would unmask them and let them grow back).
        target: ``macs`` or ``params``, for the messages.

    Raises:
        UnreachableCompressionError: even ``max_sparsity`` does not reach the requested ratio.
    """
    unit = "MACs" if target == "macs" else "weights"
    goal = dense_cost / compression
    hi_cost = cost_at(max_sparsity)
    if hi_cost > goal * 1.02:
        raise UnreachableCompressionError(
            f"pruning.compression={compression:g} with pruning.target={target} cannot be reached: pruning every "
            f"group this granularity allows leaves {dense_cost / hi_cost:.2f}× fewer {unit} in the compacted model"
        )
    lo, hi = min(min_sparsity, max_sparsity), max_sparsity
    best = (abs(hi_cost - goal), hi, hi_cost)
    for _ in range(steps):
        mid = (lo + hi) / 2
        cost = cost_at(mid)
        best = min(best, (abs(cost - goal), mid, cost))
        if cost > goal:
            lo = mid
        else:
            hi = mid
    _, sparsity, cost = best
    reached = dense_cost / max(cost, 1)
    if abs(reached - compression) / compression > 0.02:
        log.warning("pruning.target=%s: the closest ratio of %s this ranking reaches is %.3fx (requested %gx): "
                    "single groups are coarse on this network", target, unit, reached, compression)
    return sparsity, reached
