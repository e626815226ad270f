"""The compacted model leaves as ONNX checked against PyTorch's logits (dynamic batch), or as a torch.export
program; ONNX Runtime latency has the metric names of the PyTorch timing; ``prunelab-export`` writes either from a
recorded run."""

import math

import mlflow
import numpy as np
import pytest
import torch
import torchvision
from omegaconf import OmegaConf

from prunelab.measure import compact
from prunelab.measure.export import ExportCheckError, export_onnx, export_pt2, onnx_latency, session
from prunelab.models import LeNet5
from prunelab.models.architecture import log_description, rebuild
from prunelab.tracking.runs import export_cli
from prunelab.tracking.runs.model_log import log_model

RTOL = 1e-4


def _lenet5() -> torch.nn.Module:
    torch.manual_seed(0)
    return LeNet5(in_channels=1, image_size=28, num_classes=10).eval()


def _resnet18() -> torch.nn.Module:
    torch.manual_seed(0)
    net = torchvision.models.resnet18(weights=None, num_classes=10)
    for m in net.modules():  # BatchNorm statistics other than the defaults: the export must keep them
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2), m.running_var.uniform_(0.5, 2.0)
    return net.eval()


def _compacted_lenet5() -> tuple[torch.nn.Module, torch.nn.Module]:
    """LeNet-5 with 12 of conv1's 20 filters and 300 of fc1's 500 rows zeroed, and its compacted copy."""
    net = _lenet5()
    with torch.no_grad():
        net.conv1.weight[8:] = 0
        net.conv1.bias[8:] = 0
        net.fc1.weight[200:] = 0
        net.fc1.bias[200:] = 0
    return net, compact(net, torch.zeros(1, 1, 28, 28)).net


def _assert_ort_matches(net: torch.nn.Module, path, shape: tuple[int, ...]) -> None:
    """ONNX Runtime gives ``net``'s logits within RTOL·max(1, max|logit|) at batch 1 and 5 (dynamic batch axis)."""
    runtime = session(path)
    assert isinstance(runtime.get_inputs()[0].shape[0], str), "the batch axis is symbolic"
    for batch in (1, 5):
        x = torch.randn(batch, *shape)
        with torch.no_grad():
            expected = net(x).numpy()
        got = runtime.run(None, {"input": x.numpy()})[0]
        assert got.shape == (batch, 10)
        assert np.abs(got - expected).max() <= RTOL * max(1.0, np.abs(expected).max())


@pytest.mark.parametrize("name, shape", [("lenet5", (1, 28, 28)), ("resnet18", (3, 32, 32))])
def test_onnx_logits_equal_pytorch_at_batch_1_and_5(tmp_path, name, shape):
    net = {"lenet5": _lenet5, "resnet18": _resnet18}[name]()
    path = tmp_path / "sub" / f"{name}.onnx"
    diff = export_onnx(net, torch.zeros(1, *shape), path, atol=RTOL)
    assert path.is_file() and 0.0 <= diff <= RTOL
    assert not net.training
    _assert_ort_matches(net, path, shape)


def test_a_compacted_model_exports_and_matches_the_masked_one(tmp_path):
    masked, compacted = _compacted_lenet5()
    assert compacted.conv1.out_channels == 8 and compacted.fc1.out_features == 200
    path = tmp_path / "compacted.onnx"
    export_onnx(compacted, torch.zeros(1, 1, 28, 28), path)
    dense_path = tmp_path / "dense.onnx"
    export_onnx(masked, torch.zeros(1, 1, 28, 28), dense_path)
    assert path.stat().st_size < 0.5 * dense_path.stat().st_size
    _assert_ort_matches(masked, path, (1, 28, 28))


def test_a_difference_beyond_the_tolerance_raises(tmp_path, monkeypatch):
    from prunelab.measure import export

    class Shifted:
        def __init__(self, real):
            self.real = real

        def run(self, names, feed):
            return [self.real.run(names, feed)[0] + 0.01]

    real_session = export.session
    monkeypatch.setattr(export, "session", lambda path, threads=None: Shifted(real_session(path, threads)))
    with pytest.raises(ExportCheckError, match=r"ONNX model .*bad.onnx differs from PyTorch by 0.01 at batch 1"):
        export_onnx(_lenet5(), torch.zeros(1, 1, 28, 28), tmp_path / "bad.onnx", atol=1e-4)


def test_pt2_program_loads_and_takes_any_batch(tmp_path):
    net = _lenet5()
    path = tmp_path / "lenet5.pt2"
    assert export_pt2(net, torch.zeros(1, 1, 28, 28), path) <= RTOL
    loaded = torch.export.load(str(path)).module()
    x = torch.randn(7, 1, 28, 28)
    with torch.no_grad():
        assert torch.allclose(loaded(x), net(x), atol=1e-5)


def test_onnx_latency_names_and_values(tmp_path):
    masked, compacted = _compacted_lenet5()
    example = torch.zeros(1, 1, 28, 28)
    export_onnx(masked, example, tmp_path / "dense.onnx")
    export_onnx(compacted, example, tmp_path / "pruned.onnx")
    result = onnx_latency(
        tmp_path / "dense.onnx",
        tmp_path / "pruned.onnx",
        example,
        batch_sizes=(1, 3),
        blocks=2,
        threads=1,
        min_run_time=0.01,
        slice_time=0.002,
    )
    names = {
        f"{kind}_onnx_b{b}_{unit}" for kind in ("latency", "dense_latency") for b in (1, 3) for unit in ("ms", "iqr_ms")
    } | {"speedup_onnx_b1", "speedup_onnx_b3", "latency_onnx_threads"}
    assert set(result.metrics) == names
    assert all(math.isfinite(v) and v >= 0 for v in result.metrics.values())
    assert result.metrics["latency_onnx_threads"] == 1.0
    assert len(result.samples["onnx_b1"]["dense"]) == len(result.samples["onnx_b3"]["pruned"]) == 2  # blocks
    assert "onnxruntime" in result.params["latency_onnx_runtime"]


@pytest.fixture
def logged_run(tmp_path):
    """A run in a temporary SQLite store with what ``logger.log_model`` records: the MLflow model, the state dict,
    the architecture description and the config; one layer replaced by a bottleneck (as EigenDamage does)."""
    net = rebuild(
        _lenet5(),
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
    ).eval()
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    mlflow.set_tracking_uri(uri)
    with mlflow.start_run() as run:
        log_model(net, torch.zeros(1, 1, 28, 28))
        torch.save(net.state_dict(), tmp_path / "model_state.pt")
        mlflow.log_artifact(str(tmp_path / "model_state.pt"), "weights")
        log_description(net)
        config = OmegaConf.create({"model": {"_target_": "prunelab.models.LeNet5", "padding": None}})
        mlflow.log_text(OmegaConf.to_yaml(config), "config.yaml")
    return uri, run.info.run_id, net


@pytest.mark.parametrize("fmt", ["onnx", "pt2"])
def test_cli_writes_the_runs_model(logged_run, tmp_path, capsys, fmt):
    uri, run_id, net = logged_run
    out = tmp_path / "out" / f"model.{fmt}"
    assert export_cli.main([run_id, "--format", fmt, "--tracking-uri", uri, "--out", str(out)]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == str(out) and out.is_file()
    assert float(printed[1].split(": ")[1].split()[0]) <= RTOL
    if fmt == "onnx":
        _assert_ort_matches(net, out, (1, 28, 28))


def test_cli_rebuilds_from_the_weights_when_the_model_does_not_load(logged_run, tmp_path, capsys, monkeypatch):
    uri, run_id, net = logged_run
    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")  # the MLflow model no longer loads
    model, example = export_cli.load_run_model(run_id)
    assert not isinstance(model, torch.fx.GraphModule) and example.shape == (1, 1, 28, 28)
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(model(x), net(x))
    out = tmp_path / "rebuilt.onnx"
    assert export_cli.main([run_id, "--format", "onnx", "--tracking-uri", uri, "--out", str(out)]) == 0
    _assert_ort_matches(net, out, (1, 28, 28))


def test_cli_errors_name_the_run_and_format(tmp_path, capsys):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    mlflow.set_tracking_uri(uri)
    with mlflow.start_run() as run:
        pass  # a run without a model
    assert export_cli.main([run.info.run_id, "--format", "pt2", "--tracking-uri", uri]) == 1
    err = capsys.readouterr().err
    assert f"prunelab-export {run.info.run_id} --format pt2: run {run.info.run_id} has no MLflow model" in err
    with pytest.raises(SystemExit):
        export_cli.main([run.info.run_id, "--format", "tflite", "--tracking-uri", uri])
