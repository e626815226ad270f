"""The tracking store under faults: parallel first use, a half-migrated store and its repair, a dead server."""

import os
import sqlite3
import subprocess
import sys

import mlflow
import pytest
from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore
from mlflow.tracking._tracking_service.registry import TrackingStoreRegistry

from prunelab.tracking.runs.cli import main as runs_cli
from prunelab.tracking.server.store import (
    StoreBrokenError,
    TrackingUnavailableError,
    ensure_experiment,
    schema_problems,
    tracking_uri,
)
from prunelab.tracking.server.teamserver import free_port

# every process imports MLflow, says so, then waits for the same moment to touch the store
_FIRST_USE = """
import sys, time
from pathlib import Path
from prunelab.tracking.server.store import ensure_experiment
print("ready", flush=True)
while not Path(sys.argv[2]).exists():
    time.sleep(0.005)
print(ensure_experiment(sys.argv[1], "prunelab"))
"""


def start_together(uri: str, tmp_path, n: int) -> list[subprocess.CompletedProcess]:
    """``n`` processes whose first use of ``uri`` starts at the same moment."""
    go = tmp_path / "go"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _FIRST_USE, uri, str(go)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(n)
    ]
    for p in procs:
        assert p.stdout.readline().strip() == "ready"
    go.touch()
    return [subprocess.CompletedProcess(p.args, p.wait(timeout=300), p.stdout.read(), p.stderr.read()) for p in procs]


def _client(uri: str) -> mlflow.MlflowClient:
    """A client on the file as it is now (MLflow keeps one store, and its open connections, per URI)."""
    TrackingStoreRegistry._get_store_with_resolved_uri.cache_clear()
    engine = SqlAlchemyStore._engine_map.pop(uri, None)
    if engine is not None:
        engine.dispose()
    return mlflow.MlflowClient(tracking_uri=uri)


@pytest.mark.slow
def test_parallel_first_use_of_a_fresh_sqlite_store(tmp_path):
    uri = f"sqlite:///{tmp_path / 'fresh' / 'mlflow.db'}"
    results = start_together(uri, tmp_path, 6)
    assert [r.returncode for r in results] == [0] * 6, [r.stderr[-2000:] for r in results if r.returncode]
    assert len({r.stdout.strip() for r in results}) == 1  # one experiment id for all
    assert schema_problems(tmp_path / "fresh" / "mlflow.db") == []
    names = [e.name for e in _client(uri).search_experiments()]
    assert sorted(names) == ["Default", "prunelab"]


def _store_with_a_run(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    exp = ensure_experiment(uri, "prunelab", (tmp_path / "art").as_uri())
    client = mlflow.MlflowClient(tracking_uri=uri)
    run = client.create_run(exp)
    for step in range(5):
        client.log_metric(run.info.run_id, "val/acc", 0.5 + step / 10, step=step)
    client.log_param(run.info.run_id, "method", "magnitude")
    client.set_terminated(run.info.run_id)
    return uri, run.info.run_id


def _break_like_an_interrupted_migration(db):
    """What alembic's SQLite batch mode leaves when stopped between dropping a table and renaming its new copy."""
    con = sqlite3.connect(db)
    con.execute("CREATE TABLE _alembic_tmp_latest_metrics AS SELECT * FROM latest_metrics")
    con.execute("DROP TABLE latest_metrics")
    con.execute("UPDATE alembic_version SET version_num = 'a8c4a736bde6'")  # an older revision
    con.commit()
    con.close()


def test_broken_store_is_reported_then_repaired_without_losing_a_run(tmp_path, capsys):
    uri, run_id = _store_with_a_run(tmp_path)
    _break_like_an_interrupted_migration(tmp_path / "mlflow.db")
    with pytest.raises(StoreBrokenError, match=r"_alembic_tmp_latest_metrics.*prunelab-runs repair-store"):
        ensure_experiment(uri, "prunelab")
    assert runs_cli(["--tracking-uri", uri, "check-store"]) == 1
    assert runs_cli(["--tracking-uri", uri, "repair-store"]) == 0
    assert "1 runs" in capsys.readouterr().out
    assert list(tmp_path.glob("mlflow.db.broken-*"))  # the broken file is kept
    assert runs_cli(["--tracking-uri", uri, "check-store"]) == 0
    client = _client(uri)
    run = client.get_run(run_id)
    assert run.data.metrics["val/acc"] == pytest.approx(0.9)  # latest_metrics came back from the tmp copy
    assert [m.value for m in client.get_metric_history(run_id, "val/acc")] == pytest.approx([0.5, 0.6, 0.7, 0.8, 0.9])
    assert run.data.params == {"method": "magnitude"}
    assert ensure_experiment(uri, "prunelab") == run.info.experiment_id


def test_tracking_uri_creates_nothing(tmp_path):
    uri = tracking_uri(None, tmp_path / "outputs")
    assert uri == f"sqlite:///{tmp_path / 'outputs' / 'mlflow.db'}"
    assert not (tmp_path / "outputs").exists()


def test_dead_server_fails_fast_with_one_message():
    uri = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(
        TrackingUnavailableError,
        match=rf"tracking server {uri} did not answer within "
        r"logger.connect_timeout=2 s",
    ):
        ensure_experiment(uri, "prunelab", connect_timeout=2)


@pytest.mark.slow  # the CLI against a dead server in a subprocess, ~12 s each
@pytest.mark.parametrize("multirun", [False, True])
def test_cli_against_a_dead_server_exits_nonzero_at_once(tmp_path, multirun):
    uri = f"http://127.0.0.1:{free_port()}"
    cmd = [
        sys.executable,
        "-m",
        "prunelab.train",
        *(["-m"] if multirun else []),
        "data=digits",
        "model=lenet300",
        "logger.connect_timeout=2",
        "pruning.compression=2,4" if multirun else "pruning.compression=2",
        f"paths.root_dir={tmp_path}",
    ]
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=240, env={**os.environ, "MLFLOW_TRACKING_URI": uri}
    )
    assert proc.returncode != 0
    output = proc.stdout + proc.stderr  # Hydra logs to stdout, prints an uncaught error to stderr
    assert output.count("did not answer within logger.connect_timeout=2 s") == 1, output[-3000:]
    assert not (tmp_path / "outputs" / "mlflow.db").exists()
