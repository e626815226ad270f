"""PruningCallback: the contract every pruning method implements (docs/architecture.md, "The method contract").

The base owns the Lightning hooks, the weights' device and the resumable state; a method says *what* it does
through methods that are not Lightning hooks (:meth:`start`, :meth:`before_batch`, :meth:`regularize`, …, as
Torch-Pruning splits importance, regularizer and pruner). Which groups go at which sparsity, and the search for the
ratio on the compacted model, is the :class:`~prunelab.pruning.allocator.Allocator` the callback holds; operations
on the running fit are free functions in :mod:`prunelab.pruning.training`. Per-layer tensors follow the weights'
device and are saved in every checkpoint as CPU tensors, so checkpoints move between CPU and GPU.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping
from typing import Any

import pytorch_lightning as pl
import torch
from torch import nn

from prunelab.pruning import groups
from prunelab.pruning.allocator import Allocator
from prunelab.pruning.checks import check_allocation_options, check_compression, check_table_layers
from prunelab.pruning.masks import MaskSet, filter_dependents, fresh_masks, prunable_layers, refuse_attention
from prunelab.pruning.schedules import compression_to_sparsity
from prunelab.pruning.training import example_input_of

log = logging.getLogger(__name__)
ROUND_TO_AUTO = 8  # ``round_to: auto`` on a CUDA device (tensor-core friendly channel counts); off on the CPU


def network_of(pl_module: nn.Module) -> nn.Module:
    """The network whose layers are pruned: ``pl_module.net`` for the classifier, else the module itself."""
    return getattr(pl_module, "net", pl_module)


class PruningCallback(pl.Callback):
    """Base class: masks, zero-keeping hooks, device-following and resumable state; exact allocation and the
    target search through :attr:`allocator`.

    Args:
        compression: requested ratio, prunable weights before / nonzero prunable weights after; for ``filter``,
            ``channel`` and ``column``, the weights left once compaction removed the pruned channels and every
            weight that reads or feeds them (see :attr:`counts_compacted`).
        granularity: ``weight``, ``filter``, ``channel``, ``column`` or N:M such as ``2:4``.
        scope: ``global`` (rank all layers together), ``layer`` (same ratio in every layer), ``lamp`` (rank all
            layers together by LAMP scores, scale-free across layers) or ``auto``: ``layer`` under ``target=macs``
            (the uniform ratio of Torch-Pruning's default; global rankings starve layers there, docs/benchmarks.md),
            else the method's own (:attr:`auto_scope`).
        layers, exclude: module names of the network to prune (default: every Conv2d and Linear), to keep dense.
        layer_sparsity: explicit fraction of zeros per layer name (allocates instead of ``compression``, which must
            agree with it within 2 %).
        min_keep: groups every layer keeps, so no layer is emptied; ``auto``: 2 under ``target=macs`` (no layer
            cut to one filter or channel unless asked), else 1.
        min_keep_fraction: share of its groups every layer keeps (not applied to an explicit ``layer_sparsity``).
        round_to: ``filter``/``channel``: kept groups per layer a multiple of this; ``auto`` = 8 when training on
            CUDA, off on the CPU; ``None`` off.
        target: ``params`` (compression counts prunable weights) or ``macs`` (``filter``/``channel``: compression
            = dense MACs / MACs of the compacted model), both counted on the compacted model for ``filter``,
            ``channel`` and ``column`` (:meth:`Allocator.calibrate` searches the masks' sparsity).
    """

    method = "base"
    auto_scope = "lamp"  # what ``scope=auto`` (the configs' default) means under target=params
    changes_architecture = False
    # the ranking (:meth:`group_scores`) exists when training starts, so the compacted model's ratio can be calibrated
    # then; False for a method whose scores come from its own pass at its pruning event (it is calibrated there)
    ranks_at_start = True

    def __init__(
        self,
        compression: float,
        granularity: str = "weight",
        scope: str = "global",
        layers: list[str] | None = None,
        exclude: list[str] | None = None,
        layer_sparsity: dict[str, float] | None = None,
        min_keep: int | str = "auto",
        min_keep_fraction: float = 0.0,
        round_to: int | str | None = None,
        target: str = "params",
    ) -> None:
        super().__init__()
        self.compression = check_compression(compression)
        self.granularity = groups.check_granularity(granularity)
        options = check_allocation_options(
            self.granularity, scope, min_keep, min_keep_fraction, round_to, target, layer_sparsity, self.auto_scope
        )
        self.scope, self.target, self.min_keep = options["scope"], options["target"], options["min_keep"]
        self.min_keep_fraction, self.round_to = options["min_keep_fraction"], options["round_to"]
        self.round_to_auto = options["round_to_auto"]  # round_to=auto: set once the accelerator is known
        self.counts_compacted = options["counts_compacted"]  # filter/channel/column: ratio on the compacted model
        self.layers = list(layers) if layers is not None else None
        self.exclude = list(exclude or [])
        self.layer_sparsity = dict(layer_sparsity) if layer_sparsity else None
        self.final_sparsity = compression_to_sparsity(self.compression)
        self.masks = MaskSet()
        self.layer_names: list[str] = []  # the pruned layers as bound, before any architecture change
        self.current_sparsity = 0.0  # last target applied by prune_to
        self.net: nn.Module | None = None
        self.example_input: torch.Tensor | None = None  # one input, to compact (counts_compacted)
        self.allocator = Allocator(self)  # allocation and target search, on the settings and state of this callback
        self.allocator.load_state_dict({})  # nothing found yet: reached, note, the target=macs plan, … (its state)
        self._eligible: set[str] = set()
        self._targets: dict[int, float] = {}

    @property
    def state_key(self) -> str:
        return self._generate_state_key(method=self.method, granularity=self.granularity, compression=self.compression)

    @classmethod
    def budget_factor(cls, options: Mapping[str, Any]) -> float:
        """Multiplier of the ``finetune.epochs: auto`` steps (:mod:`prunelab.budget`) for a run of this method with
        these ``pruning`` options, read before the callback is built; 1: the rule as it stands."""
        return 1.0

    # ----------------------------------------------------------------- what to prune
    def bind(self, model: nn.Module) -> None:
        """Resolve the layers of ``model`` to prune and attach the masks (validates layer names)."""
        self.net = model
        modules = prunable_layers(model, self.layers, self.exclude)
        self.layer_names = list(modules)
        all_layers = list(prunable_layers(model))
        count = len(all_layers)
        self._eligible = {n for n in modules if groups.has_groups(self.granularity, all_layers.index(n), count)}
        dependents = None
        if self.granularity == "filter":  # a pruned filter takes its bias and BatchNorm channel with it
            dependents = filter_dependents(model, {n: m for n, m in modules.items() if n in self._eligible})
        self.masks.bind(modules, dependents)
        check_table_layers(self.layer_sparsity, list(modules))

    def validate(self, model: nn.Module, example_input: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Check, before any training, that the layers exist and the target is reachable at this granularity
        (:attr:`counts_compacted`: on the model compacted on ``example_input``, when given).

        Returns the trial masks of that check (scores all equal), so subclasses can check what they imply.
        """
        if self.round_to_auto:
            self.round_to = ROUND_TO_AUTO if torch.cuda.is_available() else None
        if self.counts_compacted:
            refuse_attention(model, self.granularity)
        self.bind(model)
        trial = self.allocator.trial(example_input)
        self.masks = MaskSet()
        return trial

    def group_scores(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        """Importance of every group (low = pruned first). Default: L2 norm, RMS-normalised for structured global
        ranking so that groups of different sizes compare."""
        norms = groups.group_norms(weight, self.granularity)
        scores = norms / math.sqrt(groups.group_size(weight, self.granularity))
        block = (self.input_blocks or {}).get(name)
        if block:  # inputs fed by one channel of a flattened map rank (and go) together: their RMS
            scores = scores.reshape(-1, block).square().mean(1).sqrt().repeat_interleave(block).view_as(scores)
        return scores

    def prune_to(self, sparsity: float, trainer: pl.Trainer | None = None) -> None:
        """Masks for ``sparsity`` from :meth:`group_scores`, pruned weights zeroed (:meth:`Allocator.prune_to`)."""
        self.allocator.prune_to(sparsity, trainer)

    # ----------------------------------------------------------------- what a method implements
    def targets(self, trainer: pl.Trainer) -> dict[int, float]:
        """Map global step → target sparsity at which masks are recomputed. Default: one shot at step 0."""
        return {0: self.final_sparsity}

    def start(self, trainer: pl.Trainer) -> None:
        """Once when training starts (also on resume), state already on the weights' device. Default: schedule."""
        self._targets = self.targets(trainer)

    def before_batch(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """The method's events before a training batch, while not :attr:`done`. Default: the schedule."""
        target = self._targets.get(trainer.global_step)
        if target is not None and target > self.current_sparsity:
            self.prune_to(target, trainer)
            pl_module.log("prune/target_sparsity", target, on_step=True, on_epoch=False)

    def transient_masks(self, trainer: pl.Trainer) -> dict[str, torch.Tensor] | None:
        """Keep-masks for this step only (layer name → bool, weight-shaped), or ``None``."""
        return None

    def regularize(self, trainer: pl.Trainer) -> None:
        """Gradient-side terms: gradients are ready and not yet masked; the optimizer steps next."""

    def after_step(self, trainer: pl.Trainer) -> None:
        """After the optimizer step, transient weights restored and pruned weights re-zeroed."""

    def observe_loss(self, trainer: pl.Trainer, loss: torch.Tensor) -> None:
        """The training loss of the batch just stepped (detached, on the model's device), after :meth:`after_step`."""

    @property
    def done(self) -> bool:
        """Pruning is over: masks stay fixed from here (fine-tuning). ``target=macs``: once the final groups per
        layer are planned (an intermediate ratio's masks may zero more weights than the final ones)."""
        if self.target == "macs" and self._planned is None and not self.layer_sparsity:
            return False
        return self.current_sparsity >= self.final_sparsity

    def finalize(self, trainer: pl.Trainer | None) -> None:
        """Training ended before :attr:`done`: reach the target now. Default: prune every layer to it."""
        self.prune_to(self.final_sparsity, trainer)

    def achieved_sparsity(self) -> float:
        """Fraction of the prunable weights that are gone now (``train/sparsity``): by default the masked ones."""
        return self.masks.sparsity()

    def stored_bytes(self, path: str | os.PathLike) -> int | None:
        """Write the method's own stored form of the fitted network to ``path`` and return its size in bytes, or
        ``None`` (default) when the generic sparse form applies (``bytes_stored``)."""
        return None

    # ----------------------------------------------------------------- Lightning hooks (the core's)
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if self.round_to_auto:
            self.round_to = ROUND_TO_AUTO if trainer.accelerator.__class__.__name__ == "CUDAAccelerator" else None
        self.bind(network_of(pl_module))
        if (self.counts_compacted or self.target == "macs") and self.example_input is None:
            self.example_input = example_input_of(trainer, pl_module)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.masks.follow(self.layer_tensors())
        self.masks.apply()  # on resume the loaded masks are re-imposed before the first step
        self.allocator.start(pl_module.device, pl_module.dtype)
        self.start(trainer)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.masks.follow(self.layer_tensors())
        if not self.done:
            self.before_batch(trainer, pl_module)
        keep = self.transient_masks(trainer)
        if keep:
            self.masks.drop(keep)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.regularize(trainer)
        self.masks.mask_grads()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.masks.restore()
        self.masks.apply()
        self.after_step(trainer)
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if torch.is_tensor(loss):  # None when the training step skipped the batch
            self.observe_loss(trainer, loss.detach())

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pl_module.log("train/sparsity", self.achieved_sparsity())

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.masks.restore()
        if not self.done:
            log.warning(
                "%s: training ended before pruning was done; finishing it now (no fine-tuning after this)", self.method
            )
            self.finalize(trainer)
        if self.target == "macs" and self.example_input is not None and not self.changes_architecture:
            self.allocator.check_reached()

    # ----------------------------------------------------------------- state
    def layer_tensors(self) -> dict[str, dict[str, torch.Tensor]]:
        """Per-layer tensors of the method by kind (e.g. ``{"Z": {layer: tensor}}``): kept on the weights' device
        and saved in checkpoints. Subclasses extend."""
        return {}

    def extra_state(self) -> dict[str, Any]:
        """Method-specific state other than :meth:`layer_tensors` (scalars, RNG state, …); subclasses extend."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        """Inverse of :meth:`extra_state`."""

    def state_dict(self) -> dict[str, Any]:
        return {
            "masks": self.masks.state_dict(),
            "current_sparsity": self.current_sparsity,
            **self.allocator.state_dict(),
            "phase": "finetune" if self.done else "prune",
            "tensors": {
                kind: {n: t.detach().cpu().clone() for n, t in d.items()} for kind, d in self.layer_tensors().items()
            },
            "extra": self.extra_state(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self.changes_architecture and self.net is not None:
            self.masks = fresh_masks(self.net)  # the module rebuilt its layers from the checkpoint before this runs
        self.masks.load_state_dict(state_dict["masks"])
        self.current_sparsity = state_dict["current_sparsity"]
        self.allocator.load_state_dict(state_dict)
        saved = state_dict.get("tensors", {})
        for kind, tensors in self.layer_tensors().items():
            tensors.clear()
            tensors.update(saved.get(kind, {}))
        self.load_extra_state(state_dict.get("extra", {}))
        if self.masks.modules:
            self.masks.follow(self.layer_tensors())

    def describe(self) -> dict[str, Any]:
        """What the method is, for MLflow params."""
        keys = ("method", "granularity", "scope", "target", "round_to", "changes_architecture")
        return {key: getattr(self, key) for key in keys}
