"""N:M granularity: exactly N nonzeros in every block of M inputs, fixed compression M/N, clear errors."""

import pytest
import torch

from prunelab.models import LeNet5, LeNet300
from prunelab.pruning import MagnitudePruning, groups
from prunelab.pruning.allocate import allocate
from prunelab.pruning.masks import prunable_layers


@pytest.mark.parametrize(("n", "m"), [(2, 4), (1, 4), (4, 8)])
def test_nm_mask_keeps_exactly_n_largest_per_block(n, m):
    torch.manual_seed(0)
    w = torch.randn(6, 8, 3, 3)  # rows of 72 = 8·3·3
    mask = groups.nm_mask(w.abs(), n, m)
    blocks_mask = mask.reshape(6, -1, m)
    assert mask.shape == w.shape and bool((blocks_mask.sum(-1) == n).all())
    blocks = w.abs().reshape(6, -1, m)
    kept_min = blocks.masked_fill(~blocks_mask, float("inf")).amin(-1)
    dropped_max = blocks.masked_fill(blocks_mask, -1.0).amax(-1)
    assert bool((kept_min >= dropped_max).all())


def test_nm_blocks_follow_the_flattened_input_dimension():
    w = torch.tensor([[4.0, 3, 2, 1, 1, 2, 3, 4]])
    assert groups.nm_mask(w, 2, 4).tolist() == [[True, True, False, False, False, False, True, True]]


def test_nm_granularity_parsing_and_errors():
    assert groups.check_granularity("2:4") == "2:4" and groups.parse_nm("2:4") == (2, 4)
    for bad in ("4:2", "0:4", "2:", "2-4"):
        with pytest.raises(ValueError, match="N:M"):
            groups.check_granularity(bad)
    with pytest.raises(ValueError, match="quote"):
        groups.check_granularity(124)  # what YAML 1.1 makes of an unquoted 2:4
    w = torch.randn(5, 7)
    assert groups.group_shape(w, "2:4") == (5, 7, 1) and groups.group_size(w, "2:4") == 1


def test_indivisible_layer_is_named():
    with pytest.raises(ValueError, match="'conv1'.*25"):
        groups.nm_mask(torch.randn(20, 1, 5, 5), 2, 4, "conv1")


def _weights(net):
    return {n: m.weight.detach() for n, m in prunable_layers(net).items()}


def test_allocate_nm_gives_m_over_n_and_rejects_other_targets():
    weights = _weights(LeNet300())
    scores = {n: w.abs() for n, w in weights.items()}
    masks = allocate(weights, scores, 0.5, "2:4")
    total = sum(w.numel() for w in weights.values())
    assert total / sum(int(m.sum()) for m in masks.values()) == pytest.approx(2.0)
    assert allocate(weights, scores, 1 - 1 / 2.03, "2:4")  # within 2 %
    with pytest.raises(ValueError, match="fixes the compression at 2.*compression=2"):
        allocate(weights, scores, 1 - 1 / 8, "2:4")


def test_callback_with_nm_granularity():
    net = LeNet5()
    with pytest.raises(ValueError, match="conv1"):
        MagnitudePruning(compression=2, granularity="2:4").validate(net)
    with pytest.raises(ValueError, match="fixes the compression"):
        MagnitudePruning(compression=4, granularity="2:4", exclude=["conv1"]).validate(net)
    cb = MagnitudePruning(compression=2, granularity="2:4", exclude=["conv1"])
    cb.validate(net)
    cb.bind(net)
    cb.prune_to(0.1)  # an intermediate schedule target still applies the one N:M mask
    for name, module in cb.masks.modules.items():
        rows = module.weight.detach().reshape(module.weight.shape[0], -1, 4)
        assert bool((rows.ne(0).sum(-1) <= 2).all()), name
        assert bool((cb.masks.masks[name].reshape(rows.shape).sum(-1) == 2).all()), name
    assert cb.done
    assert abs(1 / (1 - cb.masks.sparsity()) - 2) / 2 < 0.02
