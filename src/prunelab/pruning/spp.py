"""SPP — Structured Probabilistic Pruning (Wang, Zhang, Wang, Hu; BMVC 2018, arXiv 1709.06994).

Every group (an im2col column, or a filter) of a pruned layer has a pruning probability p, starting at 0. Every
``prune_interval`` steps the layer's live groups are ranked by importance (L1 norm, ascending; optionally a decayed
history of it) and each p moves by the rank increment Δ(r) of :mod:`prunelab.pruning.increments`:
p ← clip(p + Δ(r), 0, 1) (paper eqs. 3–5). The least important N_p groups (N_p = groups the layer still has to
prune) gain probability, the others lose it. At every training step each group is dropped with probability p for
that step only (a fresh Bernoulli draw; the weights come back bit for bit after the step). A group whose p reaches 1
is pruned for good. A layer stops when it has pruned its count; from then on its mask is deterministic. When every
layer has stopped, training goes on with fixed masks.

Per-layer counts: the global ``compression`` is turned into a number of groups per layer once, at the start of the
fit, by the core's exact allocator on the dense weights (``scope=global``: groups of all layers ranked together by
RMS norm; ``scope=layer``: one ratio for every layer; or the explicit ``layer_sparsity`` table), so the target is
met to within one group. SPP's own L1 ranking then decides *which* groups of each layer go.

Deviations from the authors' Caffe code (MingSun-Tse/Caffe_IncReg@2749a56, ``ProbPruneCol``): the dropped weights
are zero for the forward *and* the backward pass (the Caffe code restores them before backward), as the paper
states; validation and test use the deterministic mask (pruned groups off, all others on), the Caffe code samples
there too; a layer never prunes more groups than its count (the Caffe code prunes every group that reaches p = 1);
layer priorities are not implemented (all layers prune at once, the code's default).
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import pytorch_lightning as pl
import torch

from prunelab.pruning import groups
from prunelab.pruning.base import PruningCallback
from prunelab.pruning.checks import BASE_OPTIONS, check_choice, check_int, check_known, check_number
from prunelab.pruning.increments import SHAPES, increment, live_ranks

log = logging.getLogger(__name__)

GRANULARITIES = ("column", "filter")
MASK_MODES = ("group", "element")
RANK_CHURN = 1.25  # plan for this many times the updates a fixed ranking needs: in training the ranks move
OPTIONS = ("A", "u", "prune_interval", "prune_fraction", "mask_mode", "score_decay", "increment", *BASE_OPTIONS)


class SPPPruning(PruningCallback):
    """Structured probabilistic pruning to exact per-layer group counts.

    Args:
        compression: requested ratio (see :class:`PruningCallback`).
        A: largest change of p in one update (Δ(0)); ``None`` derives it from ``prune_fraction``.
        u: Δ(N₁)/A, the centre of symmetry of the increment.
        prune_interval: steps between two updates of p.
        prune_fraction: share of the fit's steps in which pruning should end (sets the derived A).
        mask_mode: ``group`` (one draw per group) or ``element`` (one draw per weight, probability of its group).
        score_decay: d in h ← d·h + L1 (0: the instantaneous L1 norm).
        increment: ``exponential`` (the paper's) or ``linear`` (the code's PP-linear alternative).
        **kwargs: granularity (``column`` or ``filter``) and the allocation options of :class:`PruningCallback`
            (scope, layers, exclude, layer_sparsity, min_keep, min_keep_fraction, round_to, target).
    """

    method = "spp"
    auto_scope = "layer"  # scope=auto under target=params

    def __init__(
        self,
        compression: float,
        A: float | None = None,
        u: float = 0.25,
        prune_interval: int = 1,
        prune_fraction: float = 0.5,
        mask_mode: str = "group",
        score_decay: float = 0.0,
        increment: str = "exponential",
        **kwargs,
    ) -> None:
        check_known("SPP", kwargs, OPTIONS)
        kwargs["granularity"] = check_choice("granularity", kwargs.get("granularity", "column"), GRANULARITIES)
        super().__init__(compression, **kwargs)
        self.A = None if A is None else check_number("A", A, 0.0, 1.0)
        self.u = check_number("u", u, 0.0, 0.5, high_open=True)
        self.prune_interval = check_int("prune_interval", prune_interval)
        self.prune_fraction = check_number("prune_fraction", prune_fraction, 0.0, 1.0)
        self.mask_mode = check_choice("mask_mode", mask_mode, MASK_MODES)
        self.score_decay = check_number("score_decay", score_decay, 0.0, 1.0, low_open=False, high_open=True)
        self.shape = check_choice("increment", increment, SHAPES)
        self.p: dict[str, torch.Tensor] = {}  # pruning probability per group (float64)
        self.score: dict[str, torch.Tensor] = {}  # (decayed) L1 norm per group
        self.counts: dict[str, int] = {}  # groups each layer prunes in all, fixed at the start of the fit
        self.amplitude = 0.0  # the A in use: ``A``, or derived from the pruning window at the start
        self.total_steps = 0
        self.finished_at: dict[str, int] = {}  # step at which each layer reached its count
        self.gen: torch.Generator | None = None

    # ----------------------------------------------------------------- bookkeeping
    def pruned_count(self, name: str) -> int:
        """Groups of layer ``name`` pruned so far (read from its mask)."""
        return int((~groups.group_mask_of(self.masks.masks[name], self.granularity)).sum())

    def live(self, name: str) -> torch.Tensor:
        return groups.group_mask_of(self.masks.masks[name], self.granularity).bool()

    def unfinished(self) -> list[str]:
        """Layers that still have groups to prune, in a fixed order."""
        return [n for n in sorted(self.counts) if self.pruned_count(n) < self.counts[n]]

    @property
    def done(self) -> bool:
        return bool(self.counts) and not self.unfinished()

    def planned_updates(self, amplitude: float) -> int:
        """Updates of p the slowest layer needs at ``amplitude`` if the ranking never changed (a lower bound)."""
        return max(
            (_static_updates(self.p[n].numel(), k, amplitude, self.u, self.shape) for n, k in self.counts.items()),
            default=0,
        )

    def prune_end_fraction(self) -> float | None:
        """Share of the fit's steps after which every layer had reached its count (``None``: not reached)."""
        if not self.counts or len(self.finished_at) < len(self.counts):
            return None
        return (max(self.finished_at.values(), default=-1) + 1) / max(self.total_steps, 1)

    # ----------------------------------------------------------------- the core's method hooks
    def start(self, trainer: pl.Trainer) -> None:
        self.total_steps = int(trainer.estimated_stepping_batches)
        if self.gen is not None:  # resumed: the checkpoint brought counts, p, scores, A and the generator
            return
        self.counts = self.allocator.layer_prune_counts()
        for name in self.counts:
            weight = self.masks.modules[name].weight
            shape = groups.group_shape(weight, self.granularity)
            self.p[name] = torch.zeros(shape, dtype=torch.float64, device=weight.device)
            self.score[name] = torch.zeros(shape, dtype=torch.float64, device=weight.device)
        self.gen = torch.Generator().manual_seed(torch.initial_seed())
        updates = int(self.prune_fraction * self.total_steps) // self.prune_interval
        self.amplitude = self.A if self.A is not None else self._derived_amplitude(updates)
        planned = self.planned_updates(self.amplitude)
        if planned > updates:
            log.warning(
                "spp: at A=%.3g pruning needs at least %d updates of p, more than the %d in the pruning window "
                "(prune_fraction=%g, prune_interval=%d): it may not finish before training ends",
                self.amplitude,
                planned,
                updates,
                self.prune_fraction,
                self.prune_interval,
            )
        log.info(
            "spp: groups to prune per layer %s; A=%.3g, p updated every %d steps",
            self.counts,
            self.amplitude,
            self.prune_interval,
        )

    def _derived_amplitude(self, updates: int) -> float:
        """The A at which pruning would take ``updates / RANK_CHURN`` updates with a fixed ranking (about
        (1 + 1.2·ln k)/A updates for a layer pruning k groups, nearly independent of A: a fixed point in a few
        rounds)."""
        amplitude = 0.05
        for _ in range(3):
            amplitude = min(RANK_CHURN * self.planned_updates(amplitude) * amplitude / max(updates, 1), 1.0)
        return amplitude

    def before_batch(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        step = trainer.global_step
        for name in self.unfinished():  # the authors rank by a score refreshed every iteration
            norms = groups.group_norms(self.masks.modules[name].weight, self.granularity, p=1)
            self.score[name].mul_(self.score_decay).add_(norms.to(torch.float64))
        if step % self.prune_interval:
            return
        self.update(trainer)
        for name in self.counts:
            if name not in self.finished_at and self.pruned_count(name) >= self.counts[name]:
                self.finished_at[name] = step
        self._log(pl_module, step)

    @torch.no_grad()
    def update(self, trainer: pl.Trainer | None = None) -> None:
        """One update of p in every unfinished layer (paper eqs. 3–5); prune the groups that reach p = 1, never more
        than the layer still needs (lowest rank first)."""
        for name in self.unfinished():
            live, to_prune = self.live(name), self.counts[name] - self.pruned_count(name)
            rank = live_ranks(self.score[name], live)
            delta = increment(rank.to(torch.float64), to_prune, self.amplitude, self.u, self.shape)
            p = self.p[name]
            p.copy_(torch.where(live, (p + delta).clamp(0.0, 1.0), p))
            reached = live & (p >= 1.0)
            if reached.any():
                order = torch.argsort(torch.where(reached, rank, rank.numel()).flatten(), stable=True)
                pruned = torch.zeros_like(live).flatten()
                pruned[order[: min(int(reached.sum()), to_prune)]] = True
                self.allocator.prune_groups(name, pruned.view_as(live), trainer)

    def transient_masks(self, trainer: pl.Trainer) -> dict[str, torch.Tensor] | None:
        """Keep-masks for this step: in every unfinished layer, keep a live group (or weight, ``element``) when a
        uniform draw U < 1 − p."""
        keep = {}
        for name in self.unfinished():
            weight, p = self.masks.modules[name].weight, self.p[name]
            if self.mask_mode == "group":
                draw = torch.rand(p.shape, generator=self.gen, dtype=torch.float64).to(p.device)
                kept = groups.expand(draw < 1.0 - p, weight, self.granularity)
            else:
                draw = torch.rand(weight.shape, generator=self.gen, dtype=torch.float64).to(p.device)
                kept = draw < groups.expand(1.0 - p, weight, self.granularity)
            keep[name] = kept & self.masks.masks[name]
        return keep or None

    @torch.no_grad()
    def finalize(self, trainer: pl.Trainer | None) -> None:
        """Training ended before every layer reached its count: prune each unfinished layer's remaining groups by
        highest p, then lowest score."""
        forced = {}
        for name in self.unfinished():
            live, to_prune = self.live(name), self.counts[name] - self.pruned_count(name)
            by_score = torch.argsort(self.score[name].flatten(), stable=True)
            p = torch.where(live, self.p[name], -1.0).flatten()[by_score]
            order = by_score[torch.argsort(-p, stable=True)]
            pruned = torch.zeros_like(live).flatten()
            pruned[order[:to_prune]] = True
            self.allocator.prune_groups(name, pruned.view_as(live), trainer)
            self.p[name][pruned.view_as(live)] = 1.0
            forced[name] = to_prune
        if forced:
            log.warning(
                "spp: training ended before every layer reached its count; pruned the remaining groups by "
                "highest p (then lowest L1 norm): %s",
                forced,
            )

    def _log(self, pl_module: pl.LightningModule, step: int) -> None:
        for name in self.counts:
            live = self.live(name)
            mean_p = float(self.p[name][live].mean()) if live.any() else 1.0
            pl_module.log(
                f"spp/groups_pruned/{name}",
                float(self.pruned_count(name)),
                on_step=False,
                on_epoch=True,
                reduce_fx="max",
            )
            pl_module.log(f"spp/mean_p/{name}", mean_p, on_step=False, on_epoch=True)
        pl_module.log("spp/A", self.amplitude, on_step=False, on_epoch=True)
        pl_module.log("spp/layers_done", float(len(self.finished_at)), on_step=False, on_epoch=True, reduce_fx="max")
        if self.done:
            pl_module.log("spp/prune_end_fraction", self.prune_end_fraction(), on_step=False, on_epoch=True)

    # ----------------------------------------------------------------- state
    def layer_tensors(self) -> dict[str, dict[str, torch.Tensor]]:
        return {"p": self.p, "score": self.score}

    def extra_state(self) -> dict[str, Any]:
        return {
            "counts": dict(self.counts),
            "amplitude": self.amplitude,
            "finished_at": dict(self.finished_at),
            "generator": None if self.gen is None else self.gen.get_state(),
        }

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.counts, self.amplitude = dict(state["counts"]), state["amplitude"]
        self.finished_at = dict(state["finished_at"])
        self.gen = None
        if state["generator"] is not None:
            self.gen = torch.Generator()
            self.gen.set_state(state["generator"])

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "A": "auto" if self.A is None else self.A,
            "mask_mode": self.mask_mode,
            "score_decay": self.score_decay,
        }


@functools.lru_cache(maxsize=256)
def _static_updates(groups_total: int, count: int, amplitude: float, u: float, shape: str) -> int:
    """Updates of p until ``count`` of ``groups_total`` groups are pruned when the ranking never changes."""
    if count <= 0:
        return 0
    p = torch.zeros(groups_total, dtype=torch.float64)
    rank = torch.arange(groups_total, dtype=torch.float64)
    pruned, updates = 0, 0
    while pruned < count:
        p[pruned:] = (p[pruned:] + increment(rank[: groups_total - pruned], count - pruned, amplitude, u, shape)).clamp(
            0.0, 1.0
        )
        pruned += min(int((p[pruned:] >= 1.0).sum()), count - pruned)  # reached p = 1 ⇔ lowest ranks, in order
        updates += 1
    return updates
