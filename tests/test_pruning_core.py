"""Pruning core: granularity views, exact allocation, schedules, masks."""

import math

import pytest
import torch
from torch import nn

from callbacks import compacted_ratio
from prunelab.models import LeNet5, LeNet300
from prunelab.pruning import MagnitudePruning, check_compression, groups, schedules
from prunelab.pruning.allocate import UnreachableCompressionError, allocate
from prunelab.pruning.masks import MaskSet, prunable_layers


def test_group_views_match_im2col_definitions():
    w = torch.arange(2 * 3 * 2 * 2, dtype=torch.float).view(2, 3, 2, 2)
    assert groups.group_shape(w, "filter") == (2,)
    assert groups.group_shape(w, "channel") == (3,)
    assert groups.group_shape(w, "column") == (3, 4)
    assert groups.group_size(w, "filter") == 12 and groups.group_size(w, "channel") == 8
    assert groups.group_size(w, "column") == 2 and groups.group_size(w, "weight") == 1
    torch.testing.assert_close(groups.group_norms(w, "filter"), w.flatten(1).norm(dim=1))
    torch.testing.assert_close(groups.group_norms(w, "channel"), w.transpose(0, 1).flatten(1).norm(dim=1))
    torch.testing.assert_close(groups.group_norms(w, "column").flatten(), w.flatten(1).norm(dim=0))
    # expanding a group mask zeroes exactly that group
    mask = groups.expand(torch.tensor([True, False, True]), w, "channel")
    assert mask.shape == w.shape and not mask[:, 1].any() and mask[:, [0, 2]].all()
    col = torch.ones(3, 4, dtype=torch.bool)
    col[1, 2] = False
    cm = groups.expand(col, w, "column")
    assert not cm[:, 1, 1, 0].any() and cm.sum() == w.numel() - 2


def test_unknown_granularity_lists_choices():
    with pytest.raises(ValueError, match="'rows'.*weight, filter, channel, column"):
        groups.check_granularity("rows")


def _lenet5_weights(seed=0):
    torch.manual_seed(seed)
    net = LeNet5()
    return net, {n: m.weight.detach() for n, m in prunable_layers(net).items()}


@pytest.mark.parametrize("granularity", ["weight", "filter", "channel", "column"])
@pytest.mark.parametrize("scope", ["global", "layer"])
@pytest.mark.parametrize("compression", [2.0, 8.0, 32.0])
def test_allocation_reaches_requested_compression(granularity, scope, compression):
    net, weights = _lenet5_weights()
    names = list(weights)
    eligible = {"filter": names[:-1], "channel": names[1:], "column": names[1:], "weight": names}[granularity]
    scores = {n: groups.group_norms(weights[n], granularity) for n in eligible}
    masks = allocate(weights, scores, 1 - 1 / compression, granularity, scope)
    total = sum(w.numel() for w in weights.values())
    nonzero = sum(int(m.sum()) for m in masks.values())
    assert abs(total / nonzero - compression) / compression < 0.02
    for n, m in masks.items():
        gm = groups.group_mask_of(m, granularity)
        # masks are made of whole groups and every layer keeps at least one
        assert torch.equal(groups.expand(gm, weights[n], granularity), m)
        assert gm.any()
    if granularity == "weight" and scope == "global":
        kept = torch.cat([weights[n][masks[n]].abs() for n in names])
        dropped = torch.cat([weights[n][~masks[n]].abs() for n in names])
        assert kept.min() >= dropped.max()  # exact global top-k by magnitude


def test_allocation_is_deterministic_with_ties():
    w = {"a": torch.ones(4, 4), "b": torch.ones(4, 4)}
    s = {n: v.abs() for n, v in w.items()}
    m1, m2 = allocate(w, s, 0.5, "weight"), allocate(w, s, 0.5, "weight")
    assert all(torch.equal(m1[n], m2[n]) for n in w)
    assert sum(int((~m).sum()) for m in m1.values()) == 16


def test_unreachable_compression_is_a_clear_error():
    net, weights = _lenet5_weights()
    scores = {n: groups.group_norms(weights[n], "filter") for n in list(weights)[:-1]}
    with pytest.raises(UnreachableCompressionError, match="max compression"):
        allocate(weights, scores, 1 - 1 / 500, "filter")


def test_per_layer_table_is_respected():
    net, weights = _lenet5_weights()
    table = {"conv1": 0.2, "conv2": 0.92, "fc1": 0.991, "fc2": 0.93}
    masks = allocate(weights, {n: w.abs() for n, w in weights.items()}, 0.0, "weight", layer_sparsity=table)
    for n, frac in table.items():
        assert int((~masks[n]).sum()) == round(frac * weights[n].numel())


def test_cubic_schedule_endpoints_and_monotone():
    values = [schedules.cubic(t, 0, 100, 0.9) for t in range(101)]
    assert values[0] == 0.0 and values[-1] == pytest.approx(0.9)
    assert all(b >= a for a, b in zip(values, values[1:]))
    assert schedules.cubic(50, 0, 100, 0.9) == pytest.approx(0.9 * (1 - 0.5**3))


def test_iterative_rounds_remove_equal_fractions():
    s = [schedules.iterative_round_sparsity(r, 3, 1 - 1 / 8) for r in range(3)]
    keep = [1 - x for x in s]
    assert keep[-1] == pytest.approx(1 / 8)
    assert keep[0] == pytest.approx(0.5) and keep[1] == pytest.approx(0.25)
    ratios = [schedules.round_compression(r, 3, 8.0) for r in range(3)]  # the same rounds as compression ratios
    assert ratios[:2] == [pytest.approx(2.0), pytest.approx(4.0)] and ratios[2] == 8.0  # the last one exactly


def test_update_steps():
    assert schedules.update_steps("one_shot", 100) == [0]
    assert schedules.update_steps("iterative", 90, rounds=3) == [0, 30, 60]
    assert schedules.update_steps("gradual", 25, frequency=10) == [0, 10, 20, 25]
    assert schedules.round_steps(200, 0.45, rounds=3) == [0, 30, 60]  # three rounds over the first 90 steps


@pytest.mark.parametrize("bad", [1, 0.5, -3, "abc", None, True, float("nan"), float("inf")])
def test_bad_compression_names_the_value(bad):
    with pytest.raises(ValueError, match="pruning.compression"):
        check_compression(bad)


def test_unknown_layer_lists_valid_layers():
    with pytest.raises(ValueError, match=r"\['conv9'\].*conv1, conv2, fc1, fc2"):
        prunable_layers(LeNet5(), layers=["conv9"])
    cb = MagnitudePruning(compression=4, exclude=["fc3"])
    with pytest.raises(ValueError, match="fc3"):
        cb.validate(LeNet5())


def test_maskset_keeps_zeros_and_masks_optimizer_state():
    net = LeNet300()
    ms = MaskSet()
    ms.bind(prunable_layers(net))
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
    nn.functional.cross_entropy(net(x), y).backward()
    opt.step()  # momentum buffers now nonzero everywhere
    for name, mod in ms.modules.items():
        ms.set(name, mod.weight.abs() > mod.weight.abs().median())
    ms.apply()
    ms.mask_optimizer_state([opt])
    for name, mod in ms.modules.items():
        assert not opt.state[mod.weight]["momentum_buffer"][~ms.masks[name]].any()
    total, nonzero = ms.counts()
    assert math.isclose(1 - nonzero / total, ms.sparsity())
    state = ms.state_dict()
    other = MaskSet()
    other.load_state_dict(state)
    other.bind(prunable_layers(net))
    assert all(torch.equal(other.masks[n], ms.masks[n]) for n in ms.masks)


@pytest.mark.parametrize("granularity, ratio, final", [("weight", 4, 16), ("filter", 2, 4)])
def test_prune_to_compression_counts_an_intermediate_ratio_as_the_final_one_is_counted(granularity, ratio, final):
    torch.manual_seed(0)
    pruning = MagnitudePruning(compression=final, granularity=granularity)
    pruning.bind(LeNet5(image_size=8))
    pruning.example_input = torch.zeros(1, 1, 8, 8)

    def reached():  # the compression the method is held to, and the masks' own ratio
        total, nonzero = pruning.masks.counts()
        compacted = compacted_ratio(pruning, pruning.example_input) if granularity == "filter" else total / nonzero
        return compacted, total / nonzero

    pruning.allocator.prune_to_compression(ratio)
    compacted, masked = reached()
    assert abs(compacted - ratio) / ratio < 0.03 and not pruning.done
    if granularity == "filter":  # the masks alone leave the weights that read pruned filters
        assert masked < 0.95 * ratio
    pruning.allocator.prune_to_compression(final)
    compacted, masked = reached()
    assert abs(compacted - final) / final < 0.03 and pruning.done and masked <= compacted + 1e-9
