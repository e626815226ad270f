"""Start-up time of the MLflow UI: `mlflow ui` as MLflow starts it (4 workers, job runner) against `make ui`
(prunelab-ui: the store's experiments get their UI tags, then `mlflow server` with 1 worker and no job runner), from
the command to the first answer of /health, on an empty store.

    python bench/ui_start.py --runs 3
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

SETTINGS = {  # name -> command, given the store and the port
    "mlflow ui (default: 4 workers, job runner)": lambda uri, port: [
        "-m",
        "mlflow",
        "ui",
        "--backend-store-uri",
        uri,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ],
    "make ui (1 worker, no job runner)": lambda uri, port: [
        "-m",
        "prunelab.tracking.server.ui",
        "--backend-store-uri",
        uri,
        "--port",
        str(port),
    ],
}


def start_time(name: str, port: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        command = [sys.executable, *SETTINGS[name](f"sqlite:///{tmp}/mlflow.db", port)]
        start = time.perf_counter()
        server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            while True:
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                        return time.perf_counter() - start
                except OSError:
                    if server.poll() is not None:
                        raise RuntimeError(f"{command} exited with {server.returncode}") from None
                    time.sleep(0.1)
        finally:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--port", type=int, default=5077)
    args = parser.parse_args()
    times: dict[str, list[float]] = {name: [] for name in SETTINGS}
    for _ in range(args.runs):  # interleaved, so that a change of load hits both settings alike
        for name in SETTINGS:
            times[name].append(start_time(name, args.port))
            time.sleep(2)  # let the stopped workers go
    print("| command | start-up to /health (s), median | min | max |\n| --- | ---: | ---: | ---: |")
    for name, values in times.items():
        print(f"| {name} | {statistics.median(values):.1f} | {min(values):.1f} | {max(values):.1f} |")


if __name__ == "__main__":
    main()
