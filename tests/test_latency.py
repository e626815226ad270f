"""Latency measurement: sane statistics on a tiny model, GPU keys absent without CUDA, raw samples written."""

import json
import math

import pytest
import torch
from torch import nn

from prunelab.measure import measure
from prunelab.measure.latency import cpu_latency, is_2to4, measure_latency
from prunelab.models import LeNet300

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
    res = measure_latency(dense, small, X, gpu=True, threads=1, **FAST)
    assert res.metrics and not any("gpu" in k for k in res.metrics)
    assert not any("gpu" in k for k in res.samples)
    assert dense.training and res.metrics["latency_cpu_threads"] == 1  # train mode restored, threads honoured


@pytest.mark.parametrize("bad", [{"blocks": 0}, {"batch_sizes": ()}, {"batch_sizes": (0,)}])
def test_bad_options_name_the_key(bad):
    dense, small = _pair()
    with pytest.raises(ValueError, match="measure"):
        measure_latency(dense, small, X, **{**FAST, **bad})


def test_measure_with_latency_writes_raw_samples(tmp_path):
    dense, pruned = _pair()[0], LeNet300(image_size=8)
    with torch.no_grad():
        pruned.fc1.weight[:150] = 0
    metrics, _ = measure(pruned, dense, ["fc1", "fc2", "fc3"], X, tmp_path, latency=True, gpu=False, **FAST)
    for key in ("latency_cpu_b1_ms", "latency_cpu_b4_ms", "speedup_cpu_b1", "speedup_cpu_b4"):
        assert math.isfinite(metrics[key]) and metrics[key] > 0
    samples = json.loads((tmp_path / "latency.json").read_text())
    assert set(samples["cpu_b1"]) == {"dense", "pruned"}


def test_is_2to4():
    w = torch.tensor([[1.0, 0, 2, 0, 0, 0, 3, 4], [0, 0, 0, 0, 1, 1, 0, 0]])
    assert is_2to4(w)
    w[0, 1] = 5
    assert not is_2to4(w) and not is_2to4(torch.ones(2, 6))
