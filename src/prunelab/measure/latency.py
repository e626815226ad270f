"""Latency of the dense and the pruned (compacted) network, timed interleaved in one process.

Every block times both models back to back (the order alternates between blocks), so slow drifts of a shared or
throttled machine hit both alike. Per model we report the median and IQR of the block medians; the speedup is the
median over blocks of the paired ratio dense/pruned. CPU timing uses ``torch.utils.benchmark.Timer``; CUDA timing
(when present) CUDA events after warm-up; on GPUs of compute capability ≥ 8.0 Linear weights that are 2:4 sparse are
also timed as ``torch.sparse.to_sparse_semi_structured`` tensors in fp16 against the fp16 dense model.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from torch.utils import benchmark

log = logging.getLogger(__name__)


@dataclass
class LatencyResult:
    """Metrics with DESIGN.md names (ms, speedups) and every raw sample (ms), JSON-ready."""

    metrics: dict[str, float] = field(default_factory=dict)
    samples: dict = field(default_factory=dict)


def _batch(example_input: torch.Tensor, size: int, device=None, dtype=None) -> torch.Tensor:
    gen = torch.Generator().manual_seed(size)
    x = torch.randn((size, *example_input.shape[1:]), generator=gen)
    return x.to(device=device or example_input.device, dtype=dtype or example_input.dtype)


def _summarise(prefix: str, batch: int, dense: list[float], pruned: list[float], metrics: dict) -> None:
    """Median/IQR of the block medians of both models and the median paired speedup."""
    tag = f"{prefix}_b{batch}"
    for name, values in (("latency", pruned), ("dense_latency", dense)):
        q1, med, q3 = np.percentile(values, [25, 50, 75])
        metrics[f"{name}_{tag}_ms"] = float(med)
        metrics[f"{name}_{tag}_iqr_ms"] = float(q3 - q1)
    metrics[f"speedup_{tag}"] = float(np.median([d / p for d, p in zip(dense, pruned)]))


def _interleave(time_block, models: dict[str, nn.Module], blocks: int) -> dict[str, list]:
    """``time_block(net) -> list of ms`` for every model in every block, order alternating; raw lists per model."""
    raw: dict[str, list] = {name: [] for name in models}
    names = list(models)
    for b in range(blocks):
        for name in names if b % 2 == 0 else names[::-1]:
            raw[name].append(time_block(models[name]))
    return raw


def _record(prefix: str, batch: int, raw: dict[str, list], result: LatencyResult, labels=("dense", "pruned")) -> None:
    medians = {k: [float(np.median(block)) for block in raw[k]] for k in labels}
    _summarise(prefix, batch, medians[labels[0]], medians[labels[1]], result.metrics)
    result.samples[f"{prefix}_b{batch}"] = {k: raw[k] for k in labels}


@torch.inference_mode()
def cpu_latency(
    dense: nn.Module, pruned: nn.Module, example_input: torch.Tensor, batch_sizes: Sequence[int] = (1, 64),
    blocks: int = 5, threads: int | None = None, min_run_time: float = 0.1, slice_time: float = 0.02,
) -> LatencyResult:
    """CPU latency of both models per batch size (``latency_cpu_b{B}_ms``, ``speedup_cpu_b{B}``, …).

    Within a block the two models alternate every ``slice_time`` seconds (one ``Timer.timeit`` each), so that load
    from other processes hits both alike; a block gives each model about ``min_run_time`` seconds (≥ 3 slices).

    Args:
        dense: reference model.
        pruned: the pruned (compacted) model.
        example_input: an input batch; only its shape beyond the batch dimension is used.
        batch_sizes: batch sizes to time.
        blocks: interleaved dense/pruned blocks.
        threads: CPU threads (``None``: ``torch.get_num_threads()``), recorded as ``latency_cpu_threads``.
        min_run_time: seconds each model runs per block.
        slice_time: seconds of one timed slice.
    """
    threads = int(threads or torch.get_num_threads())
    result = LatencyResult({"latency_cpu_threads": float(threads)}, {"cpu_threads": threads})
    models = {"dense": dense.cpu().eval(), "pruned": pruned.cpu().eval()}
    for batch in batch_sizes:
        x = _batch(example_input, int(batch), device="cpu", dtype=torch.float32)
        timers = {k: benchmark.Timer("net(x)", globals={"net": net, "x": x}, num_threads=threads)
                  for k, net in models.items()}
        number, single = {}, []
        for k, timer in timers.items():
            timer.timeit(2)  # warm-up: allocator, oneDNN primitive caches
            once = max(timer.timeit(1).mean, 1e-7)
            number[k] = max(1, int(slice_time / once))
            single.append(once)
        reps = max(3, math.ceil(min_run_time / max(slice_time, *single)))
        raw: dict[str, list] = {k: [] for k in models}
        for b in range(blocks):
            for k in models:
                raw[k].append([])
            order = list(models) if b % 2 == 0 else list(models)[::-1]
            for _ in range(reps):
                for k in order:
                    raw[k][-1].append(timers[k].timeit(number[k]).mean * 1e3)
        _record("cpu", int(batch), raw, result)
    return result


def _cuda_block_fn(x: torch.Tensor, min_run_time: float):
    def block(net: nn.Module) -> list[float]:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        times, spent = [], 0.0
        while spent < min_run_time * 1e3 or len(times) < 3:
            start.record()
            net(x)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
            spent += times[-1]
        return times

    return block


@torch.inference_mode()
def gpu_latency(
    dense: nn.Module, pruned: nn.Module, example_input: torch.Tensor, batch_sizes: Sequence[int] = (1, 64),
    blocks: int = 5, min_run_time: float = 0.1, warmup: int = 10,
) -> LatencyResult:
    """CUDA latency (``latency_gpu_b{B}_ms``, ``speedup_gpu_b{B}``, …) with CUDA events; empty without CUDA."""
    result = LatencyResult()
    if not torch.cuda.is_available():
        return result
    models = {"dense": copy.deepcopy(dense).cuda().eval(), "pruned": copy.deepcopy(pruned).cuda().eval()}
    result.samples["gpu_device"] = torch.cuda.get_device_name()
    for batch in batch_sizes:
        x = _batch(example_input, int(batch), device="cuda", dtype=torch.float32)
        for net in models.values():
            for _ in range(warmup):
                net(x)
        torch.cuda.synchronize()
        _record("gpu", int(batch), _interleave(_cuda_block_fn(x, min_run_time), models, blocks), result)
    result.metrics.update(semi_structured_latency(pruned, example_input, batch_sizes, blocks, min_run_time, result))
    return result


def is_2to4(weight: torch.Tensor) -> bool:
    """Whether every block of 4 consecutive inputs of every row holds at most 2 nonzeros."""
    rows = weight.detach().reshape(weight.shape[0], -1)
    return rows.shape[1] % 4 == 0 and bool((rows.reshape(rows.shape[0], -1, 4).ne(0).sum(-1) <= 2).all())


def semi_structured_latency(
    pruned: nn.Module, example_input: torch.Tensor, batch_sizes: Sequence[int], blocks: int, min_run_time: float,
    result: LatencyResult,
) -> dict[str, float]:
    """fp16 dense vs fp16 with 2:4 Linear weights as semi-structured sparse tensors (CUDA, capability ≥ 8.0).

    Metrics ``latency_gpu_2to4_b{B}_ms``, ``dense_latency_gpu_2to4_b{B}_ms`` (the same net, dense fp16) and
    ``speedup_gpu_2to4_b{B}``; nothing when the GPU, the masks or the layer shapes do not allow it.
    """
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 0):
        return {}
    dense16 = copy.deepcopy(pruned).half().cuda().eval()
    sparse16 = copy.deepcopy(dense16)
    converted = []
    for name, m in sparse16.named_modules():
        # cuSPARSELt/CUTLASS fp16 kernels need rows % 32 == 0 and columns % 64 == 0
        if isinstance(m, nn.Linear) and m.out_features % 32 == 0 and m.in_features % 64 == 0 and is_2to4(m.weight):
            try:
                m.weight = nn.Parameter(torch.sparse.to_sparse_semi_structured(m.weight.detach()), requires_grad=False)
                converted.append(name)
            except (RuntimeError, ValueError) as exc:
                log.warning("2:4 semi-structured conversion of %s failed: %s", name, exc)
    result.samples["gpu_2to4_layers"] = converted
    if not converted:
        return {}
    out = LatencyResult()
    try:
        for batch in batch_sizes:
            x = _batch(example_input, int(batch), device="cuda", dtype=torch.float16)
            models = {"dense": dense16, "pruned": sparse16}
            for net in models.values():
                for _ in range(10):
                    net(x)
            torch.cuda.synchronize()
            _record("gpu_2to4", int(batch), _interleave(_cuda_block_fn(x, min_run_time), models, blocks), out)
    except RuntimeError as exc:  # kernels missing for this shape/build: report, do not fail the run
        log.warning("2:4 semi-structured timing skipped: %s", exc)
        result.samples["gpu_2to4_skipped"] = str(exc)
        return {}
    result.samples.update(out.samples)
    return out.metrics


def measure_latency(
    dense: nn.Module, pruned: nn.Module, example_input: torch.Tensor, batch_sizes: Sequence[int] = (1, 64),
    blocks: int = 5, threads: int | None = None, min_run_time: float = 0.1, gpu: bool = True,
) -> LatencyResult:
    """CPU latency, plus CUDA (and 2:4) latency when ``gpu`` and CUDA is available; see :func:`cpu_latency`."""
    if blocks < 1 or not batch_sizes or any(int(b) < 1 for b in batch_sizes):
        raise ValueError(f"measure.blocks={blocks!r} and measure.batch_sizes={list(batch_sizes)!r} must be ≥ 1")
    modes = dense.training, pruned.training
    try:
        result = cpu_latency(dense, pruned, example_input, batch_sizes, blocks, threads, min_run_time)
        if gpu:
            extra = gpu_latency(dense, pruned, example_input, batch_sizes, blocks, min_run_time)
            result.metrics.update(extra.metrics)
            result.samples.update(extra.samples)
    finally:
        dense.train(modes[0]), pruned.train(modes[1])
    bad = [k for k, v in result.metrics.items() if not math.isfinite(v)]
    if bad:
        raise RuntimeError(f"non-finite latency metrics: {bad}")
    return result


__all__ = ["LatencyResult", "cpu_latency", "gpu_latency", "is_2to4", "measure_latency", "semi_structured_latency"]
