"""Sparsity, compression and parameter counts, read from the weights themselves (never from the request)."""

from __future__ import annotations

import torch
from torch import nn


def layer_table(net: nn.Module, prunable: list[str]) -> list[dict]:
    """One row per prunable layer: name, shape, params, nonzero, sparsity."""
    modules = dict(net.named_modules())
    rows = []
    for name in prunable:
        w = modules[name].weight.detach()
        nonzero = int(torch.count_nonzero(w))
        rows.append(
            {
                "layer": name,
                "shape": "x".join(str(s) for s in w.shape),
                "params": w.numel(),
                "nonzero": nonzero,
                "sparsity": 1.0 - nonzero / w.numel(),
            }
        )
    return rows


def sparsity_metrics(net: nn.Module, prunable: list[str]) -> dict[str, float]:
    """``sparsity``/``compression`` over the prunable weights, ``params``/``params_nonzero`` over all parameters."""
    rows = layer_table(net, prunable)
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
