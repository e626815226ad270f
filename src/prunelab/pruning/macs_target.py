"""Structured compression counted on the compacted model: the parameter sparsity whose masks, once compacted, give
the requested ratio of prunable weights (``target=params``) or of MACs (``target=macs``).

Removing a filter also removes every weight that reads its channel in the next layer, which the masks leave nonzero:
counted on the masks, filter pruning of LeNet-5 "at 8×" is 17× fewer weights once compacted, and 300× "at 32×"
(bench/robustness.py). The MACs saved by a group depend on its layer's input size as well, so a ranking that meets a
parameter ratio misses a MACs ratio (channel pruning of ResNet-20 at 4× fewer weights gives 1.5× fewer MACs). As
Torch-Pruning's and NNI's FLOPs-budget pruners do, we keep the method's ranking and search its threshold, each point
measured exactly by compacting a masked copy (:func:`prunelab.measure.compact`) and counting its weights or MACs:

- ``target=params``: bisection over the masks' parameter sparsity (:func:`sparsity_for_target`);
- ``target=macs``: a search over whole groups (:func:`plan_counts`). The allocation's order of removal is a *path*
  of per-layer prune counts (:func:`removal_path`: by score for ``global``, LAMP score for ``lamp``, by the share of
  the layer already pruned for ``layer``); the point of the path closest to the ratio is found by bisection over
  the number of groups removed, then, where one group of the path jumps over the ±2 % band (a conv1 filter of
  LeNet-5 carries ~9 % of its MACs), single groups are added from the point below and given back from the point
  above, in any layer, until the ratio is inside it; of the two plans, the one that keeps more weights. A plan past
  the ratio then gives back single groups while it stays at or above it. Where no such point exists the error names
  the nearest ratios reached on either side.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import torch
import torch_pruning as tp
from torch import nn

from prunelab.measure import compact, count_macs
from prunelab.measure.sparsity import layer_table
from prunelab.pruning import groups
from prunelab.pruning.allocate import UnreachableCompressionError, allocate, keep_floor, lamp_scores
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


def compacted_cost(
    net: nn.Module,
    masks: dict[str, torch.Tensor],
    dependents: dict[str, list[Dependent]],
    example_input: torch.Tensor,
    target: str,
    layers: list[str],
) -> int:
    """MACs (``target=macs``) or nonzero weights of ``layers`` (``params``; a compacted ``column`` mask keeps the
    zeros of columns whose channel still has a reader) of ``net`` with ``masks`` applied and every removable channel
    removed."""
    compacted = compact(masked_copy(net, masks, dependents), example_input, inplace=True).net  # a throwaway copy
    if target == "macs":
        return count_macs(compacted, example_input)
    return sum(row["nonzero"] for row in layer_table(compacted, layers))


@torch.no_grad()
def compacted_macs(net: nn.Module, example_input: torch.Tensor) -> int:
    """MACs of ``net`` once every removable structured zero is taken out (what ``macs_reduction`` counts)."""
    return count_macs(compact(net, example_input).net, example_input)


def sparsity_for_target(
    cost_at: Callable[[float], int],
    dense_cost: int,
    compression: float,
    max_sparsity: float,
    steps: int = 12,
    min_sparsity: float = 0.0,
    target: str = "macs",
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
        log.warning(
            "pruning.target=%s: the closest ratio of %s this ranking reaches is %.3fx (requested %gx): "
            "single groups are coarse on this network",
            target,
            unit,
            reached,
            compression,
        )
    return sparsity, reached


TOLERANCE = 0.02  # |reached − requested| / requested that counts as meeting the ratio (the method contract's 2 %)
REFINE_ROUNDS = 6  # single-group moves tried after the path's bisection, each over every layer


def rungs(count: int, start: int, cap: int, round_to: int | None = None, block: int = 1) -> list[int]:
    """Prune counts a layer of ``count`` groups may take, ascending, from ``start`` (already pruned) to ``cap``;
    with ``round_to`` the kept count is a multiple of it (or the whole layer, as :func:`allocate.keep_floor`); with
    ``block`` the groups go ``block`` at a time (:func:`layer_structure`)."""
    if block > 1:
        allowed = set(range(0, count + 1, block))
    elif round_to and count > round_to:
        allowed = {0, *(count - j * round_to for j in range(1, math.ceil(count / round_to)))}
    else:
        allowed = set(range(count + 1))
    return [start, *sorted(k for k in allowed if start < k <= cap)]


def removal_path(scores: dict[str, torch.Tensor], ladders: dict[str, list[int]], scope: str) -> list[tuple[str, int]]:
    """The order in which the allocation removes groups: moves (layer, prune count after the move), each one rung of
    the layer's ladder. ``global`` orders the moves by the mean score of the groups they remove, ``lamp`` by their
    LAMP score (:func:`prunelab.pruning.allocate.lamp_scores`), ``layer`` by the share of the layer pruned after the
    move (every layer at the same ratio, Torch-Pruning's default). Within a layer the lowest scores always go first."""
    ranked = lamp_scores(scores) if scope == "lamp" else scores
    moves = []
    for i, (name, ladder) in enumerate(ladders.items()):
        order = torch.sort(ranked[name].detach().flatten().double().cpu(), stable=True).values
        for j in range(1, len(ladder)):
            a, b = ladder[j - 1], ladder[j]
            key = b / len(order) if scope == "layer" else float(order[a:b].mean())
            moves.append((key, i, j, name, b))
    moves.sort(key=lambda m: m[:3])
    return [(name, k) for *_, name, k in moves]


@dataclass
class Plan:
    """Groups to prune per layer, the ratio they give, and the nearest ratios met on either side of the request."""

    counts: dict[str, int]
    reached: float
    below: float | None = None  # largest ratio < requested that the search met
    above: float | None = None  # smallest ratio > requested that the search met
    evaluated: int = 0
    points: dict[tuple[int, ...], float] = field(default_factory=dict, repr=False)

    def met(self, compression: float) -> bool:
        return within_band(self.reached, compression)


def within_band(reached: float, compression: float) -> bool:
    """``reached`` within the ±2 % band of the requested ``compression`` (the method contract's tolerance)."""
    return abs(reached - compression) / compression <= TOLERANCE


def nearest_message(compression: float, target: str, below: float | None, above: float | None, why: str) -> str:
    """The error for a ratio no allocation reaches within 2 %: the nearest ratios on either side, and why."""
    unit = "MACs" if target == "macs" else "weights"
    sides = [f"{below:.3g}× below" if below else "none below", f"{above:.3g}× above" if above else "none above"]
    offer = " or ".join(f"{r:.3g}" for r in (below, above) if r)
    return (
        f"pruning.compression={compression:g} with pruning.target={target} cannot be met within 2 %: {why}; the "
        f"nearest ratios of {unit} reached are {sides[0]} and {sides[1]}"
        + (f" (set pruning.compression={offer})" if offer else "")
    )


def plan_counts(
    cost_of: Callable[[dict[str, int]], int],
    dense_cost: int,
    compression: float,
    path: list[tuple[str, int]],
    start: dict[str, int],
    ladders: dict[str, list[int]],
    refine: bool = True,
    kept: Callable[[dict[str, int]], int] | None = None,
) -> Plan:
    """The per-layer prune counts along ``path`` (from ``start``) whose compacted cost is closest to
    ``dense_cost / compression``; where one move of the path steps over the ±2 % band, one layer at a time moves
    off the path (:func:`_refine`) from the path's points on both sides of it, and of the two plans that land in the
    band the one that keeps more weights (``kept``) wins: on LeNet-5 (6-16-120-84) at 4× fewer MACs, the path steps
    from 3.75× to 5.4× when conv1 gives up its fourth filter; adding groups from below cuts conv2 to 5 filters and
    fc1 to 25 units, giving groups back from above keeps conv1 at 2 filters, conv2 at 10 and fc1 at 41 — the same
    MACs and 1.9× the weights (+0.6 points over seeds 0–2, docs/benchmarks.md).

    Args:
        cost_of: prune counts per layer → cost (MACs or weights) of the compacted network (non-increasing).
        dense_cost: cost of the dense network.
        compression: requested dense cost / pruned cost.
        path: :func:`removal_path`.
        start: the counts already pruned (the path starts there and never goes below them).
        ladders: the rungs of every layer (:func:`rungs`), for the moves off the path.
        refine: move off the path where it misses the band, and give back the groups a plan past the ratio
            does not need (:func:`_give_back`).
        kept: prune counts per layer → weights of the compacted network, to choose between plans in the band
            (without it, the one closer to the ratio).
    """
    plan = Plan(dict(start), 1.0)

    def at(counts: dict[str, int]) -> float:
        key = tuple(counts[n] for n in ladders)
        if key not in plan.points:
            plan.points[key] = dense_cost / max(cost_of(counts), 1)
            plan.evaluated += 1
        return plan.points[key]

    prefix = [dict(start)]
    for name, k in path:
        prefix.append({**prefix[-1], name: k})
    lo, hi = 0, len(path)
    if at(prefix[hi]) >= compression:  # smallest m with ratio ≥ compression
        while lo < hi:
            mid = (lo + hi) // 2
            if at(prefix[mid]) >= compression:
                hi = mid
            else:
                lo = mid + 1
    # the path's points on either side of the ratio, the closer first (the answer where no move lands in the band)
    sides = sorted((prefix[m] for m in {max(hi - 1, 0), hi}), key=lambda c: abs(at(c) - compression))
    best = sides[0]
    if refine and not within_band(at(best), compression):
        found = [_refine(side, compression, at, path, start, ladders) for side in sides]
        inside = [c for c in found if within_band(at(c), compression)]
        if inside and kept is not None:  # equal cost either way: the network that keeps more weights
            best = max(inside, key=kept)
        else:
            best = min([best, *found], key=lambda c: abs(at(c) - compression))
    if refine and at(best) > compression:
        best = _give_back(best, compression, at, ladders, kept)
    ratios = list(plan.points.values())
    plan.counts, plan.reached = best, at(best)
    plan.below = max((r for r in ratios if r < compression), default=None)
    plan.above = min((r for r in ratios if r > compression), default=None)
    return plan


def _refine(
    counts: dict[str, int],
    compression: float,
    at: Callable[[dict[str, int]], float],
    path: list[tuple[str, int]],
    start: dict[str, int],
    ladders: dict[str, list[int]],
) -> dict[str, int]:
    """Moves of one layer from ``counts``, as far along its ladder as the ratio needs (forward when below it, back
    towards ``start`` when above; bisection, the cost being monotone in each layer's count): the smallest such move
    (share of the layer's ladder) that lands within 2 % wins, else the one that comes closest, for at most
    :data:`REFINE_ROUNDS` moves. One layer can be the only way in: a channel of LeNet-5's conv2 goes only with all
    25 of fc1's inputs that read it."""
    rank = {}
    for i, (name, _) in enumerate(path):
        rank.setdefault(name, i)
    off = lambda c: abs(at(c) - compression) / compression  # noqa: E731
    for _ in range(REFINE_ROUNDS):
        if off(counts) <= TOLERANCE:
            break
        forward = at(counts) < compression
        options = []
        for name in sorted(ladders, key=lambda n: rank.get(n, len(path))):
            ladder = ladders[name]
            if counts[name] not in ladder:
                continue
            j = ladder.index(counts[name])
            steps = ladder[j + 1 :] if forward else [k for k in reversed(ladder[:j]) if k >= start[name]]
            if not steps:
                continue
            here = [{**counts, name: k} for k in steps]
            lo, hi = 0, len(here) - 1  # the first step whose ratio is on the other side of the request
            if (at(here[hi]) >= compression) == forward:
                while lo < hi:
                    mid = (lo + hi) // 2
                    if (at(here[mid]) >= compression) == forward:
                        hi = mid
                    else:
                        lo = mid + 1
            options += [here[i] for i in {max(hi - 1, 0), hi}]
        moved = {id(c): sum(abs(c[n] - counts[n]) / max(len(ladders[n]), 2) for n in c) for c in options}
        inside = min((c for c in options if off(c) <= TOLERANCE), key=lambda c: moved[id(c)], default=None)
        if inside is not None:  # the smallest change of one layer that meets the ratio
            return inside
        closest = min(options, key=off, default=None)
        if closest is None or off(closest) >= off(counts):
            break
        counts = closest
    return counts


def _give_back(
    counts: dict[str, int],
    compression: float,
    at: Callable[[dict[str, int]], float],
    ladders: dict[str, list[int]],
    kept: Callable[[dict[str, int]], int] | None,
) -> dict[str, int]:
    """From a plan above the requested ratio, single groups given back (one rung of one layer's ladder, which starts
    at the groups already pruned) while the ratio stays at or above the request, each time the one that keeps the
    most weights (without ``kept``, the one closest to the ratio). The path's last move can overshoot by a whole
    group: on LeNet-5 (6-16-120-84) at 2× fewer MACs it lands at 2.03×, and giving back fc units until 2.00× keeps
    fc1 at 86 units rather than 76 and fc2 at 55 rather than 53."""
    while True:
        options = []
        for name, ladder in ladders.items():
            j = ladder.index(counts[name]) if counts[name] in ladder else 0
            if j > 0:
                back = {**counts, name: ladder[j - 1]}
                if at(back) >= compression:
                    options.append(back)
        if not options:
            return counts
        counts = max(options, key=kept) if kept is not None else min(options, key=at)


@torch.no_grad()
def layer_structure(
    net: nn.Module, layers: dict[str, nn.Module], example_input: torch.Tensor, granularity: str
) -> tuple[dict[str, int], list[str]]:
    """What Torch-Pruning's dependency graph says about the channels of ``layers`` at ``granularity``:

    - input blocks (``channel``): Linear layers that read a flattened feature map, with the number of their inputs
      one channel of the map feeds (LeNet-5's fc1: 25 of its 400). Their ``channel`` groups go that many at a time,
      a whole channel of the map, or pruning them saves no MACs upstream;
    - coupled layers: a layer whose channels are shared with another layer's (residual additions: every producer of
      the stream for ``filter``, every reader of it for ``channel``). Such a channel goes only when every layer of
      the group drops it, which per-layer masks do not coordinate (Torch-Pruning prunes the group as one), so under
      ``target=macs`` these layers are left whole: pruning them would cost accuracy and save no MACs.
    """
    model = copy.deepcopy(net).eval()
    copies = {n: model.get_submodule(n) for n in layers}
    with torch.enable_grad():  # Torch-Pruning traces the graph through autograd
        graph = tp.DependencyGraph().build_dependency(model, example_inputs=example_input, verbose=False)
    blocks, coupled = {}, []
    for name, module in copies.items():
        linear = isinstance(module, nn.Linear)
        if granularity == "filter":
            fn = tp.prune_linear_out_channels if linear else tp.prune_conv_out_channels
        else:
            fn = tp.prune_linear_in_channels if linear else tp.prune_conv_in_channels
        group = graph.get_pruning_group(module, fn, idxs=[0])
        out = graph.is_out_channel_pruning_fn(fn)
        sharing = {
            dep.target.module
            for dep, _ in group
            if isinstance(dep.target.module, (nn.Conv2d, nn.Linear))
            and graph.is_out_channel_pruning_fn(dep.handler) == out
        }
        if len(sharing) > 1:
            coupled.append(name)
        block = max((len(idxs) for dep, idxs in group if dep.target.module is module), default=1)
        if granularity == "channel" and linear and block > 1 and module.in_features % block == 0:
            blocks[name] = block
    log.debug("layer structure: input blocks %s, coupled %s", blocks, coupled)
    return blocks, coupled


def fractions(callback, counts: dict[str, int]) -> dict[str, float]:
    """Prune counts per layer as the share of its groups (a ``layer_sparsity`` table the allocator meets exactly)."""
    weights = callback.masks.weights()
    return {n: k / math.prod(groups.group_shape(weights[n], callback.granularity)) for n, k in counts.items()}


@torch.no_grad()
def plan_for(
    callback,
    compression: float | None = None,
    scores: dict[str, torch.Tensor] | None = None,
    scope: str | None = None,
    refine: bool = True,
) -> Plan:
    """:func:`plan_counts` for a bound :class:`~prunelab.pruning.base.PruningCallback`: its eligible layers, their
    floors (``min_keep``, ``min_keep_fraction``, ``round_to``), the groups its masks prune already as the start, its
    ranking (:meth:`group_scores`, or ``scores``) in its ``scope`` (or ``scope``), MACs of the model compacted on its
    example input."""
    example = callback.allocator.example()
    weights = callback.masks.weights()
    if callback.coupled is None:
        callback.input_blocks, callback.coupled = layer_structure(
            callback.net,
            {n: m for n, m in callback.masks.modules.items() if n in callback._eligible},
            example,
            callback.granularity,
        )
        if callback.coupled:
            log.info(
                "%s: target=macs leaves %s whole (channels shared through residual additions)",
                callback.method,
                ", ".join(callback.coupled),
            )
    blocks = callback.input_blocks or {}
    if scores is None:
        scores = callback.allocator.scores()
    scores = {n: scores[n] for n in weights if n in scores}
    names = list(weights)
    ladders, start = {}, {}
    for n, score in scores.items():
        count = score.numel()
        mask = callback.masks.masks.get(n)
        start[n] = 0 if mask is None else int((~groups.group_mask_of(mask, callback.granularity).bool()).sum())
        block = blocks.get(n, 1)
        floor = block * keep_floor(
            count // block, callback.min_keep, callback.min_keep_fraction, None if block > 1 else callback.round_to
        )
        cap = start[n] if n in callback.coupled else max(count - floor, start[n])
        ladders[n] = rungs(count, start[n], cap, callback.round_to, block)
    path = removal_path(scores, ladders, scope or callback.scope)
    table = lambda counts: {n: k / scores[n].numel() for n, k in counts.items()}  # noqa: E731

    def cost_of(counts: dict[str, int], target: str = "macs") -> int:
        masks = allocate(weights, scores, 0.0, callback.granularity, "global", callback.min_keep, table(counts))
        return compacted_cost(callback.net, masks, callback.masks.dependents, example, target, names)

    dense = count_macs(callback.net, example)
    request = callback.compression if compression is None else compression
    return plan_counts(cost_of, dense, request, path, start, ladders, refine, kept=partial(cost_of, target="params"))
