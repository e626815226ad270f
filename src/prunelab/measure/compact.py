"""Physical removal of structured zeros with Torch-Pruning, and the check that outputs did not change.

Channels are taken from Torch-Pruning's groups (``DependencyGraph.get_all_groups``): one group is a set of coupled
channels — a conv's filters, its BatchNorm, the input channels of every consumer, and through residual additions
every other producer and consumer of the same channel. Removing channel ``c`` of a group is exact when either

1. every consumer ignores it (all consumer weight columns for ``c`` are zero: channel/column pruning), or
2. every producer's row for ``c`` is zero (filter pruning). The channel is then a *constant* — not zero: a zero
   filter still emits its bias, and BatchNorm turns a zero input into ``β − γ·μ/√(σ²+ε)``, which ReLU may or
   may not clip. The constant is read at each consumer's input on a random batch (after BN, ReLU, pooling, additions);
   where it is zero the channel goes; where it is not, it is folded into the consumer's bias, which is exact only
   for a Linear or an unpadded conv. A padded conv sees the constant everywhere except where its kernel overlaps
   the zero padding, so no bias reproduces it: such channels are kept (a pruning method that also zeroes the BN
   shift of the filters it prunes makes them removable).

The classifier's outputs (the layer that produces the network output) are never removed, nor the image input.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
import torch_pruning as tp
from torch import nn

LAYERS = (nn.Conv2d, nn.Linear)
ZERO = 1e-7  # |constant| below this is treated as an exact zero (removal changes logits by ≲ ZERO·Σ|W|)


class CompactionError(RuntimeError):
    """The compacted network does not reproduce the masked one within tolerance."""


@dataclass
class CompactResult:
    """The compacted copy, its largest logit difference to the masked net, and what was removed/folded."""

    net: nn.Module
    max_abs_diff: float
    removed: dict[str, int] = field(default_factory=dict)
    folded: int = 0


def _random_batch(example_input: torch.Tensor, batch: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((batch, *example_input.shape[1:]), generator=gen)
    return x.to(device=example_input.device, dtype=example_input.dtype)


@torch.no_grad()
def _layer_inputs(model: nn.Module, x: torch.Tensor) -> tuple[dict[nn.Module, torch.Tensor], nn.Module | None]:
    """Input of every Conv2d/Linear on ``x``, and the layer whose output is the network output."""
    inputs, outputs = {}, {}

    def hook(mod, args, out):
        inputs[mod], outputs[mod] = args[0].detach(), out

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, LAYERS)]
    try:
        y = model(x)
    finally:
        for h in handles:
            h.remove()
    head = next((m for m, out in outputs.items() if out is y), None)
    return inputs, head


def _constant(values: torch.Tensor) -> float | None:
    """The value of a tensor that is constant (up to float noise), else ``None``."""
    lo, hi = float(values.min()), float(values.max())
    return (lo + hi) / 2 if hi - lo <= 1e-6 * max(1.0, abs(lo), abs(hi)) else None


def _foldable(layer: nn.Module) -> bool:
    """Whether a constant input channel of ``layer`` equals a bias term at every output position."""
    if isinstance(layer, nn.Linear):
        return True
    unpadded = layer.padding == "valid" if isinstance(layer.padding, str) else not any(layer.padding)
    return layer.groups == 1 and unpadded


def _channel_values(layer: nn.Module, x: torch.Tensor, index: int) -> torch.Tensor:
    return x[:, index] if isinstance(layer, nn.Conv2d) else x[..., index]


def _plan_group(group, graph, inputs) -> tuple[list[int], list[tuple[nn.Module, int, float]]]:
    """Root indices of ``group`` that can go, and the (consumer, input index, constant) folds they need."""
    n = len(group[0].idxs)
    producer_zero, consumer_zero = [True] * n, [True] * n
    consumers: list[tuple[nn.Module, int, int]] = []  # (layer, input index, root index)
    for item in group.items:
        module, idxs = item.dep.target.module, item.idxs
        if not isinstance(module, LAYERS):
            continue
        weight = module.weight.detach()
        if graph.is_out_channel_pruning_fn(item.dep.handler):
            alive, flags = weight.reshape(weight.shape[0], -1)[idxs].ne(0).any(1), producer_zero
        else:
            alive, flags = weight.transpose(0, 1).reshape(weight.shape[1], -1)[idxs].ne(0).any(1), consumer_zero
            consumers += [(module, i, r) for i, r in zip(idxs, item.root_idxs)]
        for r, a in zip(item.root_idxs, alive.tolist()):
            flags[r] = flags[r] and not a
    if not consumers:  # the channels leave through something Torch-Pruning does not model: keep them
        return [], []
    plan: dict[int, list[tuple[nn.Module, int, float]]] = {}
    for r in range(n):
        if consumer_zero[r]:
            plan[r] = []
        elif producer_zero[r]:
            folds = []
            for module, i, rr in consumers:
                if rr != r:
                    continue
                x = inputs.get(module)
                value = None if x is None else _constant(_channel_values(module, x, i))
                if value is None or (abs(value) > ZERO and not _foldable(module)):
                    break
                if abs(value) > ZERO:
                    folds.append((module, i, value))
            else:
                plan[r] = folds
    if len(plan) == n:  # keep one channel so that no layer is emptied
        plan.pop(n - 1)
    return sorted(plan), [f for folds in plan.values() for f in folds]


@torch.no_grad()
def _fold(layer: nn.Module, index: int, value: float) -> None:
    """Move the contribution of a constant input ``index`` of ``layer`` into its bias."""
    column = layer.weight[:, index]
    delta = value * (column.sum(dim=tuple(range(1, column.dim()))) if column.dim() > 1 else column)
    if layer.bias is None:
        layer.bias = nn.Parameter(torch.zeros_like(delta))
    layer.bias.add_(delta)


@torch.no_grad()
def max_abs_diff(a: nn.Module, b: nn.Module, x: torch.Tensor) -> tuple[float, float]:
    """Largest absolute logit difference between ``a`` and ``b`` on ``x`` (eval mode), and the largest |logit| of
    ``a``."""
    modes = a.training, b.training
    a.eval(), b.eval()
    try:
        ya, yb = a(x), b(x)
    finally:
        a.train(modes[0]), b.train(modes[1])
    return float((ya - yb).abs().max()), float(ya.abs().max())


def check_equivalence(masked: nn.Module, compacted: nn.Module, x: torch.Tensor, atol: float) -> float:
    """Max abs logit difference; raises :class:`CompactionError` above ``atol·max(1, max|logit|)``."""
    diff, scale = max_abs_diff(masked, compacted, x)
    limit = atol * max(1.0, scale)
    if not diff <= limit:
        raise CompactionError(
            f"compacted model differs from the masked one by {diff:.3g} (max |logit| {scale:.3g}, tolerance "
            f"{limit:.3g} = measure.atol {atol:g} × max(1, max|logit|)); the structured zeros could not be removed "
            "without changing the outputs"
        )
    return diff


def compact(
    net: nn.Module,
    example_input: torch.Tensor,
    atol: float = 1e-4,
    batch: int = 8,
    seed: int = 0,
    inplace: bool = False,
    check: bool = True,
) -> CompactResult:
    """Copy of ``net`` with every removable structured zero taken out, checked against ``net``.

    Args:
        net: the masked network (left untouched unless ``inplace``).
        example_input: one input batch (only its shape, dtype and device are used beyond tracing).
        atol: tolerance on the max abs logit difference, relative to max(1, max|logit|).
        batch: size of the random batch used to read constants and check equivalence.
        seed: seed of that batch.
        inplace: compact ``net`` itself (a throwaway copy: no second copy is made, and nothing is checked).
        check: compare the result with ``net`` (``inplace`` cannot: ``net`` is the result).

    Raises:
        CompactionError: the compacted copy does not reproduce ``net``.
    """
    model = net.eval() if inplace else copy.deepcopy(net).eval()
    x = _random_batch(example_input, batch, seed)
    inputs, head = _layer_inputs(model, x)
    with torch.enable_grad():  # Torch-Pruning traces the graph through autograd
        graph = tp.DependencyGraph().build_dependency(model, example_inputs=example_input, verbose=False)
    names = {m: n for n, m in model.named_modules()}
    ignored = [head] if head is not None else [m for m in model.modules() if isinstance(m, LAYERS)][-1:]
    plans = []
    for group in graph.get_all_groups(ignored_layers=ignored, root_module_types=LAYERS):
        idxs, folds = _plan_group(group, graph, inputs)
        if idxs:
            plans.append((group[0].dep.target.module, group[0].dep.handler, idxs, folds))
    removed, folded = {}, 0
    for module, handler, idxs, folds in plans:
        for layer, index, value in folds:
            _fold(layer, index, value)
        folded += len(folds)
        graph.get_pruning_group(module, handler, idxs=idxs).prune()
        removed[names[module]] = len(idxs)
    diff = check_equivalence(net, model, x, atol) if check and not inplace else float("nan")
    return CompactResult(model, diff, removed, folded)
