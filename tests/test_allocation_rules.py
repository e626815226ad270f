"""Allocation rules beyond the ratio: a per-layer keep floor, channel counts rounded for GPUs, compression in MACs."""

import math

import pytest
import torch

from prunelab.measure import compact, count_macs
from prunelab.models import LeNet5, LeNet5Classic, build_model
from prunelab.pruning import ADMMPruning, MagnitudePruning, groups
from prunelab.pruning.allocate import UnreachableCompressionError, allocate
from prunelab.pruning.macs_target import masked_copy
from prunelab.pruning.masks import prunable_layers


def _weights(net):
    return {n: m.weight.detach() for n, m in prunable_layers(net).items()}


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_keep_floor_protects_small_layers_at_high_compression(scope):
    torch.manual_seed(0)
    weights = _weights(LeNet5Classic())
    scores = {n: w.abs() for n, w in weights.items()}
    plain = allocate(weights, scores, 1 - 1 / 64, "weight", scope)
    floored = allocate(weights, scores, 1 - 1 / 64, "weight", scope, min_keep_fraction=0.05)
    kept = {n: int(m.sum()) for n, m in floored.items()}
    budget = sum(kept.values())
    small = sorted(weights, key=lambda n: weights[n].numel())
    granted = [
        n
        for i, n in enumerate(small)
        if sum(math.ceil(0.05 * weights[m].numel()) for m in small[: i + 1]) <= budget / 2
    ]
    assert granted[:2] == ["conv1", "fc3"] and "fc1" not in granted
    assert all(kept[n] >= math.ceil(0.05 * weights[n].numel()) for n in granted)
    starved = [n for n in granted if int(plain[n].sum()) < math.ceil(0.05 * weights[n].numel())]
    if scope == "layer":  # one ratio everywhere starves the small layers: conv1 would keep 2 of its 150 weights
        assert "conv1" in starved and int(plain["conv1"].sum()) <= 3 and kept["conv1"] >= 8
    if not starved:  # where no layer is starved the floor changes nothing
        assert all(torch.equal(floored[n], plain[n]) for n in weights)
    total = sum(w.numel() for w in weights.values())
    assert abs(total / sum(kept.values()) - 64) / 64 < 0.02


def test_floors_that_cannot_be_met_name_the_keys():
    weights = _weights(LeNet5Classic())
    scores = {n: groups.group_norms(w, "filter") for n, w in list(weights.items())[:-1]}
    with pytest.raises(UnreachableCompressionError, match=r"pruning.compression=64.*pruning.min_keep=4"):
        allocate(weights, scores, 1 - 1 / 64, "filter", min_keep=4, min_keep_fraction=0.2)


@pytest.mark.parametrize("granularity", ["filter", "channel"])
@pytest.mark.parametrize("compression", [2.0, 4.0])
def test_round_to_keeps_channel_counts_multiples_and_the_ratio(granularity, compression):
    torch.manual_seed(0)
    net = build_model("vgg16", in_channels=3, image_size=32, num_classes=10)
    cb = MagnitudePruning(compression=compression, granularity=granularity, round_to=8)
    cb.bind(net)
    masks = cb.allocator.allocation(cb.final_sparsity)
    for n in cb._eligible:
        alive = int(groups.group_mask_of(masks[n], granularity).sum())
        count = math.prod(groups.group_shape(masks[n], granularity))
        assert alive % 8 == 0 or alive == count, (n, alive)
    total = sum(m.numel() for m in masks.values())
    assert abs(total / sum(int(m.sum()) for m in masks.values()) - compression) / compression < 0.02


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"target": "macs"}, r"pruning.target=macs needs a granularity.*'weight'"),
        ({"target": "flops"}, r"pruning.target='flops' is not one of: params, macs"),
        ({"round_to": 8}, r"pruning.round_to=8 rounds channel counts.*not 'weight'"),
        ({"round_to": 0, "granularity": "filter"}, r"pruning.round_to=0 must be an integer >= 1"),
        ({"min_keep_fraction": 1.0}, r"pruning.min_keep_fraction=1.0 must be a number >= 0 and < 1"),
    ],
)
def test_bad_rules_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MagnitudePruning(compression=4, **kwargs)


def test_round_to_auto_is_off_on_the_cpu_and_ignored_where_it_cannot_apply(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cb = MagnitudePruning(compression=4, granularity="filter", round_to="auto")
    cb.validate(LeNet5(image_size=8))
    assert cb.round_to is None and cb.describe()["round_to"] is None
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    cb.validate(LeNet5(image_size=8))
    assert cb.round_to == 8
    assert MagnitudePruning(compression=4, round_to="auto").round_to is None  # weight granularity: nothing to round


def _macs_reduction(cb, net, example):
    masks = {n: cb.masks.masks[n] for n in cb.masks.modules}
    pruned = compact(masked_copy(net, masks, cb.masks.dependents), example).net
    return count_macs(net, example) / count_macs(pruned, example)


@pytest.mark.parametrize(
    "model, granularity, scope",
    [
        ("lenet5", "channel", "global"),
        ("lenet5", "channel", "lamp"),
        pytest.param("resnet20", "channel", "global", marks=pytest.mark.slow),  # the case: 4× fewer MACs, ±2 %
        pytest.param("resnet20", "filter", "global", marks=pytest.mark.slow),
        pytest.param("resnet20", "channel", "lamp", marks=pytest.mark.slow),
    ],
)
def test_target_macs_reaches_the_macs_ratio(model, granularity, scope):
    torch.manual_seed(0)
    size, channels = (32, 3) if model == "resnet20" else (28, 1)
    net = build_model(model, in_channels=channels, image_size=size, num_classes=10).eval()
    example = torch.zeros(1, channels, size, size)
    cb = MagnitudePruning(compression=4, granularity=granularity, target="macs", scope=scope)
    cb.validate(net, example)
    cb.bind(net)
    cb.example_input = example
    cb.prune_to(cb.final_sparsity)
    reduction = _macs_reduction(cb, net, example)
    assert abs(reduction - 4) / 4 < 0.02, reduction
    assert cb.allocator.macs_reduction == pytest.approx(reduction)
    total, nonzero = cb.masks.counts()
    assert total / nonzero != pytest.approx(4, rel=0.02)  # the parameter ratio is not the MACs ratio


def test_target_macs_on_coarse_groups_moves_off_the_path_into_the_band():
    """LeNet-5's 20 conv1 filters each carry ~4 % of its MACs: one step of the global ranking's path jumps over the
    ±2 % band around 4×; moving one layer off the path lands inside it."""
    torch.manual_seed(0)
    net, example = LeNet5().eval(), torch.zeros(1, 1, 28, 28)
    cb = MagnitudePruning(compression=4, granularity="filter", target="macs")
    cb.bind(net)
    cb.example_input = example
    cb.prune_to(cb.final_sparsity)
    reduction = _macs_reduction(cb, net, example)
    assert cb.allocator.macs_reduction == pytest.approx(reduction) and abs(reduction - 4) / 4 <= 0.02
    assert cb.note is None and cb.allocator.tags() == {"target_reached": f"{reduction:.4g}"}


def test_target_macs_unreachable_is_rejected_before_training():
    cb = ADMMPruning(compression=500, granularity="filter", target="macs")
    with pytest.raises(
        ValueError,
        match=r"pruning.compression=500 with pruning.target=macs cannot be met within 2 %.*"
        r"reached are [0-9.]+× below and none above",
    ):
        cb.validate(LeNet5(), torch.zeros(1, 1, 28, 28))


def test_train_records_macs_target_and_reaches_it(make_cfg):
    from prunelab.train import train

    metrics = train(
        make_cfg(
            "model=lenet5",
            "pruning.granularity=channel",
            "pruning.target=macs",
            "pruning.compression=3",
            "measure.latency=false",
        )
    )
    assert abs(metrics["macs_reduction"] - 3) / 3 < 0.02
    assert abs(metrics["compression"] - 3) / 3 > 0.02  # the weights' ratio is another number


def test_lamp_scores_by_hand_and_the_ranking_they_give():
    from prunelab.pruning.allocate import lamp_scores

    scores = {"a": torch.tensor([1.0, 2.0, 3.0]), "b": torch.tensor([10.0, 20.0])}
    lamp = lamp_scores(scores)  # squares 1 4 9 over suffix sums 14 13 9; 100 400 over 500 400
    assert torch.allclose(lamp["a"], torch.tensor([1 / 14, 4 / 13, 1.0], dtype=torch.float64))
    assert torch.allclose(lamp["b"], torch.tensor([0.2, 1.0], dtype=torch.float64))
    weights = {n: torch.zeros(len(s), 1) for n, s in scores.items()}
    by_lamp = allocate(weights, {n: s.view(-1, 1) for n, s in scores.items()}, 2 / 5, "weight", "lamp")
    by_size = allocate(weights, {n: s.view(-1, 1) for n, s in scores.items()}, 2 / 5, "weight", "global")
    assert by_lamp["a"].flatten().tolist() == [False, True, True] and by_lamp["b"].flatten().tolist() == [False, True]
    assert by_size["a"].flatten().tolist() == [False, False, True] and by_size["b"].all()


def test_lamp_scope_spreads_sparsity_where_global_starves_a_layer():
    """LeNet-5 (6-16-120-84) on 8×8 inputs at 64×: a global magnitude ranking of the initial weights leaves fc2 and fc3
    one weight each (their initial weights are the smallest); LAMP keeps every layer alive, at the exact ratio."""
    torch.manual_seed(0)
    weights = _weights(build_model("lenet5_classic", in_channels=1, image_size=8, num_classes=10))
    scores = {n: w.abs() for n, w in weights.items()}
    plain = allocate(weights, scores, 1 - 1 / 64, "weight", "global")
    lamp = allocate(weights, scores, 1 - 1 / 64, "weight", "lamp")
    assert min(int(m.sum()) for m in plain.values()) == 1
    assert min(int(m.sum()) for m in lamp.values()) >= 10
    total = sum(w.numel() for w in weights.values())
    assert sum(int(m.sum()) for m in lamp.values()) == total - round((1 - 1 / 64) * total)


def test_macs_search_never_goes_below_what_the_schedule_pruned():
    """A later calibration must not unmask weights a schedule already zeroed (they count as removed in the MACs of
    the masked copy, so a lower sparsity looks as good, but they would grow back)."""
    from prunelab.pruning.macs_target import sparsity_for_target

    def macs_at(sparsity):  # 1000 MACs dense, linear in the sparsity
        return round(1000 * (1 - sparsity))

    free, _ = sparsity_for_target(macs_at, 1000, 2.0, 0.99, steps=20)
    floored, reached = sparsity_for_target(macs_at, 1000, 2.0, 0.99, steps=20, min_sparsity=0.7)
    assert abs(free - 0.5) < 0.01 and floored >= 0.7 and reached == pytest.approx(1000 / macs_at(floored))
