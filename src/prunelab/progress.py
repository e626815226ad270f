"""What a run shows while it trains: Lightning's progress bar on a terminal, one log line per epoch otherwise."""

from __future__ import annotations

import logging
import sys
import time

import pytorch_lightning as pl
from omegaconf import OmegaConf

log = logging.getLogger("prunelab.progress")


def on_terminal() -> bool:
    """Whether the progress bar has a terminal to draw on (Lightning's bar writes to stderr)."""
    return sys.stderr.isatty()


# conf/trainer/default.yaml: enable_progress_bar: ${prunelab.terminal:}
if not OmegaConf.has_resolver("prunelab.terminal"):
    OmegaConf.register_new_resolver("prunelab.terminal", on_terminal)


class EpochLine(pl.Callback):
    """Logs one line per epoch (train loss, validation accuracy, sparsity, time) when there is no progress bar.

    Args:
        label: what is training, e.g. ``"dense baseline"`` or ``"pruning (admm 16×)"``.
    """

    def __init__(self, label: str) -> None:
        self.label = label
        self._start = time.perf_counter()

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start = time.perf_counter()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.progress_bar_callback is not None or not trainer.is_global_zero:
            return
        metrics = trainer.callback_metrics
        parts = [f"{self.label}: epoch {trainer.current_epoch + 1}/{trainer.max_epochs}"]
        if "train/loss" in metrics:
            parts.append(f"train loss {float(metrics['train/loss']):.4f}")
        if "val/acc" in metrics:
            parts.append(f"val acc {100 * float(metrics['val/acc']):.2f}%")
        if "train/sparsity" in metrics:
            parts.append(f"sparsity {float(metrics['train/sparsity']):.4f}")
        parts.append(f"{time.perf_counter() - self._start:.1f} s")
        log.info("  ".join(parts))
