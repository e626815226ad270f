"""Measurement of a pruned model against its dense parent: sparsity, params, MACs, bytes."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
import torch_pruning as tp
from torch import nn

from prunelab.measure.compact import compact
from prunelab.measure.sparsity import format_table, layer_table, sparsity_metrics
from prunelab.measure.storage import save_dense, save_sparse


def count_macs(net: nn.Module, example_input: torch.Tensor) -> int:
    """Multiply–accumulates of one forward pass (Torch-Pruning's counter)."""
    macs, _ = tp.utils.count_ops_and_params(net, example_input)
    return int(macs)


def measure(
    pruned: nn.Module, dense: nn.Module, prunable: list[str], example_input: torch.Tensor, out_dir: str | Path | None = None
) -> tuple[dict[str, float], list[dict]]:
    """Final size metrics (DESIGN.md names) and the per-layer sparsity table.

    The stored form is written to ``out_dir`` (a temporary folder when ``None``) and its size on disk is
    ``bytes_stored``.
    """
    metrics = sparsity_metrics(pruned, prunable)
    rows = layer_table(pruned, prunable)
    was_training = pruned.training
    pruned.eval()
    dense.eval()
    with torch.no_grad():
        compacted = compact(pruned, example_input)
        metrics["macs"] = float(count_macs(compacted, example_input))
        metrics["dense_macs"] = float(count_macs(dense, example_input))
    metrics["macs_reduction"] = metrics["dense_macs"] / max(metrics["macs"], 1.0)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(out_dir) if out_dir is not None else Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        metrics["bytes_dense"] = float(save_dense(dense, Path(tmp) / "dense.npz"))
        metrics["bytes_stored"] = float(save_sparse(pruned, folder / "model_sparse.npz", prunable))
    metrics["storage_compression"] = metrics["bytes_dense"] / metrics["bytes_stored"]
    pruned.train(was_training)
    return metrics, rows


__all__ = ["compact", "count_macs", "format_table", "layer_table", "measure", "sparsity_metrics"]
