"""Wall time of `make train` on the embedded default: once training the dense baseline, once reusing it.

    python bench/train_time.py            # prints a markdown table
    python bench/train_time.py --runs 3   # repeat the cached run to see the spread

Each measurement runs the real `make train` in a fresh PRUNELAB_ROOT (a temporary folder), so nothing cached
from earlier work is reused by the first run.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def timed_make_train(root: str) -> float:
    env = {**os.environ, "PRUNELAB_ROOT": root}
    env.pop("MLFLOW_TRACKING_URI", None)
    start = time.perf_counter()
    proc = subprocess.run(["make", "-s", "train"], cwd=ROOT, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"make train failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=1, help="cached runs to time (median reported)")
    args = parser.parse_args()
    subprocess.run(["make", "-s", "venv"], cwd=ROOT, check=True)
    with tempfile.TemporaryDirectory() as root:
        fresh = timed_make_train(root)
        cached = [timed_make_train(root) for _ in range(args.runs)]
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}")
    print("| `make train` (mnist5k, lenet5, gradual magnitude 8×) | wall time (s) | limit (s) |")
    print("| --- | ---: | ---: |")
    print(f"| dense baseline trained | {fresh:.1f} | 90 |")
    spread = f" (min {min(cached):.1f}, max {max(cached):.1f})" if len(cached) > 1 else ""
    print(f"| dense baseline cached | {statistics.median(cached):.1f}{spread} | 45 |")


if __name__ == "__main__":
    main()
