"""Structured pruning in FLOPs: every structured method × its structured granularities × ``pruning.target=macs`` at 2×
and 4× × the five cells of ``bench/robustness.py`` × seeds, with the MACs reduction reached, test accuracy and CPU
speed-up; Torch-Pruning's uniform channel pruning (``bench/tp_uniform.py``) beside them.

    python bench/structured_macs.py                                     # everything: 9 variants × 5 cells × 2 × 3
    python bench/structured_macs.py --cells mnist5k/lenet5_classic --methods magnitude:filter obd:kron --seeds 0
    python bench/structured_macs.py --methods tp --cells mnist5k/lenet5_classic     # the Torch-Pruning baseline
    python bench/structured_macs.py --methods magnitude:filter@lamp     # another allocation (pruning.scope=lamp)
    python bench/structured_macs.py --report                            # the table of the runs recorded
    python bench/structured_macs.py --root R -- pruning.rounds=3        # Hydra overrides for every run, after --

A variant is ``method:granularity`` (``obd:diagonal``/``obd:kron`` name the criterion, ``eigendamage`` its
eigenbasis, ``tp`` the Torch-Pruning baseline), optionally ``@scope`` and ``+key=value`` for more of its
``pruning.`` keys (``magnitude:filter+mode=one_shot``). Every run is the real CLI at the default
budget (``finetune.epochs=auto``), one Hydra multirun per (cell, variant) over ratios × seeds, into a private
PRUNELAB_ROOT (default ``outputs/bench_structured_macs``; dense baselines cached there per seed, so every variant of a
cell starts from the same dense model); latency is measured (CPU, batch 1 and 64, dense and pruned interleaved in one
process), ONNX is not. The table gives per cell and variant: MACs reduction reached (mean), test accuracy mean ± std,
its drop from dense, the CPU speed-up at batch 1 (median over seeds) and flags: ``C k/n`` runs below the collapse
limit against their dense model (``prunelab.collapse.dense_limit``: less than 75 % of the dense accuracy above
chance), ``off`` a run more than 2 % from the requested MACs ratio, ``F`` a failed run, ``unreachable`` a ratio
rejected before training. The bars of issue 24 are checked at the end: every cell within 2 points of dense, every
ratio within 2 %, and on ``lenet5_classic`` the best method at least Torch-Pruning's accuracy.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = Path(__file__).resolve().parent
CELLS = ("mnist5k/lenet5", "mnist5k/lenet5_classic", "mnist5k/lenet300", "digits/lenet300", "digits/lenet5_classic")
VARIANTS = (
    "magnitude:filter",
    "magnitude:channel",
    "admm:filter",
    "admm:channel",
    "increg:filter",
    "spp:filter",
    "obd:diagonal",
    "obd:kron",
    "eigendamage",
)
EXPERIMENT = "structured_macs"


def overrides_of(variant: str) -> list[str]:
    """Hydra overrides of a variant (see the module docstring)."""
    variant, *extra = variant.split("+")
    extra = [f"pruning.{e}" for e in extra]
    name, _, scope = variant.partition("@")
    method, _, kind = name.partition(":")
    if method == "tp":
        return ["pruning=tp_uniform", f"hydra.searchpath=[file://{BENCH / 'conf'}]"]
    out = [f"pruning={method}"]
    if method == "obd":
        out.append(f"pruning.criterion={kind or 'diagonal'}")
    elif kind:
        out.append(f"pruning.granularity={kind}")
    if scope:
        out.append(f"pruning.scope={scope}")
    return [*out, "pruning.target=macs", *extra]


def run(cell: str, variant: str, args, env: dict[str, str]) -> None:
    data, model = cell.split("/")
    cmd = [
        sys.executable,
        "-m",
        "prunelab.train",
        "-m",
        f"data={data}",
        f"model={model}",
        *overrides_of(variant),
        f"pruning.compression={','.join(map(str, args.ratios))}",
        f"seed={','.join(map(str, args.seeds))}",
        f"logger.experiment_name={EXPERIMENT}",
        f"logger.run_name='{variant}'",
        "logger.log_model=false",
        "measure.onnx=false",
        "hydra/launcher=local_parallel",
        "num_threads=1",
        "+hydra.callbacks.mlflow_setup.report=false",
        *args.overrides,
    ]
    print("$", " ".join(cmd[2:]), flush=True)
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    print(f"  {time.perf_counter() - start:.0f} s, exit {proc.returncode}", flush=True)
    if proc.returncode:
        print(proc.stderr[-2000:], flush=True)


def load(root: Path):
    """Every recorded run, one row each: variant (the run name), cell, ratio, seed, status, metrics, tags."""
    import mlflow
    import pandas as pd

    mlflow.set_tracking_uri(f"sqlite:///{root / 'outputs' / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=[EXPERIMENT], output_format="pandas")
    if runs.empty:
        return pd.DataFrame()
    runs = runs[runs.get("tags.prunelab.kind", pd.Series(index=runs.index, dtype=object)).ne("sweep")]
    col = lambda name: runs.get(name, pd.Series(index=runs.index, dtype=object))  # noqa: E731
    out = pd.DataFrame(
        {
            "variant": col("tags.mlflow.runName"),
            "cell": col("params.dataset") + "/" + col("params.model"),
            "ratio": pd.to_numeric(col("params.compression_target"), errors="coerce"),
            "seed": col("params.seed"),
            "status": runs["status"],
            "acc": col("metrics.test_acc"),
            "dense": col("metrics.dense_test_acc"),
            "macs": col("metrics.macs_reduction"),
            "speedup": col("metrics.speedup_cpu_b1"),
            "speedup64": col("metrics.speedup_cpu_b64"),
            "note": col("tags.target_note"),
            "failure": col("tags.failure_reason"),
            "start": runs["start_time"],
        }
    )
    # a (variant, cell, ratio, seed) run again: its latest run counts
    return out.sort_values("start").drop_duplicates(["variant", "cell", "ratio", "seed"], keep="last")


def _mean_std(values) -> str:
    values = [float(v) for v in values if v == v]
    if not values:
        return "—"
    return f"{statistics.mean(values):.2f}" + (f" ± {statistics.stdev(values):.2f}" if len(values) > 1 else "")


def table(runs, variants: list[str], cells: list[str], ratios: list[float]) -> tuple[list[str], list[str]]:
    """Markdown lines (one table per cell) and the bars missed."""
    from prunelab.collapse import dense_limit

    lines, missed, best = [], [], {}
    for cell in cells:
        here = runs[runs["cell"] == cell]
        if here.empty:
            continue
        dense = here[here["status"] == "FINISHED"].drop_duplicates("seed")["dense"].astype(float)
        lines += [
            "",
            f"**{cell}** — dense {_mean_std(dense)} % (seeds {', '.join(sorted(here['seed'].unique()))})",
            "",
            "| variant | ratio | MACs reduction | test acc (%) | drop (pts) | CPU speed-up b1 | b64 | flags |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
        ]
        for variant in variants:
            for ratio in ratios:
                sel = here[(here["variant"] == variant) & (here["ratio"] == ratio)]
                if sel.empty:
                    continue
                done = sel[sel["status"] == "FINISHED"]
                if done.empty and sel["status"].eq("RUNNING").any():
                    lines.append(f"| {variant} | {ratio:g}× | — | — | — | — | — | running |")
                    continue
                if done.empty:
                    why = sel["failure"].fillna("").astype(str)
                    rejected = why.str.startswith("UnreachableCompressionError").all()
                    lines.append(
                        f"| {variant} | {ratio:g}× | — | — | — | — | — | {'unreachable' if rejected else 'F'} |"
                    )
                    continue
                acc, ref = done["acc"].astype(float), done["dense"].astype(float)
                drop = (ref - acc).mean()
                collapsed = sum(a < dense_limit(d, 10) for a, d in zip(acc, ref))
                off = sum(abs(m - ratio) / ratio > 0.02 for m in done["macs"].astype(float))
                flags = [f"C {collapsed}/{len(done)}"] * bool(collapsed) + [f"off {off}/{len(done)}"] * bool(off)
                flags += ["F"] * bool(sel["status"].isin(["FAILED", "KILLED"]).any())
                flags += ["running"] * bool(sel["status"].eq("RUNNING").any())
                speed = sorted(done["speedup"].astype(float).dropna())
                speed64 = sorted(done["speedup64"].astype(float).dropna())
                median = lambda v: f"{statistics.median(v):.2f}" if v else "—"  # noqa: E731
                lines.append(
                    f"| {variant} | {ratio:g}× | {done['macs'].astype(float).mean():.2f}× | {_mean_std(acc)} "
                    f"| {drop:+.2f} | {median(speed)} | {median(speed64)} | {' '.join(flags)} |"
                )
                if variant != "tp":
                    best[(cell, ratio)] = max(best.get((cell, ratio), -1.0), acc.mean())
                if drop > 2:
                    missed.append(f"{cell} {variant} {ratio:g}×: {drop:.2f} points below dense")
                if off:
                    missed.append(f"{cell} {variant} {ratio:g}×: {off} run(s) off the ratio by more than 2 %")
    tp = runs[(runs["variant"] == "tp") & (runs["status"] == "FINISHED")]
    for (cell, ratio), group in tp.groupby(["cell", "ratio"]):
        if (cell, ratio) in best and best[(cell, ratio)] < group["acc"].astype(float).mean():
            missed.append(
                f"{cell} {ratio:g}×: best method {best[(cell, ratio)]:.2f} < Torch-Pruning "
                f"{group['acc'].astype(float).mean():.2f}"
            )
    return lines, missed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=list(VARIANTS), metavar="VARIANT")
    parser.add_argument("--cells", nargs="+", default=list(CELLS))
    parser.add_argument("--ratios", type=float, nargs="+", default=[2.0, 4.0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--root", default=str(ROOT / "outputs" / "bench_structured_macs"))
    parser.add_argument("--report", action="store_true", help="only print the table of the runs recorded")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run")
    args = parser.parse_args()
    args.ratios = [int(r) if float(r).is_integer() else r for r in args.ratios]
    root = Path(args.root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "PRUNELAB_ROOT": str(root),
        "PRUNELAB_JOBS": str(args.jobs),
        "PYTHONPATH": os.pathsep.join([str(BENCH), str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
    }
    env.pop("MLFLOW_TRACKING_URI", None)
    start = time.perf_counter()
    if not args.report:
        for cell in args.cells:
            for variant in args.methods:
                run(cell, variant, args, env)
    runs = load(root)
    runs = runs[runs["seed"].isin([str(s) for s in args.seeds])]  # the seeds asked for, in a run or a report
    if runs.empty:
        raise SystemExit("no runs recorded")
    variants = list(dict.fromkeys([*args.methods, *sorted(runs["variant"].dropna().unique())]))
    lines, missed = table(runs, variants, [c for c in CELLS if c in args.cells], [float(r) for r in args.ratios])
    print(
        f"\npruning.target=macs; seeds {args.seeds}; CPU speed-up = dense / pruned latency, median over seeds "
        "(2 jobs on a shared machine: noisy)"
    )
    print("\n".join(lines))
    print("\nbars:", "all met" if not missed else "")
    for bar in missed:
        print("  MISSED", bar)
    print(f"({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
