"""The one LightningModule: a network, cross-entropy, torchmetrics accuracy, optimizer/scheduler from config."""

from __future__ import annotations

from collections.abc import Callable

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from prunelab.models import architecture


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite."""


class Classifier(pl.LightningModule):
    """Image classifier around ``net``.

    Args:
        net: the network (its Conv2d/Linear layers are what pruning acts on).
        num_classes: number of classes, for the accuracy metrics.
        optimizer: ``params -> Optimizer`` (a Hydra ``_partial_`` config).
        scheduler: ``optimizer -> LRScheduler`` stepped once per epoch, or ``None``.
    """

    def __init__(
        self,
        net: nn.Module,
        num_classes: int,
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        scheduler: Callable[..., torch.optim.lr_scheduler.LRScheduler] | None = None,
    ) -> None:
        super().__init__()
        self.net = net
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.train_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        if not torch.isfinite(loss):
            raise NonFiniteLossError(
                f"training loss is {loss.item()} at epoch {self.current_epoch}, step {self.global_step}"
            )
        self.train_acc(logits, y)
        self.log("train/loss", loss, on_step=False, on_epoch=True, prog_bar=True)
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch, batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.val_acc(logits, y)
        self.log("val/loss", F.cross_entropy(logits, y), on_epoch=True)
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
