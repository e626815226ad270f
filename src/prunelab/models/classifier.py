"""The one LightningModule: a network, cross-entropy, torchmetrics accuracy, optimizer/scheduler from config."""

from __future__ import annotations

from collections.abc import Callable

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from prunelab.models import architecture

GPU_NAN_CHECK_EVERY = 50  # steps between host reads of the non-finite-loss record on an accelerator


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite."""


class Classifier(pl.LightningModule):
    """Image classifier around ``net``.

    A non-finite training loss fails the fit with :class:`NonFiniteLossError`. Checking it needs the loss on the
    host, which on a GPU waits for the step to finish, so the check is deferred: every step only records on the
    device the first step whose loss was not finite, and the host reads that record every ``nan_check_every``
    steps and at the end of each epoch. The error names the step where the loss went bad and the step it was seen.

    Args:
        net: the network (its Conv2d/Linear layers are what pruning acts on).
        num_classes: number of classes, for the accuracy metrics.
        optimizer: ``params -> Optimizer`` (a Hydra ``_partial_`` config).
        scheduler: ``optimizer -> LRScheduler`` stepped once per epoch, or ``None``.
        nan_check_every: steps between host checks of the loss; ``None``: every step on the CPU (a check costs
            nothing there), every ``GPU_NAN_CHECK_EVERY`` steps on an accelerator.
    """

    def __init__(
        self,
        net: nn.Module,
        num_classes: int,
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        scheduler: Callable[..., torch.optim.lr_scheduler.LRScheduler] | None = None,
        nan_check_every: int | None = None,
    ) -> None:
        super().__init__()
        if nan_check_every is not None and (isinstance(nan_check_every, bool) or int(nan_check_every) < 1):
            raise ValueError(f"nan_check_every={nan_check_every!r} must be None or an integer >= 1")
        self.net = net
        self.nan_check_every = nan_check_every
        self._bad_loss: torch.Tensor | None = None  # [step, loss] of the first non-finite loss; step -1: none yet
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        # validate_args=False: torchmetrics' input check calls torch.unique, a host sync every step on a GPU
        self.train_acc = MulticlassAccuracy(num_classes=num_classes, average="micro", validate_args=False)
        self.val_acc = MulticlassAccuracy(num_classes=num_classes, average="micro", validate_args=False)
        self.test_acc = MulticlassAccuracy(num_classes=num_classes, average="micro", validate_args=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        self._note_nonfinite(loss.detach())
        if self._check_every() == 1:
            self._check_finite()  # before the optimizer step sees the loss
        self.train_acc(logits, y)
        self.log("train/loss", loss, on_step=False, on_epoch=True, prog_bar=True, sync_dist=True)
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True)
        return loss

    def _note_nonfinite(self, loss: torch.Tensor) -> None:
        """Keep [step, loss] of the first non-finite loss, on the loss's device (no host sync)."""
        if self._bad_loss is None or self._bad_loss.device != loss.device:
            self._bad_loss = torch.tensor([-1.0, 0.0], device=loss.device)
        now = torch.stack([torch.full_like(loss, self.global_step, dtype=torch.float32), loss.float()])
        first = (self._bad_loss[0] < 0) & ~torch.isfinite(loss)
        self._bad_loss = torch.where(first, now, self._bad_loss)

    def _check_finite(self) -> None:
        """Raise :class:`NonFiniteLossError` if a non-finite loss was noted (reads the device record: a sync)."""
        if self._bad_loss is None:
            return
        step, loss = self._bad_loss.tolist()
        if step >= 0:
            self._bad_loss = None
            raise NonFiniteLossError(
                f"training loss is {loss} at step {int(step)} of epoch {self.current_epoch} (seen at step "
                f"{self.global_step})"
            )

    def _check_every(self) -> int:
        return self.nan_check_every or (1 if self.device.type == "cpu" else GPU_NAN_CHECK_EVERY)

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        if self._check_every() > 1 and (batch_idx + 1) % self._check_every() == 0:
            self._check_finite()

    def on_validation_start(self) -> None:
        self._check_finite()  # before validation and the checkpoint it triggers

    def on_train_epoch_end(self) -> None:
        self._check_finite()

    def validation_step(self, batch, batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.val_acc(logits, y)
        self.log("val/loss", F.cross_entropy(logits, y), on_epoch=True, sync_dist=True)
        self.log("val/acc", self.val_acc, on_epoch=True, prog_bar=True)

    def test_step(self, batch, batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.test_acc(logits, y)
        self.log("test/acc", self.test_acc, on_epoch=True)

    def configure_optimizers(self):
        if self.optimizer_factory is None:
            raise ValueError("Classifier needs an optimizer factory to train")
        optimizer = self.optimizer_factory(params=self.parameters())
        if self.scheduler_factory is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": self.scheduler_factory(optimizer=optimizer)}}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Put the network's replaced layers (if any) into the checkpoint, as data."""
        description = architecture.describe(self.net)
        if description["bottlenecks"]:
            checkpoint[architecture.CHECKPOINT_KEY] = description

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Rebuild replaced layers before Lightning loads the weights (it calls this hook first)."""
        if architecture.CHECKPOINT_KEY in checkpoint:
            architecture.rebuild(self.net, checkpoint[architecture.CHECKPOINT_KEY])
