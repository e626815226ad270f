"""Latency of the dense and the pruned (compacted) network, timed interleaved in one process.

Every block times both models back to back (the order alternates between blocks), so slow drifts of a shared or
throttled machine hit both alike. Per model we report the median and IQR of the block medians; the speedup is the
median over blocks of the paired ratio dense/pruned. CPU timing uses ``torch.utils.benchmark.Timer``; CUDA timing
(when present) is in :mod:`prunelab.measure.gpu_latency` (CUDA-graph replay by default) and the 2:4 sparse-kernel
timing in :mod:`prunelab.measure.semi_structured`.
"""

from __future__ import annotations

import math
import numbers
import os
import platform
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn
from torch.utils import benchmark

from prunelab.measure.gpu_latency import DTYPES, GPU_MODES, dtype_name, gpu_latency
from prunelab.measure.semi_structured import is_2to4, semi_structured_latency
from prunelab.measure.timing import LatencyResult, make_batch, record


def cpu_name() -> str:
    """The CPU model and core count, e.g. ``AMD EPYC 7B13 (2 cpus)``."""
    name = platform.processor()
    cpuinfo = Path("/proc/cpuinfo")
    if not name and cpuinfo.exists():
        name = next(
            (
                line.split(":", 1)[1].strip()
                for line in cpuinfo.read_text().splitlines()
                if line.startswith("model name")
            ),
            "",
        )
    return f"{name or platform.machine()} ({os.cpu_count()} cpus)"


@torch.inference_mode()
def cpu_latency(
    dense: nn.Module,
    pruned: nn.Module,
    example_input: torch.Tensor,
    batch_sizes: Sequence[int] = (1, 64),
    blocks: int = 5,
    threads: int | None = None,
    min_run_time: float = 0.1,
    slice_time: float = 0.02,
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
    result = LatencyResult(
        {"latency_cpu_threads": float(threads)}, {"cpu_threads": threads}, {"latency_cpu_device": cpu_name()}
    )
    models = {"dense": dense.cpu().eval(), "pruned": pruned.cpu().eval()}
    for batch in batch_sizes:
        x = make_batch(example_input, int(batch), device="cpu", dtype=torch.float32)
        timers = {
            k: benchmark.Timer("net(x)", globals={"net": net, "x": x}, num_threads=threads) for k, net in models.items()
        }
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
        record("cpu", int(batch), raw, result)
    return result


def _check_sizes(key: str, sizes: object) -> None:
    if (
        isinstance(sizes, (str, bytes))
        or not isinstance(sizes, Sequence)
        or not sizes
        or any(isinstance(b, bool) or not isinstance(b, numbers.Integral) or b < 1 for b in sizes)
    ):
        raise ValueError(f"measure.{key}={sizes!r} must be a non-empty list of integers ≥ 1")


def check_latency_options(
    batch_sizes: Sequence[int] = (1, 64),
    gpu_batch_sizes: Sequence[int] = (1, 64, 256),
    blocks: int = 5,
    threads: int | None = None,
    min_run_time: float = 0.1,
    gpu_mode: str = "graph",
    gpu_dtype: str = "float32",
    channels_last: bool = False,
    gpu: bool = True,
) -> None:
    """Raise a ValueError naming the ``measure.<key>`` and value of the first bad latency option."""
    _check_sizes("batch_sizes", batch_sizes)
    _check_sizes("gpu_batch_sizes", gpu_batch_sizes)
    if isinstance(blocks, bool) or not isinstance(blocks, numbers.Integral) or blocks < 1:
        raise ValueError(f"measure.blocks={blocks!r} must be an integer ≥ 1")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, numbers.Integral) or threads < 1):
        raise ValueError(f"measure.threads={threads!r} must be null or an integer ≥ 1")
    if isinstance(min_run_time, bool) or not isinstance(min_run_time, numbers.Real) or not min_run_time > 0:
        raise ValueError(f"measure.min_run_time={min_run_time!r} must be a number of seconds > 0")
    if gpu_mode not in GPU_MODES:
        raise ValueError(f"measure.gpu_mode={gpu_mode!r} must be one of {', '.join(GPU_MODES)}")
    dtype = dtype_name(gpu_dtype)
    for key, value in (("channels_last", channels_last), ("gpu", gpu)):
        if not isinstance(value, bool):
            raise ValueError(f"measure.{key}={value!r} must be true or false")
    if gpu and dtype == "bfloat16" and torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        raise ValueError(f"measure.gpu_dtype={gpu_dtype!r}: {torch.cuda.get_device_name()} has no bfloat16")


def measure_latency(
    dense: nn.Module,
    pruned: nn.Module,
    example_input: torch.Tensor,
    batch_sizes: Sequence[int] = (1, 64),
    blocks: int = 5,
    threads: int | None = None,
    min_run_time: float = 0.1,
    gpu: bool = True,
    *,
    gpu_batch_sizes: Sequence[int] = (1, 64, 256),
    gpu_mode: str = "graph",
    gpu_dtype: str = "float32",
    channels_last: bool = False,
    masked: nn.Module | None = None,
) -> LatencyResult:
    """CPU latency (:func:`cpu_latency`), plus CUDA and 2:4 latency when ``gpu`` and CUDA is available.

    The GPU options are those of :func:`prunelab.measure.gpu_latency.gpu_latency` (``gpu_batch_sizes``, ``gpu_mode``,
    ``gpu_dtype``, ``channels_last``). The 2:4 timing uses the same batch sizes and mode, in fp16 (bf16 when
    ``gpu_dtype`` is bfloat16), on ``masked``: the pruned net before compaction (default ``pruned``), whose layers
    keep the dense shapes that the sparse kernels accept.
    """
    check_latency_options(
        batch_sizes, gpu_batch_sizes, blocks, threads, min_run_time, gpu_mode, gpu_dtype, channels_last, gpu
    )
    modes = dense.training, pruned.training
    try:
        result = cpu_latency(dense, pruned, example_input, batch_sizes, blocks, threads, min_run_time)
        if gpu and torch.cuda.is_available():
            timing = {
                "blocks": blocks,
                "min_run_time": min_run_time,
                "mode": gpu_mode,
                "dtype": dtype_name(gpu_dtype),
                "channels_last": channels_last,
            }
            result.update(gpu_latency(dense, pruned, example_input, gpu_batch_sizes, **timing))
            two_to_four = pruned if masked is None else masked
            result.update(semi_structured_latency(two_to_four, example_input, gpu_batch_sizes, **timing))
    finally:
        dense.train(modes[0]), pruned.train(modes[1])
    bad = [k for k, v in result.metrics.items() if not math.isfinite(v)]
    if bad:
        raise RuntimeError(f"non-finite latency metrics: {bad}")
    return result


__all__ = [
    "DTYPES",
    "GPU_MODES",
    "LatencyResult",
    "check_latency_options",
    "cpu_latency",
    "cpu_name",
    "gpu_latency",
    "is_2to4",
    "measure_latency",
    "semi_structured_latency",
]
