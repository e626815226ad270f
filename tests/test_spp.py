"""SPP: p by hand, exact counts, transient drops restored, no regrowth, reproducible masks, resume, bad input."""

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from torch import nn

from callbacks import OPTIMIZERS, KillAt, Killed, ZeroWatch, compacted_ratio, fit_digits, same_init
from prunelab.measure import compact
from prunelab.models import LeNet5, LeNet300
from prunelab.pruning import METHODS, SPPPruning

FAST = dict(A=0.5)  # 11 steps per epoch on digits at batch 128: every layer done in about 2 epochs


def _tiny(rows_l1=(5.0, 1.0, 4.0, 2.0, 3.0)):
    """Linear(3→5) whose filters have the given L1 norms, then a classifier; SPP prunes 3 of the 5 filters."""
    net = nn.Sequential(nn.Linear(3, len(rows_l1)), nn.Linear(len(rows_l1), 2))
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor(rows_l1)[:, None] / 3 * torch.tensor([1.0, -1.0, 1.0]))
    spp = SPPPruning(compression=1.5, granularity="filter", layer_sparsity={"0": 0.6}, A=0.4, prune_interval=1)
    spp.bind(net)
    trainer = type("T", (), {"global_step": 0, "estimated_stepping_batches": 100, "optimizers": []})()
    spp.start(trainer)
    logged = {}
    module = type("M", (), {"log": lambda self, k, v, **kw: logged.__setitem__(k, v)})()
    return net, spp, trainer, module, logged


def test_p_update_by_hand_on_a_tiny_layer():
    net, spp, trainer, module, logged = _tiny()
    assert spp.counts == {"0": 3}
    # N_p = 3, u = 1/4: α = ln 2, N₁ = 2, Δ(r) = A·[1, 1/2, 1/4, 0, −1/2] for r = 0…4; L1 5,1,4,2,3 → ranks 4,0,3,1,2
    spp.p["0"].copy_(torch.tensor([0.3, 0.7, 0.05, 0.5, 0.95], dtype=torch.float64))
    spp.before_batch(trainer, module)
    torch.testing.assert_close(spp.p["0"], torch.tensor([0.1, 1.0, 0.05, 0.7, 1.0], dtype=torch.float64))
    assert torch.equal(spp.live("0"), torch.tensor([True, False, True, True, False]))  # both at p = 1 pruned
    assert not net[0].weight[[1, 4]].any() and not net[0].bias[[1, 4]].any() and net[0].weight[[0, 2, 3]].all()
    assert logged["spp/groups_pruned/0"] == 2 and logged["spp/layers_done"] == 0
    # N_p = 1: α = ln 8, N₁ = 2/3; live L1 2, 4, 5 → ranks 0, 1, 2: Δ = A·[1, 0, −3.5]
    trainer.global_step = 1
    spp.before_batch(trainer, module)
    torch.testing.assert_close(spp.p["0"], torch.tensor([0.0, 1.0, 0.05, 1.0, 1.0], dtype=torch.float64))
    assert spp.pruned_count("0") == 3 and spp.done and spp.finished_at == {"0": 1}
    assert logged["spp/layers_done"] == 1 and spp.transient_masks(trainer) is None  # deterministic from here


def test_history_score_decays():
    net, spp, trainer, module, _ = _tiny()
    spp.score_decay = 0.5
    spp.before_batch(trainer, module)
    spp.prune_interval = spp.interval = 2
    trainer.global_step = 1
    spp.before_batch(trainer, module)  # no update at step 1: only the score moves
    l1 = net[0].weight.abs().sum(1).double() * spp.live("0")
    torch.testing.assert_close(spp.score["0"], torch.tensor([5.0, 1.0, 4.0, 2.0, 3.0], dtype=torch.float64) * 0.5 + l1)


def test_never_prunes_more_than_the_layer_needs():
    _, spp, trainer, module, _ = _tiny()
    spp.p["0"].fill_(1.0)  # every group at p = 1 (Δ(3) = 0 keeps rank 3 there): only the 3 lowest ranks go
    spp.before_batch(trainer, module)
    assert torch.equal(spp.live("0"), torch.tensor([True, False, True, False, False]))
    assert spp.done


def test_finalize_prunes_highest_p_then_lowest_score():
    _, spp, trainer, module, _ = _tiny()
    spp.score["0"].copy_(torch.tensor([5.0, 1.0, 4.0, 2.0, 3.0], dtype=torch.float64))
    spp.p["0"].copy_(torch.tensor([0.9, 0.2, 0.9, 0.1, 0.2], dtype=torch.float64))
    spp.finalize(trainer)  # p ties broken by score: 0.9 (4.0), 0.9 (5.0), then 0.2 (1.0)
    assert torch.equal(spp.live("0"), torch.tensor([False, False, False, True, True])) and spp.done


def _counts(pruning, net):
    fresh = SPPPruning(
        compression=pruning.compression,
        granularity=pruning.granularity,
        scope=pruning.scope,
        layer_sparsity=pruning.layer_sparsity,
    )
    fresh.bind(net)
    if fresh.counts_compacted and not fresh.layer_sparsity:  # as the core does before start()
        fresh.example_input = torch.zeros(1, 1, 8, 8)
        fresh.allocator.calibrate()
    return fresh.allocator.layer_prune_counts()


def _removable(pruning) -> dict[str, int]:
    """Channels of LeNet-5 (8×8 input) that the masks leave empty: a dead filter's output (its bias was zeroed with
    it), or an input channel that no live column of the next layer reads."""
    masks = pruning.masks.masks
    if pruning.granularity == "filter":
        return {n: int((~masks[n].flatten(1).any(1)).sum()) for n in ("conv1", "conv2", "fc1")}
    unread = {
        n: int((~masks[n].reshape(masks[n].shape[0], c, -1).any(2).any(0)).sum())
        for n, c in (("conv2", 20), ("fc1", 50), ("fc2", 500))
    }  # fc1 reads conv2's 50 channels × 2×2
    return {"conv1": unread["conv2"], "conv2": unread["fc1"], "fc1": unread["fc2"]}


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(granularity="column", scope="lamp"),
        dict(granularity="filter", scope="layer", mask_mode="element", score_decay=0.9),
        dict(granularity="filter", layer_sparsity={"conv1": 0.5, "conv2": 0.75, "fc1": 0.9}, increment="linear"),
    ],
)
def test_exact_group_counts_and_compacted_channels(kwargs):
    torch.manual_seed(0)
    net = LeNet5(image_size=8)
    pruning = SPPPruning(compression=6, **FAST, **kwargs)
    expected = _counts(pruning, net)
    fit_digits(net, pruning, epochs=4)
    assert pruning.done and pruning.counts == expected and pruning.prune_end_fraction() < 1  # ended by itself
    assert {n: pruning.pruned_count(n) for n in expected} == expected
    if "layer_sparsity" not in kwargs:
        total, nonzero = pruning.masks.counts()
        ratio = compacted_ratio(pruning, torch.zeros(1, 1, 8, 8)) if pruning.counts_compacted else total / nonzero
        assert abs(ratio - 6) / 6 < 0.02
    # the existing compaction removes exactly the emptied channels, and the logits stay (compact checks them)
    dead = _removable(pruning)
    assert sum(dead.values()) > 0
    result = compact(net.eval(), torch.zeros(1, 1, 8, 8))
    kept = {
        "conv1": result.net.conv1.out_channels,
        "conv2": result.net.conv2.out_channels,
        "fc1": result.net.fc1.out_features,
    }
    assert kept == {"conv1": 20 - dead["conv1"], "conv2": 50 - dead["conv2"], "fc1": 500 - dead["fc1"]}


def test_target_macs_sets_the_layer_counts():
    from prunelab.measure import count_macs
    from prunelab.pruning.macs_target import masked_copy

    torch.manual_seed(0)
    net, example = LeNet300(image_size=8).eval(), torch.zeros(1, 1, 8, 8)
    spp = SPPPruning(compression=3, granularity="filter", target="macs")
    spp.validate(net, example)
    spp.bind(net)
    spp.allocator.calibrate()  # as the core does before start() under target=macs
    spp.start(type("T", (), {"estimated_stepping_batches": 100, "optimizers": []})())
    spp.finalize(None)  # prune the counts (filters' MACs depend only on how many go per layer)
    pruned = compact(masked_copy(net, spp.masks.masks, spp.masks.dependents), example).net
    reduction = count_macs(net, example) / count_macs(pruned, example)
    assert reduction == pytest.approx(spp.allocator.macs_reduction) and abs(reduction - 3) / 3 < 0.02


@pytest.mark.parametrize("opt", list(OPTIMIZERS))
def test_no_regrowth_while_pruning_and_after(opt):
    pruning = SPPPruning(compression=10, granularity="filter", **FAST)
    watch = ZeroWatch(pruning)
    fit_digits(LeNet300(image_size=8), pruning, OPTIMIZERS[opt], callbacks=[watch])
    assert watch.steps > 30 and watch.violations == 0
    assert pruning.done and 0.2 < pruning.prune_end_fraction() < 1  # pruned while training, then fine-tuned
    assert abs(compacted_ratio(pruning, torch.zeros(1, 1, 8, 8)) - 10) / 10 < 0.02


class Recorder(SPPPruning):
    """SPP that records, at every step, the weights before the drop, its keep-masks, and the weights after."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.steps = []

    def transient_masks(self, trainer):
        keep = super().transient_masks(trainer)
        if keep:
            self.steps.append(({n: m.weight.detach().clone() for n, m in self.masks.modules.items()}, keep))
        return keep

    def after_step(self, trainer):
        if self.steps and len(self.steps[-1]) == 2:
            self.steps[-1] += ({n: m.weight.detach().clone() for n, m in self.masks.modules.items()},)


@pytest.mark.parametrize("mask_mode", ["group", "element"])
def test_dropped_weights_come_back_bit_identical(mask_mode):
    pruning = Recorder(compression=8, granularity="filter", mask_mode=mask_mode, **FAST)
    seen_in_eval = []

    class Eval(pl.Callback):  # validation sees the deterministic mask: no drop, zeros exactly the pruned weights
        def on_validation_batch_start(self, trainer, pl_module, *args):
            seen_in_eval.append(
                not pruning.masks.transient
                and all(torch.equal(m.weight != 0, pruning.masks.masks[n]) for n, m in pruning.masks.modules.items())
            )

    fit_digits(LeNet300(image_size=8), pruning, callbacks=[Eval()], epochs=2)
    dropped_total = 0
    for before, keep, after in pruning.steps:
        for n, k in keep.items():
            live = pruning.masks.masks[n]  # the final mask: anything pruned later is zero here, compare the rest
            dropped = ~k & before[n].ne(0) & live
            assert torch.equal(after[n][dropped], before[n][dropped])
            dropped_total += int(dropped.sum())
    assert dropped_total > 0 and seen_in_eval and all(seen_in_eval)


def test_masks_reproducible_from_the_saved_state():
    torch.manual_seed(0)
    net = LeNet5(image_size=8)
    spp = SPPPruning(compression=6, **FAST)
    spp.bind(net)
    trainer = type("T", (), {"global_step": 0, "estimated_stepping_batches": 50, "optimizers": []})()
    spp.start(trainer)
    for name in spp.counts:
        spp.p[name].uniform_(0.0, 0.9)
    spp.transient_masks(trainer)
    state = spp.state_dict()
    ahead = [spp.transient_masks(trainer) for _ in range(3)]
    again = SPPPruning(compression=6, **FAST)
    again.bind(net)
    again.load_state_dict(state)
    again.start(trainer)  # a resumed start keeps the loaded counts, p and generator
    for mine, theirs in zip(ahead, [again.transient_masks(trainer) for _ in range(3)]):
        assert mine.keys() == theirs.keys() and all(torch.equal(mine[n], theirs[n]) for n in mine)
    assert any(not k.all() for k in ahead[0].values())  # something is dropped


@pytest.mark.slow  # the contract suite (test_core_contract.py) resumes every method in the default run
def test_resume_mid_prune_gives_identical_p_and_masks(tmp_path):
    kwargs = dict(compression=20, granularity="filter", A=0.08, prune_interval=1, score_decay=0.9)
    fresh = same_init(lambda: LeNet300(image_size=8))

    full = SPPPruning(**kwargs)
    fit_digits(fresh(), full, epochs=4)
    first = SPPPruning(**kwargs)
    with pytest.raises(Killed):
        fit_digits(
            fresh(),
            first,
            epochs=4,
            ckpt=True,
            callbacks=[ModelCheckpoint(dirpath=tmp_path, save_last=True), KillAt(2)],
        )
    assert not first.done and any(first.pruned_count(n) for n in first.counts)  # killed mid-prune
    saved = {k: {n: t.clone() for n, t in d.items()} for k, d in first.layer_tensors().items()}
    resumed, seen = SPPPruning(**kwargs), {}

    class Peek(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            seen.update({k: {n: t.clone() for n, t in d.items()} for k, d in resumed.layer_tensors().items()})
            seen["gen"] = resumed.gen.get_state()

    fit_digits(
        fresh(),
        resumed,
        epochs=4,
        callbacks=[Peek(), ModelCheckpoint(dirpath=tmp_path / "b")],
        ckpt_path=tmp_path / "last.ckpt",
        ckpt=True,
    )
    for k in saved:
        assert all(torch.equal(seen[k][n], saved[k][n]) for n in saved[k])
    assert torch.equal(seen["gen"], first.gen.get_state())
    for n in full.counts:
        assert torch.equal(full.masks.masks[n], resumed.masks.masks[n])
        assert torch.equal(full.p[n], resumed.p[n]) and torch.equal(full.score[n], resumed.score[n])
    assert full.finished_at == resumed.finished_at and full.done and resumed.done


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"granularity": "weight"}, r"pruning.granularity='weight' is not one of: column, filter"),
        ({"granularity": "2:4"}, r"pruning.granularity='2:4'"),
        ({"A": 0}, r"pruning.A=0 must be a number > 0 and <= 1"),
        ({"A": 1.5}, r"pruning.A=1.5"),
        ({"u": 0.5}, r"pruning.u=0.5 must be a number > 0 and < 0.5"),
        ({"prune_interval": 0}, r"pruning.prune_interval=0 must be an integer >= 1"),
        ({"prune_interval": 2.5}, r"pruning.prune_interval=2.5"),
        ({"prune_fraction": 0}, r"pruning.prune_fraction=0"),
        ({"mask_mode": "row"}, r"pruning.mask_mode='row' is not one of: group, element"),
        ({"score_decay": 1.0}, r"pruning.score_decay=1.0 must be a number >= 0 and < 1"),
        ({"increment": "cubic"}, r"pruning.increment='cubic' is not one of: exponential, linear"),
        ({"AA": 0.05}, r"Unknown SPP option\(s\) \['AA'\]"),
    ],
)
def test_bad_hyperparameters_name_the_value(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SPPPruning(compression=8, **kwargs)


def test_bad_value_in_config_fails_before_any_run(make_cfg, tmp_path):
    from conftest import runs_in
    from prunelab.train import train

    with pytest.raises(ValueError, match=r"pruning.mask_mode='rows'"):
        train(make_cfg("pruning=spp", "pruning.mask_mode=rows"))
    assert runs_in(tmp_path) == []


def test_train_records_spp_curves_in_mlflow(make_cfg, tmp_path):
    import mlflow

    from conftest import runs_in
    from prunelab.train import train

    assert METHODS["spp"] is SPPPruning
    metrics = train(make_cfg("pruning=spp", "pruning.compression=4", "pruning.granularity=filter"))
    assert abs(metrics["compression"] - 4) / 4 < 0.02
    (run,) = runs_in(tmp_path)
    assert run.data.params["method"] == "spp"
    keys = ["spp/layers_done", "spp/prune_end_fraction", "spp/groups_pruned/fc1", "spp/mean_p/fc2", "train/sparsity"]
    history = {k: mlflow.MlflowClient().get_metric_history(run.info.run_id, k) for k in keys}
    assert all(history.values()), {k: len(v) for k, v in history.items()}
    assert history["spp/layers_done"][-1].value == 2  # fc1 and fc2 (the classifier keeps its outputs)
