"""The one place masks live: which weights are prunable, their 0/1 masks, and keeping pruned weights at zero."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator

import torch
import torch.fx
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

PRUNABLE_TYPES = (nn.Conv2d, nn.Linear)
Dependent = tuple[nn.Module, str]  # (module, parameter name) of a 1-D parameter indexed by a layer's output filters

log = logging.getLogger(__name__)


def refuse_attention(model: nn.Module, granularity: str) -> None:
    """Raise a ValueError when ``model`` has an ``nn.MultiheadAttention``: a structured granularity compacts
    through Torch-Pruning's dependency graph, which prunelab does not run through attention blocks (their heads and
    the packed q/k/v projection)."""
    attention = [n for n, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)]
    if attention:
        raise ValueError(
            f"pruning.granularity={granularity} removes channels, which prunelab does not do through "
            f"nn.MultiheadAttention ({attention[0]!r}{' and others' if len(attention) > 1 else ''}): "
            "use pruning.granularity=weight (or N:M) on this network"
        )


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


def filter_dependents(model: nn.Module, modules: dict[str, nn.Module]) -> dict[str, list[Dependent]]:
    """Per layer, the 1-D parameters that only serve its output filters: its own bias, and the affine γ/β of every
    BatchNorm whose input is exactly this layer's output.

    A pruned filter still emits its bias, and a BatchNorm turns its zero output into the constant β − γ·μ/σ; zeroing
    these too makes the channel exactly zero, hence removable by compaction. The BatchNorms are the direct users of
    the layer's node in a ``torch.fx`` trace (the same edge as Torch-Pruning's conv → BN dependency, but it needs no
    example input). A BN reached through an addition (residual streams) is never a direct user, so coupled layers
    never zero each other's channels.
    """
    deps: dict[str, list[Dependent]] = {n: [(m, "bias")] if m.bias is not None else [] for n, m in modules.items()}
    if not any(isinstance(m, _BatchNorm) and m.affine for m in model.modules()):
        return deps
    try:
        graph = torch.fx.symbolic_trace(model).graph
    except Exception as exc:  # noqa: BLE001 — untraceable forward (data-dependent control flow, …)
        log.warning(
            "filter pruning: cannot trace %s (%s); BatchNorm channels of pruned filters are left as they are",
            type(model).__name__,
            exc,
        )
        return deps
    for node in graph.nodes:
        if node.op != "call_module" or node.target not in modules:
            continue
        for user in node.users:
            bn = model.get_submodule(user.target) if user.op == "call_module" else None
            if isinstance(bn, _BatchNorm) and bn.affine and user.args[0] is node:
                deps[node.target] += [(bn, "weight"), (bn, "bias")]
    return deps


class MaskSet:
    """Boolean masks over the ``weight`` of named modules, plus their *dependents*.

    Masks are kept as bool tensors on the weight's device (:meth:`follow` moves them when the model moves).
    ``apply`` zeroes pruned weights in place, ``mask_grads`` zeroes their gradients and ``mask_optimizer_state`` their
    optimizer buffers (momentum, Adam moments), so that no optimizer step can move a pruned weight away from zero.
    Dependents (see :func:`filter_dependents`) are 1-D parameters masked alike by their layer's filter mask, a filter
    being alive when any of its weights is; that mask is derived from the weight mask, so it is neither stored nor
    counted in the sparsity.

    *Transient* masks (:meth:`drop`, :meth:`restore`) hold for one training step only: the weights they drop are
    zeroed before the forward, their gradients masked, and their values put back bit for bit after the step.
    """

    def __init__(self) -> None:
        self.modules: dict[str, nn.Module] = {}
        self.masks: dict[str, torch.Tensor] = {}
        self.dependents: dict[str, list[Dependent]] = {}
        self.transient: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # name -> (keep mask, weight before drop)

    def bind(self, modules: dict[str, nn.Module], dependents: dict[str, list[Dependent]] | None = None) -> None:
        """Attach to the modules to prune (and the dependents of their filters); keeps masks already loaded for the
        same names."""
        self.modules = dict(modules)
        self.dependents = {n: list(d) for n, d in (dependents or {}).items() if d}
        for name, deps in self.dependents.items():
            rows = self.modules[name].weight.shape[0]
            bad = [p for m, p in deps if getattr(m, p).shape != (rows,)]
            if bad:
                raise ValueError(f"Dependents {bad} of {name!r} do not have one entry per output filter ({rows})")
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

    def weights(self) -> dict[str, torch.Tensor]:
        """The masked weights by layer name."""
        return {n: m.weight for n, m in self.modules.items()}

    def follow(self, layer_tensors: dict[str, dict[str, torch.Tensor]] | None = None) -> None:
        """Move every mask to its weight's device (the model may have moved since the masks were made), and the
        per-layer tensors of ``layer_tensors`` (kind → layer → tensor) too; those shaped like the weight also take its
        dtype (per-group accumulators keep theirs)."""
        for name, module in self.modules.items():
            if self.masks[name].device != module.weight.device:
                self.masks[name] = self.masks[name].to(module.weight.device)
        for tensors in (layer_tensors or {}).values():
            for name, t in list(tensors.items()):
                weight = self.modules[name].weight
                dtype = weight.dtype if t.is_floating_point() and t.shape == weight.shape else t.dtype
                if t.device != weight.device or t.dtype != dtype:
                    tensors[name] = t.to(device=weight.device, dtype=dtype)

    def _masked(self, names: Iterable[str] | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(parameter, mask) for every masked weight and every dependent (of the layers ``names``; default all)."""
        for name in self.modules if names is None else names:
            mask = self.masks[name]
            yield self.modules[name].weight, mask
            if name in self.dependents:
                alive = mask.reshape(mask.shape[0], -1).any(dim=1)
                for owner, param in self.dependents[name]:
                    yield getattr(owner, param), alive

    @torch.no_grad()
    def apply(self, names: Iterable[str] | None = None) -> None:
        """Zero every pruned weight (and dependent) of the layers ``names`` (default: all)."""
        for param, mask in self._masked(names):
            param.mul_(mask)

    @torch.no_grad()
    def mask_grads(self) -> None:
        for param, mask in self._masked():
            if param.grad is not None:
                param.grad.mul_(mask)
        for name, (keep, _) in self.transient.items():
            grad = self.modules[name].weight.grad
            if grad is not None:
                grad.mul_(keep)

    @torch.no_grad()
    def mask_optimizer_state(
        self, optimizers: Iterable[torch.optim.Optimizer], names: Iterable[str] | None = None
    ) -> None:
        """Zero optimizer buffers (momentum, exp_avg, exp_avg_sq, …) shaped like a masked parameter."""
        names = None if names is None else list(names)
        for optimizer in optimizers:
            for param, mask in self._masked(names):
                for value in optimizer.state.get(param, {}).values():
                    if torch.is_tensor(value) and value.shape == param.shape:
                        value.mul_(mask)

    @torch.no_grad()
    def drop(self, keep: dict[str, torch.Tensor]) -> None:
        """Zero, for one step, the weights outside ``keep`` (layer name → bool mask shaped like the weight)."""
        self.restore()
        for name, mask in keep.items():
            weight = self.modules[name].weight
            mask = mask.to(device=weight.device, dtype=torch.bool)
            self.transient[name] = (mask, weight.detach().clone())
            weight.mul_(mask)

    @torch.no_grad()
    def restore(self) -> None:
        """Put back, bit for bit, the weights the transient masks dropped (pruned ones stay zero)."""
        for name, (keep, before) in self.transient.items():
            weight = self.modules[name].weight
            weight.copy_(torch.where(keep, weight, before * self.masks[name]))
        self.transient = {}

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
            self.bind(self.modules, self.dependents)


def fresh_masks(model: nn.Module) -> MaskSet:
    """All-ones masks on every Conv2d and Linear ``model`` has now (after a method replaced layers)."""
    masks = MaskSet()
    masks.bind(prunable_layers(model))
    return masks
