"""The README's screenshots of the MLflow UI: run a small real sweep, serve it as `make ui` does, and photograph the
run list, Compare's charts and the sweep report in headless Chromium.

    python bench/screenshots.py                 # sweep into outputs/screenshots (fresh), images into docs/img/
    python bench/screenshots.py --reuse         # photograph the last sweep of that store again

The sweep: gradual magnitude and ADMM × 2, 4, 8, 16, 32× × seeds 0, 1 on digits / LeNet-300-100 (short budget:
10 dense and 4 fine-tuning epochs), CPU latency measured. Needs Debian's chromium and the playwright package.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import mlflow

from prunelab.tracking.server import ui_pages
from prunelab.tracking.sweeps.report import find_sweep

ROOT = Path(__file__).resolve().parents[1]
SWEEP = [
    "data=digits",
    "model=lenet300",
    "dense.epochs=10",
    "finetune.epochs=4",
    "pruning=magnitude,admm",
    "pruning.compression=2,4,8,16,32",
    "seed=0,1",
]


def run_sweep(root: Path) -> None:
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    command = [sys.executable, "-m", "prunelab.train", "-m", *SWEEP]
    print("$", " ".join(command), flush=True)
    start = time.perf_counter()
    subprocess.run(
        command, cwd=ROOT, env={**os.environ, "PRUNELAB_ROOT": str(root)}, check=True, stdout=subprocess.DEVNULL
    )
    print(f"sweep: {time.perf_counter() - start:.0f} s", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=str(ROOT / "outputs" / "screenshots"), help="PRUNELAB_ROOT of the sweep")
    parser.add_argument("--out", default=str(ROOT / "docs" / "img"), help="folder for the PNG files")
    parser.add_argument("--reuse", action="store_true", help="photograph the store's last sweep, run none")
    args = parser.parse_args()
    if ui_pages.missing():
        raise SystemExit(ui_pages.missing())
    root, out = Path(args.root), Path(args.out)
    if not args.reuse:
        run_sweep(root)
    uri = f"sqlite:///{root / 'outputs' / 'mlflow.db'}"
    sweep_id, parent = find_sweep(uri, "prunelab", None)
    experiment = mlflow.MlflowClient(uri).get_run(parent).info.experiment_id
    out.mkdir(parents=True, exist_ok=True)
    with ui_pages.serve(uri) as base, ui_pages.chromium(width=1440, height=860) as page:
        ui_pages.open_run_list(page, base, experiment)
        page.screenshot(path=str(out / "mlflow_runs.png"))
        ui_pages.open_run_list(page, base, experiment, charts=True)
        page.wait_for_timeout(2000)  # charts draw after the runs load
        page.screenshot(path=str(out / "mlflow_compare.png"))
        ui_pages.open_report(page, base, experiment, parent)
        page.wait_for_timeout(1000)
        page.screenshot(path=str(out / "mlflow_report.png"))
    shutil.copyfile(
        Path(mlflow.artifacts.download_artifacts(f"runs:/{parent}/report/accuracy.png", tracking_uri=uri)),
        out / "report_accuracy.png",
    )
    print(f"sweep {sweep_id}: {', '.join(sorted(p.name for p in out.glob('*.png')))} in {out}")


if __name__ == "__main__":
    main()
