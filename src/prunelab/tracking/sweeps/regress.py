"""Regression gate: a fixed grid's mean ``test_acc`` per cell against a committed baseline.

A cell (dataset/model/method/ratio) regresses when its mean over seeds falls below the baseline mean by more than
``max(2 × baseline std, floor)``; the floor comes from measured seed noise (``regress/NOISE.md``). Cells missing from
the baseline are reported as ``new``; baseline cells absent or failed now are ``missing`` and fail the gate.

    prunelab-regress                      # run the grids (conf/sweep/regress*.yaml), compare, exit 1 on regression
    prunelab-regress --sweep-id ID [ID]   # compare already finished sweeps instead
    prunelab-regress --update             # run the grids and rewrite the baseline on purpose (prints the diff)
    prunelab-regress --update --grid regress_macs   # run one grid and replace only its cells in the baseline
    prunelab-regress --grid regress -- data=digits ...   # one grid, extra Hydra overrides for its runs

The grids: ``regress`` (every method at its defaults, a product of models × methods × ratios × seeds) and
``regress_macs`` (one structured FLOPs cell per method that removes structure). Baseline cells carry the grid they
come from (``grid``; ``regress`` when absent); a run of some grids compares only their cells, and ``--update`` with
``--grid`` replaces only those cells, keeping the others and the band's floor as they are.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd

from prunelab.tracking.server.store import tracking_uri
from prunelab.tracking.sweeps.report import load_runs
from prunelab.tracking.sweeps.sweep import KIND_TAG

ROOT = Path(__file__).resolve().parents[4]
BASELINE = ROOT / "regress" / "baseline.json"
EXPERIMENT = "prunelab-regress"
DEFAULT_FLOOR = 1.0
GRIDS = ("regress", "regress_macs")  # conf/sweep/<grid>.yaml


def run_grid(overrides: list[str], experiment: str, grid: str = "regress") -> str:
    """Run one of the gate's sweeps in a subprocess (the real CLI) and return its sweep id."""
    started = int(time.time() * 1000)
    cmd = [sys.executable, "-m", "prunelab.train", f"sweep={grid}", f"logger.experiment_name={experiment}", *overrides]
    print("$", " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, cwd=ROOT, text=True, capture_output=True)
    if proc.returncode != 0:
        raise SystemExit(f"the regression grid did not run:\n{proc.stderr[-4000:]}")
    parents = mlflow.search_runs(
        experiment_names=[experiment],
        output_format="list",
        order_by=["start_time DESC"],
        filter_string=f"tags.`{KIND_TAG}` = 'sweep' and attributes.start_time >= {started}",
    )
    if not parents:
        raise SystemExit("the regression grid ran but recorded no sweep")
    return parents[0].data.tags["sweep_id"]


def cells(runs: pd.DataFrame, grid: str = "regress") -> dict[str, dict]:
    """Per cell: mean, std (ddof 1) and count of finished runs' test_acc, plus the per-seed values (and the grid,
    for any grid but ``regress``)."""
    out: dict[str, dict] = {}
    for key, group in runs.groupby(["dataset", "model", "method", "compression_target"], dropna=False):
        name = f"{key[0]}/{key[1]}/{key[2]}/{key[3]:g}"
        done = group[group["status"] == "FINISHED"].sort_values("seed")
        acc = done["test_acc"].to_numpy(float)
        out[name] = {
            "mean": float(acc.mean()) if len(acc) else None,
            "std": float(acc.std(ddof=1)) if len(acc) > 1 else 0.0,
            "n": int(len(acc)),
            "failed": int(len(group) - len(acc)),
            "seeds": {str(s): float(a) for s, a in zip(done["seed"], acc)},
            **({"grid": grid} if grid != "regress" else {}),
        }
    return out


def compare(baseline: dict, now: dict[str, dict]) -> pd.DataFrame:
    """One row per cell of either side: baseline, now, band and verdict."""
    floor = float(baseline.get("floor", DEFAULT_FLOOR))
    rows = []
    for name in sorted(set(baseline["cells"]) | set(now)):
        base, cur = baseline["cells"].get(name), now.get(name)
        band = max(2 * base["std"], floor) if base else np.nan
        if base is None:
            verdict = "new"
        elif cur is None or cur["mean"] is None:
            verdict = "missing"
        elif cur["mean"] < base["mean"] - band:
            verdict = "REGRESSED"
        else:
            verdict = "ok"
        rows.append(
            {
                "cell": name,
                "baseline": base["mean"] if base else np.nan,
                "baseline_std": base["std"] if base else np.nan,
                "now": cur["mean"] if cur and cur["mean"] is not None else np.nan,
                "now_std": cur["std"] if cur else np.nan,
                "band": band,
                "verdict": verdict,
            }
        )
    return pd.DataFrame(rows)


def format_table(table: pd.DataFrame) -> str:
    def f(x, s=None):
        return "—" if not np.isfinite(x) else (f"{x:.2f} ± {s:.2f}" if s is not None and np.isfinite(s) else f"{x:.2f}")

    lines = ["| cell | baseline | now | band | verdict |", "| --- | ---: | ---: | ---: | --- |"]
    for r in table.itertuples():
        lines.append(
            f"| {r.cell} | {f(r.baseline, r.baseline_std)} | {f(r.now, r.now_std)} | {f(r.band)} | {r.verdict} |"
        )
    return "\n".join(lines)


def noise_floor(stds: list[float]) -> float:
    """The band's floor: twice the median seed std of the grid's cells, rounded up to 0.1, at least 0.5. The median,
    not the largest: one cell whose seeds disagree wildly (a method near its limit) widens its own band (2 × its
    std), not every other cell's."""
    return max(0.5, float(np.ceil(2 * np.median(stds) * 10) / 10)) if stds else 0.5


def noise_report(now: dict[str, dict], floor: float, kept: bool = False) -> str:
    """Markdown written next to the baseline: the seed noise that sets the floor (``kept``: the floor of the last
    full update, kept when ``--grid`` updated some cells only)."""
    stds = [c["std"] for c in now.values() if c["n"] > 1]
    lines = [
        "# Seed noise of the regression grid",
        "",
        "Written by `prunelab-regress --update` from the runs that produced `baseline.json`.",
        "",
        "| cell | per-seed test_acc (%) | mean | std |",
        "| --- | --- | ---: | ---: |",
    ]
    for name, c in sorted(now.items()):
        seeds = ", ".join(f"{v:.2f}" for v in c["seeds"].values())
        mean = f"{c['mean']:.2f}" if c["mean"] is not None else "—"
        lines.append(f"| {name} | {seeds} | {mean} | {c['std']:.2f} |")
    if stds:
        lines += [
            "",
            f"Seed std across cells: median {np.median(stds):.2f}, max {np.max(stds):.2f} points.",
            f"Floor of the band: {floor:.2f} points (the band is max(2 × cell std, floor)). A cell whose seeds "
            "happen to agree closely would otherwise get a band narrower than the noise seen elsewhere in the "
            "grid; the floor is twice the median seed std measured here, rounded up to 0.1, and at least 0.5 "
            "(one cell whose seeds disagree wildly widens its own band, not the others').",
        ]
    if kept:
        lines += [
            "",
            "The floor is the one of the last full update (`prunelab-regress --update`): an update of some "
            "grids only (`--grid`) adds or replaces their cells and leaves every other cell's band as it was.",
        ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="prunelab-regress",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    parser.add_argument(
        "--sweep-id",
        nargs="+",
        help="compare these finished sweeps (one per grid, in --grid order) instead of running the grids",
    )
    parser.add_argument(
        "--grid", nargs="+", choices=GRIDS, default=list(GRIDS), help="the grids to run and compare (default: all)"
    )
    parser.add_argument("--update", action="store_true", help="rewrite the baseline from this grid and show the diff")
    parser.add_argument("--baseline", type=Path, default=BASELINE, help=f"baseline file (default: {BASELINE})")
    parser.add_argument("--experiment", default=EXPERIMENT, help=f"MLflow experiment (default: {EXPERIMENT})")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for the grid's runs (after --)")
    args = parser.parse_args(argv)

    mlflow.set_tracking_uri(tracking_uri(None, Path(os.environ.get("PRUNELAB_ROOT", ROOT)) / "outputs"))
    if args.sweep_id and len(args.sweep_id) != len(args.grid):
        raise SystemExit(f"--sweep-id: one sweep per grid ({', '.join(args.grid)})")
    sweeps = dict(zip(args.grid, args.sweep_id or [run_grid(args.overrides, args.experiment, g) for g in args.grid]))
    now = {}
    for grid, sweep_id in sweeps.items():
        found = cells(load_runs(mlflow.get_tracking_uri(), args.experiment, sweep_id), grid)
        if not found:
            raise SystemExit(f"no runs for sweep_id={sweep_id!r} in experiment {args.experiment!r}")
        now.update(found)
    old = json.loads(args.baseline.read_text()) if args.baseline.exists() else {"cells": {}}
    partial = set(args.grid) != set(GRIDS)
    if partial:  # the other grids' cells are not compared, nor rewritten
        mine = {n: c for n, c in old["cells"].items() if c.get("grid", "regress") in args.grid}
        table = compare({**old, "cells": mine}, now)
    else:
        table = compare(old, now)
    print(f"sweeps {sweeps}\n\n{format_table(table)}\n")
    if args.update:
        merged = {**(old["cells"] if partial else {}), **now}
        floor = (
            float(old.get("floor", DEFAULT_FLOOR))
            if partial and old["cells"]
            else noise_floor([c["std"] for c in now.values() if c["n"] > 1])
        )
        args.baseline.parent.mkdir(parents=True, exist_ok=True)
        ids = {**(old.get("sweep_ids") or {"regress": old.get("sweep_id")} if partial else {}), **sweeps}
        args.baseline.write_text(
            json.dumps(
                {"floor": floor, "sweep_ids": ids, "overrides": args.overrides, "cells": merged},
                indent=2,
                sort_keys=True,
            )
            + "\n"
        )
        (args.baseline.parent / "NOISE.md").write_text(noise_report(merged, floor, kept=partial and bool(old["cells"])))
        print(
            f"baseline {'updated' if partial else 'rewritten'}: {args.baseline} (floor {floor:.2f}); the table "
            "above is the diff old → new" + (f" for the cells of {', '.join(args.grid)}" if partial else "")
        )
        return
    bad = table[table["verdict"].isin(["REGRESSED", "missing"])]
    if len(bad):
        print(f"FAIL: {len(bad)} cell(s) regressed or missing: {', '.join(bad['cell'])}")
        raise SystemExit(1)
    print(
        f"PASS: {int((table['verdict'] == 'ok').sum())} cell(s) within their band, "
        f"{int((table['verdict'] == 'new').sum())} new"
    )


if __name__ == "__main__":
    main()
