"""Latency measurement: sane statistics on a tiny model, GPU keys absent without CUDA, raw samples written,
options checked before training, the 2:4 eligibility rules; the CUDA paths themselves in ``gpu``-marked tests."""

import json
import math
import re

import pytest
import torch
from torch import nn

from conftest import runs_in
from prunelab.measure import check_options, measure
from prunelab.measure.gpu_latency import cudnn_benchmark, gpu_latency, mode_params
from prunelab.measure.latency import cpu_latency, is_2to4, measure_latency
from prunelab.measure.semi_structured import SparseConv1x1, choose_backend, eligibility, semi_structured_latency
from prunelab.models import MLP, LeNet5, LeNet300
from prunelab.train import train

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

X = torch.zeros(1, 1, 8, 8)
FAST = {"batch_sizes": (1, 4), "blocks": 2, "min_run_time": 0.01}


def _pair():
    torch.manual_seed(0)
    dense = LeNet300(image_size=8)
    small = nn.Sequential(nn.Flatten(), nn.Linear(64, 30), nn.ReLU(), nn.Linear(30, 10))
    return dense, small


def test_cpu_latency_statistics_are_sane():
    dense, small = _pair()
    res = cpu_latency(dense, small, X, **FAST)
    for b in (1, 4):
        for key in (f"latency_cpu_b{b}_ms", f"dense_latency_cpu_b{b}_ms"):
            assert math.isfinite(res.metrics[key]) and res.metrics[key] > 0
            assert res.metrics[key.replace("_ms", "_iqr_ms")] >= 0
        assert math.isfinite(res.metrics[f"speedup_cpu_b{b}"]) and res.metrics[f"speedup_cpu_b{b}"] > 0
        raw = res.samples[f"cpu_b{b}"]
        assert len(raw["dense"]) == len(raw["pruned"]) == 2 and all(len(block) >= 1 for block in raw["pruned"])
    assert res.metrics["latency_cpu_threads"] == torch.get_num_threads()
    json.dumps(res.samples)  # JSON-ready


def test_gpu_path_is_skipped_cleanly_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    dense, small = _pair()
    dense.train()
    res = measure_latency(dense, small, X, gpu=True, threads=2, **FAST)  # not the tests' default of one thread
    assert res.metrics and not any("gpu" in k for k in res.metrics)
    assert not any("gpu" in k for k in res.samples) and not any("gpu" in k for k in res.params)
    assert dense.training and res.metrics["latency_cpu_threads"] == 2  # train mode restored, threads honoured
    assert res.params["latency_cpu_device"]


@pytest.mark.parametrize(
    "key, value",
    [
        ("blocks", 0),
        ("batch_sizes", ()),
        ("batch_sizes", (0,)),
        ("gpu_batch_sizes", (1, -64)),
        ("gpu_batch_sizes", ()),
        ("gpu_mode", "fast"),
        ("gpu_dtype", "int8"),
        ("channels_last", "yes"),
        ("min_run_time", 0),
    ],
)
def test_bad_options_name_the_key(key, value):
    dense, small = _pair()
    named = re.escape(f"measure.{key}={value!r}")
    with pytest.raises(ValueError, match=named):
        measure_latency(dense, small, X, **{**FAST, key: value})
    with pytest.raises(ValueError, match=named):
        check_options({key: value})


def test_unknown_measure_key_lists_the_valid_ones():
    with pytest.raises(ValueError, match=r"measure\.gpu_modes is not a measure option.*gpu_mode"):
        check_options({"gpu_modes": "graph"})
    check_options({"gpu_mode": "eager", "gpu_dtype": "bf16", "gpu_batch_sizes": [256], "channels_last": True})


@pytest.mark.parametrize("override", ["measure.gpu_mode=fast", "measure.gpu_dtype=fp8", "measure.gpu_batch_sizes=[0]"])
def test_bad_measure_option_fails_before_any_run(make_cfg, tmp_path, override):
    with pytest.raises(ValueError, match=rf"measure\.{override.split('=')[0].split('.')[1]}="):
        train(make_cfg(override))
    assert runs_in(tmp_path) == []


def test_run_records_latency_params(make_cfg, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    metrics = train(make_cfg("pruning=none", "measure.blocks=1", "measure.min_run_time=0.01"))
    (run,) = runs_in(tmp_path)
    assert run.data.params["latency_cpu_device"] and metrics["speedup_cpu_b1"] > 0
    assert not any(k.startswith("latency_gpu") for k in run.data.params) and not any("gpu" in k for k in metrics)


def test_cudnn_benchmark_is_restored():
    before = torch.backends.cudnn.benchmark
    with pytest.raises(KeyError), cudnn_benchmark():
        assert torch.backends.cudnn.benchmark
        raise KeyError
    assert torch.backends.cudnn.benchmark == before


def test_mode_params_record_the_fallback():
    assert mode_params("latency_gpu", "graph", {1: "graph", 64: "graph"}, {}) == {
        "latency_gpu_mode_requested": "graph",
        "latency_gpu_mode": "graph",
    }
    params = mode_params("latency_gpu", "graph", {1: "eager", 64: "graph"}, {1: "RuntimeError: capture"})
    assert params["latency_gpu_mode"] == "eager+graph" and params["latency_gpu_fallback"] == "b1: RuntimeError: capture"


def test_measure_with_latency_writes_raw_samples(tmp_path):
    dense, pruned = _pair()[0], LeNet300(image_size=8)
    with torch.no_grad():
        pruned.fc1.weight[:150] = 0
    metrics, _, params = measure(pruned, dense, ["fc1", "fc2", "fc3"], X, tmp_path, latency=True, gpu=False, **FAST)
    assert set(params) == {"latency_cpu_device", "latency_onnx_runtime"}  # ONNX Runtime timed too (onnx=True)
    for key in (
        "latency_cpu_b1_ms",
        "latency_cpu_b4_ms",
        "speedup_cpu_b1",
        "speedup_cpu_b4",
        "latency_onnx_b1_ms",
        "speedup_onnx_b4",
    ):
        assert math.isfinite(metrics[key]) and metrics[key] > 0
    samples = json.loads((tmp_path / "latency.json").read_text())
    assert set(samples["cpu_b1"]) == set(samples["onnx_b1"]) == {"dense", "pruned"}


def test_is_2to4():
    w = torch.tensor([[1.0, 0, 2, 0, 0, 0, 3, 4], [0, 0, 0, 0, 1, 1, 0, 0]])
    assert is_2to4(w)
    w[0, 1] = 5
    assert not is_2to4(w) and not is_2to4(torch.ones(2, 6))


def _two_of_four(net: nn.Module) -> nn.Module:
    """Keep the 2 largest |w| of every 4 consecutive inputs of every Linear (a 2:4 magnitude mask)."""
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.Linear) and m.in_features % 4 == 0:
                groups = m.weight.view(m.out_features, -1, 4)
                drop = groups.abs().argsort(-1)[..., :2]
                groups.scatter_(-1, drop, 0.0)
    return net


@pytest.mark.parametrize(
    "capability, cusparselt, backend",
    [
        (None, True, None),
        ((7, 5), True, None),
        ((8, 0), True, "cusparselt"),
        ((8, 6), False, "cutlass"),
        ((9, 0), True, "cusparselt"),
        ((9, 0), False, None),
        ((12, 0), False, None),
    ],
)
def test_backend_choice(capability, cusparselt, backend):
    chosen, why = choose_backend(capability, cusparselt)
    assert chosen == backend and why
    if capability and capability[0] >= 9:
        assert chosen != "cutlass"  # CUTLASS's 2:4 kernels error on anything but 8.x


def test_eligibility_names_why_a_layer_is_not_converted():
    torch.manual_seed(0)
    mlp = _two_of_four(MLP(image_size=28, hidden=(1024, 512)))
    for backend in ("cusparselt", "cutlass"):
        assert eligibility(mlp.fc2, backend) is None
        assert "shape 10×512" in eligibility(mlp.fc3, backend)
    assert eligibility(mlp.fc1, "cusparselt") is None  # 1024 × 784: multiples of 16
    assert "shape 1024×784: cutlass needs multiples of 32×64" in eligibility(mlp.fc1, "cutlass")
    assert eligibility(nn.Linear(64, 64), "cusparselt") == "weights are not 2:4 sparse"
    assert eligibility(nn.Linear(64, 64), "cusparselt", torch.float32) == "cusparselt has no 2:4 kernels for float32"
    assert "3×3 convolution" in eligibility(nn.Conv2d(64, 64, 3), "cusparselt")
    assert "not a plain matmul" in eligibility(nn.Conv2d(64, 64, 1, padding=1), "cusparselt")
    conv = nn.Conv2d(32, 64, 1, stride=2)
    with torch.no_grad():
        conv.weight.view(64, -1, 4)[..., :2] = 0
    assert eligibility(conv, "cusparselt") is None
    assert "needs multiples of 32×64" in eligibility(conv, "cutlass")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("mode", ["graph", "eager"])
@pytest.mark.parametrize("dtype, channels_last", [("float32", False), ("float16", True)])
def test_gpu_latency_modes(mode, dtype, channels_last):
    torch.manual_seed(0)
    dense, small = LeNet5(image_size=8), LeNet5(image_size=8)
    with torch.no_grad():
        small.conv2.weight[25:] = 0
    before = torch.backends.cudnn.benchmark
    res = gpu_latency(
        dense, small, X, (1, 8), blocks=2, min_run_time=0.01, mode=mode, dtype=dtype, channels_last=channels_last
    )
    assert torch.backends.cudnn.benchmark == before
    for b in (1, 8):
        assert res.metrics[f"latency_gpu_b{b}_ms"] > 0 and res.metrics[f"speedup_gpu_b{b}"] > 0
        assert len(res.samples[f"gpu_b{b}"]["pruned"]) == 2
    assert res.params["latency_gpu_mode"] == mode and "latency_gpu_fallback" not in res.params  # captures cleanly
    assert res.params["latency_gpu_dtype"] == dtype and res.params["latency_gpu_device"]
    assert res.params["latency_gpu_channels_last"] == str(channels_last).lower()
    json.dumps(res.samples)


@pytest.mark.gpu
@needs_cuda
def test_measure_records_gpu_metrics_and_params(tmp_path):
    dense, pruned = _pair()[0], LeNet300(image_size=8)
    metrics, _, params = measure(
        pruned, dense, ["fc1", "fc2", "fc3"], X, tmp_path, latency=True, gpu_batch_sizes=(1, 64), **FAST
    )
    for key in ("latency_gpu_b1_ms", "latency_gpu_b64_ms", "speedup_gpu_b1", "speedup_gpu_b64"):
        assert math.isfinite(metrics[key]) and metrics[key] > 0
    assert params["latency_gpu_mode"] == "graph" and params["latency_gpu_dtype"] == "float32"
    samples = json.loads((tmp_path / "latency.json").read_text())
    assert samples["gpu_modes"] == {"b1": "graph", "b64": "graph"}


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("mode", ["graph", "eager"])
def test_2to4_path_runs_the_sparse_kernels_on_the_wide_mlp(mode):
    torch.manual_seed(0)
    mlp = _two_of_four(MLP(image_size=8, hidden=(1024, 1024))).eval()
    res = semi_structured_latency(mlp, X, (1, 256), blocks=2, min_run_time=0.01, mode=mode)
    backend = res.params["latency_gpu_2to4_backend"]
    if torch.cuda.get_device_capability() < (8, 0):
        assert backend == "none" and not res.metrics
        return
    if torch.cuda.get_device_capability()[0] != 8:
        assert backend != "cutlass"
    layers = res.samples["gpu_2to4_layers"]
    assert layers["fc1"] == layers["fc2"] == "converted" and "shape 10×1024" in layers["fc3"]
    assert res.samples["gpu_2to4_check"]["sparse_kernel_calls"] >= 2
    for b in (1, 256):
        assert res.metrics[f"speedup_gpu_2to4_b{b}"] > 0 and res.metrics[f"latency_gpu_2to4_b{b}_ms"] > 0


@pytest.mark.gpu
@needs_cuda
def test_dense_weights_get_no_2to4_metrics():
    res = semi_structured_latency(MLP(image_size=8, hidden=(1024, 1024)), X, (1,), blocks=1, min_run_time=0.01)
    assert not res.metrics
    if res.params["latency_gpu_2to4_backend"] != "none":
        assert set(res.samples["gpu_2to4_layers"].values()) >= {"weights are not 2:4 sparse"}


@pytest.mark.gpu
@needs_cuda
def test_sparse_1x1_convolution_matches_the_dense_one():
    backend, _ = choose_backend(torch.cuda.get_device_capability(), torch.backends.cusparselt.is_available())
    if backend is None:
        pytest.skip("no 2:4 backend on this GPU")
    torch.manual_seed(0)
    conv = nn.Conv2d(64, 128, 1, stride=2).cuda().half().eval()
    with torch.no_grad():
        conv.weight.view(128, -1, 4)[..., :2] = 0
        x = torch.randn(4, 64, 16, 16, device="cuda", dtype=torch.float16)
        sparse = SparseConv1x1(conv, torch.sparse.to_sparse_semi_structured(conv.weight.view(128, 64).contiguous()))
        torch.testing.assert_close(sparse(x), conv(x), rtol=1e-2, atol=1e-2)
