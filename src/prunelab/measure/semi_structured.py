"""2:4 semi-structured sparse latency: the pruned net with its 2:4 weights on the sparse tensor-core kernels.

Ampere and later GPUs multiply a matrix with at most 2 nonzeros in every 4 consecutive inputs at up to twice the
dense rate (Mishra et al. 2021, "Accelerating Sparse Deep Neural Networks"). PyTorch exposes this as
``torch.sparse.to_sparse_semi_structured`` with two backends: cuSPARSELt (capability ≥ 8.0, where the build has it)
and CUTLASS (kernels built for capability 8.x only). Every Linear layer, and every 1×1 convolution (as a matmul),
whose weight is 2:4 and whose shape the backend accepts is converted; each other Conv2d/Linear layer is recorded with
the reason it was not. The sparse net is timed against the same net dense, both in fp16 (bf16 when asked), and the
``speedup_gpu_2to4_*`` metrics are kept only when the profiler saw the sparse kernels run and the outputs match.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from prunelab.measure.gpu_latency import cuda_batch, forward_fn, mode_params, on_cuda, time_pair
from prunelab.measure.timing import LatencyResult, record

CONVERTED = "converted"
# aten ops behind SparseSemiStructuredTensor matmuls (cuSPARSELt, CUTLASS)
SPARSE_OPS = {
    "aten::_cslt_sparse_mm",
    "aten::_sparse_semi_structured_mm",
    "aten::_sparse_semi_structured_addmm",
    "aten::_sparse_semi_structured_linear",
}
OUTPUT_RTOL = 1e-2  # fp16 sparse vs fp16 dense logits: same products, different accumulation order


def is_2to4(weight: torch.Tensor) -> bool:
    """Whether every block of 4 consecutive inputs of every row holds at most 2 nonzeros."""
    rows = weight.detach().reshape(weight.shape[0], -1)
    return rows.shape[1] % 4 == 0 and bool((rows.reshape(rows.shape[0], -1, 4).ne(0).sum(-1) <= 2).all())


def choose_backend(capability: tuple[int, int] | None, cusparselt: bool) -> tuple[str | None, str]:
    """The 2:4 backend (``cusparselt``, ``cutlass`` or ``None``) for a GPU of ``capability``, and why."""
    if capability is None:
        return None, "no CUDA device"
    cc = f"{capability[0]}.{capability[1]}"
    if tuple(capability) < (8, 0):
        return None, f"compute capability {cc}: 2:4 sparse tensor cores need 8.0 or later"
    if cusparselt:
        return "cusparselt", f"cuSPARSELt on compute capability {cc}"
    if capability[0] == 8:
        return "cutlass", f"CUTLASS on compute capability {cc} (no cuSPARSELt in this build)"
    return None, f"compute capability {cc}: no cuSPARSELt in this build and CUTLASS's 2:4 kernels are for 8.x only"


def sparse_class(backend: str) -> type:
    return {
        "cusparselt": torch.sparse.SparseSemiStructuredTensorCUSPARSELT,
        "cutlass": torch.sparse.SparseSemiStructuredTensorCUTLASS,
    }[backend]


def shape_limits(backend: str, dtype: torch.dtype) -> tuple[int, int]:
    """(rows, columns) that a sparse weight's shape must be a multiple of, from torch's own table."""
    limits = sparse_class(backend)._DTYPE_SHAPE_CONSTRAINTS[dtype]
    return limits.sparse_min_rows, limits.sparse_min_cols


def matmul_weight(module: nn.Module) -> torch.Tensor | str:
    """The (out, in) matrix ``module`` multiplies by, or why it is not a plain matmul."""
    if isinstance(module, nn.Linear):
        return module.weight
    if isinstance(module, nn.Conv2d):
        k = "×".join(map(str, module.kernel_size))
        if module.kernel_size != (1, 1):
            return f"{k} convolution: only Linear layers and 1×1 convolutions run as matmuls"
        if module.groups != 1 or module.dilation != (1, 1) or module.padding not in ((0, 0), "valid"):
            return "1×1 convolution with groups, dilation or padding is not a plain matmul"
        return module.weight.reshape(module.out_channels, module.in_channels)
    return f"{type(module).__name__} is not a Linear or Conv2d"


def eligibility(module: nn.Module, backend: str, dtype: torch.dtype = torch.float16) -> str | None:
    """``None`` when ``module`` can run as a 2:4 sparse matmul on ``backend`` in ``dtype``; otherwise why not."""
    weight = matmul_weight(module)
    if isinstance(weight, str):
        return weight
    dtype_name = str(dtype).removeprefix("torch.")
    if dtype not in sparse_class(backend)._DTYPE_SHAPE_CONSTRAINTS:
        return f"{backend} has no 2:4 kernels for {dtype_name}"
    rows, cols = weight.shape
    min_rows, min_cols = shape_limits(backend, dtype)
    if rows % min_rows or cols % min_cols:
        return f"shape {rows}×{cols}: {backend} needs multiples of {min_rows}×{min_cols} in {dtype_name}"
    if not is_2to4(weight):
        return "weights are not 2:4 sparse"
    return None


class SparseConv1x1(nn.Module):
    """A 1×1 convolution computed as a matmul with a 2:4 sparse weight (stride by subsampling the input)."""

    def __init__(self, conv: nn.Conv2d, sparse_weight: torch.Tensor) -> None:
        super().__init__()
        self.stride = conv.stride
        self.weight = nn.Parameter(sparse_weight, requires_grad=False)
        self.bias = None if conv.bias is None else nn.Parameter(conv.bias.detach(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride[0], :: self.stride[1]]
        n, c, h, w = x.shape
        y = F.linear(x.permute(0, 2, 3, 1).reshape(-1, c), self.weight, self.bias)
        return y.reshape(n, h, w, -1).permute(0, 3, 1, 2)


def convert(net: nn.Module, backend: str, dtype: torch.dtype) -> dict[str, str]:
    """Put the weights of every eligible layer of ``net`` (on CUDA, in ``dtype``) in 2:4 form, in place.

    Returns ``{layer: "converted" or why not}`` for every Conv2d/Linear layer.
    """
    to_sparse = sparse_class(backend).from_dense
    decisions = {}
    for name, module in list(net.named_modules()):
        if not isinstance(module, (nn.Linear, nn.Conv2d)):
            continue
        reason = eligibility(module, backend, dtype)
        if reason is None:
            try:
                sparse = to_sparse(matmul_weight(module).detach().contiguous())
                if isinstance(module, nn.Linear):
                    module.weight = nn.Parameter(sparse, requires_grad=False)
                else:
                    net.set_submodule(name, SparseConv1x1(module, sparse))
                reason = CONVERTED
            except (RuntimeError, ValueError, NotImplementedError) as exc:
                reason = f"kernel error: {type(exc).__name__}: {exc}"[:500]
        decisions[name] = reason
    return decisions


def sparse_kernel_calls(forward) -> int:
    """How many sparse 2:4 matmuls one call of ``forward`` ran (from the profiler's aten op names)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        forward()
        torch.cuda.synchronize()
    return sum(event.count for event in prof.key_averages() if event.key in SPARSE_OPS)


def semi_structured_latency(
    pruned: nn.Module,
    example_input: torch.Tensor,
    batch_sizes: Sequence[int] = (1, 64, 256),
    blocks: int = 5,
    min_run_time: float = 0.1,
    mode: str = "graph",
    dtype: str = "float16",
    channels_last: bool = False,
    warmup: int = 10,
) -> LatencyResult:
    """The pruned net in fp16 (or bf16) dense vs with its 2:4 layers sparse, on CUDA.

    Metrics ``latency_gpu_2to4_b{B}_ms``, ``dense_latency_gpu_2to4_b{B}_ms`` and ``speedup_gpu_2to4_b{B}`` only
    when at least one layer was converted and the sparse kernels ran; the per-layer decisions, the backend and any
    reason for skipping are in the samples (``latency.json``) and params either way.
    """
    result = LatencyResult()
    if not torch.cuda.is_available():
        return result
    sparse_dtype = torch.bfloat16 if dtype == "bfloat16" else torch.float16
    backend, why = choose_backend(torch.cuda.get_device_capability(), torch.backends.cusparselt.is_available())
    result.samples["gpu_2to4_backend"] = why
    result.params.update(
        {
            "latency_gpu_2to4_backend": backend or "none",
            "latency_gpu_2to4_dtype": str(sparse_dtype).removeprefix("torch."),
        }
    )
    if backend is None:
        return result
    with torch.no_grad():
        dense = on_cuda(pruned, sparse_dtype, channels_last)
        sparse = copy.deepcopy(dense)
        decisions = convert(sparse, backend, sparse_dtype)
        converted = [name for name, d in decisions.items() if d == CONVERTED]
        result.samples["gpu_2to4_layers"] = decisions
        result.params["latency_gpu_2to4_converted"] = f"{len(converted)} of {len(decisions)} layers"
        if not converted:
            return result
        out = LatencyResult()
        used, fallback = {}, {}
        try:
            x = cuda_batch(example_input, int(batch_sizes[0]), sparse_dtype, channels_last)
            calls = sparse_kernel_calls(forward_fn(sparse, x))
            diff = float((sparse(x).float() - dense(x).float()).abs().max())
            scale = float(dense(x).float().abs().max())
            result.samples["gpu_2to4_check"] = {"sparse_kernel_calls": calls, "max_abs_diff": diff}
            if calls < len(converted) or not diff <= OUTPUT_RTOL * max(1.0, scale):
                result.samples["gpu_2to4_skipped"] = (
                    f"sparse kernels ran {calls} times for {len(converted)} converted layers; "
                    f"max |logit diff| {diff:.3g} vs dense fp16"
                )
                return result
            for batch in map(int, batch_sizes):
                x = cuda_batch(example_input, batch, sparse_dtype, channels_last)
                forwards = {"dense": forward_fn(dense, x), "pruned": forward_fn(sparse, x)}
                raw, used[batch], reason = time_pair(forwards, mode, warmup, blocks, min_run_time)
                if reason:
                    fallback[batch] = reason
                record("gpu_2to4", batch, raw, out)
        except RuntimeError as exc:  # a kernel missing for this shape or build: recorded, the run goes on
            result.samples["gpu_2to4_skipped"] = f"{type(exc).__name__}: {exc}"[:1000]
            return result
    result.update(out)
    result.params.update(mode_params("latency_gpu_2to4", mode, used, fallback))
    return result


__all__ = ["SparseConv1x1", "choose_backend", "convert", "eligibility", "is_2to4", "semi_structured_latency"]
