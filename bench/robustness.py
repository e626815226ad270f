"""Do the defaults hold beyond the cell they were tuned on? Every method × five (data, model) cells × ratios × seeds.

    python bench/robustness.py                           # every method in conf/pruning/, 8/32/64×, seeds 0-2 (long)
    python bench/robustness.py --methods admm magnitude --ratios 64 --seeds 0 1
    python bench/robustness.py --report                  # print the table again from the runs already recorded
    python bench/robustness.py --jobs 2                  # parallel jobs (Hydra's joblib launcher)
    python bench/robustness.py --report --root A B       # one table from several roots (B's runs replace A's)
    python bench/robustness.py --methods admm --root R -- pruning.rho=0.01   # Hydra overrides for every run, after --

Every run is the real CLI with the default budget (``finetune.epochs=auto``), one Hydra multirun per cell, in a
private PRUNELAB_ROOT (default ``outputs/bench_robustness``; the dense baselines are cached there per seed). Prints
test accuracy mean ± std per method and ratio, one column per cell, and flags: ``C`` when the mean is more than 10
points below the dense model, ``k/n`` runs tagged ``collapsed``, ``F`` when a run failed, ``→N×`` when the compacted
model is more than twice as compressed as requested (median over seeds: removing a filter also removes the next
layer's weights that read it, which ``compression`` does not count), ``unreachable`` when the ratio was rejected
before training (the granularity cannot zero that many weights). The last lines check the
issue's bars: no collapse at 8× and 32×, and ADMM within 0.5 points of gradual magnitude (or above) at 64×.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CELLS = ("mnist5k/lenet5", "mnist5k/lenet5_classic", "mnist5k/lenet300", "digits/lenet300", "digits/lenet5_classic")
EXPERIMENT = "robustness"


def methods_available() -> list[str]:
    return sorted(p.stem for p in (ROOT / "conf" / "pruning").glob("*.yaml") if p.stem != "none")


def run_cell(cell: str, args, env: dict[str, str]) -> None:
    data, model = cell.split("/")
    cmd = [
        sys.executable,
        "-m",
        "prunelab.train",
        "-m",
        f"data={data}",
        f"model={model}",
        f"pruning={','.join(args.methods)}",
        f"pruning.compression={','.join(map(str, args.ratios))}",
        f"seed={','.join(map(str, args.seeds))}",
        f"logger.experiment_name={EXPERIMENT}",
        "measure.latency=false",
        "logger.log_model=false",
        "hydra/launcher=local_parallel",
        "num_threads=1",
        *args.overrides,
    ]
    print("$", " ".join(cmd[1:]), flush=True)
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    print(f"  {time.perf_counter() - start:.0f} s, exit {proc.returncode}", flush=True)
    if proc.returncode:
        print(proc.stderr[-2000:], flush=True)


def load(*roots: Path):
    """The recorded runs (:func:`prunelab.tracking.sweeps.report.load_runs`), keyed by cell, method name and ratio;
    where several roots hold a (cell, method, ratio, seed), the last root's runs are kept."""
    import pandas as pd

    from prunelab.tracking.sweeps.report import load_runs

    frames = []
    for order, root in enumerate(roots):
        runs = load_runs(f"sqlite:///{root / 'outputs' / 'mlflow.db'}", EXPERIMENT)
        runs["cell"] = runs["dataset"] + "/" + runs["model"]
        runs["method"] = runs["method"].str.split(" ").str[0]  # "increg (column)" → "increg"
        frames.append(runs.assign(root_order=order))
    runs = pd.concat(frames, ignore_index=True)
    key = ["cell", "method", "compression_target", "seed"]
    newest = runs.groupby(key)["root_order"].transform("max")
    runs = runs[runs["root_order"] == newest].drop(columns="root_order")
    return runs.rename(columns={"compression_target": "ratio", "test_acc": "acc", "dense_test_acc": "dense"})


def table(runs, methods, ratios) -> tuple[list[str], list[str]]:
    """Markdown lines, and the bars the issue sets, checked."""
    cells = [c for c in CELLS if c in set(runs["cell"])]
    lines = [
        "| method | ratio | " + " | ".join(cells) + " |",
        "| --- | ---: | " + " | ".join("---:" for _ in cells) + " |",
    ]
    dense = {c: runs[(runs["cell"] == c) & (runs["status"] == "FINISHED")]["dense"].mean() for c in cells}
    lines.append("| dense | — | " + " | ".join(f"{dense[c]:.2f}" for c in cells) + " |")
    means, bars = {}, []
    for method in methods:
        for ratio in ratios:
            row = []
            for c in cells:
                sel = runs[(runs["cell"] == c) & (runs["method"] == method) & (runs["ratio"] == ratio)]
                done = sel[sel["status"] == "FINISHED"]["acc"].astype(float)
                if sel.empty:
                    row.append("—")
                    continue
                if done.empty:  # every seed failed; rejected before training when the ratio is out of reach
                    reasons = sel["failure_reason"].fillna("").astype(str)
                    row.append("unreachable" if reasons.str.startswith("UnreachableCompressionError").all() else "F")
                    continue
                mean, std = done.mean(), done.std(ddof=1) if len(done) > 1 else 0.0
                means[(method, ratio, c)] = mean
                flags = []
                if mean < dense[c] - 10:
                    flags.append("C")
                    if ratio < 64:
                        bars.append(f"collapse: {method} {ratio:g}× on {c}: {mean:.2f} (dense {dense[c]:.2f})")
                tagged = int(sel["collapsed"].sum())
                if tagged:
                    flags.append(f"{tagged}/{len(sel)}")
                if (sel["status"] != "FINISHED").any():
                    flags.append("F")
                compacted = sel[sel["status"] == "FINISHED"]["compression_compacted"].astype(float).median()
                if compacted > 2 * ratio:  # compaction took the next layers' inputs of pruned channels too
                    flags.append(f"→{compacted:.0f}×")
                row.append(f"{mean:.2f} ± {std:.2f}" + (f" {' '.join(flags)}" if flags else ""))
            lines.append(f"| {method} | {ratio:g}× | " + " | ".join(row) + " |")
    for c in cells:
        admm, mag = means.get(("admm", 64.0, c)), means.get(("magnitude", 64.0, c))
        if admm is not None and mag is not None and admm < mag - 0.5:
            bars.append(f"64× on {c}: admm {admm:.2f} < magnitude {mag:.2f} − 0.5")
    return lines, bars


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=methods_available())
    parser.add_argument("--cells", nargs="+", default=list(CELLS))
    parser.add_argument("--ratios", type=int, nargs="+", default=[8, 32, 64])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument(
        "--root",
        nargs="+",
        default=[str(ROOT / "outputs" / "bench_robustness")],
        help="where the runs go (the first root); --report reads them all, later roots first",
    )
    parser.add_argument("--report", action="store_true", help="only print the table of the runs recorded")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run")
    args = parser.parse_args()
    roots = [Path(r).resolve() for r in args.root]
    root = roots[0]
    if len(roots) > 1 and not args.report:
        raise SystemExit("several --root are for --report only: runs go into one root")
    root.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PRUNELAB_ROOT": str(root), "PRUNELAB_JOBS": str(args.jobs)}
    env.pop("MLFLOW_TRACKING_URI", None)
    start = time.perf_counter()
    if not args.report:
        for cell in args.cells:
            run_cell(cell, args, env)
    runs = load(*roots)
    if runs.empty:
        raise SystemExit("no runs recorded")
    lines, bars = table(runs, args.methods, [float(r) for r in args.ratios])
    print(
        "\ntest accuracy (%), mean ± std over seeds",
        args.seeds,
        "— C: > 10 points below dense; k/n: runs tagged "
        "collapsed; F: a run failed; →N×: compression after compaction, where more than twice the ratio; "
        "unreachable: the ratio was rejected before training",
    )
    print("\n".join(lines))
    print("\nbars:", "all met" if not bars else "")
    for bar in bars:
        print("  MISSED", bar)
    print(f"({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
