"""Every run logs a loadable MLflow model and its datasets: the model loads in a fresh process and gives the run's
test accuracy, for magnitude and ADMM; the three splits are the run's dataset inputs."""

import json
import os
import subprocess
import sys

import mlflow
import pytest

from conftest import runs_in
from prunelab.train import train

# A fresh interpreter: only the tracking URI and the run ids come from this process.
LOAD_AND_TEST = """
import json, sys
import mlflow, torch
from prunelab.data import DigitsDataModule

data = DigitsDataModule()
data.setup()
x, y = data.test_set.tensors
out = {}
for run_id in sys.argv[1:]:
    model = mlflow.pytorch.load_model(f"runs:/{run_id}/model")
    with torch.no_grad():
        out[run_id] = 100.0 * float((model(x).argmax(1) == y).float().mean())
print(json.dumps(out))
"""


def test_model_loads_in_a_fresh_process_with_the_runs_test_accuracy(make_cfg, tmp_path):
    for method in ("magnitude", "admm"):
        train(make_cfg(f"pruning={method}", "pruning.compression=4", "logger.log_model=true",
                       "measure.latency=false"))
    runs = {r.data.params["method"]: r for r in runs_in(tmp_path)}
    assert sorted(runs) == ["admm", "magnitude"]
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/outputs/mlflow.db"}
    proc = subprocess.run([sys.executable, "-c", LOAD_AND_TEST, *(r.info.run_id for r in runs.values())],
                          capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    loaded = json.loads(proc.stdout.strip().splitlines()[-1])
    for run in runs.values():
        assert loaded[run.info.run_id] == pytest.approx(run.data.metrics["test_acc"], abs=1e-3)
        info = mlflow.models.get_model_info(f"runs:/{run.info.run_id}/model")
        assert list(info.signature.inputs.to_dict()[0]["tensor-spec"]["shape"]) == [-1, 1, 8, 8]
        files = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id, "weights")}
        assert {"weights/model_state.pt", "weights/model_sparse.npz"} <= files


def test_datasets_are_the_three_splits(make_cfg, tmp_path):
    train(make_cfg("pruning.compression=2"))
    (run,) = runs_in(tmp_path)
    inputs = {i.tags[0].value: i.dataset for i in run.inputs.dataset_inputs}
    assert sorted(inputs) == ["test", "train", "validation"]
    assert {d.name for d in inputs.values()} == {"digits"}
    assert len({d.digest for d in inputs.values()}) == 3
    assert json.loads(inputs["test"].source) == {"tags": {"datamodule": "prunelab.data.DigitsDataModule"}}


def test_a_dataset_another_run_inserted_first_is_logged_again_and_other_errors_raise(monkeypatch):
    """Two runs of a parallel sweep logging the same split at once: the loser's insert fails on the store's unique
    key (the PostgreSQL message); logging again links the row the winner inserted."""
    from mlflow.exceptions import MlflowException

    from prunelab.data import DigitsDataModule
    from prunelab.tracking import model_log

    calls = []

    def log_input(dataset, context):
        calls.append(context)
        if calls.count("validation") == 1 and context == "validation":
            raise MlflowException('(psycopg.errors.UniqueViolation) duplicate key value violates unique constraint '
                                  '"dataset_pk"')

    monkeypatch.setattr(mlflow, "log_input", log_input)
    monkeypatch.setattr(model_log.time, "sleep", lambda seconds: None)
    model_log.log_datasets("digits", DigitsDataModule(), {})
    assert calls == ["train", "validation", "validation", "test"]

    def refused(dataset, context):
        raise MlflowException("RESOURCE_DOES_NOT_EXIST: run not found")

    monkeypatch.setattr(mlflow, "log_input", refused)
    with pytest.raises(MlflowException, match="run not found"):
        model_log.log_datasets("digits", DigitsDataModule(), {})


def test_system_metrics_flag_must_be_a_bool(make_cfg, tmp_path):
    with pytest.raises(ValueError, match=r"logger.system_metrics='yes' must be true or false"):
        train(make_cfg("logger.system_metrics=yes"))
    assert runs_in(tmp_path) == []
