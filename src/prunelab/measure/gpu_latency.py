"""CUDA latency of the dense and the pruned network, with the per-launch overhead taken out.

Eager PyTorch spends a few microseconds of host time per kernel launch; for the small CIFAR/MNIST nets that is more
than the kernels themselves, so eager timing measures the launches, not the model. The default ``graph`` mode
captures one forward on a static input into a CUDA graph and times its replays (see PyTorch's "CUDA Graphs" notes:
warm-up on a side stream, capture, replay); ``eager`` times plain calls. Both warm up with ``cudnn.benchmark`` on,
so cuDNN picks its fastest algorithm per shape before timing. A sample is the mean of back-to-back calls between two
CUDA events (at least ``SLICE_MS`` long, so the events' resolution does not matter); dense and pruned alternate by
block as on the CPU. Capture can fail for models with host syncs or unsupported ops: that batch size then falls back
to eager for both models, and the fallback and its reason are recorded.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn

from prunelab.measure.timing import LatencyResult, interleave, make_batch, record

GPU_MODES = ("graph", "eager")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DTYPE_ALIASES = {"fp32": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16"}
SLICE_MS = 2.0  # shortest timed sample: back-to-back calls between two events


def dtype_name(name: str) -> str:
    """Canonical dtype name (``float32``, ``float16``, ``bfloat16``) for a name or alias; ValueError otherwise."""
    canonical = DTYPE_ALIASES.get(str(name), str(name))
    if canonical not in DTYPES:
        raise ValueError(f"measure.gpu_dtype={name!r} must be one of {', '.join([*DTYPES, *DTYPE_ALIASES])}")
    return canonical


@contextlib.contextmanager
def cudnn_benchmark(enabled: bool = True) -> Iterator[None]:
    """Set ``torch.backends.cudnn.benchmark`` inside the block and restore the previous value after it."""
    previous = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = enabled
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = previous


def on_cuda(net: nn.Module, dtype: torch.dtype | None = None, channels_last: bool = False) -> nn.Module:
    """An eval copy of ``net`` on the current CUDA device (cast to ``dtype`` when given, optionally NHWC)."""
    net = copy.deepcopy(net).cuda().eval()
    if dtype is not None:
        net = net.to(dtype)
    return net.to(memory_format=torch.channels_last) if channels_last else net


def cuda_batch(example_input: torch.Tensor, size: int, dtype=torch.float32, channels_last: bool = False):
    x = make_batch(example_input, size, device="cuda", dtype=dtype)
    return x.contiguous(memory_format=torch.channels_last) if channels_last and x.dim() == 4 else x


def forward_fn(net: nn.Module, x: torch.Tensor, autocast: torch.dtype | None = None) -> Callable[[], torch.Tensor]:
    """One forward of ``net`` on the fixed input ``x``, under CUDA autocast to ``autocast`` when given."""

    def forward() -> torch.Tensor:
        # no weight-cast cache: cached casts and graph capture do not mix (torch.cuda.make_graphed_callables docs)
        with torch.autocast("cuda", dtype=autocast or torch.float16, enabled=autocast is not None, cache_enabled=False):
            return net(x)

    return forward


def warm_up(forward: Callable[[], torch.Tensor], steps: int) -> None:
    """Run ``steps`` forwards on a side stream (as graph capture requires) and wait for them."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(steps):
            forward()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()


class GraphedForward:
    """A forward captured once into a CUDA graph; calling it replays the graph."""

    def __init__(self, forward: Callable[[], torch.Tensor]) -> None:
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.output = forward()  # the static output lives in the graph's private memory pool
        self.graph.replay()
        torch.cuda.synchronize()

    def __call__(self) -> None:
        self.graph.replay()


def runners(forwards: dict[str, Callable], mode: str, warmup: int) -> tuple[dict[str, Callable], str, str | None]:
    """Warmed-up callables in ``mode`` (graph replays or the forwards), the mode used and why it fell back."""
    for forward in forwards.values():
        warm_up(forward, warmup)
    if mode == "eager":
        return forwards, "eager", None
    try:
        return {name: GraphedForward(forward) for name, forward in forwards.items()}, "graph", None
    except RuntimeError as exc:  # capture refused (host sync, unsupported op): time both models eagerly instead
        torch.cuda.synchronize()
        return forwards, "eager", f"{type(exc).__name__}: {exc}"[:1000]


def calls_per_sample(run: Callable, slice_ms: float = SLICE_MS) -> int:
    """How many back-to-back calls of ``run`` fill about ``slice_ms``."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    run()
    end.record()
    end.synchronize()
    return max(1, int(slice_ms / max(start.elapsed_time(end), 1e-3)))


def time_block(item: tuple[Callable, int], min_run_time: float) -> list[float]:
    """ms per call of ``run`` (``item = (run, calls per sample)``), samples until ``min_run_time`` s and ≥ 3."""
    run, number = item
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times, spent = [], 0.0
    while spent < min_run_time * 1e3 or len(times) < 3:
        start.record()
        for _ in range(number):
            run()
        end.record()
        end.synchronize()
        elapsed = start.elapsed_time(end)
        times.append(elapsed / number)
        spent += elapsed
    return times


def time_pair(
    forwards: dict[str, Callable], mode: str, warmup: int, blocks: int, min_run_time: float
) -> tuple[dict[str, list], str, str | None]:
    """Raw interleaved samples of both forwards, the mode used and the fallback reason (``None``: no fallback)."""
    runs, used, reason = runners(forwards, mode, warmup)
    items = {name: (run, calls_per_sample(run)) for name, run in runs.items()}
    raw = interleave(lambda item: time_block(item, min_run_time), items, blocks)
    del runs, items
    torch.cuda.empty_cache()
    return raw, used, reason


def mode_params(prefix: str, requested: str, used: dict[int, str], fallback: dict[int, str]) -> dict[str, str]:
    """MLflow params for the timing mode: what was asked, what ran (``graph``, ``eager`` or both) and why not."""
    params = {f"{prefix}_mode_requested": requested, f"{prefix}_mode": "+".join(sorted(set(used.values())))}
    if fallback:
        params[f"{prefix}_fallback"] = "; ".join(f"b{b}: {why}" for b, why in fallback.items())[:1000]
    return params


def gpu_latency(
    dense: nn.Module,
    pruned: nn.Module,
    example_input: torch.Tensor,
    batch_sizes: Sequence[int] = (1, 64, 256),
    blocks: int = 5,
    min_run_time: float = 0.1,
    mode: str = "graph",
    dtype: str = "float32",
    channels_last: bool = False,
    warmup: int = 10,
) -> LatencyResult:
    """CUDA latency (``latency_gpu_b{B}_ms``, ``speedup_gpu_b{B}``, …) of both models; empty without CUDA.

    Args:
        dense: reference model.
        pruned: the pruned (compacted) model.
        example_input: an input batch; only its shape beyond the batch dimension is used.
        batch_sizes: batch sizes to time.
        blocks: interleaved dense/pruned blocks.
        min_run_time: seconds each model runs per block.
        mode: ``graph`` (CUDA-graph replay, eager where capture fails) or ``eager``.
        dtype: ``float32``, or ``float16``/``bfloat16`` under autocast (weights stay float32).
        channels_last: NHWC weights and inputs.
        warmup: forwards per model before capture and timing (cuDNN's algorithm search happens here).
    """
    result = LatencyResult()
    if not torch.cuda.is_available():
        return result
    dtype = dtype_name(dtype)
    autocast = None if dtype == "float32" else DTYPES[dtype]
    device = torch.cuda.get_device_name()
    result.samples["gpu_device"] = device
    result.params.update(
        {
            "latency_gpu_device": device,
            "latency_gpu_dtype": dtype,
            "latency_gpu_channels_last": str(bool(channels_last)).lower(),
        }
    )
    used, fallback = {}, {}
    with torch.no_grad(), cudnn_benchmark():
        nets = {
            "dense": on_cuda(dense, channels_last=channels_last),
            "pruned": on_cuda(pruned, channels_last=channels_last),
        }
        for batch in map(int, batch_sizes):
            x = cuda_batch(example_input, batch, channels_last=channels_last)
            forwards = {name: forward_fn(net, x, autocast) for name, net in nets.items()}
            raw, used[batch], reason = time_pair(forwards, mode, warmup, blocks, min_run_time)
            if reason:
                fallback[batch] = reason
            record("gpu", batch, raw, result)
    result.samples["gpu_modes"] = {f"b{b}": m for b, m in used.items()}
    result.samples["gpu_fallback"] = {f"b{b}": why for b, why in fallback.items()}
    result.params.update(mode_params("latency_gpu", mode, used, fallback))
    return result


__all__ = ["DTYPES", "GPU_MODES", "cudnn_benchmark", "dtype_name", "gpu_latency", "mode_params", "time_pair"]
