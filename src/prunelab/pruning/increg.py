"""IncReg: incremental regularization (Wang et al., arXiv 1804.09461 / 1811.08390; the authors' Caffe code,
MingSun-Tse/Caffe_IncReg, ``Reg_Col``/``Reg_Row``), structured by im2col columns or by filters.

Every group g of a pruned layer carries its own L2 factor λ_g: the loss gets Σ_g λ_g/2 ‖W_g‖², i.e. λ_g·w is added
to the gradient of the group's weights. Every step, before the forward, each layer still pruning

1. ranks its live groups by L1 norm (ascending: rank 0 = least important) and folds that instantaneous rank into a
   running mean over all iterations, h ← ((n − 1)·h + r)/n with n = global step + 1 (the authors' history rank);
2. ranks the live groups by h (``rank=history``, the authors' default) or by the instantaneous rank;
3. moves every live λ_g by Δλ(rank) (:func:`prunelab.pruning.increments.increment`, N_p = groups the layer still
   has to prune) and clips it at 0: the least important N_p groups are pushed up, the others pulled back;
4. prunes the groups whose λ_g reached the ceiling ``lambda_max`` — when more cross it in one step than the layer
   still needs, only as many as it needs, those with the largest λ first (ties: lowest rank) — so every layer stops
   at its exact count.

A layer stops (no more λ updates, no more λ·w) at its count; when every layer has stopped the masks are fixed and
training goes on as masked fine-tuning.

How the global ratio becomes per-layer counts: once, when training starts, the core's exact allocator turns
``compression`` into a number of groups to prune per layer: ``scope=layer`` (default) prunes the same share of groups
in every pruned layer, the share chosen so that the total hits the target, as the authors give each layer its own
ratio; ``scope=global`` ranks the groups of all layers together by RMS norm on the starting weights; an explicit
``layer_sparsity`` table overrides both. The counts are saved in checkpoints and never recomputed (not even on
resume from other weights); IncReg then decides *which* groups go.

Scaling to short runs: the authors grow λ by A = 2.5e-4 per step up to an effective ceiling of 6.13 (2.45e4 steps
for a group to reach it at the fastest). Here A = ``lambda_max`` / (``ramp`` · training steps), so a rank-0 group
reaches the ceiling after a share ``ramp`` of the fit, whatever its length; ``amplitude`` sets A directly instead.
"""

from __future__ import annotations

import logging
from typing import Any

import pytorch_lightning as pl
import torch

from prunelab.pruning import groups
from prunelab.pruning.base import PruningCallback
from prunelab.pruning.checks import BASE_OPTIONS, check_choice, check_known, check_number
from prunelab.pruning.increments import increment, live_ranks

log = logging.getLogger(__name__)

RANKS = ("history", "instantaneous")
GRANULARITIES = ("column", "filter")
OPTIONS = ("lambda_max", "ramp", "amplitude", "u", "rank", *BASE_OPTIONS)


class IncRegPruning(PruningCallback):
    """Incremental regularization pruning to exact per-layer group counts.

    Args:
        compression: requested ratio (see :class:`PruningCallback`); with ``layer_sparsity`` it must agree with it.
        lambda_max: the λ ceiling at which a group is pruned (the *effective* value: the authors' code multiplies
            its configured ``target_reg`` by 2.45 before use).
        ramp: share of the fit's steps a group needs to reach ``lambda_max`` at the largest increment A.
        amplitude: A, the largest increment per step; ``None`` derives it from ``ramp``.
        u: Δλ(N₁)/A, the increment at the symmetry point, in (0, 0.5) (0.25 in the authors' code).
        rank: ``history`` (running mean of the rank over all steps, the authors' default) or ``instantaneous``.
        granularity: ``column`` (im2col columns, the authors' main setting) or ``filter``.
        scope: how ``compression`` becomes per-layer counts (``layer``: one ratio; ``global``: RMS ranking).
        **kwargs: layers, exclude, layer_sparsity, min_keep (see :class:`PruningCallback`).
    """

    method = "increg"
    auto_scope = "layer"  # scope=auto under target=params

    def __init__(
        self,
        compression: float,
        lambda_max: float = 6.13,
        ramp: float = 0.05,
        amplitude: float | None = None,
        u: float = 0.25,
        rank: str = "history",
        granularity: str = "column",
        scope: str = "layer",
        **kwargs,
    ) -> None:
        check_known("IncReg", kwargs, OPTIONS)
        granularity = check_choice("granularity", granularity, GRANULARITIES)
        super().__init__(compression, granularity=granularity, scope=scope, **kwargs)
        self.lambda_max = check_number("lambda_max", lambda_max, 0.0)
        self.ramp = check_number("ramp", ramp, 0.0, 1.0)
        self.amplitude = None if amplitude is None else check_number("amplitude", amplitude, 0.0)
        self.u = check_number("u", u, 0.0, 0.5, high_open=True)
        self.rank = check_choice("rank", rank, RANKS)
        self.counts: dict[str, int] = {}  # groups to prune per layer, fixed when training starts
        self.A: float | None = None  # the increment amplitude in use, fixed when training starts
        self.lam: dict[str, torch.Tensor] = {}  # λ_g per layer, shaped as groups.group_shape
        self.hist: dict[str, torch.Tensor] = {}  # history rank h_g per layer

    # ----------------------------------------------------------------- per-layer bookkeeping
    def live(self, name: str) -> torch.Tensor:
        """Groups of layer ``name`` not pruned yet (bool, group-shaped)."""
        return groups.group_mask_of(self.masks.masks[name], self.granularity)

    def pruned(self, name: str) -> int:
        return int((~self.live(name)).sum())

    def active(self) -> list[str]:
        """Layers still pruning."""
        return [n for n, k in self.counts.items() if self.pruned(n) < k]

    def ranking(self, name: str, live: torch.Tensor) -> torch.Tensor:
        """Rank of every live group under the configured ranking (dead groups: −1)."""
        if self.rank == "history":
            return live_ranks(self.hist[name], live)
        weight = self.masks.modules[name].weight
        return live_ranks(groups.group_norms(weight, self.granularity, p=1), live)

    def _choose(self, name: str, candidates: torch.Tensor, k: int) -> torch.Tensor:
        """The ``k`` candidate groups with the largest λ (ties: lowest rank), as a group-shaped bool mask."""
        lam, rank = self.lam[name].flatten(), self.ranking(name, self.live(name)).flatten()
        index = torch.nonzero(candidates.flatten()).flatten()
        index = index[torch.argsort(rank[index], stable=True)]
        index = index[torch.argsort(-lam[index], stable=True)][:k]
        chosen = torch.zeros_like(candidates.flatten())
        chosen[index] = True
        return chosen.view_as(candidates)

    # ----------------------------------------------------------------- the core's method hooks
    def start(self, trainer: pl.Trainer) -> None:
        if not self.counts:  # fresh fit only: a resumed one keeps the counts of its checkpoint
            self.counts = self.allocator.layer_prune_counts()
        if self.A is None:
            steps = max(int(trainer.estimated_stepping_batches), 1)
            self.A = self.amplitude if self.amplitude is not None else self.lambda_max / max(self.ramp * steps, 1.0)
        self._init_state()

    def _init_state(self) -> None:
        """λ = 0 and h = 0 for every layer that has none yet, on the layer's device."""
        for name in self.counts:
            weight = self.masks.modules[name].weight
            shape = groups.group_shape(weight, self.granularity)
            for state in (self.lam, self.hist):
                if name not in state:
                    state[name] = torch.zeros(shape, dtype=torch.float64, device=weight.device)

    @torch.no_grad()
    def before_batch(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        n = trainer.global_step + 1
        for name in self.active():
            weight, live, lam = self.masks.modules[name].weight, self.live(name), self.lam[name]
            now = live_ranks(groups.group_norms(weight, self.granularity, p=1), live).to(torch.float64)
            # The authors rank pruned groups first, adding #pruned to every live rank: the same shift for all
            # live groups at every step, so the order of the running means is the same as here.
            self.hist[name] = torch.where(live, ((n - 1) * self.hist[name] + now) / n, self.hist[name])
            to_prune = self.counts[name] - self.pruned(name)
            rank = self.ranking(name, live)
            delta = increment(rank[live], to_prune, self.A, self.u)
            lam[live] = (lam[live] + delta).clamp(min=0.0)
            crossed = live & (lam >= self.lambda_max)
            if crossed.any():
                self.allocator.prune_groups(name, self._choose(name, crossed, to_prune), trainer)

    @torch.no_grad()
    def regularize(self, trainer: pl.Trainer | None) -> None:
        for name in self.active():  # ∂/∂W of Σ_g λ_g/2 ‖W_g‖²
            weight = self.masks.modules[name].weight
            if weight.grad is not None:
                factor = groups.expand(self.lam[name].to(weight.dtype), weight, self.granularity)
                weight.grad.add_(weight * factor)

    def after_step(self, trainer: pl.Trainer) -> None:
        module = trainer.lightning_module
        for name in self.counts:
            live = self.live(name)
            pruned = (~live).sum().to(torch.float32)
            mean_lam = self.lam[name][live].mean() if live.any() else torch.zeros((), dtype=torch.float64)
            module.log(f"increg/groups_pruned/{name}", pruned, on_step=False, on_epoch=True, reduce_fx="max")
            module.log(f"increg/mean_lambda/{name}", mean_lam.float(), on_step=False, on_epoch=True)
        done = sum(self.pruned(n) >= k for n, k in self.counts.items())
        module.log("increg/layers_done", float(done), on_step=False, on_epoch=True, reduce_fx="max")
        module.log("increg/amplitude", float(self.A), on_step=False, on_epoch=True)  # A derived from ramp

    @property
    def done(self) -> bool:
        return bool(self.counts) and not self.active()

    @torch.no_grad()
    def finalize(self, trainer: pl.Trainer | None) -> None:
        """Training ended first: prune each unfinished layer's remaining groups, largest λ first (ties: rank)."""
        missing = {}
        for name in self.active():
            missing[name] = self.counts[name] - self.pruned(name)
            self.allocator.prune_groups(name, self._choose(name, self.live(name), missing[name]), trainer)
        log.warning("increg: training ended before λ pruned every group; pruned the rest by λ/rank %s", missing)

    # ----------------------------------------------------------------- state
    def layer_tensors(self) -> dict[str, dict[str, torch.Tensor]]:
        return {"lambda": self.lam, "history_rank": self.hist}

    def extra_state(self) -> dict[str, Any]:
        return {"counts": dict(self.counts), "A": self.A}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.counts, self.A = dict(state["counts"]), state["A"]

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "lambda_max": self.lambda_max, "ramp": self.ramp, "u": self.u, "rank": self.rank}
