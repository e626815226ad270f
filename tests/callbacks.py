"""Lightning callbacks and fit helpers shared by the pruning tests."""

from functools import partial

import pytorch_lightning as pl
import torch

from prunelab.data import DigitsDataModule
from prunelab.models.classifier import Classifier

OPTIMIZERS = {
    "sgd_momentum": partial(torch.optim.SGD, lr=0.05, momentum=0.9, weight_decay=5e-4),
    "adam": partial(torch.optim.Adam, lr=1e-3, weight_decay=1e-4),
    "adamw": partial(torch.optim.AdamW, lr=1e-3, weight_decay=1e-2),
}


def fit_digits(
    net,
    pruning,
    optimizer=OPTIMIZERS["adam"],
    epochs=3,
    callbacks=(),
    ckpt_path=None,
    ckpt=False,
    seed=0,
    scheduler=None,
    **trainer_kwargs,
):
    """Seeds, then fits ``Classifier(net)`` on the digits (batch 128, CPU) with ``pruning``; returns the trainer."""
    pl.seed_everything(seed, workers=True)
    trainer = pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=ckpt,
        callbacks=[pruning, *callbacks],
        num_sanity_val_steps=0,
        **trainer_kwargs,
    )
    trainer.fit(
        Classifier(net, 10, optimizer=optimizer, scheduler=scheduler),
        datamodule=DigitsDataModule(batch_size=128),
        ckpt_path=ckpt_path,
    )
    return trainer


def same_init(model_fn, seed=0):
    """A factory of fresh ``model_fn()`` models, all with the weights ``model_fn`` gives right after ``seed``."""
    torch.manual_seed(seed)
    init = model_fn().state_dict()

    def fresh():
        net = model_fn()
        net.load_state_dict(init)
        return net

    return fresh


def dead_rows(pruning, name: str) -> torch.Tensor:
    """Output filters/neurons of layer ``name`` whose whole weight row is pruned."""
    mask = pruning.masks.masks[name]
    return ~mask.reshape(mask.shape[0], -1).any(1)


@torch.no_grad()
def compacted_ratio(pruning, example: torch.Tensor) -> float:
    """Prunable weights of the dense network / those left once the masked network is compacted: the ratio a
    ``filter``/``channel`` method must reach."""
    from prunelab.measure import compact
    from prunelab.measure.sparsity import layer_table

    names = list(pruning.masks.modules)
    dense = sum(m.weight.numel() for m in pruning.masks.modules.values())
    net = pruning.net
    training = net.training
    compacted = compact(net.eval(), example.to(next(net.parameters()).device)).net
    net.train(training)
    return dense / sum(row["nonzero"] for row in layer_table(compacted, names))


def achieved(pruning) -> float:
    """The compression a method is held to: on the compacted model for structured granularities (the input shape
    the callback took from the datamodule), else prunable weights / nonzero ones."""
    if pruning.counts_compacted:
        return compacted_ratio(pruning, pruning.example_input)
    total, nonzero = pruning.masks.counts()
    return total / nonzero


def pruned_values(pruning) -> list[torch.Tensor]:
    """Every value pruning must hold at zero: masked weights and the dependents (bias, BN γ/β) of dead filters."""
    values = [m.weight[~pruning.masks.masks[n]] for n, m in pruning.masks.modules.items()]
    for name, deps in pruning.masks.dependents.items():
        values += [getattr(owner, p)[dead_rows(pruning, name)] for owner, p in deps]
    return values


class ZeroWatch(pl.Callback):
    """Counts pruned values that are nonzero right after an optimizer step, before any re-masking."""

    def __init__(self, pruning) -> None:
        self.pruning, self.steps, self.violations = pruning, 0, 0

    def on_train_start(self, trainer, pl_module):
        trainer.optimizers[0].register_step_post_hook(self._check)

    def _check(self, optimizer, args, kwargs):
        self.steps += 1
        self.violations += sum(int(v.count_nonzero()) for v in pruned_values(self.pruning))


class Killed(RuntimeError):
    """What a killed job looks like to the test."""


class KillAt(pl.Callback):
    """Dies at the start of ``epoch``, after the previous epoch's checkpoint was written."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == self.epoch:
            raise Killed
