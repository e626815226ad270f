"""The (compacted) model as ONNX, checked against PyTorch's logits in ONNX Runtime, and its ONNX Runtime latency.

The export uses ``torch.onnx.export(dynamo=True)``, the exporter built on ``torch.export`` (the default since
PyTorch 2.9; it needs ``onnxscript``): its dynamic batch axis is a ``torch.export`` dimension, which fails the export
loudly where the network fixes the batch size. The legacy TorchScript exporter (``dynamo=False``) still works with
torch 2.14 but warns that it will be removed. See https://docs.pytorch.org/docs/stable/onnx_export.html.

Latency follows :mod:`prunelab.measure.latency`: dense and pruned alternate in slices within every block, the block
order alternates, and the metrics are the median and IQR of the block medians and the median paired speedup
(``latency_onnx_b1_ms``, ``dense_latency_onnx_b1_ms``, ``speedup_onnx_b1``, …).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from prunelab.measure.timing import LatencyResult, make_batch, record

OPSET = 18
INPUT, OUTPUT = "input", "logits"


class ExportCheckError(RuntimeError):
    """The exported model's logits (ONNX Runtime, or the loaded ``torch.export`` program) differ from PyTorch's beyond
    the tolerance."""


def session(path: str | Path, threads: int | None = None) -> ort.InferenceSession:
    """An ONNX Runtime CPU session of ``path`` with ``threads`` intra-op threads (``None``: ONNX Runtime's choice)."""
    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads, options.inter_op_num_threads = int(threads), 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _cpu_copy(net: nn.Module, example: torch.Tensor) -> tuple[nn.Module, torch.Tensor]:
    """A float32 CPU copy of ``net`` in eval mode, and a batch of two inputs to trace it with (``torch.export``
    fixes a dimension of size 1 to a constant)."""
    x = example.detach().cpu().float()[:1].expand(2, *example.shape[1:]).contiguous()
    return copy.deepcopy(net).cpu().float().eval(), x


@torch.no_grad()
def _check(
    what: str, reference: nn.Module, run, example: torch.Tensor, atol: float, batch_sizes: Sequence[int]
) -> float:
    """Largest absolute logit difference between ``reference`` and ``run`` (inputs → logits) over random batches of
    ``batch_sizes`` inputs shaped like ``example``; raises :class:`ExportCheckError` above ``atol``·max(1, max|logit|).
    """
    worst = 0.0
    for size in batch_sizes:
        x = make_batch(example, int(size), device="cpu", dtype=torch.float32)
        expected, got = reference(x).numpy(), np.asarray(run(x))
        if got.shape != expected.shape:
            raise ExportCheckError(
                f"{what} gives logits of shape {got.shape} at batch {size}; PyTorch {expected.shape}"
            )
        diff, scale = float(np.abs(got - expected).max()), float(np.abs(expected).max())
        limit = atol * max(1.0, scale)
        if not diff <= limit:
            raise ExportCheckError(
                f"{what} differs from PyTorch by {diff:.3g} at batch {size} (max |logit| "
                f"{scale:.3g}, tolerance {limit:.3g} = atol {atol:g} × max(1, max|logit|))"
            )
        worst = max(worst, diff)
    return worst


def export_onnx(
    net: nn.Module,
    example: torch.Tensor,
    path: str | Path,
    opset: int = OPSET,
    atol: float = 1e-4,
    batch_sizes: Sequence[int] = (1, 5),
) -> float:
    """Write ``net`` to ``path`` as ONNX (batch axis dynamic) and check it in ONNX Runtime; return the largest
    absolute logit difference to PyTorch over random batches of ``batch_sizes`` inputs shaped like ``example``.

    Args:
        net: the (compacted) network; left as it is (a float32 CPU copy is exported).
        example: an input batch; only its shape beyond the batch dimension is used.
        path: the ``.onnx`` file to write (weights inside it; folders are created).
        opset: ONNX opset version.
        atol: tolerance on the difference, relative to max(1, max|logit|) (as ``measure.atol`` for compaction).
        batch_sizes: batch sizes checked, besides the traced batch of two (so the dynamic axis is checked too).

    Raises:
        ExportCheckError: the ONNX model's logits differ by more than ``atol``·max(1, max|logit|).
    """
    path = Path(path)
    model, x = _cpu_copy(net, example)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(
        model,
        (x,),
        str(path),
        dynamo=True,
        input_names=[INPUT],
        output_names=[OUTPUT],
        dynamic_shapes=({0: torch.export.Dim("batch")},),
        opset_version=opset,
        external_data=False,
        verbose=False,
    )
    runtime = session(path)
    return _check(
        f"ONNX model {path}", model, lambda b: runtime.run([OUTPUT], {INPUT: b.numpy()})[0], example, atol, batch_sizes
    )


def export_pt2(
    net: nn.Module, example: torch.Tensor, path: str | Path, atol: float = 1e-4, batch_sizes: Sequence[int] = (1, 5)
) -> float:
    """Write ``net`` to ``path`` as a ``torch.export`` program (``torch.export.save``, batch axis dynamic), load it
    again and return the largest absolute logit difference to ``net`` (arguments as :func:`export_onnx`).

    Raises:
        ExportCheckError: the loaded program's logits differ by more than ``atol``·max(1, max|logit|).
    """
    path = Path(path)
    model, x = _cpu_copy(net, example)
    program = torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.export.save(program, str(path))
    loaded = torch.export.load(str(path)).module()
    return _check(f"torch.export program {path}", model, lambda b: loaded(b).numpy(), example, atol, batch_sizes)


def _slice_ms(run, number: int) -> float:
    """Mean milliseconds of ``number`` calls of ``run``."""
    start = time.perf_counter()
    for _ in range(number):
        run()
    return (time.perf_counter() - start) * 1e3 / number


def onnx_latency(
    dense_path: str | Path,
    pruned_path: str | Path,
    example: torch.Tensor,
    batch_sizes: Sequence[int] = (1, 64),
    blocks: int = 5,
    threads: int | None = None,
    min_run_time: float = 0.1,
    slice_time: float = 0.02,
) -> LatencyResult:
    """ONNX Runtime CPU latency of the dense and the pruned ONNX files, timed interleaved in this process.

    Metrics per batch size B: ``latency_onnx_bB_ms`` and ``dense_latency_onnx_bB_ms`` (median of block medians),
    their ``_iqr_ms``, ``speedup_onnx_bB`` (median paired dense/pruned), and ``latency_onnx_threads``.

    Args:
        dense_path: ONNX file of the reference model.
        pruned_path: ONNX file of the pruned (compacted) model.
        example: an input batch; only its shape beyond the batch dimension is used.
        batch_sizes: batch sizes to time.
        blocks: interleaved dense/pruned blocks.
        threads: intra-op threads (``None``: ``torch.get_num_threads()``, as the PyTorch CPU timing).
        min_run_time: seconds each model runs per block.
        slice_time: seconds of one timed slice.
    """
    threads = int(threads or torch.get_num_threads())
    result = LatencyResult(
        {"latency_onnx_threads": float(threads)},
        {"onnx_threads": threads},
        {"latency_onnx_runtime": f"onnxruntime {ort.__version__} CPUExecutionProvider"},
    )
    sessions = {"dense": session(dense_path, threads), "pruned": session(pruned_path, threads)}
    for batch in batch_sizes:
        feed = {INPUT: make_batch(example, int(batch), device="cpu", dtype=torch.float32).numpy()}
        runs = {k: (lambda s=s, feed=feed: s.run([OUTPUT], feed)) for k, s in sessions.items()}
        number, single = {}, []
        for k, run in runs.items():
            _slice_ms(run, 2)  # warm-up: memory arena, kernel selection
            once = max(_slice_ms(run, 1) / 1e3, 1e-7)
            number[k], single = max(1, int(slice_time / once)), [*single, once]
        reps = max(3, math.ceil(min_run_time / max(slice_time, *single)))
        raw: dict[str, list] = {k: [] for k in runs}
        for b in range(blocks):
            order = list(runs) if b % 2 == 0 else list(runs)[::-1]
            for k in runs:
                raw[k].append([])
            for _ in range(reps):
                for k in order:
                    raw[k][-1].append(_slice_ms(runs[k], number[k]))
        record("onnx", int(batch), raw, result)
    return result


__all__ = ["INPUT", "OPSET", "OUTPUT", "ExportCheckError", "export_onnx", "export_pt2", "onnx_latency", "session"]
