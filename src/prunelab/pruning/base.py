"""PruningCallback: the contract every pruning method implements (DESIGN.md, "Contracts")."""

from __future__ import annotations

import logging
import math
import numbers
from typing import Any

import pytorch_lightning as pl
import torch
from torch import nn

from prunelab.pruning import groups
from prunelab.pruning.allocate import SCOPES, allocate
from prunelab.pruning.masks import MaskSet, filter_dependents, prunable_layers
from prunelab.pruning.schedules import compression_to_sparsity

log = logging.getLogger(__name__)


def check_compression(compression: Any) -> float:
    """Return ``compression`` as a float, or raise naming the bad value (must be a finite number > 1)."""
    if isinstance(compression, bool) or not isinstance(compression, numbers.Real):
        raise ValueError(f"pruning.compression={compression!r} is not a number; give a ratio > 1, e.g. 8")
    if not math.isfinite(compression) or compression <= 1:
        raise ValueError(
            f"pruning.compression={compression!r} must be a finite ratio > 1 "
            "(prunable weights before / nonzero after; 8 keeps 1/8 of them)"
        )
    return float(compression)


def network_of(pl_module: nn.Module) -> nn.Module:
    """The network whose layers are pruned: ``pl_module.net`` for the classifier, else the module itself."""
    return getattr(pl_module, "net", pl_module)


class PruningCallback(pl.Callback):
    """Base class: masks, exact allocation, zero-keeping hooks and resumable state.

    Subclasses decide *when* to prune (:meth:`targets`, a map step → target sparsity) and *what* to keep
    (:meth:`group_scores`, default: group L2 norm); they may add a training-time term in their own hooks.

    Args:
        compression: requested ratio, prunable weights before / nonzero prunable weights after.
        granularity: ``weight``, ``filter``, ``channel``, ``column`` or N:M such as ``2:4``.
        scope: ``global`` (rank all layers together) or ``layer`` (same ratio in every layer).
        layers: module names of the network to prune (default: every Conv2d and Linear).
        exclude: module names to keep dense.
        layer_sparsity: explicit fraction of zeros per layer name (overrides ``compression`` for the allocation).
        min_keep: groups every layer keeps, so no layer is emptied.
    """

    method = "base"
    changes_architecture = False

    def __init__(
        self,
        compression: float,
        granularity: str = "weight",
        scope: str = "global",
        layers: list[str] | None = None,
        exclude: list[str] | None = None,
        layer_sparsity: dict[str, float] | None = None,
        min_keep: int = 1,
    ) -> None:
        super().__init__()
        self.compression = check_compression(compression)
        self.granularity = groups.check_granularity(granularity)
        if scope not in SCOPES:
            raise ValueError(f"pruning.scope={scope!r} is not one of: {', '.join(SCOPES)}")
        if not isinstance(min_keep, int) or min_keep < 1:
            raise ValueError(f"pruning.min_keep={min_keep!r} must be an integer ≥ 1")
        for name, frac in (layer_sparsity or {}).items():
            if not 0.0 <= float(frac) < 1.0:
                raise ValueError(f"pruning.layer_sparsity.{name}={frac!r} must be in [0, 1)")
        self.scope = scope
        self.layers = list(layers) if layers is not None else None
        self.exclude = list(exclude or [])
        self.layer_sparsity = dict(layer_sparsity) if layer_sparsity else None
        self.min_keep = min_keep
        self.final_sparsity = compression_to_sparsity(self.compression)
        self.masks = MaskSet()
        self.current_sparsity = 0.0  # last target applied
        self._eligible: set[str] = set()
        self._targets: dict[int, float] = {}

    # ----------------------------------------------------------------- what to prune
    @property
    def state_key(self) -> str:
        return self._generate_state_key(method=self.method, granularity=self.granularity, compression=self.compression)

    def eligible(self, name: str, index: int, count: int) -> bool:
        """Whether the layer has groups of this granularity: the classifier's outputs (``filter``) and the
        image input (``channel``/``column``) are not pruned structurally."""
        if self.granularity == "filter":
            return index < count - 1
        if self.granularity in ("channel", "column"):
            return index > 0
        return True

    def bind(self, model: nn.Module) -> None:
        """Resolve the layers of ``model`` to prune and attach the masks (validates layer names)."""
        modules = prunable_layers(model, self.layers, self.exclude)
        all_layers = list(prunable_layers(model))
        self._eligible = {n for n in modules if self.eligible(n, all_layers.index(n), len(all_layers))}
        dependents = None
        if self.granularity == "filter":  # a pruned filter takes its bias and BatchNorm channel with it
            dependents = filter_dependents(model, {n: m for n, m in modules.items() if n in self._eligible})
        self.masks.bind(modules, dependents)
        if self.layer_sparsity:
            unknown = sorted(set(self.layer_sparsity) - set(modules))
            if unknown:
                raise ValueError(f"Unknown layer(s) {unknown} in pruning.layer_sparsity; pruned layers: {list(modules)}")

    def validate(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Check, before any training, that the layers exist and the target is reachable at this granularity.

        Returns the trial masks of that check (scores all equal), so subclasses can check what they imply.
        """
        self.bind(model)
        weights = {n: m.weight for n, m in self.masks.modules.items()}
        zeros = {n: torch.zeros(groups.group_shape(weights[n], self.granularity)) for n in self._eligible}
        trial = allocate(weights, zeros, self.final_sparsity, self.granularity, self.scope, self.min_keep,
                         self.layer_sparsity)
        self.masks = MaskSet()
        return trial

    def group_scores(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        """Importance of every group (low = pruned first). Default: L2 norm, RMS-normalised for structured global
        ranking so that groups of different sizes compare."""
        norms = groups.group_norms(weight, self.granularity)
        return norms / math.sqrt(groups.group_size(weight, self.granularity))

    @torch.no_grad()
    def prune_to(self, sparsity: float, trainer: pl.Trainer | None = None) -> None:
        """Recompute masks for ``sparsity`` over the prunable weights and zero what they remove."""
        if groups.parse_nm(self.granularity):
            sparsity = self.final_sparsity  # an N:M mask has one sparsity: every scheduled update applies it
        weights = {n: m.weight for n, m in self.masks.modules.items()}
        scores = {n: self.group_scores(n, weights[n]) for n in weights if n in self._eligible}
        new = allocate(weights, scores, sparsity, self.granularity, self.scope, self.min_keep, self._layer_targets(sparsity))
        for name, mask in new.items():
            self.masks.set(name, mask)
        self.masks.apply()
        if trainer is not None:
            self.masks.mask_optimizer_state(trainer.optimizers)
        self.current_sparsity = sparsity
        log.debug("%s: pruned to sparsity %.4f (achieved %.4f)", self.method, sparsity, self.masks.sparsity())

    def _layer_targets(self, sparsity: float) -> dict[str, float] | None:
        """Per-layer targets scaled to the current step of the schedule (explicit per-layer tables only)."""
        if not self.layer_sparsity:
            return None
        scale = sparsity / self.final_sparsity
        return {n: f * scale for n, f in self.layer_sparsity.items()}

    # ----------------------------------------------------------------- when to prune
    def targets(self, trainer: pl.Trainer) -> dict[int, float]:
        """Map global step → target sparsity at which masks are recomputed. Default: one shot at step 0."""
        return {0: self.final_sparsity}

    # ----------------------------------------------------------------- Lightning hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self.bind(network_of(pl_module))

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._targets = self.targets(trainer)
        self.masks.apply()  # on resume the loaded masks are re-imposed before the first step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        target = self._targets.get(trainer.global_step)
        if target is not None and target > self.current_sparsity:
            self.prune_to(target, trainer)
            pl_module.log("prune/target_sparsity", target, on_step=True, on_epoch=False)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.masks.mask_grads()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.masks.apply()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pl_module.log("train/sparsity", self.masks.sparsity())

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.current_sparsity < self.final_sparsity:
            log.warning(
                "%s: training ended at sparsity %.4f before the schedule reached %.4f; pruning to the target now "
                "(no fine-tuning after this step)", self.method, self.current_sparsity, self.final_sparsity,
            )
            self.prune_to(self.final_sparsity)

    # ----------------------------------------------------------------- state
    @property
    def phase(self) -> str:
        return "finetune" if self.current_sparsity >= self.final_sparsity else "prune"

    def extra_state(self) -> dict[str, Any]:
        """Method-specific state (Z/U, λ, probabilities, RNG …); subclasses extend."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        """Inverse of :meth:`extra_state`."""

    def state_dict(self) -> dict[str, Any]:
        return {
            "masks": self.masks.state_dict(),
            "current_sparsity": self.current_sparsity,
            "phase": self.phase,
            "extra": self.extra_state(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.masks.load_state_dict(state_dict["masks"])
        self.current_sparsity = state_dict["current_sparsity"]
        self.load_extra_state(state_dict.get("extra", {}))

    def describe(self) -> dict[str, Any]:
        """What the method is, for MLflow params."""
        return {
            "method": self.method,
            "granularity": self.granularity,
            "scope": self.scope,
            "changes_architecture": self.changes_architecture,
        }
