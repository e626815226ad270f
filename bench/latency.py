"""Measured CPU or GPU speedup of channel-pruned CIFAR nets against their MACs reduction.

    python bench/latency.py                       # resnet20, resnet56, vgg16 at 2×, 4×, 8× fewer MACs (CPU)
    python bench/latency.py --quick               # resnet20 only, 2 blocks, short runs
    python bench/latency.py --models vgg16 --targets 2 4 --blocks 7 --threads 1 --round-to 8
    python bench/latency.py --device cuda         # CUDA-graph replay, batch 256, channel counts rounded to 8
    python bench/latency.py --device cuda --mode eager --dtype float16 --channels-last --batch-sizes 1 64 256

Random weights (3×32×32 inputs, 10 classes). The pruned nets come from Torch-Pruning's own ``MagnitudePruner``
(``global_pruning=False``, classifier outputs kept) at the channel ratio whose MACs reduction lands nearest the
target; dense and pruned are timed interleaved in one process (prunelab.measure.latency.cpu_latency on the CPU,
prunelab.measure.gpu_latency.gpu_latency on CUDA).
"""

from __future__ import annotations

import argparse
import copy

import torch
import torch_pruning as tp

from prunelab.measure import count_macs
from prunelab.measure.gpu_latency import DTYPES, GPU_MODES, gpu_latency
from prunelab.measure.latency import cpu_latency, cpu_name
from prunelab.models import build_model

SHAPE = (1, 3, 32, 32)


def channel_pruned(dense: torch.nn.Module, ratio: float, round_to: int | None = None) -> torch.nn.Module:
    """A physically smaller copy of ``dense`` with ``ratio`` of the channels of every group removed (channel counts
    rounded to multiples of ``round_to`` when given)."""
    net = copy.deepcopy(dense)
    head = [m for m in net.modules() if isinstance(m, torch.nn.Linear)][-1]
    pruner = tp.pruner.MagnitudePruner(
        net,
        torch.zeros(SHAPE),
        importance=tp.importance.MagnitudeImportance(p=2),
        pruning_ratio=ratio,
        global_pruning=False,
        ignored_layers=[head],
        round_to=round_to,
    )
    pruner.step()
    return net.eval()


def pruned_at(
    dense: torch.nn.Module, target: float, tol: float = 0.03, round_to: int | None = None
) -> tuple[torch.nn.Module, float]:
    """Bisect the channel ratio so that dense MACs / pruned MACs is within ``tol`` of ``target``."""
    example = torch.zeros(SHAPE)
    dense_macs = count_macs(dense, example)
    lo, hi = 0.0, 0.95
    best = None
    for _ in range(12):
        ratio = (lo + hi) / 2
        net = channel_pruned(dense, ratio, round_to)
        reduction = dense_macs / count_macs(net, example)
        if best is None or abs(reduction - target) < abs(best[1] - target):
            best = (net, reduction)
        if abs(reduction - target) / target <= tol:
            break
        lo, hi = (ratio, hi) if reduction < target else (lo, ratio)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["resnet20", "resnet56", "vgg16"])
    parser.add_argument("--targets", nargs="+", type=float, default=[2.0, 4.0, 8.0], help="MACs reductions")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=None, help="default: 1 64 (cpu), 256 (cuda)")
    parser.add_argument("--blocks", type=int, default=5, help="interleaved dense/pruned blocks")
    parser.add_argument("--min-run-time", type=float, default=0.2, help="seconds per model and block")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    parser.add_argument(
        "--round-to",
        type=int,
        default=None,
        help="round pruned channel counts to multiples of this (default: 8 on cuda, off on cpu)",
    )
    parser.add_argument("--mode", choices=GPU_MODES, default="graph", help="cuda: CUDA-graph replay or eager")
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32", help="cuda: autocast dtype")
    parser.add_argument("--channels-last", action="store_true", help="cuda: NHWC weights and inputs")
    parser.add_argument("--quick", action="store_true", help="resnet20 only, 2 blocks, 0.05 s per block")
    args = parser.parse_args()
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    if args.quick:
        args.models, args.blocks, args.min_run_time = ["resnet20"], 2, 0.05
    batch_sizes = args.batch_sizes or ([256] if cuda else [1, 64])
    round_to = args.round_to if args.round_to is not None else (8 if cuda else None)
    torch.manual_seed(0)
    cols = " | ".join(f"speedup b{b}" for b in batch_sizes)
    ratio_cols = " | ".join(f"speedup ÷ MACs red. b{b}" for b in batch_sizes)
    if cuda:
        print(
            f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, dtype {args.dtype}, "
            f"channels_last {args.channels_last}, channel counts rounded to {round_to or 'nothing'}"
        )
    else:
        print(f"machine: {cpu_name()}, torch {torch.__version__}")
    print(f"| model | target | MACs reduction | {cols} | {ratio_cols} | {'mode' if cuda else 'threads'} |")
    print("| --- | ---: | ---: |" + " ---: |" * (2 * len(batch_sizes)) + (" --- |" if cuda else " ---: |"))
    for name in args.models:
        dense = build_model(name, in_channels=3, image_size=32).eval()
        for target in args.targets:
            pruned, reduction = pruned_at(dense, target, round_to=round_to)
            if cuda:
                res = gpu_latency(
                    dense,
                    pruned,
                    torch.zeros(SHAPE),
                    batch_sizes,
                    args.blocks,
                    args.min_run_time,
                    args.mode,
                    args.dtype,
                    args.channels_last,
                )
                last = res.params["latency_gpu_mode"]
            else:
                res = cpu_latency(
                    dense, pruned, torch.zeros(SHAPE), batch_sizes, args.blocks, args.threads, args.min_run_time
                )
                last = str(int(res.metrics["latency_cpu_threads"]))
            speed = [res.metrics[f"speedup_{args.device.replace('cuda', 'gpu')}_b{b}"] for b in batch_sizes]
            cells = [f"{s:.2f}" for s in speed] + [f"{s / reduction:.2f}" for s in speed]
            print(f"| {name} | {target:g}× | {reduction:.2f} | {' | '.join(cells)} | {last} |", flush=True)
            for why in res.samples.get("gpu_fallback", {}).values():
                print(f"  graph capture failed, timed eagerly: {why}")


if __name__ == "__main__":
    main()
