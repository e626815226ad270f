"""Collapse: a pruned network that no longer classifies is recorded as such, not as a result like the others.

A run has collapsed when any of these holds:

- its test accuracy is near chance: below chance + ``CHANCE_MARGIN`` of the range from chance to 100 % (10 classes:
  chance 10 %, collapsed below 19 %; 100 classes: chance 1 %, collapsed below 10.9 %);
- its test accuracy is far below its dense model's (when the dense accuracy is given): it kept less than
  ``DENSE_SHARE`` of what the dense model scores above chance, i.e. below chance + 0.75 · (dense − chance) (10 classes,
  dense 95.6 %: collapsed below 74.2 %, a drop of more than 21.4 points; 100 classes, dense 70 %: below 52.75 %);
- a prunable layer has no nonzero weight left;
- its output does not depend on its input (no path from input to output): random inputs give identical logits.

The run still ends FINISHED (exit status unchanged); it is tagged ``collapsed=true`` with ``collapse_reason``, its
summary has a WARNING line, and the sweep report marks it and keeps it off the Pareto front.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

CHANCE_MARGIN = 0.1
DENSE_SHARE = 0.75  # share of the dense model's accuracy above chance a pruned model must keep
TAG = "collapsed"
REASON_TAG = "collapse_reason"


@dataclass(frozen=True)
class Collapse:
    reasons: tuple[str, ...] = ()

    @property
    def collapsed(self) -> bool:
        return bool(self.reasons)

    def tags(self) -> dict[str, str]:
        """MLflow tags: ``collapsed`` is ``true``/``false``; ``collapse_reason`` only when collapsed."""
        tags = {TAG: str(self.collapsed).lower()}
        if self.collapsed:
            tags[REASON_TAG] = "; ".join(self.reasons)[:5000]
        return tags

    @property
    def warning(self) -> str | None:
        return f"collapsed: {'; '.join(self.reasons)}" if self.collapsed else None


def chance_limit(num_classes: int) -> float:
    """Test accuracy (%) below which a run counts as collapsed."""
    chance = 100.0 / num_classes
    return chance + CHANCE_MARGIN * (100.0 - chance)


def dense_limit(dense_acc: float, num_classes: int) -> float:
    """Test accuracy (%) below which a run counts as collapsed against a dense model of ``dense_acc`` (%)."""
    chance = 100.0 / num_classes
    return chance + DENSE_SHARE * (dense_acc - chance)


def starved(net: nn.Module, prunable: Iterable[str]) -> list[str]:
    """Conv2d/Linear layers left one live filter or one live input (of more), e.g. ``fc1 keeps 1 of 400 inputs``."""
    modules = dict(net.named_modules())
    out = []
    for name in prunable:
        layer = modules[name]
        if not isinstance(layer, (nn.Conv2d, nn.Linear)):
            continue
        w = layer.weight.detach()
        live = (
            ("filters", int(w.flatten(1).ne(0).any(1).sum()), w.shape[0]),
            ("inputs", int(w.transpose(0, 1).flatten(1).ne(0).any(1).sum()), w.shape[1]),
        )
        out += [f"{name} keeps {n} of {total} {kind}" for kind, n, total in live if n == 1 < total]
    return out


@torch.no_grad()
def depends_on_input(net: nn.Module, example_input: torch.Tensor, samples: int = 8) -> bool:
    """Whether ``net``'s logits change with its input (eval mode, seeded random inputs shaped like the example)."""
    device = next(net.parameters()).device
    generator = torch.Generator().manual_seed(0)
    x = torch.randn((samples, *example_input.shape[1:]), generator=generator).to(device, example_input.dtype)
    mode = net.training
    net.eval()
    try:
        logits = net(x).float()
    finally:
        net.train(mode)
    spread = (logits - logits[:1]).abs().max()
    return bool(spread > 1e-6 * max(1.0, float(logits.abs().max())))


def _empty(layer: nn.Module) -> bool:
    """A layer passes nothing on: one of its weight tensors is all zeros (a replaced layer's stages included)."""
    weights = [p for n, p in layer.named_parameters() if n.rsplit(".", 1)[-1] == "weight"]
    return any(int(torch.count_nonzero(w)) == 0 for w in weights)


def check(
    net: nn.Module,
    prunable: Iterable[str],
    example_input: torch.Tensor,
    test_acc: float,
    num_classes: int,
    dense_acc: float | None = None,
) -> Collapse:
    """Check a trained (pruned) network for collapse; ``test_acc`` and ``dense_acc`` (its dense model's test
    accuracy, when known) in percent. A collapse on accuracy names the layers left one filter or one input."""
    reasons = []
    prunable = list(prunable)
    limit = chance_limit(num_classes)
    if not test_acc >= limit:  # NaN counts as collapsed
        reasons.append(
            f"test accuracy {test_acc:.2f}% is near chance ({100.0 / num_classes:.1f}% for "
            f"{num_classes} classes; collapse below {limit:.1f}%)"
        )
    elif dense_acc is not None and test_acc < dense_limit(dense_acc, num_classes):
        reasons.append(
            f"test accuracy {test_acc:.2f}% is far below the dense model's {dense_acc:.2f}% (drop "
            f"{dense_acc - test_acc:.2f} points; collapse below {dense_limit(dense_acc, num_classes):.2f}%, "
            f"{DENSE_SHARE:.0%} of the dense accuracy above chance)"
        )
    if reasons:
        thin = starved(net, prunable)
        if thin:
            reasons[-1] += f"; starved: {', '.join(thin)}"
    modules = dict(net.named_modules())
    empty = [name for name in prunable if _empty(modules[name])]
    if empty:
        reasons.append(f"no nonzero weight left in {', '.join(empty)}")
    if not depends_on_input(net, example_input):
        reasons.append("the output does not depend on the input (no path from input to output)")
    return Collapse(tuple(reasons))
