"""EigenDamage vs structured (filter) magnitude pruning vs C-OBD, same budget, on mnist5k/lenet5 and digits/lenet300.

    python bench/eigendamage.py                        # both cells, their default ratios, seeds 0 1 2 (long)
    python bench/eigendamage.py --quick                # the first ratio of each cell, seed 0
    python bench/eigendamage.py --cells mnist5k/lenet5_classic mnist5k/lenet5 --ratios 4 8 --methods eigendamage \
        --seeds 0 1                                    # EigenDamage's defaults on another cell
    python bench/eigendamage.py --cells digits/lenet300 --ratios 2 4 --methods eigendamage \\
        --eigendamage pruning.prune_ratio_limit=0.99   # tune one method on one cell

Every run goes through the project's entry, ``prunelab.train.train(cfg)``, under a private PRUNELAB_ROOT (default
outputs/bench_eigendamage); the dense baseline is cached per seed and shared by the methods. ``compression`` is what
each method was asked for (EigenDamage: dense / remaining weights of the replaced layers; the filter methods: dense /
nonzero weights); the table shows what was measured on the model each one ends with (compacted for the filter
methods, rebuilt for EigenDamage): parameters, MACs and CPU latency against the dense model, timed interleaved in one
process (median of 5 blocks; speed-up = dense / pruned).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import time
from pathlib import Path

from prunelab.bench_util import compose, private_root

ROOT = Path(__file__).resolve().parents[1]
CELLS = {"mnist5k/lenet5": (8, 16), "digits/lenet300": (4, 8), "mnist5k/lenet5_classic": (8,)}
DEFAULT_CELLS = ["mnist5k/lenet5", "digits/lenet300"]
METHODS = {
    "eigendamage": ["pruning=eigendamage"],
    "magnitude-filter": ["pruning=magnitude", "pruning.granularity=filter", "pruning.mode=one_shot"],
    "c-obd": ["pruning=obd", "pruning.criterion=diagonal", "pruning.rounds=1"],  # one pass, as the other two
}
COLUMNS = ("test_acc", "param_compression", "macs_reduction", "speedup_cpu_b1", "speedup_cpu_b64")


def run(overrides: list[str], root: Path) -> dict[str, float]:
    import prunelab.train as entry

    cfg = compose(["logger.log_model=false", *overrides], root / "runs" / f"{time.time_ns()}")
    with contextlib.redirect_stdout(io.StringIO()):  # each run prints a one-screen summary
        metrics = entry.train(cfg)
    metrics["param_compression"] = metrics["dense_params"] / metrics["params"]
    return metrics


def fmt(values: list[float | None]) -> str:
    if any(v is None for v in values):
        return "n/a"  # e.g. latency with measure.latency=false
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def table(args, root: Path) -> None:
    methods = {m: [*METHODS[m], *getattr(args, m.replace("-", "_"))] for m in args.methods}
    for name, overrides in methods.items():
        print(f"{name}: {' '.join(overrides)}")
    for cell in args.cells:
        data, model = cell.split("/")
        ratios = args.ratios or CELLS[cell]
        print(f"\n{cell}, finetune.epochs={args.epochs}, seeds {args.seeds}; mean ± std over seeds")
        print("| compression | method | test acc (%) | params ÷ | MACs ÷ | CPU speed-up b1 | CPU speed-up b64 |")
        print("| ---: | --- | ---: | ---: | ---: | ---: | ---: |", flush=True)
        dense = []
        for ratio in ratios:
            for name, overrides in methods.items():
                rows = []
                for seed in args.seeds:
                    m = run(
                        [
                            f"data={data}",
                            f"model={model}",
                            *overrides,
                            f"pruning.compression={ratio}",
                            f"seed={seed}",
                            f"finetune.epochs={args.epochs}",
                        ],
                        root,
                    )
                    rows.append(m)
                    dense.append(m["dense_test_acc"])
                cells = [fmt([r.get(c) for r in rows]) for c in COLUMNS]
                print(f"| {ratio}× | {name} | " + " | ".join(cells) + " |", flush=True)
        print(f"dense test accuracy {fmt(sorted(set(dense)))} (per seed, shared by every method)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the first ratio of each cell, seed 0")
    parser.add_argument("--cells", nargs="+", default=DEFAULT_CELLS, choices=list(CELLS))
    parser.add_argument("--ratios", type=float, nargs="+", default=None, help="instead of each cell's defaults")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=6, help="finetune.epochs, the same for every method")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    for name in METHODS:
        parser.add_argument(
            f"--{name}", dest=name.replace("-", "_"), nargs="*", default=[], help=f"extra Hydra overrides for {name}"
        )
    parser.add_argument("--root", default=str(ROOT / "outputs" / "bench_eigendamage"), help="private PRUNELAB_ROOT")
    args = parser.parse_args()
    if args.quick:
        args.seeds = [0]
        CELLS.update({cell: ratios[:1] for cell, ratios in CELLS.items()})
    if args.ratios:
        args.ratios = [int(r) if float(r).is_integer() else r for r in args.ratios]
    root = private_root(args.root)
    start = time.perf_counter()
    table(args, root)
    print(f"({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
