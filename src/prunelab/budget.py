"""The fine-tuning budget: optimizer steps that grow with the requested compression, turned into epochs.

A pruned network recovers in optimizer steps, not epochs, and the further it is pruned the more steps it needs (Han
et al. 2015 retrain longer at higher ratios; Zhu & Gupta 2017 spread the prune phase over many steps). With a fixed
epoch count a small dataset gets too few steps (8×8 digits: 20 steps an epoch) and a high ratio too little recovery
(`bench/robustness.py` shows both). ``finetune.epochs: auto`` gives ``steps_per_doubling × log2(compression)``
steps, at least ``min_epochs`` epochs.
"""

from __future__ import annotations

import math

from omegaconf import DictConfig, open_dict

AUTO = "auto"


def finetune_epochs(cfg: DictConfig, train_batches: int) -> int:
    """Epochs of the pruning fit for ``cfg`` when an epoch has ``train_batches`` optimizer steps."""
    epochs = cfg.finetune.epochs
    if epochs != AUTO:
        return int(epochs)
    steps = cfg.finetune.steps_per_doubling * math.log2(max(float(cfg.pruning.compression), 1.0))
    return max(int(cfg.finetune.min_epochs), math.ceil(steps / max(train_batches, 1)))


def resolve(cfg: DictConfig, train_batches: int) -> None:
    """Write the resolved epoch count into ``cfg`` (so MLflow params and the scheduler see the number)."""
    with open_dict(cfg):
        cfg.finetune.epochs = finetune_epochs(cfg, train_batches)
