"""Magnitude pruning inside a real Lightning fit: exact targets, no regrowth, bit-identical resume."""

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint

from callbacks import OPTIMIZERS, KillAt, Killed, ZeroWatch, compacted_ratio, fit_digits, same_init
from prunelab.models import LeNet5, LeNet300
from prunelab.pruning import MagnitudePruning


@pytest.mark.parametrize("opt", list(OPTIMIZERS))
@pytest.mark.parametrize("mode", ["one_shot", "gradual"])
def test_pruned_weights_stay_zero_after_every_step(opt, mode):
    pruning = MagnitudePruning(compression=10, mode=mode, frequency=3, prune_fraction=0.5)
    watch = ZeroWatch(pruning)
    fit_digits(LeNet300(image_size=8), pruning, OPTIMIZERS[opt], callbacks=[watch])
    assert watch.steps > 20 and watch.violations == 0
    total, nonzero = pruning.masks.counts()
    assert abs(total / nonzero - 10) / 10 < 0.02
    # the masks are the weights' own zeros: nothing pruned came back, nothing unpruned is counted as pruned
    for name, module in pruning.masks.modules.items():
        assert not module.weight[~pruning.masks.masks[name]].any()


@pytest.mark.parametrize("granularity", ["filter", "channel", "column"])
def test_structured_modes_reach_target_in_training(granularity):
    pruning = MagnitudePruning(compression=4, mode="iterative", rounds=3, granularity=granularity)
    fit_digits(LeNet5(image_size=8), pruning, OPTIMIZERS["sgd_momentum"], epochs=3)
    total, nonzero = pruning.masks.counts()
    # counted once compaction removed the emptied channels and the weights that read or fed them
    assert total / nonzero < 3.9
    assert abs(compacted_ratio(pruning, torch.zeros(1, 1, 8, 8)) - 4) / 4 < 0.02
    assert pruning.done


def _masks(pruning):
    return {n: m.clone() for n, m in pruning.masks.masks.items()}


@pytest.mark.slow  # the contract suite (test_core_contract.py) resumes every method in the default run
def test_resume_mid_prune_gives_bit_identical_masks(tmp_path):
    kwargs = dict(compression=20, mode="gradual", frequency=2, prune_fraction=0.8)
    opt = OPTIMIZERS["sgd_momentum"]
    fresh = same_init(lambda: LeNet300(image_size=8))

    full = MagnitudePruning(**kwargs)
    fit_digits(fresh(), full, opt, epochs=4)

    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    first = MagnitudePruning(**kwargs)
    with pytest.raises(Killed):
        fit_digits(fresh(), first, opt, epochs=4, callbacks=[ckpt, KillAt(2)], ckpt=True)
    assert 0 < first.current_sparsity < first.final_sparsity  # killed in the middle of the schedule
    saved = _masks(first)
    stored = torch.load(tmp_path / "last.ckpt", weights_only=False)["callbacks"][first.state_key]
    assert all(torch.equal(stored["masks"][n], saved[n]) for n in saved)

    resumed = MagnitudePruning(**kwargs)
    seen = {}

    class Peek(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            seen.update(_masks(resumed))

    fit_digits(
        fresh(),
        resumed,
        opt,
        epochs=4,
        callbacks=[Peek(), ModelCheckpoint(dirpath=tmp_path / "b")],
        ckpt_path=tmp_path / "last.ckpt",
        ckpt=True,
    )
    assert all(torch.equal(seen[n], saved[n]) for n in saved)  # state restored before training goes on
    final_full, final_resumed = _masks(full), _masks(resumed)
    assert all(torch.equal(final_full[n], final_resumed[n]) for n in final_full)
    assert resumed.current_sparsity == full.current_sparsity == full.final_sparsity


def test_layer_scope_prunes_every_layer_alike():
    pruning = MagnitudePruning(compression=5, mode="one_shot", scope="layer")
    fit_digits(LeNet300(image_size=8), pruning, OPTIMIZERS["adam"], epochs=1)
    for mask in pruning.masks.masks.values():
        assert abs((~mask).float().mean().item() - 0.8) < 0.01
