"""Wall time of `make sweep` (conf/sweep/default.yaml) in a fresh PRUNELAB_ROOT, with the grid size, the number of
child runs recorded under the sweep's parent run, and the report table.

    python bench/sweep_time.py
"""

from __future__ import annotations

import os
import platform
import subprocess
import tempfile
import time
from pathlib import Path

import mlflow

from prunelab.tracking.sweeps.sweep import KIND_TAG

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    methods = sorted(p.stem for p in (ROOT / "conf" / "pruning").glob("*.yaml") if p.stem != "none")
    grid = len(methods) * 6 * 2  # methods × ratios 2..64 × {mnist5k, digits} × 1 seed
    with tempfile.TemporaryDirectory() as root:
        env = {**os.environ, "PRUNELAB_ROOT": root}
        env.pop("MLFLOW_TRACKING_URI", None)
        start = time.perf_counter()
        proc = subprocess.run(["make", "-s", "sweep"], cwd=ROOT, env=env, capture_output=True, text=True)
        seconds = time.perf_counter() - start
        if proc.returncode != 0:
            raise SystemExit(f"make sweep failed:\n{proc.stderr[-4000:]}")
        mlflow.set_tracking_uri(f"sqlite:///{root}/outputs/mlflow.db")
        runs = mlflow.search_runs(experiment_names=["prunelab"], output_format="list")
        parents = [r for r in runs if r.data.tags.get(KIND_TAG) == "sweep"]
        children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
        table = mlflow.artifacts.load_text(f"runs:/{parents[0].info.run_id}/report/table.md")
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}")
    print(
        f"methods: {', '.join(methods)}; grid {grid} jobs; child runs recorded: {len(children)} "
        f"({sum(c.info.status == 'FINISHED' for c in children)} finished)"
    )
    print(f"`make sweep` wall time: {seconds / 60:.1f} min\n")
    print(table)


if __name__ == "__main__":
    main()
