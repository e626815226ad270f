"""Sweeps: parent/child runs in MLflow, failures inside a sweep, and the report read back from MLflow."""

import subprocess
import sys

import mlflow
import numpy as np
import pytest

from conftest import runs_in
from prunelab.tracking.runs.record import FINAL_METRICS
from prunelab.tracking.sweeps import report
from prunelab.tracking.sweeps.sweep import KIND_TAG

SWEEP = [
    sys.executable,
    "-m",
    "prunelab.train",
    "-m",
    "data=digits",
    "model=lenet300",
    "dense.epochs=1",
    "finetune.epochs=1",
    "logger.log_model=false",
    "measure.latency=false",
]


def _sweep(tmp_path, *overrides):
    proc = subprocess.run(
        [*SWEEP, *overrides, f"paths.root_dir={tmp_path}"], capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = runs_in(tmp_path)
    (parent,) = [r for r in runs if r.data.tags.get(KIND_TAG) == "sweep"]
    children = [r for r in runs if r.data.tags.get(KIND_TAG) != "sweep"]
    return proc, parent, children


@pytest.mark.slow  # a 4-job Hydra multirun in a subprocess, ~25 s
def test_two_by_two_sweep_has_one_parent_and_tagged_children(tmp_path):
    proc, parent, children = _sweep(tmp_path, "pruning.compression=2,4", "seed=0,1")
    assert len(children) == 4
    sweep_id = parent.data.tags["sweep_id"]
    assert all(c.data.tags["sweep_id"] == sweep_id for c in children)
    assert all(c.data.tags["mlflow.parentRunId"] == parent.info.run_id for c in children)
    assert all(c.info.status == "FINISHED" for c in children)
    assert parent.info.status == "FINISHED" and parent.data.metrics["sweep_runs_finished"] == 4
    # one dense baseline per (data, model, seed): seeds 0 and 1 each trained once
    assert sorted(c.data.tags["dense_cache_hit"] for c in children) == ["False", "False", "True", "True"]
    files = {a.path for a in mlflow.MlflowClient().list_artifacts(parent.info.run_id, "report")}
    assert files == {f"report/{f}" for f in ("accuracy.png", "accuracy.html", "table.json", "table.md")}
    table = mlflow.MlflowClient().load_table(
        parent.info.experiment_id, "report/table.json", run_ids=[parent.info.run_id]
    )
    assert sorted(table["compression_target"]) == [2, 4] and (table["seeds"] == 2).all()
    assert "| digits | lenet300 | magnitude | 4 |" in proc.stdout


@pytest.mark.slow
def test_failing_job_is_failed_and_the_others_finish(tmp_path):
    _, parent, children = _sweep(tmp_path, "pruning.granularity=filter", "pruning.compression=2,1000,4")
    status = {c.data.params["compression_target"]: c.info.status for c in children}
    assert status == {"2": "FINISHED", "1000": "FAILED", "4": "FINISHED"}
    failed = next(c for c in children if c.info.status == "FAILED")
    assert "UnreachableCompressionError" in failed.data.tags["failure_reason"]
    assert parent.data.metrics["sweep_runs_failed"] == 1
    table = mlflow.artifacts.load_text(f"runs:/{parent.info.run_id}/report/table.md")
    assert "| 1000 | — |" in table and "FAILED" in table


def _fake_run(exp, dataset, method, ratio, seed, acc, status="FINISHED", **metrics):
    with mlflow.start_run(experiment_id=exp, tags={"sweep_id": "s1"}) as run:
        mlflow.log_params(
            {
                "dataset": dataset,
                "model": "lenet5",
                "method": method,
                "granularity": "weight",
                "compression_target": ratio,
                "seed": seed,
            }
        )
        if status == "FINISHED":
            mlflow.log_metrics({"test_acc": acc, "compression": ratio, "macs_reduction": 1.0, **metrics})
        else:
            mlflow.set_tag("failure_reason", "boom")
    if status != "FINISHED":
        mlflow.MlflowClient().set_terminated(run.info.run_id, status)


def test_report_from_store_with_missing_and_failed_cells(tmp_path):
    uri = f"sqlite:///{tmp_path}/m.db"
    mlflow.set_tracking_uri(uri)
    exp = mlflow.create_experiment("e", artifact_location=(tmp_path / "a").as_uri())
    for seed, acc in ((0, 98.0), (1, 96.0)):
        _fake_run(exp, "mnist5k", "magnitude", 4, seed, acc, latency_cpu_b1_ms=1.0)
    _fake_run(exp, "mnist5k", "magnitude", 16, 0, 0.0, status="FAILED")
    _fake_run(exp, "mnist5k", "admm", 4, 0, 98.5, latency_cpu_b1_ms=1.2)
    _fake_run(exp, "mnist5k", "admm", 16, 0, 97.0, latency_cpu_b1_ms=0.9)
    _fake_run(exp, "digits", "admm", 4, 0, 90.0)
    result = report.build(uri, "e", sweep_id="s1", out_dir=tmp_path / "r")
    t = result.table.set_index(["dataset", "method", "compression_target"])
    assert t.loc[("mnist5k", "magnitude", 4), "test_acc"] == pytest.approx(97.0)
    assert t.loc[("mnist5k", "magnitude", 4), "test_acc_std"] == pytest.approx(np.std([98.0, 96.0], ddof=1))
    assert t.loc[("mnist5k", "magnitude", 16), "status"] == "FAILED"
    assert t.loc[("digits", "admm", 4), "status"] == "ok"
    assert len(result.failed) == 1
    assert {f.name for f in result.files} == {"accuracy.png", "accuracy.html", "table.json", "table.md"}
    assert all(f.stat().st_size > 0 for f in result.files)


def test_pareto_front():
    x = np.array([2.0, 4.0, 4.0, 8.0])
    y = np.array([99.0, 98.0, 97.0, 90.0])
    assert report.pareto(x, y).tolist() == [True, True, False, True]
    assert report.pareto(np.array([1.0, 2.0]), np.array([90.0, 95.0]), x_larger_better=False).tolist() == [True, True]


def _count_metrics(run) -> dict:
    client = mlflow.MlflowClient()
    return {
        "final": len(set(FINAL_METRICS) & set(run.data.metrics)),
        "layers": len([k for k in run.data.metrics if k.startswith("layer_sparsity/")]),
        **{k: len(client.get_metric_history(run.info.run_id, k)) for k in ("train/loss", "val/acc", "train/sparsity")},
    }


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["local_parallel", "ray_local"])
def test_parallel_launchers_on_a_fresh_store_lose_nothing(tmp_path, launcher):
    proc, parent, children = _sweep(
        tmp_path, f"hydra/launcher={launcher}", "num_threads=1", "finetune.epochs=2", "pruning.compression=2,4,8,16"
    )
    assert "database is locked" not in proc.stderr + proc.stdout
    assert sorted(c.data.params["compression_target"] for c in children) == ["16", "2", "4", "8"]
    assert all(c.info.status == "FINISHED" for c in children)
    expected = {"final": len(FINAL_METRICS), "layers": 3, "train/loss": 2, "val/acc": 2, "train/sparsity": 2}
    assert all(_count_metrics(c) == expected for c in children)
    assert sorted(c.data.tags["dense_cache_hit"] for c in children) == ["False", "True", "True", "True"]
    assert parent.info.status == "FINISHED"
