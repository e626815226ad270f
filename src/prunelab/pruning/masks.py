"""The one place masks live: which weights are prunable, their 0/1 masks, and keeping pruned weights at zero."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

PRUNABLE_TYPES = (nn.Conv2d, nn.Linear)


def prunable_layers(
    model: nn.Module, layers: Iterable[str] | None = None, exclude: Iterable[str] = ()
) -> dict[str, nn.Module]:
    """Conv2d/Linear modules to prune, by module name, in model order.

    Args:
        model: the network.
        layers: module names to prune; ``None`` means every Conv2d and Linear.
        exclude: module names to leave dense.

    Raises:
        ValueError: a name in ``layers`` or ``exclude`` is not a Conv2d/Linear of the model (lists the valid names).
    """
    candidates = {name: m for name, m in model.named_modules() if isinstance(m, PRUNABLE_TYPES)}
    valid = ", ".join(candidates) or "(none)"
    for key, names in (("pruning.layers", layers or ()), ("pruning.exclude", exclude or ())):
        unknown = [n for n in names if n not in candidates]
        if unknown:
            raise ValueError(f"Unknown layer name(s) {unknown} in {key}; prunable layers of this model: {valid}")
    chosen = set(layers) if layers is not None else set(candidates)
    chosen -= set(exclude or ())
    if not chosen:
        raise ValueError("No layer left to prune: pruning.layers/pruning.exclude select nothing")
    return {name: m for name, m in candidates.items() if name in chosen}


class MaskSet:
    """Boolean masks over the ``weight`` of named modules.

    Masks are kept as bool tensors on the weight's device. ``apply`` zeroes pruned weights in place, ``mask_grads``
    zeroes their gradients and ``mask_optimizer_state`` their optimizer buffers (momentum, Adam moments), so that no
    optimizer step can move a pruned weight away from zero.
    """

    def __init__(self) -> None:
        self.modules: dict[str, nn.Module] = {}
        self.masks: dict[str, torch.Tensor] = {}

    def bind(self, modules: dict[str, nn.Module]) -> None:
        """Attach to the modules to prune; keeps masks already loaded for the same names."""
        self.modules = dict(modules)
        for name, module in self.modules.items():
            mask = self.masks.get(name)
            if mask is None:
                self.masks[name] = torch.ones_like(module.weight, dtype=torch.bool)
            else:
                if mask.shape != module.weight.shape:
                    raise ValueError(
                        f"Mask for {name!r} has shape {tuple(mask.shape)}, weight has {tuple(module.weight.shape)}"
                    )
                self.masks[name] = mask.to(module.weight.device)
        stale = set(self.masks) - set(self.modules)
        if stale:
            raise ValueError(f"Masks for layers that are not pruned here: {sorted(stale)}")

    def set(self, name: str, mask: torch.Tensor) -> None:
        self.masks[name] = mask.to(dtype=torch.bool, device=self.modules[name].weight.device)

    @torch.no_grad()
    def apply(self) -> None:
        """Zero every pruned weight."""
        for name, module in self.modules.items():
            module.weight.mul_(self.masks[name])

    @torch.no_grad()
    def mask_grads(self) -> None:
        for name, module in self.modules.items():
            if module.weight.grad is not None:
                module.weight.grad.mul_(self.masks[name])

    @torch.no_grad()
    def mask_optimizer_state(self, optimizers: Iterable[torch.optim.Optimizer]) -> None:
        """Zero optimizer buffers (momentum, exp_avg, exp_avg_sq, …) shaped like a masked weight."""
        for optimizer in optimizers:
            for name, module in self.modules.items():
                state = optimizer.state.get(module.weight, {})
                for value in state.values():
                    if torch.is_tensor(value) and value.shape == module.weight.shape:
                        value.mul_(self.masks[name])

    def counts(self) -> tuple[int, int]:
        """(total, nonzero) over the prunable weights, counted from the weights themselves."""
        total = sum(m.weight.numel() for m in self.modules.values())
        nonzero = sum(int(torch.count_nonzero(m.weight)) for m in self.modules.values())
        return total, nonzero

    def sparsity(self) -> float:
        total, nonzero = self.counts()
        return 1.0 - nonzero / total if total else 0.0

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {name: mask.detach().cpu().clone() for name, mask in self.masks.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.masks = {name: mask.to(torch.bool) for name, mask in state.items()}
        if self.modules:
            self.bind(self.modules)
