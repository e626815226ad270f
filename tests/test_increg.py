"""IncReg: λ arithmetic by hand, exact per-layer counts, no regrowth, bit-identical resume, compaction, bad input."""

import copy
import math
from types import SimpleNamespace

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from torch import nn

from callbacks import OPTIMIZERS, KillAt, Killed, ZeroWatch, compacted_ratio, fit_digits, same_init
from prunelab.measure import compact
from prunelab.models import LeNet5, LeNet300
from prunelab.pruning import METHODS, IncRegPruning, groups

ROOT8 = 1 / math.sqrt(8)  # Δ(1)/A for N_p = 2, u = 1/4: α = ln 8 / 2


def _pruned_per_layer(pruning):
    return {n: pruning.pruned(n) for n in pruning.counts}


def _tiny(rank="history", lam=None, lambda_max=100.0, sparsity=0.5):
    """Two Linear layers; IncReg on the 4 columns (input features) of the second, A = 1."""
    net = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2, bias=False))
    with torch.no_grad():
        net[1].weight.copy_(torch.tensor([[0.1, -2.0, 0.5, 1.0], [0.2, 1.0, -0.5, 0.5]]))  # L1: .3, 3, 1, 1.5
    cb = IncRegPruning(compression=2, amplitude=1.0, lambda_max=lambda_max, rank=rank, layer_sparsity={"1": sparsity})
    cb.bind(net)
    cb.start(SimpleNamespace(estimated_stepping_batches=100))
    if lam is not None:
        cb.lam["1"] = torch.tensor(lam, dtype=torch.float64).view(4, 1)  # columns of a Linear: (C, 1)
    return net, cb


def _step(cb, step):
    cb.before_batch(SimpleNamespace(global_step=step, optimizers=[]), None)


def test_lambda_update_by_hand():
    for rank, lam0 in (("history", 1 + ROOT8), ("instantaneous", 1.5 - math.sqrt(2))):
        net, cb = _tiny(rank)
        assert cb.counts == {"1": 2} and cb.A == 1.0
        _step(cb, 0)  # ranks by L1: col0 0, col2 1, col3 2 (= N_p: Δ 0), col1 3 (Δ = 1/2 − √2 < 0, clipped)
        torch.testing.assert_close(cb.lam["1"].flatten(), torch.tensor([1.0, 0.0, ROOT8, 0.0], dtype=torch.float64))
        torch.testing.assert_close(cb.hist["1"].flatten(), torch.tensor([0.0, 3.0, 1.0, 2.0], dtype=torch.float64))
        with torch.no_grad():
            net[1].weight[:, 0] = 3.0  # col0 becomes the most important: instantaneous ranks 3, 2, 0, 1
        _step(cb, 1)  # history (n = 2): h = (0+3, 3+2, 1+0, 2+1)/2 → ranks col2 0, col0 1, col3 2 (tie), col1 3
        torch.testing.assert_close(cb.hist["1"].flatten(), torch.tensor([1.5, 2.5, 0.5, 1.5], dtype=torch.float64))
        expected = {"history": [1 + ROOT8, 0.0, ROOT8 + 1, 0.0], "instantaneous": [lam0, 0.0, ROOT8 + 1, ROOT8]}[
            rank
        ]  # col0 at rank 3: 1 + (1/2 − √2)
        torch.testing.assert_close(cb.lam["1"].flatten(), torch.tensor(expected, dtype=torch.float64))
        assert cb.masks.masks["1"].all()  # nothing reached λ_max = 100
        w = net[1].weight.detach().clone()
        net[1].weight.grad = torch.zeros_like(w)
        cb.regularize(None)  # g += λ_col · w
        torch.testing.assert_close(net[1].weight.grad, w * torch.tensor(expected, dtype=torch.float32))


def test_more_crossings_than_needed_prunes_exactly_the_count():
    net, cb = _tiny(lam=[2.0, 2.0, 2.0, 2.0], lambda_max=1.0)
    _step(cb, 0)  # every λ ≥ 1 after the step (col1: 2 + 1/2 − √2); the layer needs 2: largest λ first
    expected = torch.tensor([3.0, 2.5 - math.sqrt(2), 2 + ROOT8, 2.0], dtype=torch.float64)
    torch.testing.assert_close(cb.lam["1"].flatten(), expected)
    assert groups.group_mask_of(cb.masks.masks["1"], "column").flatten().tolist() == [False, True, False, True]
    assert not net[1].weight[:, [0, 2]].any() and net[1].weight[:, [1, 3]].all()
    assert cb.done and cb.active() == []
    net[1].weight.grad = torch.ones_like(net[1].weight)
    cb.regularize(None)  # a finished layer gets no λ term
    assert torch.equal(net[1].weight.grad, torch.ones_like(net[1].weight))


@pytest.mark.parametrize("granularity, compression", [("column", 2), ("filter", 4)])
def test_exact_group_counts_per_layer(granularity, compression):
    model = LeNet300(image_size=8)
    start = IncRegPruning(compression=compression, granularity=granularity)
    start.bind(copy.deepcopy(model))
    if start.counts_compacted:  # as the core does before start()
        start.example_input = torch.zeros(1, 1, 8, 8)
        start.allocator.calibrate()
    pruning = IncRegPruning(compression=compression, granularity=granularity, ramp=0.1)
    trainer = fit_digits(model, pruning)
    assert pruning.counts == start.allocator.layer_prune_counts()  # the allocator's counts on the starting weights
    assert pruning.done and _pruned_per_layer(pruning) == pruning.counts and sum(pruning.counts.values()) > 0
    total, nonzero = pruning.masks.counts()
    ratio = compacted_ratio(pruning, torch.zeros(1, 1, 8, 8)) if pruning.counts_compacted else total / nonzero
    assert abs(ratio - compression) / compression < 0.02
    assert trainer.callback_metrics["increg/layers_done"] == len(pruning.counts)
    for name, k in pruning.counts.items():
        assert trainer.callback_metrics[f"increg/groups_pruned/{name}"] == k


def _table_compression(net, table):
    """The compression an explicit table of column shares gives on ``net``."""
    layers = {n: m for n, m in net.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    total = sum(m.weight.numel() for m in layers.values())
    zeros = sum(
        round(f * math.prod(groups.group_shape(layers[n].weight, "column")))
        * groups.group_size(layers[n].weight, "column")
        for n, f in table.items()
    )
    return total / (total - zeros)


def test_layer_sparsity_table_sets_the_counts():
    table = {"fc2": 0.5, "fc3": 0.3}  # columns: 300 inputs of fc2, 100 of fc3
    net = LeNet300(image_size=8)
    pruning = IncRegPruning(compression=_table_compression(net, table), layer_sparsity=table, ramp=0.1)
    pruning.validate(net)
    fit_digits(net, pruning, epochs=2)
    assert pruning.counts == {"fc2": 150, "fc3": 30} and _pruned_per_layer(pruning) == pruning.counts
    with pytest.raises(ValueError, match=r"pruning.compression=4 disagrees with pruning.layer_sparsity"):
        IncRegPruning(compression=4, layer_sparsity=table).validate(LeNet300(image_size=8))


@pytest.mark.parametrize("opt", list(OPTIMIZERS))
def test_no_regrowth(opt):
    pruning = IncRegPruning(compression=4, granularity="filter", ramp=0.1)
    watch = ZeroWatch(pruning)
    fit_digits(LeNet300(image_size=8), pruning, OPTIMIZERS[opt], callbacks=[watch], epochs=2)
    assert watch.steps > 15 and watch.violations == 0 and pruning.done
    for name, module in pruning.masks.modules.items():
        assert not module.weight[~pruning.masks.masks[name]].any()


def test_finalize_prunes_the_rest_by_lambda_when_training_ends_first():
    pruning = IncRegPruning(compression=2, ramp=1.0)  # a rank-0 group needs the whole fit to reach λ_max
    fit_digits(LeNet300(image_size=8), pruning, epochs=1)
    assert pruning.done and _pruned_per_layer(pruning) == pruning.counts
    assert abs(compacted_ratio(pruning, torch.zeros(1, 1, 8, 8)) - 2) / 2 < 0.02


def _state(pruning):
    return {
        "lambda": {n: t.clone() for n, t in pruning.lam.items()},
        "hist": {n: t.clone() for n, t in pruning.hist.items()},
        "masks": {n: m.clone() for n, m in pruning.masks.masks.items()},
        "counts": dict(pruning.counts),
        "A": pruning.A,
    }


def _same(a, b):
    for key in ("lambda", "hist", "masks"):
        assert a[key].keys() == b[key].keys() and all(torch.equal(a[key][n], b[key][n]) for n in a[key]), key
    assert (a["counts"], a["A"]) == (b["counts"], b["A"])


@pytest.mark.parametrize("rank", ["history", pytest.param("instantaneous", marks=pytest.mark.slow)])
def test_resume_mid_prune_gives_identical_lambda_ranks_and_masks(tmp_path, rank):
    kwargs = dict(compression=2, ramp=0.15, rank=rank)
    opt = OPTIMIZERS["sgd_momentum"]
    fresh = same_init(lambda: LeNet300(image_size=8))

    full = IncRegPruning(**kwargs)
    fit_digits(fresh(), full, opt, epochs=4)
    first = IncRegPruning(**kwargs)
    with pytest.raises(Killed):
        fit_digits(
            fresh(),
            first,
            opt,
            epochs=4,
            ckpt=True,
            callbacks=[ModelCheckpoint(dirpath=tmp_path, save_last=True), KillAt(2)],
        )
    assert not first.done and sum(_pruned_per_layer(first).values()) > 0  # killed mid-prune
    killed, seen = _state(first), {}
    resumed = IncRegPruning(**kwargs)

    class Peek(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            seen.update(_state(resumed))

    with torch.no_grad():  # weights that would give other counts if they were recomputed on resume
        for m in (net := fresh()).modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.weight.mul_(torch.rand_like(m.weight))
    fit_digits(
        net,
        resumed,
        opt,
        epochs=4,
        callbacks=[Peek(), ModelCheckpoint(dirpath=tmp_path / "b")],
        ckpt_path=tmp_path / "last.ckpt",
        ckpt=True,
    )
    _same(seen, killed)
    _same(_state(resumed), _state(full))
    assert resumed.done and full.done


def test_column_masks_leave_empty_channels_that_compaction_removes():
    torch.manual_seed(0)
    net = LeNet5(image_size=8)
    table = {"conv2": 0.98, "fc1": 0.9, "fc2": 0.9}  # 10 of conv2's 500 columns left: some channels must empty
    pruning = IncRegPruning(compression=_table_compression(net, table), layer_sparsity=table, ramp=0.1)
    watch = ZeroWatch(pruning)
    fit_digits(net, pruning, callbacks=[watch], epochs=2)
    assert watch.violations == 0 and _pruned_per_layer(pruning) == pruning.counts
    live = {n: pruning.live(n) for n in pruning.counts}  # conv2: (20 in-channels, 25), fc1, fc2: (inputs, 1)
    spatial = net.fc1.in_features // net.conv2.out_channels
    expected = {
        "conv1": int((~live["conv2"].any(1)).sum()),  # every column of an input channel pruned
        "conv2": int((~live["fc1"].reshape(-1, spatial).any(1)).sum()),  # fc1 ignores a whole feature map
        "fc1": int((~live["fc2"]).sum()),
    }
    assert all(expected.values())
    result = compact(net.eval(), torch.zeros(1, 1, 8, 8))
    assert result.removed == expected and result.max_abs_diff <= 1e-4
    x = torch.randn(16, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(result.net(x), net(x), atol=1e-4, rtol=0)
    assert result.net.conv1.out_channels == 20 - expected["conv1"]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"granularity": "weight"}, r"pruning.granularity='weight' is not one of: column, filter"),
        ({"granularity": "channel"}, r"pruning.granularity='channel'"),
        ({"lambda_max": 0}, r"pruning.lambda_max=0 must be a number > 0"),
        ({"lambda_max": float("nan")}, r"pruning.lambda_max=nan"),
        ({"ramp": 0.0}, r"pruning.ramp=0.0 must be a number > 0 and <= 1"),
        ({"ramp": 1.5}, r"pruning.ramp=1.5"),
        ({"amplitude": -1e-4}, r"pruning.amplitude=-0.0001"),
        ({"u": 0.5}, r"pruning.u=0.5 must be a number > 0 and < 0.5"),
        ({"rank": "mean"}, r"pruning.rank='mean' is not one of: history, instantaneous"),
        ({"lamda_max": 2}, r"Unknown IncReg option\(s\) \['lamda_max'\]"),
        ({"compression": 0.5}, r"pruning.compression=0.5"),
    ],
)
def test_bad_hyperparameters_name_the_value(kwargs, message):
    with pytest.raises(ValueError, match=message):
        IncRegPruning(**{"compression": 8, **kwargs})


def test_registered_and_bad_config_fails_before_mlflow(make_cfg, tmp_path):
    from conftest import runs_in
    from prunelab.train import train

    assert METHODS["increg"] is IncRegPruning
    with pytest.raises(ValueError, match=r"pruning.ramp=0"):
        train(make_cfg("pruning=increg", "pruning.ramp=0"))
    # columns of the MLP's input are never pruned; a column of fc2 or fc3 takes a unit of the layer before with it:
    # at most fc1 keeps one unit (64 weights), fc2 one weight, fc3 one column (10) of 50,200
    with pytest.raises(ValueError, match=r"compression=1000 .* cannot be reached: .* leaves 669.33× fewer weights"):
        train(make_cfg("pruning=increg", "pruning.compression=1000"))
    assert runs_in(tmp_path) == []
