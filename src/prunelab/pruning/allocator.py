"""Which groups go: the allocation and the target search a :class:`~prunelab.pruning.base.PruningCallback` holds
(``callback.allocator``).

The allocator keeps no state of its own. It reads the callback's settings (``compression``, ``granularity``,
``scope``, floors, ``target``), its masks and ranking (:meth:`group_scores`), and writes what it finds back to the
callback (``final_sparsity``, the ``target=macs`` plan, ``reached``, ``note``), where the checkpoint saves it.

- :meth:`Allocator.allocation`: masks keeping the top groups at a sparsity (:func:`allocate.allocate`);
- :meth:`Allocator.search` / :meth:`Allocator.calibrate`: under :attr:`counts_compacted`, the mask sparsity whose
  compacted model meets the ratio (:mod:`prunelab.pruning.macs_target`);
- :meth:`Allocator.prune_to`, :meth:`Allocator.prune_to_compression`, :meth:`Allocator.prune_groups`: masks
  recomputed and the pruned weights (and their optimizer state) zeroed.
"""

from __future__ import annotations

import logging
import math

import pytorch_lightning as pl
import torch

from prunelab.pruning import groups, macs_target
from prunelab.pruning.allocate import UnreachableCompressionError, allocate, keep_floor
from prunelab.pruning.checks import check_table_compression
from prunelab.pruning.schedules import compression_to_sparsity

log = logging.getLogger(__name__)


class Allocator:
    """Allocation and target search of one bound callback (see the module docstring)."""

    def __init__(self, callback) -> None:
        self.cb = callback

    # ----------------------------------------------------------------- allocation
    def scores(self) -> dict[str, torch.Tensor]:
        """:meth:`group_scores` of every eligible layer on the current weights, in layer order."""
        cb, weights = self.cb, self.cb.masks.weights()
        return {n: cb.group_scores(n, weights[n]) for n in weights if n in cb._eligible}

    def layer_targets(self, sparsity: float) -> dict[str, float] | None:
        """Per-layer targets scaled to the current step of the schedule (an explicit per-layer table, or the one
        ``target=macs`` planned)."""
        cb = self.cb
        table = cb.layer_sparsity or cb._planned
        if not table:
            return None
        scale = min(sparsity / cb.final_sparsity, 1.0) if cb.final_sparsity > 0 else 1.0
        return {n: f * scale for n, f in table.items()}

    def allocation(
        self, sparsity: float, xs: dict[str, torch.Tensor] | None = None, scores: dict[str, torch.Tensor] | None = None
    ) -> dict[str, torch.Tensor]:
        """Masks that keep the top groups of ``xs`` (default: the weights) by :meth:`group_scores` (or the given
        ``scores``) at ``sparsity``."""
        cb = self.cb
        weights = cb.masks.weights()
        xs = weights if xs is None else xs
        if scores is None:
            scores = {n: cb.group_scores(n, xs[n]) for n in xs if n in cb._eligible}
        return allocate(
            weights,
            scores,
            sparsity,
            cb.granularity,
            cb.scope,
            cb.min_keep,
            self.layer_targets(sparsity),
            min_keep_fraction=cb.min_keep_fraction,
            round_to=cb.round_to,
        )

    def allocation_sparsity(self, sparsity: float) -> float:
        """Fraction of the prunable weights the masks of :meth:`allocation` at ``sparsity`` zero."""
        masks = self.allocation(sparsity)
        total = sum(m.numel() for m in masks.values())
        return 1.0 - sum(int(m.sum()) for m in masks.values()) / total

    def max_sparsity(self) -> float:
        """The largest sparsity the allocation accepts: every eligible layer at its floor (``min_keep_fraction``
        floors vanish as the kept budget does)."""
        cb, weights = self.cb, self.cb.masks.weights()
        total = sum(w.numel() for w in weights.values())
        zeros = 0
        for n in cb._eligible:
            count = math.prod(groups.group_shape(weights[n], cb.granularity))
            floor = keep_floor(count, cb.min_keep, 0.0, cb.round_to)
            zeros += (count - floor) * groups.group_size(weights[n], cb.granularity)
        return zeros / total

    def layer_prune_counts(self) -> dict[str, int]:
        """Groups to prune in each eligible layer for the final target, from the exact allocator on the current
        weights (``global``: groups ranked across layers; ``layer``: one ratio; or the explicit table)."""
        cb = self.cb
        masks = self.allocation(cb.final_sparsity)
        return {n: int((~groups.group_mask_of(masks[n], cb.granularity)).sum()) for n in sorted(cb._eligible)}

    # ----------------------------------------------------------------- the ratio on the compacted model
    def example(self) -> torch.Tensor:
        """The one input the model is compacted (and its MACs counted) on."""
        if self.cb.example_input is None:
            raise ValueError(
                f"pruning.granularity={self.cb.granularity} counts pruning.compression on the compacted model, "
                "which needs one example input: train with a datamodule that has num_channels and image_size, set "
                "the LightningModule's example_input_array, or set the callback's example_input"
            )
        return self.cb.example_input

    def floor_text(self) -> str:
        """What bounds the allocation, for the unreachable message."""
        cb = self.cb
        text = f"pruning.granularity={cb.granularity} keeps at least pruning.min_keep={cb.min_keep} groups"
        if cb.min_keep_fraction:
            text += f" and pruning.min_keep_fraction={cb.min_keep_fraction:g} of them"
        if cb.round_to:
            text += f", a multiple of pruning.round_to={cb.round_to},"
        return text + " in every layer, and one group moves the ratio in steps this coarse"

    def trial(self, example_input: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """Masks of the final target with every score equal, after checking that some allocation reaches it
        (:attr:`counts_compacted`: on the model compacted on ``example_input``, when given) and that an explicit
        ``layer_sparsity`` table agrees with ``compression``."""
        cb = self.cb
        weights = cb.masks.weights()
        zeros = {n: torch.zeros(groups.group_shape(weights[n], cb.granularity)) for n in cb._eligible}
        sparsity = cb.final_sparsity
        if cb.target == "macs":
            if example_input is None:
                raise ValueError("pruning.target=macs needs an example input to count MACs")
            if cb.layer_sparsity:
                raise ValueError(
                    "pruning.target=macs searches the per-layer ratios itself: drop pruning.layer_sparsity"
                )
        table = cb.layer_sparsity
        if cb.counts_compacted and example_input is not None:
            cb.example_input = example_input
            if cb.target == "macs":  # reachable by some allocation? (the uniform path, then single groups)
                plan = macs_target.plan_for(cb, scores=zeros, scope="layer")
                if not plan.met(cb.compression):
                    raise UnreachableCompressionError(
                        macs_target.nearest_message(
                            cb.compression, cb.target, plan.below, plan.above, self.floor_text()
                        )
                    )
                table = macs_target.fractions(cb, plan.counts)
            elif not cb.layer_sparsity:
                sparsity, _ = self.search(scores=zeros, steps=0)  # reachable at all?
        trial = allocate(
            weights,
            zeros,
            sparsity,
            cb.granularity,
            cb.scope,
            cb.min_keep,
            table,
            min_keep_fraction=cb.min_keep_fraction,
            round_to=cb.round_to,
        )
        if cb.layer_sparsity:  # a table is a statement of the compression too: the two must agree
            implied = None
            if cb.counts_compacted and cb.example_input is not None:
                dense = sum(w.numel() for w in weights.values())
                implied = dense / macs_target.compacted_cost(
                    cb.net, trial, cb.masks.dependents, cb.example_input, "params", list(weights)
                )
            check_table_compression(cb.compression, trial, implied)
        return trial

    @torch.no_grad()
    def calibrate(self) -> None:
        """:attr:`counts_compacted`: set :attr:`final_sparsity` to the sparsity of the masks whose compacted model
        meets :attr:`compression` in weights or MACs (:attr:`target`) on the current weights' ranking (``macs``:
        the per-layer group counts of :func:`macs_target.plan_for`, kept for every later allocation)."""
        cb = self.cb
        if cb.target == "macs":
            plan = macs_target.plan_for(cb)
            if not plan.met(cb.compression):  # the ranking's own path missed: the uniform one, as validated
                uniform = macs_target.plan_for(cb, scope="layer")
                plan = uniform if abs(uniform.reached - cb.compression) < abs(plan.reached - cb.compression) else plan
            cb._planned = macs_target.fractions(cb, plan.counts)
            cb.final_sparsity, cb.reached = self.allocation_sparsity(cb.final_sparsity), plan.reached
            cb.note = (
                None
                if plan.met(cb.compression)
                else macs_target.nearest_message(
                    cb.compression, cb.target, plan.below, plan.above, "no allocation the search tried met it"
                )
            )
            if cb.note:
                log.warning("%s: %s; pruning to %.3fx", cb.method, cb.note, plan.reached)
            log.info(
                "%s: %.2fx fewer MACs in the compacted model, groups pruned per layer %s",
                cb.method,
                cb.reached,
                plan.counts,
            )
            return
        cb.final_sparsity, cb.reached = self.search(min_sparsity=cb.current_sparsity)
        log.info(
            "%s: %.2fx fewer %s in the compacted model at mask sparsity %.4f",
            cb.method,
            cb.reached,
            "MACs" if cb.target == "macs" else "weights",
            cb.final_sparsity,
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
        cb = self.cb
        example = self.example()
        names = list(cb.masks.modules)
        dense = (
            macs_target.count_macs(cb.net, example)
            if cb.target == "macs"
            else sum(w.numel() for w in cb.masks.weights().values())
        )
        if steps is None:  # resolve one group of the ranking
            groups_total = sum(math.prod(groups.group_shape(m, cb.granularity)) for m in cb.masks.weights().values())
            steps = math.ceil(math.log2(groups_total)) + 2

        def cost_at(sparsity: float) -> int:
            masks = self.allocation(sparsity, scores=scores)
            return macs_target.compacted_cost(cb.net, masks, cb.masks.dependents, example, cb.target, names)

        compression = cb.compression if compression is None else compression
        return macs_target.sparsity_for_target(
            cost_at, dense, compression, self.max_sparsity(), steps, min_sparsity, cb.target
        )

    @torch.no_grad()
    def check_reached(self) -> None:
        """``target=macs``: the MACs ratio of the final masks, compacted (a method that chose its own groups within
        the planned counts may have removed other coupled channels than the plan), and :attr:`note` when it is off
        by more than 2 %."""
        cb = self.cb
        masks = {n: cb.masks.masks[n] for n in cb.masks.modules}
        example = self.example()
        dense = macs_target.count_macs(cb.net, example)
        cb.reached = dense / macs_target.compacted_cost(
            cb.net, masks, cb.masks.dependents, example, "macs", list(masks)
        )
        if not macs_target.within_band(cb.reached, cb.compression) and cb.note is None:
            cb.note = (
                f"pruning.compression={cb.compression:g} with pruning.target=macs: the final masks give "
                f"{cb.reached:.3f}x (the groups the method chose are coupled differently from the plan's)"
            )
            log.warning("%s: %s", cb.method, cb.note)

    @property
    def macs_reduction(self) -> float | None:
        """MACs reduction reached by the last calibration (``target=macs``)."""
        return self.cb.reached if self.cb.target == "macs" else None

    def tags(self) -> dict[str, str]:
        """MLflow tags of the run: ``target_reached`` (``target=macs``: the MACs ratio of the compacted model) and
        ``target_note`` when the ratio reached is not the one requested, with the reason."""
        out, cb = {}, self.cb
        if cb.target == "macs" and cb.reached is not None:
            out["target_reached"] = f"{cb.reached:.4g}"
        if cb.note:
            out["target_note"] = cb.note[:5000]
        return out

    def start(self, device: torch.device, dtype: torch.dtype) -> None:
        """When training starts: the example input on the model's device and in its floating dtype, and under
        :attr:`counts_compacted` the final sparsity calibrated on the ranking then (once: a resume keeps it; not
        for an explicit table, nor for a method that ranks only at its own pruning event)."""
        cb = self.cb
        if cb.counts_compacted or cb.target == "macs":
            x = self.example()
            cb.example_input = x.to(device=device, dtype=dtype) if x.is_floating_point() else x.to(device)
        if cb.counts_compacted and not cb._calibrated and cb.ranks_at_start and not cb.layer_sparsity:
            self.calibrate()
            cb._calibrated = True

    def state_dict(self) -> dict:
        """What the allocation found, kept on the callback and saved in its checkpoint: ``final_sparsity``;
        ``calibrated`` (the final sparsity was searched on the compacted model); ``planned`` (``target=macs``: the
        share of its groups each layer prunes); ``input_blocks`` and ``coupled`` (``target=macs``:
        :func:`macs_target.layer_structure`); ``reached`` (the ratio on the compacted model reached by the last
        calibration) and ``note`` (why it is not the one requested: the run's ``target_note`` tag)."""
        cb = self.cb
        return {
            "final_sparsity": cb.final_sparsity,
            "calibrated": cb._calibrated,
            "planned": cb._planned,
            "input_blocks": cb.input_blocks,
            "coupled": cb.coupled,
            "reached": cb.reached,
            "note": cb.note,
        }

    def load_state_dict(self, state: dict) -> None:
        """Inverse of :meth:`state_dict` (keys a checkpoint lacks keep their defaults)."""
        cb = self.cb
        cb.final_sparsity = state.get("final_sparsity", cb.final_sparsity)
        cb._calibrated = state.get("calibrated", False)
        cb._planned = state.get("planned")
        cb.input_blocks, cb.coupled = state.get("input_blocks"), state.get("coupled")
        cb.reached, cb.note = state.get("reached"), state.get("note")

    # ----------------------------------------------------------------- masks updated, pruned weights zeroed
    def _set(self, masks: dict[str, torch.Tensor], trainer: pl.Trainer | None) -> None:
        for name, mask in masks.items():
            self.cb.masks.set(name, mask)
        self.cb.masks.apply()
        if trainer is not None:
            self.cb.masks.mask_optimizer_state(trainer.optimizers)

    @torch.no_grad()
    def prune_to(self, sparsity: float, trainer: pl.Trainer | None = None) -> None:
        """Recompute masks for ``sparsity`` over the prunable weights and zero what they remove (the final target
        is searched again on the current ranking under :attr:`counts_compacted`, so the compacted ratio holds)."""
        cb = self.cb
        if groups.parse_nm(cb.granularity):
            sparsity = cb.final_sparsity  # an N:M mask has one sparsity: every scheduled update applies it
        elif cb.counts_compacted and not cb.layer_sparsity and sparsity >= cb.final_sparsity:
            self.calibrate()
            sparsity = cb.final_sparsity
        self._set(self.allocation(sparsity), trainer)
        cb.current_sparsity = sparsity
        log.debug("%s: pruned to sparsity %.4f (achieved %.4f)", cb.method, sparsity, cb.masks.sparsity())

    @torch.no_grad()
    def prune_to_compression(self, compression: float, trainer: pl.Trainer | None = None) -> None:
        """Prune to an intermediate ratio of a schedule, counted as :attr:`compression` is (on the compacted model
        under :attr:`counts_compacted`); a ratio at or above :attr:`compression` prunes to the final target."""
        cb = self.cb
        if compression >= cb.compression:
            cb.prune_to(cb.final_sparsity, trainer)
            return
        if cb.target == "macs":  # the groups per layer of this ratio, from what is pruned already
            plan = macs_target.plan_for(cb, compression=compression)
            masks = allocate(
                cb.masks.weights(),
                self.scores(),
                0.0,
                cb.granularity,
                cb.scope,
                cb.min_keep,
                macs_target.fractions(cb, plan.counts),
            )
            self._set(masks, trainer)
            cb.current_sparsity = cb.masks.sparsity()
            return
        sparsity = compression_to_sparsity(compression)
        if cb.counts_compacted and not cb.layer_sparsity:
            sparsity, _ = self.search(min_sparsity=cb.current_sparsity, compression=compression)
        cb.prune_to(sparsity, trainer)

    @torch.no_grad()
    def prune_groups(self, name: str, pruned: torch.Tensor, trainer: pl.Trainer | None = None) -> None:
        """Prune the groups flagged in ``pruned`` (shaped as :func:`groups.group_shape`) of one layer, leaving every
        other layer as it is: its weights, dependents and optimizer state are zeroed."""
        masks = self.cb.masks
        weight = masks.modules[name].weight
        keep = groups.expand(~pruned.to(weight.device), weight, self.cb.granularity)
        masks.set(name, masks.masks[name] & keep)
        masks.apply([name])
        if trainer is not None:
            masks.mask_optimizer_state(trainer.optimizers, [name])
