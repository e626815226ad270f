"""The team stack of docker/ without Docker: PostgreSQL + ``mlflow server`` on loopback, a parallel sweep against it,
and parallel first use of a fresh PostgreSQL database. Skipped where PostgreSQL is not installed."""

import os
import subprocess
import sys

import mlflow
import pytest

from prunelab.tracking.runs.record import FINAL_METRICS
from prunelab.tracking.server.teamserver import postgres, postgres_bin, team_server
from prunelab.tracking.sweeps.sweep import KIND_TAG
from test_store import start_together

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(postgres_bin() is None, reason="PostgreSQL not installed (apt-get install postgresql)"),
]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with team_server(tmp_path_factory.mktemp("artifacts")) as (url, _):
        yield url


def test_parallel_sweep_on_the_postgresql_server_loses_nothing(server, tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "prunelab.train",
            "-m",
            "data=digits",
            "model=lenet300",
            "dense.epochs=1",
            "finetune.epochs=2",
            "measure.latency=false",
            "pruning.compression=2,4,8",
            "hydra/launcher=local_parallel",
            "num_threads=1",
            f"paths.root_dir={tmp_path}",
        ],
        capture_output=True,
        text=True,
        timeout=1200,
        env={**os.environ, "MLFLOW_TRACKING_URI": server},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not (tmp_path / "outputs" / "mlflow.db").exists()  # everything went to the server
    client = mlflow.MlflowClient(tracking_uri=server)
    assert [e.name for e in client.search_experiments()] == ["prunelab", "Default"]
    runs = client.search_runs([client.get_experiment_by_name("prunelab").experiment_id])
    children = [r for r in runs if r.data.tags.get(KIND_TAG) != "sweep"]
    (parent,) = [r for r in runs if r.data.tags.get(KIND_TAG) == "sweep"]
    assert sorted(c.data.params["compression_target"] for c in children) == ["2", "4", "8"]
    assert all(c.info.status == "FINISHED" for c in children) and parent.info.status == "FINISHED"
    for child in children:
        assert set(FINAL_METRICS) <= set(child.data.metrics)
        assert len(client.get_metric_history(child.info.run_id, "val/acc")) == 2
        # artifacts went through the server (mlflow-artifacts:/), not to this machine's outputs/
        assert child.info.artifact_uri.startswith("mlflow-artifacts:/")
        assert {"config.yaml", "weights"} <= {a.path for a in client.list_artifacts(child.info.run_id)}


def test_parallel_first_use_of_a_fresh_postgresql_database(tmp_path):
    with postgres("fresh") as db:
        results = start_together(db, tmp_path, 6)
        assert [r.returncode for r in results] == [0] * 6, [r.stderr[-2000:] for r in results if r.returncode]
        assert len({r.stdout.strip() for r in results}) == 1
        names = sorted(e.name for e in mlflow.MlflowClient(tracking_uri=db).search_experiments())
        assert names == ["Default", "prunelab"]
