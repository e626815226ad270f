"""C-OBD and Kron-OBD filter pruning: saliencies are the OBD quadratic forms, the target is met (in one or several
rounds), resume between rounds, bad input."""

from functools import partial

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from torch import nn

from callbacks import KillAt, Killed, achieved, dead_rows, fit_digits, same_init
from prunelab.data import DigitsDataModule
from prunelab.measure import measure
from prunelab.models import LeNet5
from prunelab.models.classifier import Classifier
from prunelab.pruning import OBDPruning, kfac


class Recording(OBDPruning):
    """Keeps the saliencies it pruned by."""

    def saliencies(self, trainer):
        self.seen = super().saliencies(trainer)
        return self.seen


def _fit(net, pruning, epochs=1):
    pl.seed_everything(0, workers=True)
    trainer = pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        callbacks=[pruning],
        num_sanity_val_steps=0,
        limit_train_batches=4,
        limit_val_batches=1,
    )
    trainer.fit(
        Classifier(net, 10, optimizer=partial(torch.optim.Adam, lr=1e-3)), datamodule=DigitsDataModule(batch_size=128)
    )


def test_kron_saliency_is_half_the_kronecker_quadratic_form_of_a_removed_row():
    torch.manual_seed(0)
    layer = nn.Linear(4, 3).double()
    net = nn.Sequential(layer, nn.ReLU(), nn.Linear(3, 2)).double()
    x, y = torch.randn(9, 4, dtype=torch.float64), torch.randint(0, 2, (9,))
    f = kfac.collect_factors(net, {"0": layer}, [(x, y)], patch=False, fisher_type="empirical")["0"]
    fisher = torch.kron(f.A, f.G)  # vec(W̄) stacks columns: index (input j, output n) → j·N + n
    w_bar = torch.cat([layer.weight, layer.bias[:, None]], 1).detach()
    cb = OBDPruning(compression=2, criterion="kron", fisher_type="empirical")
    cb.bind(net)

    class Trainer:  # the two things saliencies() reads from a trainer
        lightning_module = Classifier(net, 2)
        datamodule = type("DM", (), {"train_dataloader": staticmethod(lambda: [(x, y)])})()
        precision_plugin = None

    got = cb.saliencies(Trainer())["0"]
    for n in range(3):
        delta = torch.zeros_like(w_bar)
        delta[n] = -w_bar[n]
        vec = delta.T.reshape(-1)
        assert got[n].item() == pytest.approx(0.5 * (vec @ fisher @ vec).item(), rel=1e-9)


@pytest.mark.parametrize("criterion, scope", [("diagonal", "lamp"), ("kron", "lamp"), ("diagonal", "global")])
def test_lowest_saliency_filters_go_and_the_target_is_met(criterion, scope):
    torch.manual_seed(0)
    net, dense = LeNet5(image_size=8), LeNet5(image_size=8)
    pruning = Recording(compression=4, criterion=criterion, fisher_batches=3, scope=scope)
    _fit(net, pruning)
    total, nonzero = pruning.masks.counts()
    assert total / nonzero < 3.9 and pruning.done  # the masks leave the weights that read pruned filters
    assert not dead_rows(pruning, "fc2").any()  # the classifier's outputs stay
    for name in ("conv1", "conv2", "fc1"):
        dead, scores = dead_rows(pruning, name), pruning.seen[name]
        if dead.any() and (~dead).any():
            assert scores[dead].max() <= scores[~dead].min()  # within a layer, the global ranking's order holds
    metrics, _, _ = measure(net, dense, pruning.layer_names, torch.zeros(1, 1, 8, 8))
    assert abs(metrics["compression_compacted"] - 4) / 4 < 0.02  # counted once compaction removed them too
    assert pruning.reached == pytest.approx(metrics["compression_compacted"])


class Rounds(OBDPruning):
    """Records the step, the compacted ratio and the dead filters after every pruning round."""

    rounds_seen: list

    def before_batch(self, trainer, pl_module):
        pruned_before = self.current_sparsity
        super().before_batch(trainer, pl_module)
        if self.current_sparsity != pruned_before:
            dead = {n: dead_rows(self, n).clone() for n in self.masks.modules}
            self.rounds_seen.append((trainer.global_step, achieved(self), dead))


def test_rounds_prune_geometrically_on_fresh_saliencies_and_end_at_the_ratio():
    torch.manual_seed(0)
    pruning = Rounds(compression=8, rounds=3, prune_fraction=0.5, fisher_batches=2)
    pruning.rounds_seen = []
    fit_digits(LeNet5(image_size=8), pruning, epochs=2, limit_train_batches=6)  # 12 steps, rounds at 0, 2, 4
    steps, ratios, deads = zip(*pruning.rounds_seen)
    assert steps == (0, 2, 4)
    for ratio, want in zip(ratios, (2, 4, 8)):  # round r of 3 reaches 8^(r/3) on the compacted model
        assert abs(ratio - want) / want < 0.05
    assert abs(achieved(pruning) - 8) / 8 < 0.02 and pruning.done
    for earlier, later in zip(deads, deads[1:]):  # a filter pruned in one round stays pruned
        assert all((later[n] | ~earlier[n]).all() for n in earlier)


def test_one_round_is_the_one_shot_prune_at_the_first_step():
    torch.manual_seed(0)
    pruning = Rounds(compression=4, rounds=1, fisher_batches=2)
    pruning.rounds_seen = []
    fit_digits(LeNet5(image_size=8), pruning, epochs=1, limit_train_batches=4)
    assert [step for step, _, _ in pruning.rounds_seen] == [0]
    assert abs(achieved(pruning) - 4) / 4 < 0.02


@pytest.mark.slow  # the contract suite (test_core_contract.py) resumes every method in the default run
def test_resume_between_rounds_gives_identical_masks(tmp_path):
    kwargs = dict(compression=8, rounds=4, prune_fraction=0.8, fisher_batches=2)
    fresh = same_init(lambda: LeNet5(image_size=8))
    full = OBDPruning(**kwargs)
    fit_digits(fresh(), full, epochs=4)

    first = OBDPruning(**kwargs)
    with pytest.raises(Killed):
        fit_digits(
            fresh(),
            first,
            epochs=4,
            callbacks=[ModelCheckpoint(dirpath=tmp_path, save_last=True), KillAt(2)],
            ckpt=True,
        )
    assert first.current_sparsity > 0 and not first.done  # killed between two rounds
    resumed = OBDPruning(**kwargs)
    fit_digits(
        fresh(),
        resumed,
        epochs=4,
        callbacks=[ModelCheckpoint(dirpath=tmp_path / "b")],
        ckpt_path=tmp_path / "last.ckpt",
        ckpt=True,
    )
    assert all(torch.equal(full.masks.masks[n], resumed.masks.masks[n]) for n in full.masks.masks)
    assert resumed.done and resumed.final_sparsity == full.final_sparsity


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(rounds=0), r"pruning.rounds=0 must be an integer >= 1"),
        (dict(prune_fraction=0.0), r"pruning.prune_fraction=0.0 must be a number > 0 and <= 1"),
        (dict(criterion="full"), r"pruning.criterion='full' is not one of: diagonal, kron"),
        (dict(granularity="weight"), r"Unknown OBD option\(s\) \['granularity'\]"),
        (dict(fisher_batches=0), r"pruning.fisher_batches=0 must be an integer >= 1"),
    ],
)
def test_bad_input_is_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        OBDPruning(compression=4, **kwargs)
