"""Classifier: a non-finite training loss fails the fit with the step it went bad at, checked without a host sync
per step where checks are deferred."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from prunelab.models.classifier import Classifier, NonFiniteLossError


class NaNAtCall(nn.Module):
    """A linear layer whose output turns NaN from its ``bad``-th forward call (0-based) on."""

    def __init__(self, bad: int) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.bad, self.calls = bad, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        out = self.fc(x)
        return out * float("nan") if self.calls > self.bad else out


def _fit(net: nn.Module, nan_check_every: int | None, batches: int = 6) -> Classifier:
    data = DataLoader(TensorDataset(torch.randn(4 * batches, 4), torch.randint(0, 3, (4 * batches,))), batch_size=4)
    module = Classifier(
        net, 3, optimizer=lambda params: torch.optim.SGD(params, lr=0.1), nan_check_every=nan_check_every
    )
    trainer = pl.Trainer(
        max_epochs=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, train_dataloaders=data)
    return module


@pytest.mark.parametrize(
    "every, seen",
    [(None, 2), (1, 2), (4, 4), (100, 6)],  # CPU default: at once; every 4 steps; otherwise at the epoch's end
)
def test_nonfinite_loss_names_the_step_it_went_bad(every, seen):
    net = NaNAtCall(bad=2)
    with pytest.raises(NonFiniteLossError, match=rf"training loss is nan at step 2 of epoch 0 \(seen at step {seen}\)"):
        _fit(net, every)
    assert net.calls == (3 if seen == 2 else seen)  # no step ran after the one that saw it


def test_finite_training_is_not_interrupted():
    module = _fit(NaNAtCall(bad=10**6), nan_check_every=4)
    assert module.trainer.global_step == 12


@pytest.mark.parametrize("every", [0, -1, True])
def test_bad_check_interval(every):
    with pytest.raises(ValueError, match="nan_check_every"):
        Classifier(nn.Linear(4, 3), 3, nan_check_every=every)
