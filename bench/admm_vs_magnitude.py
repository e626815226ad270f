"""Accuracy vs compression: ADMM vs gradual magnitude pruning on mnist5k + LeNet-5, same epoch budget.

    python bench/admm_vs_magnitude.py                      # 2..128×, 3 seeds, both methods (long: ~40 runs)
    python bench/admm_vs_magnitude.py --quick              # 4× and 32×, seed 0
    python bench/admm_vs_magnitude.py --ratios 16 64 --admm pruning.rho=0.05   # tune ADMM on a few ratios
    python bench/admm_vs_magnitude.py --quantized          # 32×: ADMM unquantized vs 4-bit, storage compression

Every run goes through the project's real entry, ``prunelab.train.train(cfg)``, composed with Hydra's compose API and
recorded in MLflow under a private PRUNELAB_ROOT (default outputs/bench_admm); the dense baseline is cached per seed.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import tempfile
import time
from pathlib import Path

from prunelab.bench_util import compose, private_root

ROOT = Path(__file__).resolve().parents[1]
RATIOS = (2, 4, 8, 16, 32, 64, 128)


def run(overrides: list[str], root: Path) -> tuple[dict[str, float], object]:
    """One real run; returns its metrics and the pruning callback it used."""
    import prunelab.train as entry

    seen = {}
    build = entry.build

    def spy(cfg):  # keep the callback, to ask it for its stored form afterwards
        seen["parts"] = build(cfg)
        return seen["parts"]

    entry.build = spy
    try:
        run_dir = root / "runs" / f"{time.time_ns()}"
        cfg = compose(["data=mnist5k", "model=lenet5", "logger.log_model=false", *overrides], run_dir)
        with contextlib.redirect_stdout(io.StringIO()):  # each run prints a one-screen summary
            metrics = entry.train(cfg)
    finally:
        entry.build = build
    return metrics, seen["parts"].pruning


def fmt(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def accuracy_table(args, root: Path) -> None:
    methods = {"admm": ["pruning=admm", *args.admm], "magnitude": ["pruning=magnitude", *args.magnitude]}
    methods = {k: v for k, v in methods.items() if k in args.methods}
    print(f"mnist5k / lenet5, finetune.epochs={args.epochs}, seeds {args.seeds}; test accuracy (%) mean ± std")
    for name, base in methods.items():
        print(f"{name} overrides:", " ".join(base[1:]) or "(defaults)")
    print("| compression | " + " | ".join(methods) + " | dense |")
    print("| ---: | " + " | ".join("---:" for _ in methods) + " | ---: |", flush=True)
    for ratio in args.ratios:
        cells, dense = [], []
        for name, base in methods.items():
            accs = []
            for seed in args.seeds:
                m, _ = run(
                    [*base, f"pruning.compression={ratio}", f"seed={seed}", f"finetune.epochs={args.epochs}"], root
                )
                accs.append(m["test_acc"])
                if name == args.methods[0]:
                    dense.append(m["dense_test_acc"])
            cells.append(fmt(accs))
        print(f"| {ratio}× | " + " | ".join(cells) + f" | {fmt(dense)} |", flush=True)


def quantized_check(args, root: Path) -> None:
    print(f"mnist5k / lenet5, ADMM at {args.qratio}×, finetune.epochs={args.epochs}")
    print(
        "| seed | unquantized acc | 4-bit acc | Δ (pts) | bytes_stored (4-bit) | storage_compression (4-bit) |"
        " generic bytes_stored (float) |"
    )
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |", flush=True)
    for seed in args.seeds:
        common = [
            "pruning=admm",
            *args.admm,
            f"pruning.compression={args.qratio}",
            f"seed={seed}",
            f"finetune.epochs={args.epochs}",
        ]
        plain, _ = run(common, root)
        quant, callback = run([*common, f"+pruning.quantize.bits={args.bits}"], root)
        with tempfile.TemporaryDirectory() as tmp:
            stored = callback.stored_bytes(Path(tmp) / "model.plq")
        print(
            f"| {seed} | {plain['test_acc']:.2f} | {quant['test_acc']:.2f} | "
            f"{quant['test_acc'] - plain['test_acc']:+.2f} | {stored:,} | {quant['bytes_dense'] / stored:.1f}× | "
            f"{quant['bytes_stored']:,.0f} |",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="4× and 32×, seed 0")
    parser.add_argument("--ratios", type=float, nargs="+", default=list(RATIOS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=6, help="finetune.epochs, the same for both methods")
    parser.add_argument("--methods", nargs="+", default=["admm", "magnitude"], choices=["admm", "magnitude"])
    parser.add_argument("--admm", nargs="*", default=[], help="extra Hydra overrides for the ADMM runs")
    parser.add_argument("--magnitude", nargs="*", default=[], help="extra Hydra overrides for the magnitude runs")
    parser.add_argument("--quantized", action="store_true", help="quantization check instead of the accuracy table")
    parser.add_argument("--qratio", type=float, default=32)
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--root", default=str(ROOT / "outputs" / "bench_admm"), help="private PRUNELAB_ROOT")
    args = parser.parse_args()
    if args.quick:
        args.ratios, args.seeds = [4, 32], [0]
    args.ratios = [int(r) if float(r).is_integer() else r for r in args.ratios]
    root = private_root(args.root)
    start = time.perf_counter()
    quantized_check(args, root) if args.quantized else accuracy_table(args, root)
    print(f"({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
