"""PruningCallback: the contract every pruning method implements (the core's side of it).

The core owns the Lightning hooks. A method says *what* it does through these methods, none of which is a Lightning
hook (Torch-Pruning splits its pruners the same way: importance, regularizer, pruner):

- :meth:`start` — once when training starts, fresh or resumed, with the method's state on the weights' device;
- :meth:`before_batch` — its own events before a training batch while it is not :attr:`done` (default: follow the
  schedule :meth:`targets`, a map step → target sparsity, re-allocating every layer at each entry);
- :meth:`transient_masks` — masks that hold for this step only (dropped weights come back exactly after the step);
- :meth:`regularize` — gradient-side terms, after backward, before the optimizer step and before gradient masking;
- :meth:`after_step` — after the optimizer step and the core's re-masking;
- :meth:`observe_loss` — the training loss of the batch just stepped (detached; no host sync is forced);
- :attr:`done` / :meth:`finalize` — whether pruning is over (masks fixed from then on), and how to reach the target
  when training ends before it is.

Per-layer state tensors (:meth:`layer_tensors`) follow the weights' device (and dtype when shaped like the weight)
and are saved in every checkpoint, as CPU tensors, so checkpoints move between CPU and GPU.
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any

import pytorch_lightning as pl
import torch
from torch import nn

from prunelab.pruning import groups, macs_target
from prunelab.pruning.allocate import SCOPES, UnreachableCompressionError, allocate, keep_floor
from prunelab.pruning.checks import check_choice, check_compression, check_int, check_number, check_table_compression
from prunelab.pruning.masks import MaskSet, filter_dependents, prunable_layers, refuse_attention
from prunelab.pruning.schedules import compression_to_sparsity

log = logging.getLogger(__name__)
BASE_OPTIONS = (
    "granularity",
    "scope",
    "layers",
    "exclude",
    "layer_sparsity",
    "min_keep",
    "min_keep_fraction",
    "round_to",
    "target",
)
ROUND_TO_AUTO = 8  # ``round_to: auto`` on a CUDA device (tensor-core friendly channel counts); off on the CPU


def network_of(pl_module: nn.Module) -> nn.Module:
    """The network whose layers are pruned: ``pl_module.net`` for the classifier, else the module itself."""
    return getattr(pl_module, "net", pl_module)


class PruningCallback(pl.Callback):
    """Base class: masks, exact allocation, zero-keeping hooks, device-following and resumable state.

    Args:
        compression: requested ratio, prunable weights before / nonzero prunable weights after; for ``filter``,
            ``channel`` and ``column``, the weights left once compaction removed the pruned channels and every
            weight that reads or feeds them (see :attr:`counts_compacted`).
        granularity: ``weight``, ``filter``, ``channel``, ``column`` or N:M such as ``2:4``.
        scope: ``global`` (rank all layers together), ``layer`` (same ratio in every layer), ``lamp`` (rank all
            layers together by LAMP scores, scale-free across layers) or ``auto``: ``layer`` under ``target=macs``
            (the uniform ratio of Torch-Pruning's default; global rankings starve layers there, docs/benchmarks.md),
            else the method's own (:attr:`auto_scope`).
        layers: module names of the network to prune (default: every Conv2d and Linear).
        exclude: module names to keep dense.
        layer_sparsity: explicit fraction of zeros per layer name (allocates instead of ``compression``, which must
            agree with it within 2 %).
        min_keep: groups every layer keeps, so no layer is emptied; ``auto``: 2 under ``target=macs`` (no layer
            cut to one filter or channel unless asked), else 1.
        min_keep_fraction: share of its groups every layer keeps (not applied to an explicit ``layer_sparsity``).
        round_to: ``filter``/``channel``: kept groups per layer a multiple of this; ``auto`` = 8 when training on
            CUDA, off on the CPU; ``None`` off.
        target: ``params`` (compression counts prunable weights) or ``macs`` (``filter``/``channel``: compression
            = dense MACs / MACs of the compacted model). For ``filter``/``channel``/``column`` both are counted on
            the compacted model, the masks' sparsity found by searching the global threshold (:meth:`calibrate`).
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
        if scope not in (*SCOPES, "auto"):
            raise ValueError(f"pruning.scope={scope!r} is not one of: {', '.join(SCOPES)}, auto")
        if min_keep != "auto":
            check_int("min_keep", min_keep)
        self.min_keep_fraction = check_number(
            "min_keep_fraction", min_keep_fraction, 0.0, 1.0, low_open=False, high_open=True
        )
        self.target = check_choice("target", target, macs_target.TARGETS)
        structured = self.granularity in macs_target.MACS_GRANULARITIES
        # removing a channel also removes what reads it downstream: the ratio is counted on the compacted model
        self.counts_compacted = self.granularity in macs_target.COMPACTED_GRANULARITIES
        if self.target == "macs" and not structured:
            kinds = ", ".join(macs_target.MACS_GRANULARITIES)
            raise ValueError(
                f"pruning.target=macs needs a granularity that removes channels ({kinds}), not "
                f"pruning.granularity={granularity!r}: other zeros leave the layers' MACs as they are "
                "(add pruning.granularity=filter)"
            )
        if round_to == "auto":
            self.round_to_auto = structured
            round_to = None
        else:
            self.round_to_auto = False
            if round_to is not None:
                check_int("round_to", round_to)
                if not structured:
                    raise ValueError(
                        f"pruning.round_to={round_to!r} rounds channel counts: it needs granularity "
                        f"filter or channel, not {granularity!r}"
                    )
        self.round_to: int | None = round_to
        for name, frac in (layer_sparsity or {}).items():
            if not 0.0 <= float(frac) < 1.0:
                raise ValueError(f"pruning.layer_sparsity.{name}={frac!r} must be in [0, 1)")
        self.scope = ("layer" if self.target == "macs" else self.auto_scope) if scope == "auto" else scope
        self.layers = list(layers) if layers is not None else None
        self.exclude = list(exclude or [])
        self.layer_sparsity = dict(layer_sparsity) if layer_sparsity else None
        self.min_keep = (2 if self.target == "macs" else 1) if min_keep == "auto" else min_keep
        self.final_sparsity = compression_to_sparsity(self.compression)
        self.masks = MaskSet()
        self.layer_names: list[str] = []  # the pruned layers as bound, before any architecture change
        self.current_sparsity = 0.0  # last target applied by prune_to
        self.net: nn.Module | None = None
        self.example_input: torch.Tensor | None = None  # one input, to compact (counts_compacted)
        self.reached: float | None = None  # ratio on the compacted model reached by the last calibration
        self.note: str | None = None  # why the ratio reached is not the one requested (the run's target_note tag)
        self._planned: dict[str, float] | None = None  # target=macs: share of its groups each layer prunes
        self.input_blocks: dict[str, int] | None = None  # target=macs: macs_target.layer_structure
        self.coupled: list[str] | None = None  # target=macs: layers left whole, macs_target.layer_structure
        self._calibrated = False
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
        self.net = model
        modules = prunable_layers(model, self.layers, self.exclude)
        self.layer_names = list(modules)
        all_layers = list(prunable_layers(model))
        self._eligible = {n for n in modules if self.eligible(n, all_layers.index(n), len(all_layers))}
        dependents = None
        if self.granularity == "filter":  # a pruned filter takes its bias and BatchNorm channel with it
            dependents = filter_dependents(model, {n: m for n, m in modules.items() if n in self._eligible})
        self.masks.bind(modules, dependents)
        if self.layer_sparsity:
            unknown = sorted(set(self.layer_sparsity) - set(modules))
            if unknown:
                raise ValueError(
                    f"Unknown layer(s) {unknown} in pruning.layer_sparsity; pruned layers: {list(modules)}"
                )

    def rebind(self, model: nn.Module) -> None:
        """After a method replaced layers of ``model`` (:attr:`changes_architecture`): masks start over, all ones, on
        every Conv2d/Linear the model now has, so nothing stale is masked or checkpointed; :attr:`layer_names` keeps
        the layers as first bound."""
        self.masks = MaskSet()
        self.masks.bind(prunable_layers(model))

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
        weights = self.weights()
        zeros = {n: torch.zeros(groups.group_shape(weights[n], self.granularity)) for n in self._eligible}
        sparsity = self.final_sparsity
        if self.target == "macs":
            if example_input is None:
                raise ValueError("pruning.target=macs needs an example input to count MACs")
            if self.layer_sparsity:
                raise ValueError(
                    "pruning.target=macs searches the per-layer ratios itself: drop pruning.layer_sparsity"
                )
        table = self.layer_sparsity
        if self.counts_compacted and example_input is not None:
            self.example_input = example_input
            if self.target == "macs":  # reachable by some allocation? (the uniform path, then single groups)
                plan = macs_target.plan_for(self, scores=zeros, scope="layer")
                if not plan.met(self.compression):
                    raise UnreachableCompressionError(
                        macs_target.nearest_message(
                            self.compression, self.target, plan.below, plan.above, self._floor_text()
                        )
                    )
                table = macs_target.fractions(self, plan.counts)
            elif not self.layer_sparsity:
                sparsity, _ = self.search(scores=zeros, steps=0)  # reachable at all?
        trial = allocate(
            weights,
            zeros,
            sparsity,
            self.granularity,
            self.scope,
            self.min_keep,
            table,
            min_keep_fraction=self.min_keep_fraction,
            round_to=self.round_to,
        )
        if self.layer_sparsity:  # a table is a statement of the compression too: the two must agree
            implied = None
            if self.counts_compacted and self.example_input is not None:
                dense = sum(w.numel() for w in weights.values())
                implied = dense / macs_target.compacted_cost(
                    self.net, trial, self.masks.dependents, self.example_input, "params", list(weights)
                )
            check_table_compression(self.compression, trial, implied)
        self.masks = MaskSet()
        return trial

    def weights(self) -> dict[str, torch.Tensor]:
        """The prunable weights by layer name."""
        return {n: m.weight for n, m in self.masks.modules.items()}

    def group_scores(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        """Importance of every group (low = pruned first). Default: L2 norm, RMS-normalised for structured global
        ranking so that groups of different sizes compare."""
        norms = groups.group_norms(weight, self.granularity)
        scores = norms / math.sqrt(groups.group_size(weight, self.granularity))
        block = (self.input_blocks or {}).get(name)
        if block:  # inputs fed by one channel of a flattened map rank (and go) together: their RMS
            scores = scores.reshape(-1, block).square().mean(1).sqrt().repeat_interleave(block).view_as(scores)
        return scores

    def allocation(
        self, sparsity: float, xs: dict[str, torch.Tensor] | None = None, scores: dict[str, torch.Tensor] | None = None
    ) -> dict[str, torch.Tensor]:
        """Masks that keep the top groups of ``xs`` (default: the weights) by :meth:`group_scores` (or the given
        ``scores``) at ``sparsity``."""
        weights = self.weights()
        xs = weights if xs is None else xs
        if scores is None:
            scores = {n: self.group_scores(n, xs[n]) for n in xs if n in self._eligible}
        return allocate(
            weights,
            scores,
            sparsity,
            self.granularity,
            self.scope,
            self.min_keep,
            self._layer_targets(sparsity),
            min_keep_fraction=self.min_keep_fraction,
            round_to=self.round_to,
        )

    def max_sparsity(self) -> float:
        """The largest sparsity the allocation accepts: every eligible layer at its floor (``min_keep_fraction``
        floors vanish as the kept budget does)."""
        weights = self.weights()
        total = sum(w.numel() for w in weights.values())
        zeros = 0
        for n in self._eligible:
            count = math.prod(groups.group_shape(weights[n], self.granularity))
            floor = keep_floor(count, self.min_keep, 0.0, self.round_to)
            zeros += (count - floor) * groups.group_size(weights[n], self.granularity)
        return zeros / total

    def _example(self) -> torch.Tensor:
        if self.example_input is None:
            raise ValueError(
                f"pruning.granularity={self.granularity} counts pruning.compression on the compacted model, which "
                "needs one example input: train with a datamodule that has num_channels and image_size, set the "
                "LightningModule's example_input_array, or set the callback's example_input"
            )
        return self.example_input

    @property
    def macs_reduction(self) -> float | None:
        """MACs reduction reached by the last calibration (``target=macs``)."""
        return self.reached if self.target == "macs" else None

    def _floor_text(self) -> str:
        """What bounds the allocation, for the unreachable message."""
        text = f"pruning.granularity={self.granularity} keeps at least pruning.min_keep={self.min_keep} groups"
        if self.min_keep_fraction:
            text += f" and pruning.min_keep_fraction={self.min_keep_fraction:g} of them"
        if self.round_to:
            text += f", a multiple of pruning.round_to={self.round_to},"
        return text + " in every layer, and one group moves the ratio in steps this coarse"

    @torch.no_grad()
    def calibrate(self) -> None:
        """:attr:`counts_compacted`: set :attr:`final_sparsity` to the sparsity of the masks whose compacted model
        meets :attr:`compression` in weights or MACs (:attr:`target`) on the current weights' ranking (``macs``:
        the per-layer group counts of :func:`macs_target.plan_for`, kept for every later allocation)."""
        if self.target == "macs":
            plan = macs_target.plan_for(self)
            if not plan.met(self.compression):  # the ranking's own path missed: the uniform one, as validated
                uniform = macs_target.plan_for(self, scope="layer")
                plan = (
                    uniform if abs(uniform.reached - self.compression) < abs(plan.reached - self.compression) else plan
                )
            self._planned = macs_target.fractions(self, plan.counts)
            self.final_sparsity, self.reached = self.allocation_sparsity(self.final_sparsity), plan.reached
            self.note = (
                None
                if plan.met(self.compression)
                else macs_target.nearest_message(
                    self.compression, self.target, plan.below, plan.above, "no allocation the search tried met it"
                )
            )
            if self.note:
                log.warning("%s: %s; pruning to %.3fx", self.method, self.note, plan.reached)
            log.info(
                "%s: %.2fx fewer MACs in the compacted model, groups pruned per layer %s",
                self.method,
                self.reached,
                plan.counts,
            )
            return
        self.final_sparsity, self.reached = self.search(min_sparsity=self.current_sparsity)
        log.info(
            "%s: %.2fx fewer %s in the compacted model at mask sparsity %.4f",
            self.method,
            self.reached,
            "MACs" if self.target == "macs" else "weights",
            self.final_sparsity,
        )

    @torch.no_grad()
    def search(
        self,
        scores: dict[str, torch.Tensor] | None = None,
        steps: int | None = None,
        min_sparsity: float = 0.0,
        compression: float | None = None,
    ) -> tuple[float, float]:
        """(mask sparsity ≥ ``min_sparsity``, ratio reached) closest to ``compression`` (default
        :attr:`compression`) on the compacted model, ranking groups by the weights (or ``scores``), in ``steps``
        bisection steps (default: enough to resolve one group)."""
        example = self._example()
        names = list(self.masks.modules)
        dense = (
            macs_target.count_macs(self.net, example)
            if self.target == "macs"
            else sum(w.numel() for w in self.weights().values())
        )
        if steps is None:  # resolve one group of the ranking
            groups_total = sum(math.prod(groups.group_shape(m, self.granularity)) for m in self.weights().values())
            steps = math.ceil(math.log2(groups_total)) + 2

        def cost_at(sparsity: float) -> int:
            masks = self.allocation(sparsity, scores=scores)
            return macs_target.compacted_cost(self.net, masks, self.masks.dependents, example, self.target, names)

        compression = self.compression if compression is None else compression
        return macs_target.sparsity_for_target(
            cost_at, dense, compression, self.max_sparsity(), steps, min_sparsity, self.target
        )

    @torch.no_grad()
    def prune_to(self, sparsity: float, trainer: pl.Trainer | None = None) -> None:
        """Recompute masks for ``sparsity`` over the prunable weights and zero what they remove (the final target
        is searched again on the current ranking under :attr:`counts_compacted`, so the compacted ratio holds)."""
        if groups.parse_nm(self.granularity):
            sparsity = self.final_sparsity  # an N:M mask has one sparsity: every scheduled update applies it
        elif self.counts_compacted and not self.layer_sparsity and sparsity >= self.final_sparsity:
            self.calibrate()
            sparsity = self.final_sparsity
        for name, mask in self.allocation(sparsity).items():
            self.masks.set(name, mask)
        self.masks.apply()
        if trainer is not None:
            self.masks.mask_optimizer_state(trainer.optimizers)
        self.current_sparsity = sparsity
        log.debug("%s: pruned to sparsity %.4f (achieved %.4f)", self.method, sparsity, self.masks.sparsity())

    def allocation_sparsity(self, sparsity: float) -> float:
        """Fraction of the prunable weights the masks of :meth:`allocation` at ``sparsity`` zero."""
        masks = self.allocation(sparsity)
        total = sum(m.numel() for m in masks.values())
        return 1.0 - sum(int(m.sum()) for m in masks.values()) / total

    @torch.no_grad()
    def prune_to_compression(self, compression: float, trainer: pl.Trainer | None = None) -> None:
        """Prune to an intermediate ratio of a schedule, counted as :attr:`compression` is (on the compacted model
        under :attr:`counts_compacted`); a ratio at or above :attr:`compression` prunes to the final target."""
        if compression >= self.compression:
            self.prune_to(self.final_sparsity, trainer)
            return
        if self.target == "macs":  # the groups per layer of this ratio, from what is pruned already
            plan = macs_target.plan_for(self, compression=compression)
            masks = allocate(
                self.weights(),
                self._scores(),
                0.0,
                self.granularity,
                self.scope,
                self.min_keep,
                macs_target.fractions(self, plan.counts),
            )
            for name, mask in masks.items():
                self.masks.set(name, mask)
            self.masks.apply()
            if trainer is not None:
                self.masks.mask_optimizer_state(trainer.optimizers)
            self.current_sparsity = self.masks.sparsity()
            return
        sparsity = compression_to_sparsity(compression)
        if self.counts_compacted and not self.layer_sparsity:
            sparsity, _ = self.search(min_sparsity=self.current_sparsity, compression=compression)
        self.prune_to(sparsity, trainer)

    @torch.no_grad()
    def prune_groups(self, name: str, pruned: torch.Tensor, trainer: pl.Trainer | None = None) -> None:
        """Prune the groups flagged in ``pruned`` (shaped as :func:`groups.group_shape`) of one layer, leaving every
        other layer as it is: its weights, dependents and optimizer state are zeroed."""
        weight = self.masks.modules[name].weight
        keep = groups.expand(~pruned.to(weight.device), weight, self.granularity)
        self.masks.set(name, self.masks.masks[name] & keep)
        self.masks.apply([name])
        if trainer is not None:
            self.masks.mask_optimizer_state(trainer.optimizers, [name])

    def layer_prune_counts(self) -> dict[str, int]:
        """Groups to prune in each eligible layer for the final target, from the exact allocator on the current
        weights (``global``: groups ranked across layers; ``layer``: one ratio; or the explicit table)."""
        masks = self.allocation(self.final_sparsity)
        return {n: int((~groups.group_mask_of(masks[n], self.granularity)).sum()) for n in sorted(self._eligible)}

    def _layer_targets(self, sparsity: float) -> dict[str, float] | None:
        """Per-layer targets scaled to the current step of the schedule (an explicit per-layer table, or the one
        ``target=macs`` planned)."""
        table = self.layer_sparsity or self._planned
        if not table:
            return None
        scale = min(sparsity / self.final_sparsity, 1.0) if self.final_sparsity > 0 else 1.0
        return {n: f * scale for n, f in table.items()}

    def _scores(self) -> dict[str, torch.Tensor]:
        """:meth:`group_scores` of every eligible layer on the current weights, in layer order."""
        weights = self.weights()
        return {n: self.group_scores(n, weights[n]) for n in weights if n in self._eligible}

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

    @property
    def phase(self) -> str:
        return "finetune" if self.done else "prune"

    # ----------------------------------------------------------------- device
    def follow(self) -> None:
        """Move masks and :meth:`layer_tensors` to their layer's weight device; tensors shaped like the weight also
        take its dtype (per-group accumulators keep theirs)."""
        self.masks.follow()
        for tensors in self.layer_tensors().values():
            for name, t in list(tensors.items()):
                weight = self.masks.modules[name].weight
                dtype = weight.dtype if t.is_floating_point() and t.shape == weight.shape else t.dtype
                if t.device != weight.device or t.dtype != dtype:
                    tensors[name] = t.to(device=weight.device, dtype=dtype)

    # ----------------------------------------------------------------- Lightning hooks (the core's)
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if self.round_to_auto:
            self.round_to = ROUND_TO_AUTO if trainer.accelerator.__class__.__name__ == "CUDAAccelerator" else None
        self.bind(network_of(pl_module))
        datamodule = getattr(trainer, "datamodule", None)
        if (self.counts_compacted or self.target == "macs") and self.example_input is None:
            if datamodule is not None and hasattr(datamodule, "num_channels"):
                shape = (1, datamodule.num_channels, datamodule.image_size, datamodule.image_size)
                self.example_input = torch.zeros(shape)
            elif getattr(pl_module, "example_input_array", None) is not None:  # Lightning's own convention
                self.example_input = torch.zeros_like(pl_module.example_input_array[:1])

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.follow()
        self.masks.apply()  # on resume the loaded masks are re-imposed before the first step
        if self.counts_compacted or self.target == "macs":
            self.example_input = self._example().to(pl_module.device)
        if self.counts_compacted and not self._calibrated and self.ranks_at_start and not self.layer_sparsity:
            self.calibrate()  # once: a resume keeps it
            self._calibrated = True
        self.start(trainer)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.follow()
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
            self.check_reached()

    @torch.no_grad()
    def check_reached(self) -> None:
        """``target=macs``: the MACs ratio of the final masks, compacted (a method that chose its own groups within
        the planned counts may have removed other coupled channels than the plan), and :attr:`note` when it is off
        by more than 2 %."""
        masks = {n: self.masks.masks[n] for n in self.masks.modules}
        example = self._example()
        dense = macs_target.count_macs(self.net, example)
        self.reached = dense / macs_target.compacted_cost(
            self.net, masks, self.masks.dependents, example, "macs", list(masks)
        )
        if abs(self.reached - self.compression) / self.compression > macs_target.TOLERANCE and self.note is None:
            self.note = (
                f"pruning.compression={self.compression:g} with pruning.target=macs: the final masks give "
                f"{self.reached:.3f}x (the groups the method chose are coupled differently from the plan's)"
            )
            log.warning("%s: %s", self.method, self.note)

    def tags(self) -> dict[str, str]:
        """MLflow tags of the run from the method: ``target_reached`` (``target=macs``: the MACs ratio of the
        compacted model) and ``target_note`` when the ratio reached is not the one requested, with the reason."""
        out = {}
        if self.target == "macs" and self.reached is not None:
            out["target_reached"] = f"{self.reached:.4g}"
        if self.note:
            out["target_note"] = self.note[:5000]
        return out

    # ----------------------------------------------------------------- helpers for methods
    def restart_training(self, trainer: pl.Trainer) -> None:
        """Go on as a fresh training run of the pruned network would: every optimizer's state (moments, step counts)
        is cleared and a cosine LR schedule restarts at its initial LR over the epochs (or steps) left, a warm
        restart (Loshchilov & Hutter 2017, arXiv 1608.03983). Other schedulers go on as they were, with a warning."""
        for optimizer in trainer.optimizers:
            optimizer.state.clear()
        for config in trainer.lr_scheduler_configs:
            scheduler = config.scheduler
            if type(scheduler) is not torch.optim.lr_scheduler.CosineAnnealingLR:
                log.warning(
                    "%s: the retraining goes on with %s as it was (only a cosine schedule is restarted)",
                    self.method,
                    type(scheduler).__name__,
                )
                continue
            if config.interval == "step":
                left = int(trainer.estimated_stepping_batches) - trainer.global_step
            else:
                left = int(trainer.max_epochs) - trainer.current_epoch
            scheduler.T_max, scheduler.last_epoch = max(left, 1), 0
            for group, lr in zip(scheduler.optimizer.param_groups, scheduler.base_lrs):
                group["lr"] = lr
            scheduler._last_lr = list(scheduler.base_lrs)  # what get_last_lr() reports

    @torch.no_grad()
    def val_accuracy(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> float | None:
        """Accuracy (fraction) on the validation set now, without touching the training run's random stream."""
        datamodule = getattr(trainer, "datamodule", None)
        if datamodule is None:
            return None
        rng, was_training = torch.get_rng_state(), pl_module.training
        pl_module.eval()
        precision = trainer.precision_plugin  # the run's input dtype and autocast, as in Lightning's own loops
        correct = total = 0
        for x, y in datamodule.val_dataloader():
            x, y = precision.convert_input(x.to(pl_module.device)), y.to(pl_module.device)
            with precision.val_step_context():
                correct += int((pl_module(x).argmax(1) == y).sum())
            total += y.numel()
        pl_module.train(was_training)
        torch.set_rng_state(rng)
        return correct / max(total, 1)

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
            "final_sparsity": self.final_sparsity,
            "calibrated": self._calibrated,
            "planned": self._planned,
            "input_blocks": self.input_blocks,
            "coupled": self.coupled,
            "reached": self.reached,
            "note": self.note,
            "phase": self.phase,
            "tensors": {
                kind: {n: t.detach().cpu().clone() for n, t in d.items()} for kind, d in self.layer_tensors().items()
            },
            "extra": self.extra_state(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self.changes_architecture and self.net is not None:
            self.rebind(self.net)  # the module rebuilt its layers from the checkpoint before this runs
        self.masks.load_state_dict(state_dict["masks"])
        self.current_sparsity = state_dict["current_sparsity"]
        self.final_sparsity = state_dict.get("final_sparsity", self.final_sparsity)
        self._calibrated = state_dict.get("calibrated", False)
        self._planned = state_dict.get("planned")
        self.input_blocks, self.coupled = state_dict.get("input_blocks"), state_dict.get("coupled")
        self.reached, self.note = state_dict.get("reached"), state_dict.get("note")
        saved = state_dict.get("tensors", {})
        for kind, tensors in self.layer_tensors().items():
            tensors.clear()
            tensors.update(saved.get(kind, {}))
        self.load_extra_state(state_dict.get("extra", {}))
        if self.masks.modules:
            self.follow()

    def describe(self) -> dict[str, Any]:
        """What the method is, for MLflow params."""
        return {
            "method": self.method,
            "granularity": self.granularity,
            "scope": self.scope,
            "target": self.target,
            "round_to": self.round_to,
            "changes_architecture": self.changes_architecture,
        }
