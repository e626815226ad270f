"""The MLflow REST API of a locally started server lists prunelab runs under the fixed metric names (docs/mlflow.md)."""

import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from prunelab.tracking.runs.record import FINAL_METRICS
from prunelab.train import train

pytestmark = pytest.mark.slow  # a server start and a fit; the default run records the same names into SQLite


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.load(resp)


def test_rest_api_lists_runs_with_design_metric_names(make_cfg, tmp_path):
    train(make_cfg("pruning.compression=4"))
    db = Path(tmp_path) / "outputs" / "mlflow.db"
    port = _free_port()
    mlflow_bin = Path(sys.executable).with_name("mlflow")
    server = subprocess.Popen(
        [
            str(mlflow_bin),
            "server",
            "--backend-store-uri",
            f"sqlite:///{db}",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}/api/2.0/mlflow"
    try:
        deadline = time.time() + 90
        while True:
            try:
                with urllib.request.urlopen(f"{base}/experiments/get-by-name?experiment_name=prunelab", timeout=5) as r:
                    exp = json.load(r)["experiment"]
                break
            except OSError:
                if time.time() > deadline or server.poll() is not None:
                    raise
                time.sleep(1)
        runs = _post(f"{base}/runs/search", {"experiment_ids": [exp["experiment_id"]]})["runs"]
        assert len(runs) == 1
        metrics = {m["key"] for m in runs[0]["data"]["metrics"]}
        params = {p["key"]: p["value"] for p in runs[0]["data"]["params"]}
        assert set(FINAL_METRICS) <= metrics
        assert params["method"] == "magnitude" and params["compression_target"] == "4"
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:  # a loaded machine can be slow to stop the workers
            server.kill()
            server.wait(timeout=30)
