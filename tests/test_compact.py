"""Compaction: structured zeros removed physically, outputs unchanged, failures loud; measure() on top of it."""

import importlib

import pytest
import torch
from torch import nn

from prunelab.measure import CompactionError, compact, measure
from prunelab.measure.storage import save_sparse
from prunelab.models import MODELS, build_model

LAYERS = (nn.Conv2d, nn.Linear)


def _shape(name: str) -> tuple[int, ...]:
    return (1, 1, 28, 28) if name.startswith("lenet") else (1, 3, 8, 8)


def _net(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    shape = _shape(name)
    return build_model(name, in_channels=shape[1], image_size=shape[2]).eval()


def _params(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def _head(net: nn.Module) -> nn.Linear:
    return [m for m in net.modules() if isinstance(m, nn.Linear)][-1]


def _assert_same_outputs(a: nn.Module, b: nn.Module, shape, seed: int = 123) -> None:
    x = torch.randn((5, *shape[1:]), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        ya, yb = a(x), b(x)
    torch.testing.assert_close(yb, ya, atol=1e-4 * max(1.0, float(ya.abs().max())), rtol=0)


@torch.no_grad()
def _zero_random_filters(net: nn.Module, frac: float = 0.25, seed: int = 0) -> None:
    """Zero a random ``frac`` of the output rows of every Conv2d/Linear but the classifier (and their biases)."""
    gen = torch.Generator().manual_seed(seed)
    head = _head(net)
    for m in net.modules():
        if isinstance(m, LAYERS) and m is not head:
            rows = torch.randperm(m.weight.shape[0], generator=gen)[: max(1, int(frac * m.weight.shape[0]))]
            m.weight[rows] = 0
            if m.bias is not None:
                m.bias[rows[::2]] = 0  # the others stay: a zero filter with a bias is a constant channel


@torch.no_grad()
def _zero_residual_channel(net: nn.Module, channel: int = 5) -> None:
    """Zero ``channel`` in every producer of the last stage's residual stream (all blocks' conv2 + projection)."""
    for name, m in net.named_modules():
        if name.startswith("layer3.") and name.endswith(("conv2", "shortcut.0")):
            m.weight[channel] = 0


@pytest.mark.parametrize("name", list(MODELS))
def test_structured_zeros_are_removed_and_outputs_kept(name):
    net = _net(name)
    _zero_random_filters(net)
    if name.startswith("resnet"):
        _zero_residual_channel(net)
    head_in = _head(net).in_features
    result = compact(net, torch.zeros(_shape(name)))
    assert sum(result.removed.values()) > 0
    assert _params(result.net) < _params(net)
    assert result.max_abs_diff <= 1e-4 * 10
    _assert_same_outputs(net, result.net, _shape(name))
    # the layer feeding the classifier (through flatten/avgpool) shrank; the classifier's outputs did not
    assert _head(result.net).in_features < head_in
    assert _head(result.net).out_features == _head(net).out_features
    assert net.training is False and _params(net) == _params(_net(name))  # the masked net is untouched


@pytest.mark.parametrize("name", ["vgg16", "resnet20"])
def test_zero_filter_with_batchnorm_shift_is_kept_unless_exact(name):
    net = _net(name)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.bias.normal_()  # a zero filter now yields a nonzero constant channel after BN
                m.running_mean.normal_()
    _zero_random_filters(net, frac=0.5)
    result = compact(net, torch.zeros(_shape(name)))
    _assert_same_outputs(net, result.net, _shape(name))
    convs = {n: m for n, m in net.named_modules() if isinstance(m, nn.Conv2d)}
    kept = {n: m for n, m in result.net.named_modules() if isinstance(m, nn.Conv2d)}
    zero_rows = sum(int((m.weight.flatten(1).abs().sum(1) == 0).sum()) for m in convs.values())
    removed = sum(convs[n].out_channels - kept[n].out_channels for n in convs)
    assert 0 < removed < zero_rows  # ReLU-clipped or foldable constants go, the others must stay


def test_constant_channels_fold_into_the_next_bias():
    net = _net("lenet300")
    with torch.no_grad():
        net.fc1.weight[:100] = 0
        net.fc1.bias.uniform_(0.1, 1.0)  # ReLU passes these constants on to fc2
    result = compact(net, torch.zeros(_shape("lenet300")))
    assert result.net.fc1.out_features == 200 and result.folded == 100
    _assert_same_outputs(net, result.net, _shape("lenet300"))


def test_zero_input_columns_remove_the_producer_channel():
    net = _net("vgg16")
    with torch.no_grad():
        net.features[3].weight[:, :10] = 0  # channel pruning of the second conv
    result = compact(net, torch.zeros(_shape("vgg16")))
    assert result.net.features[0].out_channels == 54 and result.net.features[1].num_features == 54
    _assert_same_outputs(net, result.net, _shape("vgg16"))


@pytest.mark.parametrize("name", ["lenet5", "resnet20", "vgg16"])
def test_unstructured_masks_remove_nothing(name):
    net = _net(name)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, LAYERS):
                m.weight.mul_(torch.rand_like(m.weight) > 0.2)  # no whole row/column zero (P < 1e-4)
    result = compact(net, torch.zeros(_shape(name)))
    assert result.removed == {} and _params(result.net) == _params(net)
    assert result.max_abs_diff == 0.0


def test_tolerance_breach_raises(monkeypatch):
    net = _net("lenet300")
    with torch.no_grad():
        net.fc1.weight[:50] = 0
        net.fc1.bias.uniform_(0.5, 1.0)
    module = importlib.import_module("prunelab.measure.compact")  # the package re-exports a function of that name
    monkeypatch.setattr(module, "_fold", lambda *args: None)  # a wrong compaction: drops the constants
    with pytest.raises(CompactionError, match="differs from the masked one"):
        compact(net, torch.zeros(_shape("lenet300")))


def test_stored_bytes_shrink_with_sparsity(tmp_path):
    sizes = []
    for keep in (1.0, 0.5, 0.1):
        net = _net("lenet300")
        with torch.no_grad():
            for m in net.modules():
                if isinstance(m, nn.Linear):
                    m.weight.mul_(torch.rand_like(m.weight) < keep)
        sizes.append(save_sparse(net, tmp_path / f"m{keep}.npz", ["fc1", "fc2", "fc3"]))
    assert sizes[0] > sizes[1] > sizes[2]


def test_measure_reports_compacted_size(tmp_path):
    dense, pruned = _net("lenet5"), _net("lenet5").train()
    with torch.no_grad():
        pruned.conv2.weight[::2] = 0
        pruned.fc1.weight[::2] = 0
    metrics, rows, _ = measure(pruned, dense, ["conv1", "conv2", "fc1", "fc2"], torch.zeros(1, 1, 28, 28), tmp_path)
    for key in (
        "sparsity",
        "compression",
        "params",
        "params_nonzero",
        "macs",
        "dense_macs",
        "macs_reduction",
        "bytes_dense",
        "bytes_stored",
        "storage_compression",
        "compaction_max_abs_diff",
    ):
        assert key in metrics
    assert not any(k.startswith(("latency", "speedup")) for k in metrics)  # latency is opt-in
    assert metrics["params"] < metrics["dense_params"] and metrics["macs_reduction"] > 1.5
    assert metrics["params_nonzero"] <= metrics["params"] and len(rows) == 4
    assert (tmp_path / "model_stored.plse").exists() and pruned.training


def test_compression_compacted_counts_the_weights_removed_downstream(tmp_path):
    """Half of conv2's filters and half of fc1's rows zeroed: the masks keep every fc1 input column and fc2 column,
    compaction also removes the columns that read the removed channels (16 fc1 inputs per conv2 filter)."""
    dense, pruned = _net("lenet5"), _net("lenet5")
    with torch.no_grad():
        pruned.conv2.weight[::2] = 0
        pruned.fc1.weight[::2] = 0
    prunable = ["conv1", "conv2", "fc1", "fc2"]
    metrics, _, _ = measure(pruned, dense, prunable, torch.zeros(1, 1, 28, 28), tmp_path)
    c1, c2, f1, f2 = (dense.get_submodule(n).weight for n in prunable)
    kept_c2, kept_f1 = c2.shape[0] // 2, f1.shape[0] // 2
    per_channel = f1.shape[1] // c2.shape[0]  # fc1 inputs fed by one conv2 channel
    compacted = c1.numel() + kept_c2 * c2[0].numel() + kept_f1 * kept_c2 * per_channel + f2.shape[0] * kept_f1
    total = sum(w.numel() for w in (c1, c2, f1, f2))
    masked = total - (c2.shape[0] - kept_c2) * c2[0].numel() - (f1.shape[0] - kept_f1) * f1.shape[1]
    assert metrics["compression"] == pytest.approx(total / masked)
    assert metrics["compression_compacted"] == pytest.approx(total / compacted)
    assert metrics["compression_compacted"] > 1.8 * metrics["compression"]
    held, _, _ = measure(pruned, dense, prunable, torch.zeros(1, 1, 28, 28), tmp_path, counts_compacted=True)
    assert held["compression"] == held["compression_compacted"] == metrics["compression_compacted"]
    assert held["sparsity"] == pytest.approx(1 - compacted / total)  # a structured method's ratio: the compacted one
