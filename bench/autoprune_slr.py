"""AutoPrune and SLR against ADMM and gradual magnitude pruning on mnist5k + LeNet-5, same budget, high ratios.

    python bench/autoprune_slr.py                          # 16/64/128/310×, seeds 0-2, 4 methods: 48 runs
    python bench/autoprune_slr.py --ratios 64 --seeds 0    # one cell per method
    python bench/autoprune_slr.py --jobs 4                 # parallel jobs of the joblib launcher
    python bench/autoprune_slr.py --root R --report        # the tables again from the runs recorded under R

The grid runs through the real CLI as one Hydra multirun with the joblib launcher
(``hydra/launcher=local_parallel num_threads=1``) in a fresh PRUNELAB_ROOT; the table is read back from MLflow:
test accuracy (%) mean ± std over seeds, and for SLR and ADMM the validation accuracy right after the hard prune
(``<method>/acc_after_hard_prune``, before any masked retraining: the "retrain-free" accuracy SLR claims).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("autoprune", "slr", "admm", "magnitude")
HARD_PRUNE = ("slr", "admm")
EXPERIMENT = "autoprune_slr"


def sweep(args, root: Path) -> float:
    """Run the grid through ``python -m prunelab.train -m``; returns its wall time in seconds."""
    command = [
        sys.executable,
        "-m",
        "prunelab.train",
        "-m",
        "data=mnist5k",
        "model=lenet5",
        f"pruning={','.join(args.methods)}",
        f"pruning.compression={','.join(map(str, args.ratios))}",
        f"seed={','.join(map(str, args.seeds))}",
        f"finetune.epochs={args.epochs}",
        "hydra/launcher=local_parallel",
        "num_threads=1",
        f"logger.experiment_name={EXPERIMENT}",
        "logger.log_model=false",
        "measure.latency=false",
        *args.overrides,
    ]
    env = {**os.environ, "PRUNELAB_ROOT": str(root), "PRUNELAB_JOBS": str(args.jobs)}
    env.pop("MLFLOW_TRACKING_URI", None)
    start = time.perf_counter()
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"the sweep failed:\n{proc.stderr[-4000:]}")
    return time.perf_counter() - start


def results(root: Path) -> dict[tuple[str, float], dict[str, list[float]]]:
    """(method, compression) → metric → values over seeds, from the finished child runs in MLflow."""
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{root}/outputs/mlflow.db")
    cells: dict[tuple[str, float], dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for run in mlflow.search_runs(experiment_names=[EXPERIMENT], output_format="list"):
        params, metrics = run.data.params, run.data.metrics
        if run.info.status != "FINISHED" or "test_acc" not in metrics:
            continue  # the sweep's parent run
        cell = cells[(params["method"], float(params["compression_target"]))]
        cell["test_acc"].append(metrics["test_acc"])
        cell["dense"].append(metrics["dense_test_acc"])
        cell["compression"].append(metrics["compression"])
        key = f"{params['method']}/acc_after_hard_prune"
        if key in metrics:
            cell["hard_prune"].append(metrics[key])  # percent, as every accuracy in MLflow
    return cells


def fmt(values: list[float]) -> str:
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def print_tables(args, cells) -> None:
    print(f"mnist5k / lenet5, finetune.epochs={args.epochs}, seeds {args.seeds}; test accuracy (%) mean ± std")
    print("| compression | " + " | ".join(args.methods) + " | dense |")
    print("| ---: | " + " | ".join("---:" for _ in args.methods) + " | ---: |")
    for ratio in args.ratios:
        row = [fmt(cells[(m, float(ratio))]["test_acc"]) for m in args.methods]
        dense = fmt(cells[(args.methods[0], float(ratio))]["dense"])
        print(f"| {ratio}× | " + " | ".join(row) + f" | {dense} |")
    reached = [c for cell in cells.values() for c in cell["compression"]]
    requested = [r for (_, r), cell in cells.items() for _ in cell["compression"]]
    worst = max((abs(c - r) / r for c, r in zip(reached, requested)), default=0.0)
    print(f"\n{len(reached)} runs; achieved compression within {100 * worst:.2f} % of the requested one")
    hard = [m for m in args.methods if m in HARD_PRUNE]
    if hard:
        print("\nvalidation accuracy (%) right after the hard prune, before masked retraining")
        print("| compression | " + " | ".join(hard) + " |")
        print("| ---: | " + " | ".join("---:" for _ in hard) + " |")
        for ratio in args.ratios:
            print(f"| {ratio}× | " + " | ".join(fmt(cells[(m, float(ratio))]["hard_prune"]) for m in hard) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ratios", type=int, nargs="+", default=[16, 64, 128, 310])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--epochs", type=int, default=6, help="finetune.epochs, the same for every method")
    parser.add_argument("--jobs", type=int, default=2, help="parallel jobs (PRUNELAB_JOBS)")
    parser.add_argument("--root", default=None, help="PRUNELAB_ROOT (default: a fresh temporary folder)")
    parser.add_argument("--report", action="store_true", help="only print the tables of the runs in --root")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run")
    args = parser.parse_args()
    if args.report and not args.root:
        raise SystemExit("--report reads the runs of an earlier --root")
    with tempfile.TemporaryDirectory(prefix="bench_autoprune_slr_") as tmp:
        root = Path(args.root).resolve() if args.root else Path(tmp)
        seconds = 0.0 if args.report else sweep(args, root)
        print_tables(args, results(root))
    if not args.report:
        print(
            f"\n({len(args.methods) * len(args.ratios) * len(args.seeds)} jobs, {args.jobs} at a time, "
            f"{seconds / 60:.0f} min)"
        )


if __name__ == "__main__":
    main()
