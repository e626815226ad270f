"""Networks we did not write, pruned to fewer MACs: torchvision's ResNet-18 and MobileNetV2, filter and channel
granularity, 2× and 4× MACs, on an embedded data set.

    python bench/families.py                                   # digits, resnet18 + mobilenet_v2, 2x and 4x, seed 0
    python bench/families.py --data mnist5k --seeds 0 1 2 --models resnet18
    python bench/families.py --report                          # the table again from the runs already recorded

Each run is the real CLI (``model=torchvision model.name=<net> pruning=magnitude pruning.target=macs``) with the
default budget, recorded in a private PRUNELAB_ROOT (default ``outputs/bench_families``). Prints test accuracy (dense
and pruned), the MACs reduction reached, and the speed-up of the compacted network over the dense one on the CPU in
PyTorch and in ONNX Runtime (batch 64, median of interleaved blocks: a ratio, so machine load cancels out).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import mlflow

ROOT = Path(__file__).resolve().parents[1]
METRICS = ("dense_test_acc", "test_acc", "macs_reduction", "speedup_cpu_b64", "speedup_onnx_b64")


def run(args, model: str, granularity: str, ratio: float, seed: int) -> None:
    cmd = [
        sys.executable,
        "-m",
        "prunelab.train",
        f"data={args.data}",
        "model=torchvision",
        f"model.name={model}",
        "pruning=magnitude",
        f"pruning.granularity={granularity}",
        "pruning.target=macs",
        f"pruning.compression={ratio}",
        f"seed={seed}",
        "logger.log_model=false",
        f"logger.run_name={model}-{granularity}-{ratio:g}-s{seed}",
        *args.overrides,
    ]
    proc = subprocess.run(
        cmd, cwd=ROOT, env={**os.environ, "PRUNELAB_ROOT": str(args.root)}, capture_output=True, text=True
    )
    if proc.returncode != 0:
        print(f"  {model} {granularity} {ratio:g}x seed {seed} FAILED:\n{proc.stderr[-1500:]}", file=sys.stderr)


def _cell(values: list[float], digits: int = 2) -> str:
    if not values:
        return "—"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.fmean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def report(args) -> None:
    mlflow.set_tracking_uri(f"sqlite:///{args.root}/outputs/mlflow.db")
    runs = mlflow.search_runs(
        experiment_names=["prunelab"], output_format="list", filter_string="attributes.status = 'FINISHED'"
    )
    by_name = {r.info.run_name: r for r in sorted(runs, key=lambda r: r.info.start_time)}
    print(
        f"{args.data}, magnitude pruning with pruning.target=macs, seeds {' '.join(map(str, args.seeds))}, "
        f"default budget, {time.strftime('%Y-%m-%d')}"
    )
    print(
        "| network | granularity | MACs target | dense acc (%) | pruned acc (%) | MACs reduction | CPU speed-up "
        "b64 | ONNX Runtime speed-up b64 |"
    )
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for model in args.models:
        for granularity in args.granularities:
            for ratio in args.ratios:
                found = [by_name.get(f"{model}-{granularity}-{ratio:g}-s{s}") for s in args.seeds]
                values = {
                    k: [r.data.metrics[k] for r in found if r is not None and k in r.data.metrics] for k in METRICS
                }
                print(
                    f"| {model} | {granularity} | {ratio:g}× | {_cell(values['dense_test_acc'])} | "
                    f"{_cell(values['test_acc'])} | {_cell(values['macs_reduction'])}× | "
                    f"{_cell(values['speedup_cpu_b64'])}× | {_cell(values['speedup_onnx_b64'])}× |"
                )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="digits")
    parser.add_argument("--models", nargs="+", default=["resnet18", "mobilenet_v2"])
    parser.add_argument("--granularities", nargs="+", default=["filter", "channel"])
    parser.add_argument("--ratios", nargs="+", type=float, default=[2.0, 4.0])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--root", type=Path, default=ROOT / "outputs" / "bench_families")
    parser.add_argument("--report", action="store_true", help="print the table from the runs already recorded")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every run, after --")
    args = parser.parse_args()
    if not args.report:
        for seed in args.seeds:
            for model in args.models:
                for granularity in args.granularities:
                    for ratio in args.ratios:
                        run(args, model, granularity, ratio, seed)
    report(args)


if __name__ == "__main__":
    main()
