"""The fine-tuning budget: optimizer steps that grow with the requested compression, turned into epochs.

A pruned network recovers in optimizer steps, not epochs, and the further it is pruned the more steps it needs (Han
et al. 2015 retrain longer at higher ratios; Zhu & Gupta 2017 spread the prune phase over many steps). With a fixed
epoch count a small dataset gets too few steps (8×8 digits: 20 steps an epoch) and a high ratio too little recovery
(`bench/robustness.py` shows both). ``finetune.epochs: auto`` gives ``steps_per_doubling × log2(compression)``
steps, at least ``min_epochs`` epochs.

Extreme ratios need more than the rule gives (docs/benchmarks.md, "Headline ratios"): past ``extreme_from`` (128×)
the steps are multiplied by a factor rising linearly in log2 of the ratio to ``extreme_factor`` (2) at twice that
ratio (256×) and staying there; ``+finetune.extreme_factor=1`` turns it off. A method may ask for a multiple of the
rule where its ratio understates how much the network changed (:meth:`PruningCallback.budget_factor`: EigenDamage
under ``target=macs``, twice). ADMM-NN's quantization phase
(``pruning.quantize``) comes on top: the pruning keeps the steps it would have unquantized, and the quantization phase
takes its ``share`` of the whole.
"""

from __future__ import annotations

import math

from hydra.utils import get_class
from omegaconf import DictConfig, open_dict

from prunelab.pruning.quantize import SHARE

AUTO = "auto"
EXTREME_FROM, EXTREME_FACTOR = 128.0, 2.0


def extreme_factor(compression: float, start: float = EXTREME_FROM, factor: float = EXTREME_FACTOR) -> float:
    """1 up to ``start``, rising linearly in log2 of the ratio to ``factor`` at ``2·start``, ``factor`` beyond."""
    ramp = min(max(math.log2(max(compression, 1.0) / start), 0.0), 1.0)
    return 1.0 + (factor - 1.0) * ramp


def method_factor(pruning: DictConfig) -> float:
    """The method's own multiplier (:meth:`PruningCallback.budget_factor`), from its ``_target_`` class; 1 where
    there is none (``pruning=none``, a target that is not a pruning callback: building it reports that)."""
    target = pruning.get("_target_")
    if target is None:
        return 1.0
    try:
        cls = get_class(str(target))
    except (ImportError, ValueError, AttributeError):  # a bad _target_ fails with its message when it is built
        return 1.0
    factor = getattr(cls, "budget_factor", None)
    return float(factor(pruning)) if callable(factor) else 1.0


def prune_steps(cfg: DictConfig) -> float:
    """Optimizer steps the pruning itself gets at ``finetune.epochs: auto``."""
    compression = max(float(cfg.pruning.compression), 1.0)
    factor = extreme_factor(
        compression,
        float(cfg.finetune.get("extreme_from", EXTREME_FROM)),
        float(cfg.finetune.get("extreme_factor", EXTREME_FACTOR)),
    )
    return cfg.finetune.steps_per_doubling * math.log2(compression) * factor * method_factor(cfg.pruning)


def finetune_epochs(cfg: DictConfig, train_batches: int) -> int:
    """Epochs of the pruning fit for ``cfg`` when an epoch has ``train_batches`` optimizer steps."""
    epochs = cfg.finetune.epochs
    if epochs != AUTO:
        return int(epochs)
    steps = prune_steps(cfg)
    quant = cfg.pruning.get("quantize")
    if quant:
        steps /= 1.0 - float(quant.get("share", SHARE))
    return max(int(cfg.finetune.min_epochs), math.ceil(steps / max(train_batches, 1)))


def resolve(cfg: DictConfig, train_batches: int) -> None:
    """Write the resolved epoch count into ``cfg`` (so MLflow params and the scheduler see the number)."""
    with open_dict(cfg):
        cfg.finetune.epochs = finetune_epochs(cfg, train_batches)
