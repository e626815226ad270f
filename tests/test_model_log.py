"""Every run logs a loadable MLflow model and its datasets: the model loads in a fresh process and gives the run's
test accuracy, for every method of the registry; it is an nn.Module (eval, to, state_dict) that loads without
prunelab, also after a method replaced a layer; the three splits are the run's dataset inputs."""

import json
import os
import subprocess
import sys

import mlflow
import pytest
import torch

from conftest import runs_in
from prunelab.pruning import METHODS
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


@pytest.mark.slow  # a fit per method, then a fresh interpreter; test_logged_model_is_a_module_... needs no fit
def test_model_loads_in_a_fresh_process_with_the_runs_test_accuracy(make_cfg, tmp_path):
    for method in METHODS:  # every method of the registry, EigenDamage's replaced layers and AutoPrune's gates too
        train(make_cfg(f"pruning={method}", "pruning.compression=4", "logger.log_model=true", "measure.latency=false"))
    runs = {r.data.params["method"]: r for r in runs_in(tmp_path)}
    assert sorted(runs) == sorted(METHODS)
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/outputs/mlflow.db"}
    proc = subprocess.run(
        [sys.executable, "-c", LOAD_AND_TEST, *(r.info.run_id for r in runs.values())],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    loaded = json.loads(proc.stdout.strip().splitlines()[-1])
    for run in runs.values():
        assert loaded[run.info.run_id] == pytest.approx(run.data.metrics["test_acc"], abs=1e-3)
        info = mlflow.models.get_model_info(f"runs:/{run.info.run_id}/model")
        assert list(info.signature.inputs.to_dict()[0]["tensor-spec"]["shape"]) == [-1, 1, 8, 8]
        files = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id, "weights")}
        assert {"weights/model_state.pt", "weights/model_stored.plse"} <= files


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
    from prunelab.tracking.runs import model_log

    calls = []

    def log_input(dataset, context):
        calls.append(context)
        if calls.count("validation") == 1 and context == "validation":
            raise MlflowException(
                '(psycopg.errors.UniqueViolation) duplicate key value violates unique constraint "dataset_pk"'
            )

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


# A fresh interpreter in which prunelab cannot be imported: the logged models must load with torch (and MLflow) alone.
LOAD_WITHOUT_PRUNELAB = """
import json, sys
sys.modules["prunelab"] = None
import mlflow, torch

out = {}
for name, run_id in json.loads(sys.argv[1]).items():
    model = mlflow.pytorch.load_model(f"runs:/{run_id}/model")
    model = model.eval().to("cpu")
    expected = torch.load(sys.argv[2] + f"/{name}.pt")
    state = model.state_dict()
    with torch.no_grad():
        logits = [model(x) for x in expected["inputs"]]
    out[name] = {
        "type": type(model).__mro__[1].__name__,
        "keys": list(state) == list(expected["state"]),
        "state": max(float((state[k] - v).abs().max()) for k, v in expected["state"].items()),
        "logits": max(float((a - b).abs().max()) for a, b in zip(logits, expected["logits"])),
        "batches": [list(y.shape) for y in logits],
    }
print(json.dumps(out))
"""


class ShapeBranch(torch.nn.Module):
    """A forward with Python control flow on the input's shape: torch.fx cannot trace it, torch.export can."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 4, 3)
        self.bn = torch.nn.BatchNorm2d(4)
        self.fc = torch.nn.Linear(4, 3)

    def forward(self, x):
        y = self.bn(self.conv(x))
        if x.shape[-1] >= 8:
            y = torch.relu(y)
        return self.fc(y.mean((2, 3)))


class ValueBranch(ShapeBranch):
    """A forward with control flow on the input's values: neither graph capture takes it."""

    def forward(self, x):
        return self.fc(self.conv(x).mean((2, 3))) * (2.0 if x.sum() > 0 else 1.0)


def _nets():
    from prunelab.models import LeNet5, ResNet20
    from prunelab.models.architecture import rebuild

    torch.manual_seed(0)
    bottleneck = rebuild(
        LeNet5(in_channels=1, image_size=28, num_classes=10),
        {
            "format": 1,
            "bottlenecks": {
                "fc1": {
                    "stages": [
                        {"type": "linear", "in": 800, "out": 24, "bias": False},
                        {"type": "linear", "in": 24, "out": 16, "bias": False},
                        {"type": "linear", "in": 16, "out": 500, "bias": True},
                    ]
                }
            },
        },
    )
    resnet = ResNet20(in_channels=3, image_size=16, num_classes=10)
    for m in resnet.modules():  # BatchNorm statistics other than the defaults, so that eval mode matters
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5), m.running_var.uniform_(0.5, 2.0)
    return {
        "lenet5": (LeNet5(in_channels=1, image_size=28, num_classes=10), (1, 28, 28)),
        "eigendamage_like": (bottleneck, (1, 28, 28)),
        "resnet20": (resnet, (3, 16, 16)),
        "shape_branch": (ShapeBranch(), (1, 8, 8)),
    }


@pytest.mark.slow  # a fresh interpreter per network, ~15 s
def test_logged_model_is_a_module_that_loads_without_prunelab(tmp_path):
    """``mlflow.pytorch.load_model`` gives an nn.Module (``.eval()``, ``.to()``, ``.state_dict()``, forward at any
    batch size) with the logged net's weights and logits, in a process where prunelab does not import: a plain
    network, one whose layer a method replaced by a bottleneck, one with BatchNorm, one only torch.export traces."""
    from prunelab.tracking.runs.model_log import log_model

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    mlflow.set_tracking_uri(uri)
    run_ids = {}
    for name, (net, shape) in _nets().items():
        net.train()  # logged at inference all the same
        inputs = [torch.randn(n, *shape) for n in (1, 5)]
        with mlflow.start_run() as run:
            log_model(net, torch.zeros(1, *shape))
        assert net.training, "log_model leaves the net's mode as it was"
        net.eval()
        with torch.no_grad():
            logits = [net(x) for x in inputs]
        torch.save({"inputs": inputs, "logits": logits, "state": net.state_dict()}, tmp_path / f"{name}.pt")
        run_ids[name] = run.info.run_id
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    proc = subprocess.run(
        [sys.executable, "-c", LOAD_WITHOUT_PRUNELAB, json.dumps(run_ids), str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    loaded = json.loads(proc.stdout.strip().splitlines()[-1])
    for name, result in loaded.items():
        assert result["type"] == "GraphModule", name
        assert result["keys"] and result["state"] == 0.0, name
        assert result["logits"] <= 1e-5, (name, result["logits"])
        assert result["batches"][1][0] == 5, name


def test_a_forward_no_graph_reproduces_is_logged_as_the_pickled_module(tmp_path, caplog):
    from prunelab.tracking.runs.model_log import log_model, portable_module

    net = ValueBranch()
    assert portable_module(net, torch.zeros(2, 1, 8, 8)) is None
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    with mlflow.start_run() as run, caplog.at_level("WARNING"):
        log_model(net, torch.zeros(1, 1, 8, 8))
    assert "logging the pickled module" in caplog.text
    loaded = mlflow.pytorch.load_model(f"runs:/{run.info.run_id}/model")
    assert type(loaded) is ValueBranch
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(loaded.eval().to("cpu")(x), net.eval()(x))
