"""Structured pruning methods compared: test accuracy (mean ± std over seeds) against MACs reduction and measured
CPU speed-up (median and range over seeds), every method at the same structured granularity and epoch budget.

    python bench/structured.py                                   # increg spp admm magnitude, seeds 0 1 2
    python bench/structured.py --methods increg admm magnitude   # a subset (e.g. before spp exists)
    python bench/structured.py --quick                           # seed 0, one ratio per cell
    python bench/structured.py --set increg pruning.lambda_max=2 pruning.ramp=0.1   # extra overrides for a method

Every run goes through the real CLI, one Hydra multirun per (cell, method): ``python -m prunelab.train -m
pruning=M pruning.compression=r1,r2,.. seed=0,1,2 data=D model=N`` with the joblib launcher
(``hydra/launcher=local_parallel num_threads=1``), recorded in MLflow under a private ``PRUNELAB_ROOT`` (a fresh
temporary folder unless ``--root`` names one, which keeps the dense baselines cached for a rerun); the table is read
back from MLflow with :func:`prunelab.tracking.sweeps.report.load_runs`.

Granularity ``column`` (im2col columns; for a Linear layer, its input features) and ``scope=layer`` (the same share
of groups pruned in every pruned layer) for every method, so that all prune the same number of groups per layer and
differ only in which groups and how. The image input is never pruned by columns, so on ``digits/lenet300``
(64 → 300 → 100 → 10) only fc2 and fc3 can be, and 2.6× is the most any method reaches there: that cell uses ratios
1.5, 2 and 2.5.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENT = "structured"
CELLS = ("mnist5k/lenet5:2,4,8", "digits/lenet300:1.5,2,2.5")


def parse_cell(text: str) -> tuple[str, str, list[str]]:
    """``data/model:r1,r2`` → (data, model, ratios)."""
    try:
        names, ratios = text.split(":")
        data, model = names.split("/")
    except ValueError:
        raise SystemExit(f"--cells {text!r}: expected data/model:ratio,ratio (e.g. mnist5k/lenet5:2,4,8)") from None
    return data, model, ratios.split(",")


def sweep(root: Path, data: str, model: str, method: str, ratios: list[str], args, extra: list[str]) -> None:
    """One multirun of the real CLI: ``method`` × ``ratios`` × seeds on one cell."""
    cmd = [
        sys.executable,
        "-m",
        "prunelab.train",
        "-m",
        f"data={data}",
        f"model={model}",
        f"pruning={method}",
        f"pruning.compression={','.join(ratios)}",
        f"seed={','.join(map(str, args.seeds))}",
        f"pruning.granularity={args.granularity}",
        f"pruning.scope={args.scope}",
        f"finetune.epochs={args.epochs}",
        "hydra/launcher=local_parallel",
        "num_threads=1",
        f"logger.experiment_name={EXPERIMENT}",
        "logger.log_model=false",
        "+hydra.callbacks.mlflow_setup.report=false",
        *extra,
    ]
    env = {**os.environ, "PRUNELAB_ROOT": str(root), "PRUNELAB_JOBS": str(args.jobs)}
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-4000:]}")


def fmt(values: list[float], digits: int = 2) -> str:
    values = [v for v in values if v == v]  # drop NaN (a metric a run did not record)
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def fmt_median(values: list[float]) -> str:
    """Median (min–max): timings on a shared machine have outliers that a mean ± std would let dominate."""
    values = sorted(v for v in values if v == v)
    if len(values) < 2:
        return fmt(values)
    return f"{statistics.median(values):.2f} ({values[0]:.2f}–{values[-1]:.2f})"


def table(root: Path) -> str:
    """Markdown table per cell: one row per (method, requested ratio), read back from MLflow."""
    import mlflow

    from prunelab.tracking.sweeps.report import load_runs

    uri = f"sqlite:///{root}/outputs/mlflow.db"
    runs = load_runs(uri, EXPERIMENT)
    extra = mlflow.search_runs(experiment_names=[EXPERIMENT], output_format="pandas")
    b64 = dict(zip(extra["run_id"], extra.get("metrics.speedup_cpu_b64", [float("nan")] * len(extra))))
    runs["speedup_cpu_b64"] = runs["run_id"].map(b64)
    failed = runs[runs["status"] != "FINISHED"]
    runs = runs[runs["status"] == "FINISHED"]
    lines = []
    columns = {
        "compression": fmt,
        "test_acc": fmt,
        "macs_reduction": fmt,
        "speedup_cpu_b1": fmt_median,
        "speedup_cpu_b64": fmt_median,
    }
    for (data, model), cell in runs.groupby(["dataset", "model"], sort=False):
        dense_acc = fmt(list(cell.drop_duplicates("seed")["dense_test_acc"]))
        lines += [
            f"\n{data} / {model} — dense test accuracy {dense_acc} % (seeds "
            f"{', '.join(sorted(cell['seed'].unique()))})",
            "| method | requested | achieved | test acc (%) | MACs reduction | CPU speed-up b1, median | "
            "CPU speed-up b64, median |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for (method, ratio), rows in cell.groupby(["method", "compression_target"]):
            cells = [f(list(rows[c])) for c, f in columns.items()]
            lines.append(f"| {method} | {ratio:g}× | " + " | ".join(cells) + " |")
    for _, row in failed.iterrows():
        lines.append(f"FAILED {row['method']} {row['compression_target']}× seed {row['seed']}: {row['failure_reason']}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=["increg", "spp", "admm", "magnitude"])
    parser.add_argument("--cells", nargs="+", default=list(CELLS), help="data/model:ratio,ratio,…")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=6, help="finetune.epochs, the same for every method")
    parser.add_argument("--granularity", default="column")
    parser.add_argument(
        "--scope",
        default="layer",
        choices=["layer", "global"],
        help="how compression becomes per-layer counts, the same for every method",
    )
    parser.add_argument("--jobs", type=int, default=2, help="parallel jobs of each multirun")
    parser.add_argument(
        "--set",
        nargs="+",
        action="append",
        default=[],
        metavar=("METHOD", "OVERRIDE"),
        help="extra Hydra overrides for one method's runs (repeatable)",
    )
    parser.add_argument("--quick", action="store_true", help="seed 0 and the middle ratio of each cell")
    parser.add_argument("--root", help="PRUNELAB_ROOT to use and keep (default: a fresh temporary folder)")
    args = parser.parse_args()
    missing = [m for m in args.methods if not (ROOT / "conf" / "pruning" / f"{m}.yaml").exists()]
    if missing:
        raise SystemExit(f"--methods: no conf/pruning/{missing[0]}.yaml on this checkout")
    overrides = {}
    for method, *extra in args.set:
        overrides.setdefault(method, []).extend(extra)
    cells = [parse_cell(c) for c in args.cells]
    if args.quick:
        args.seeds, cells = [0], [(d, m, [r[len(r) // 2]]) for d, m, r in cells]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.root).resolve() if args.root else Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        for data, model, ratios in cells:
            for method in args.methods:
                sweep(root, data, model, method, ratios, args, overrides.get(method, []))
                print(
                    f"  {data}/{model} {method}: done ({time.perf_counter() - start:.0f} s)",
                    file=sys.stderr,
                    flush=True,
                )
        print(
            f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}; "
            f"granularity {args.granularity}, scope {args.scope}, finetune.epochs={args.epochs}, "
            f"{args.jobs} jobs × 1 thread"
        )
        for method, extra in overrides.items():
            print(f"{method} overrides: {' '.join(extra)}")
        print(table(root))
        print(f"\n({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
