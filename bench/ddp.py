"""Parity of one process and two DDP processes: the same global batch, the same budget, every method.

    python bench/ddp.py                                   # every method, seeds 0-2, digits/lenet300 at 8x (CPU, gloo)
    python bench/ddp.py --methods admm obd --seeds 0 1 --data mnist5k --model lenet5 --ratio 16
    python bench/ddp.py --accelerator gpu                 # on a host with 2 GPUs (NCCL)

World size 1 runs ``data.batch_size=B``; world size 2 runs ``trainer=ddp`` with ``data.batch_size=B/2`` on each rank,
so both take the same optimizer steps over the same global batches (the DDP sampler deals the data differently, so
the runs are not bit-identical). Each run is the real CLI with the default budget, its dense baseline trained with
the same world size, recorded in a private PRUNELAB_ROOT (default ``outputs/bench_ddp``). Prints test accuracy mean ±
std and compression per method and world size, and whether the two-process mean is within 2 × the seed std of the
one-process runs (``ok``). Wall time is not a column: on a shared machine it measures the load, not DDP.
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

from prunelab.pruning import METHODS

ROOT = Path(__file__).resolve().parents[1]


def run(method: str, seed: int, world: int, args, root: Path) -> float:
    """One CLI run; returns its wall time (s)."""
    batch = args.batch_size // world
    cmd = [
        sys.executable,
        "-m",
        "prunelab.train",
        f"data={args.data}",
        f"model={args.model}",
        f"pruning={method}",
        f"pruning.compression={args.ratio}",
        f"seed={seed}",
        f"data.batch_size={batch}",
        "measure.latency=false",
        "measure.onnx=false",
        "logger.log_model=false",
        f"logger.run_name={method}-w{world}-s{seed}",
        f"trainer.accelerator={args.accelerator}",
    ]
    if world > 1:
        cmd += ["trainer=ddp", f"trainer.devices={world}"]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "PRUNELAB_ROOT": str(root)}, capture_output=True, text=True)
    if proc.returncode != 0:
        print(f"  {method} world {world} seed {seed} FAILED:\n{proc.stderr[-2000:]}", file=sys.stderr)
    return time.perf_counter() - start


def finished(root: Path) -> set[str]:
    """Names of the runs already FINISHED in ``root``'s store (none when it does not exist yet)."""
    if not (root / "outputs" / "mlflow.db").exists():
        return set()
    mlflow.set_tracking_uri(f"sqlite:///{root}/outputs/mlflow.db")
    return {
        r.info.run_name
        for r in mlflow.search_runs(
            experiment_names=["prunelab"], output_format="list", filter_string="attributes.status = 'FINISHED'"
        )
    }


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def report(root: Path, methods: list[str], seeds: list[int]) -> None:
    mlflow.set_tracking_uri(f"sqlite:///{root}/outputs/mlflow.db")
    runs = mlflow.search_runs(
        experiment_names=["prunelab"], output_format="list", filter_string="attributes.status = 'FINISHED'"
    )
    by_name = {r.info.run_name: r for r in sorted(runs, key=lambda r: r.info.start_time)}  # the latest wins
    print(
        "| method | 1 process: test acc (%) | 2 processes: test acc (%) | difference | within 2σ₁ | compression 1 / 2 |"
    )
    print("| --- | ---: | ---: | ---: | :---: | ---: |")
    for method in methods:
        accs, comps = {}, {}
        for world in (1, 2):
            found = [by_name.get(f"{method}-w{world}-s{s}") for s in seeds]
            found = [r for r in found if r is not None]
            accs[world] = [r.data.metrics["test_acc"] for r in found]
            comps[world] = [r.data.metrics["compression"] for r in found]
        if not accs[1] or not accs[2]:
            print(f"| {method} | {len(accs[1])} runs | {len(accs[2])} runs | | — | |")
            continue
        (m1, s1), (m2, s2) = _mean_std(accs[1]), _mean_std(accs[2])
        ok = "ok" if abs(m2 - m1) <= 2 * s1 + 1e-9 else "**no**"  # σ₁: the seed std of the one-process runs
        print(
            f"| {method} | {m1:.2f} ± {s1:.2f} | {m2:.2f} ± {s2:.2f} | {m2 - m1:+.2f} | {ok} | "
            f"{statistics.fmean(comps[1]):.2f} / {statistics.fmean(comps[2]):.2f} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", default=sorted(METHODS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--data", default="digits")
    parser.add_argument("--model", default="lenet300")
    parser.add_argument("--ratio", type=float, default=8)
    parser.add_argument("--batch-size", type=int, default=64, help="the global batch")
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--root", type=Path, default=ROOT / "outputs" / "bench_ddp")
    parser.add_argument("--report", action="store_true", help="print the table from the runs already recorded")
    parser.add_argument("--again", action="store_true", help="run again the runs already recorded (default: skip)")
    args = parser.parse_args()
    if not args.report:
        done = set() if args.again else finished(args.root)
        for seed in args.seeds:
            for method in args.methods:
                for world in (1, 2):
                    if f"{method}-w{world}-s{seed}" in done:
                        continue
                    seconds = run(method, seed, world, args, args.root)
                    print(f"  {method} world {world} seed {seed}: {seconds:.0f} s", file=sys.stderr)
    print(
        f"{args.data}/{args.model} at {args.ratio:g}x, global batch {args.batch_size}, seeds "
        f"{' '.join(map(str, args.seeds))}, accelerator {args.accelerator}, {time.strftime('%Y-%m-%d')}"
    )
    report(args.root, args.methods, args.seeds)


if __name__ == "__main__":
    main()
