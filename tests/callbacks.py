"""Lightning callbacks shared by the pruning tests."""

import pytorch_lightning as pl
import torch


def dead_rows(pruning, name: str) -> torch.Tensor:
    """Output filters/neurons of layer ``name`` whose whole weight row is pruned."""
    mask = pruning.masks.masks[name]
    return ~mask.reshape(mask.shape[0], -1).any(1)


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
