"""Measurement of a pruned model against its dense parent: sparsity, params, MACs, bytes, latency."""

from __future__ import annotations

import inspect
import json
import numbers
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import torch_pruning as tp
from torch import nn

from prunelab.measure.compact import CompactionError, CompactResult, compact
from prunelab.measure.export import export_onnx, onnx_latency
from prunelab.measure.latency import check_latency_options, measure_latency
from prunelab.measure.sparsity import format_table, layer_table, sparsity_metrics
from prunelab.measure.storage import save_dense, save_encoded

LATENCY_FILE = "latency.json"
ONNX_FILE = "model.onnx"
STORED_FILE = "model_stored.plse"  # the stored form (prunelab.measure.encoding): bytes_stored is its size


def count_macs(net: nn.Module, example_input: torch.Tensor) -> int:
    """Multiply–accumulates of one forward pass (Torch-Pruning's counter)."""
    macs, _ = tp.utils.count_ops_and_params(net, example_input)
    return int(macs)


def _count_params(net: nn.Module) -> tuple[int, int]:
    return (
        sum(p.numel() for p in net.parameters()),
        sum(int(torch.count_nonzero(p.detach())) for p in net.parameters()),
    )


def measure(
    pruned: nn.Module,
    dense: nn.Module,
    prunable: list[str],
    example_input: torch.Tensor,
    out_dir: str | Path | None = None,
    counts_compacted: bool = False,
    *,
    latency: bool = False,
    batch_sizes: Sequence[int] = (1, 64),
    blocks: int = 5,
    threads: int | None = None,
    min_run_time: float = 0.1,
    gpu: bool = True,
    gpu_batch_sizes: Sequence[int] = (1, 64, 256),
    gpu_mode: str = "graph",
    gpu_dtype: str = "float32",
    channels_last: bool = False,
    atol: float = 1e-4,
    onnx: bool = True,
) -> tuple[dict[str, float], list[dict], dict[str, str]]:
    """Final metrics (docs/mlflow.md names), the per-layer sparsity table and the latency params (device, mode, dtype).

    ``sparsity``/``compression`` are counted on the masked model (layers a method replaced count the weights of their
    replacement against ``dense``'s, see :func:`layer_table`), or with ``counts_compacted`` (a filter/channel/column
    method, held to its ratio on the compacted model) they are ``compression_compacted``'s; ``params``,
    ``params_nonzero``, ``macs`` and ``compression_compacted`` (``compression`` once the weights that only fed or read
    removed channels are gone) on its compacted copy (:func:`compact`, which raises :class:`CompactionError` when that
    copy's logits differ by more than ``atol``). The stored form is written to ``out_dir`` (a temporary folder when
    ``None``) and its size on disk is ``bytes_stored``; with ``onnx`` the compacted model is exported to
    ``out_dir/model.onnx`` and checked in ONNX Runtime (``onnx_max_abs_diff``, within ``atol`` like compaction) and,
    with ``latency``, timed there against the dense model too (``latency_onnx_*``); with ``latency`` the raw latency
    samples go to ``out_dir/latency.json``. The keyword arguments are the ``measure:`` block of ``conf/train.yaml`` (see
    :func:`prunelab.measure.latency.measure_latency`).
    """
    check_options(
        {
            "batch_sizes": batch_sizes,
            "blocks": blocks,
            "threads": threads,
            "min_run_time": min_run_time,
            "gpu": gpu,
            "gpu_batch_sizes": gpu_batch_sizes,
            "gpu_mode": gpu_mode,
            "gpu_dtype": gpu_dtype,
            "channels_last": channels_last,
            "latency": latency,
            "atol": atol,
            "onnx": onnx,
        }
    )
    params: dict[str, str] = {}
    metrics = sparsity_metrics(pruned, prunable, dense)
    rows = layer_table(pruned, prunable, dense)
    modes = pruned.training, dense.training
    pruned.eval()
    dense.eval()
    try:
        result = compact(pruned, example_input, atol=atol)
        compacted = result.net
        metrics["params"], metrics["params_nonzero"] = map(float, _count_params(compacted))
        left = sum(r["nonzero"] for r in layer_table(compacted, prunable, dense))
        metrics["compression_compacted"] = sum(r["params"] for r in rows) / max(left, 1)
        if counts_compacted:  # the ratio the method was asked to reach
            metrics["compression"] = metrics["compression_compacted"]
            metrics["sparsity"] = 1.0 - 1.0 / metrics["compression"]
        metrics["dense_params"] = float(_count_params(dense)[0])
        metrics["compaction_max_abs_diff"] = result.max_abs_diff
        metrics["compaction_channels_removed"] = float(sum(result.removed.values()))
        with torch.no_grad():
            metrics["macs"] = float(count_macs(compacted, example_input))
            metrics["dense_macs"] = float(count_macs(dense, example_input))
        metrics["macs_reduction"] = metrics["dense_macs"] / max(metrics["macs"], 1.0)
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(out_dir) if out_dir is not None else Path(tmp)
            folder.mkdir(parents=True, exist_ok=True)
            metrics["bytes_dense"] = float(save_dense(dense, Path(tmp) / "dense.npz"))
            metrics["bytes_stored"] = float(save_encoded(pruned, folder / STORED_FILE, prunable))
            if onnx:
                metrics["onnx_max_abs_diff"] = export_onnx(compacted, example_input, folder / ONNX_FILE, atol=atol)
            if latency:
                timed = measure_latency(
                    dense,
                    compacted,
                    example_input,
                    list(batch_sizes),
                    int(blocks),
                    threads,
                    float(min_run_time),
                    bool(gpu),
                    gpu_batch_sizes=list(gpu_batch_sizes),
                    gpu_mode=gpu_mode,
                    gpu_dtype=gpu_dtype,
                    channels_last=channels_last,
                    masked=pruned,
                )
                if onnx:  # ONNX Runtime on the CPU, dense vs pruned, interleaved as the PyTorch timing
                    export_onnx(dense, example_input, Path(tmp) / "dense.onnx", atol=atol)
                    timed.update(
                        onnx_latency(
                            Path(tmp) / "dense.onnx",
                            folder / ONNX_FILE,
                            example_input,
                            list(batch_sizes),
                            int(blocks),
                            threads,
                            float(min_run_time),
                        )
                    )
                metrics.update(timed.metrics)
                params.update(timed.params)
                (folder / LATENCY_FILE).write_text(json.dumps(timed.samples))
    finally:
        pruned.train(modes[0])
        dense.train(modes[1])
    metrics["storage_compression"] = metrics["bytes_dense"] / metrics["bytes_stored"]
    return metrics, rows, params


def check_options(options: Mapping) -> None:
    """Check the ``measure:`` config block before any training: unknown keys and bad values raise a ValueError
    naming ``measure.<key>`` and its value."""
    valid = [name for name, p in inspect.signature(measure).parameters.items() if p.kind is p.KEYWORD_ONLY]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(f"measure.{unknown[0]} is not a measure option; valid keys: {', '.join(valid)}")
    atol = options.get("atol", 1e-4)
    if isinstance(atol, bool) or not isinstance(atol, numbers.Real) or not atol >= 0:
        raise ValueError(f"measure.atol={atol!r} must be a number ≥ 0")
    for key in ("latency", "onnx"):
        if not isinstance(options.get(key, False), bool):
            raise ValueError(f"measure.{key}={options[key]!r} must be true or false")
    check_latency_options(**{k: v for k, v in options.items() if k not in ("atol", "latency", "onnx")})


__all__ = [
    "LATENCY_FILE",
    "ONNX_FILE",
    "STORED_FILE",
    "CompactResult",
    "CompactionError",
    "check_options",
    "compact",
    "count_macs",
    "format_table",
    "layer_table",
    "measure",
    "measure_latency",
    "sparsity_metrics",
]
