"""Sparsity, compression and parameter counts, read from the weights themselves (never from the request).

A prunable layer is named as in the network that was built. Where a method replaced it (EigenDamage's bottleneck),
its row counts the weights of the Conv2d/Linear layers that replaced it against the dense layer's: ``sparsity`` is
then the fraction of the layer's weights that are gone, as it is for masks.
"""

from __future__ import annotations

import torch
from torch import nn

LAYERS = (nn.Conv2d, nn.Linear)


def _shape(w: torch.Tensor) -> str:
    return "x".join(str(s) for s in w.shape)


def layer_table(net: nn.Module, prunable: list[str], dense: nn.Module | None = None) -> list[dict]:
    """One row per prunable layer: name, shape, params, nonzero, sparsity.

    ``params`` is the dense layer's weight count (from ``dense`` when the layer was replaced in ``net``); ``nonzero``
    counts the nonzero weights of what the layer is now; a replaced layer's shape reads ``dense → stage, stage, …``.
    """
    modules = dict(net.named_modules())
    originals = dict(dense.named_modules()) if dense is not None else {}
    rows = []
    for name in prunable:
        module = modules[name]
        if isinstance(module, LAYERS):
            w = module.weight.detach()
            shape, params, nonzero = _shape(w), w.numel(), int(torch.count_nonzero(w))
        else:
            if name not in originals:
                raise ValueError(f"layer {name!r} was replaced by a {type(module).__name__}: pass the dense network")
            stages = [m.weight.detach() for m in module.modules() if isinstance(m, LAYERS)]
            w = originals[name].weight
            shape = f"{_shape(w)} → " + ", ".join(_shape(s) for s in stages)
            params, nonzero = w.numel(), sum(int(torch.count_nonzero(s)) for s in stages)
        rows.append(
            {"layer": name, "shape": shape, "params": params, "nonzero": nonzero, "sparsity": 1.0 - nonzero / params}
        )
    return rows


def sparsity_metrics(net: nn.Module, prunable: list[str], dense: nn.Module | None = None) -> dict[str, float]:
    """``sparsity``/``compression`` over the prunable layers' weights (dense count vs nonzero now),
    ``params``/``params_nonzero`` over all parameters."""
    rows = layer_table(net, prunable, dense)
    total = sum(r["params"] for r in rows)
    nonzero = sum(r["nonzero"] for r in rows)
    params = sum(p.numel() for p in net.parameters())
    params_nonzero = sum(int(torch.count_nonzero(p.detach())) for p in net.parameters())
    return {
        "sparsity": 1.0 - nonzero / total,
        "compression": total / max(nonzero, 1),
        "params": float(params),
        "params_nonzero": float(params_nonzero),
    }


def format_table(rows: list[dict]) -> str:
    """Markdown table of :func:`layer_table` rows."""
    lines = ["| layer | shape | params | nonzero | sparsity |", "| --- | --- | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['layer']} | {r['shape']} | {r['params']} | {r['nonzero']} | {r['sparsity']:.4f} |")
    return "\n".join(lines)
