"""ADMM weight pruning (Zhang et al. 2018, arXiv 1804.03294) with structured projections, progressive ADMM (Ye et al.
2018, arXiv 1810.07378 and 1903.09769) and ADMM-NN's quantization phase (Ye et al. 2018, arXiv 1811.01907; Ren et
al., ASPLOS 2019, arXiv 1812.11677). docs/methods/admm.md.

The fit is a sequence of stages, each an ADMM phase, a hard event and masked retraining:

- one **prune** stage per ratio of the progressive schedule (one, at the target, without ``progressive``): the loss
  gets Σ ρ/2‖W − Z + U‖²_F, with Z ← Π(W + U), U ← U + W − Z every period and Π keeping the stage's ratio; then the
  hard prune (masks = support of Π(W)) and masked retraining. The next stage starts from the retrained weights and
  masks (pruned weights stay zero: Π never picks them again) with Z, U and ρ started afresh;
- with ``quantize``, a **quantize** stage on the pruned support: a step q per layer searched on the retrained
  weights, Z ← Q(W + U) (the nearest nonzero level; zeros stay zero); then the weights are snapped to their levels
  and retrained with a straight-through estimator: the forward/backward pass sees the weights on their levels, the
  optimizer steps a float copy (zero where pruned), and the weights are re-snapped after every optimizer step, so
  the zeros and the levels hold exactly at every forward pass, validation and checkpoint.

Every event is decided from the step count and the weights, identical on every rank under DDP.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from typing import Any

import pytorch_lightning as pl
import torch

from prunelab.pruning import groups
from prunelab.pruning.base import PruningCallback
from prunelab.pruning.checks import BASE_OPTIONS, check_choice, check_int, check_known, check_number
from prunelab.pruning.quantize import QuantSpec, project_levels, quantize, save_quantized, search_step
from prunelab.pruning.schedules import compression_to_sparsity, growth_to, progressive_ratios, stage_layout
from prunelab.pruning.training import restart_training, val_accuracy

log = logging.getLogger(__name__)

UPDATE_UNITS = ("steps", "epochs")
RETRAIN = ("restart", "continue")
AUTO = AUTO_GROWTH = "auto"
PRUNE, QUANTIZE = "prune", "quantize"
OPTIONS = (
    "rho",
    "rho_growth",
    "rho_max",
    "update_every",
    "update_unit",
    "admm_fraction",
    "retrain",
    "quantize",
    "progressive",
    "progressive_max_step",
    "eval_after_hard_prune",
    *BASE_OPTIONS,
)


def check_progressive(progressive, compression: float, max_step: float, granularity: str) -> list[float]:
    """The ratios of the prune stages: ``None`` → the target alone; ``"auto"`` → :func:`progressive_ratios`; a list
    of increasing ratios in (1, compression] → those, with the target appended when it is not the last."""
    if progressive is None:
        return [compression]
    stepped = groups.parse_nm(granularity) is None  # an N:M mask has one sparsity
    if progressive == AUTO:
        return progressive_ratios(compression, max_step) if stepped else [compression]
    if isinstance(progressive, str) or not isinstance(progressive, Sequence) or not progressive:
        raise ValueError(f"pruning.progressive={progressive!r} must be null, 'auto' or a list of increasing ratios")
    ratios = [check_number("progressive", r, 1.0) for r in progressive]
    if any(b <= a for a, b in zip(ratios, ratios[1:])) or ratios[-1] > compression:
        raise ValueError(
            f"pruning.progressive={list(progressive)!r} must increase and end at most at "
            f"pruning.compression={compression:g}"
        )
    ratios = ratios if ratios[-1] == compression else [*ratios, compression]
    if len(ratios) > 1 and not stepped:
        raise ValueError(
            f"pruning.progressive={list(progressive)!r} steps the ratio; pruning.granularity="
            f"{granularity!r} has one sparsity"
        )
    return ratios


class ADMMPruning(PruningCallback):
    """ADMM pruning to an exact sparsity, in one or several stages, optionally with per-layer quantization (ADMM-NN).

    Args:
        compression: requested ratio (see :class:`PruningCallback`); with ``layer_sparsity`` it must agree with it.
        rho: penalty ρ of the augmented Lagrangian at the start of every ADMM phase (fixed in the paper).
        rho_growth: factor applied to ρ after every Z/U update (1.0 = paper, ρ fixed; 1.3 as the later PyTorch
            code), or ``"auto"``: the factor that takes ρ from ``rho`` to ``rho_max`` at the phase's last update,
            whatever the number of updates (a growing ρ as in the later ADMM code, github.com/yeshaokai/
            Robustness-Aware-Pruning-ADMM ``admm_multi_rho_scheduler``, with its end point fixed instead of its
            factor). Default: 0.001 (the RAP MNIST config's ρ) → 0.3; a fixed ρ either left the weights far from Z
            at the hard prune or chose the support before the loss had a say (docs/methods/admm.md, "Figures").
        rho_max: cap on ρ when it grows (``None``: no cap); with ``rho_growth="auto"`` the ρ of the hard event.
        update_every: Z/U update period, in ``update_unit``.
        update_unit: ``steps`` (optimizer steps) or ``epochs``.
        admm_fraction: share of every stage spent in its ADMM phase; the rest retrains with fixed masks.
        retrain: ``restart`` (every retraining and every later ADMM phase starts with a fresh optimizer state and
            the cosine LR schedule restarted over its stage, as the authors' TF code retrains with a new Adam at the
            initial LR and each step of progressive ADMM is a training of its own; see
            :func:`prunelab.pruning.training.restart_training`) or ``continue`` (optimizer state and schedule go on).
        quantize: ``None`` or ``{bits: int | {layer: int}}`` or ``{levels_per_side: int | {layer: int}}``, with an
            optional ``share`` of the fit for the quantization phase (default 0.25).
        progressive: ``"auto"`` (default: geometric steps of ratio at most ``progressive_max_step``,
            :func:`prunelab.pruning.schedules.progressive_ratios`; one stage up to that ratio), ``None`` (one stage,
            the paper's one-shot ADMM) or a list of increasing ratios ending at (or
            below, then the target is appended) ``compression``. The stages share the prune part of the fit in
            proportion to log2 of their ratios.
        progressive_max_step: the largest ratio between two steps of ``progressive="auto"`` (64: one-shot ADMM
            holds to 64× on every cell of ``bench/robustness.py``; beyond, it fell off, docs/methods/admm.md).
        eval_after_hard_prune: validation accuracy right after every hard event (``<method>/acc_after_hard_prune``).
        **kwargs: granularity, scope, layers, exclude, layer_sparsity, min_keep (see :class:`PruningCallback`).
    """

    method = "admm"

    def __init__(
        self,
        compression: float,
        rho: float = 1e-3,
        rho_growth: float | str = AUTO_GROWTH,
        rho_max: float | None = 0.3,
        update_every: int = 20,
        update_unit: str = "steps",
        admm_fraction: float = 0.5,
        retrain: str = "restart",
        quantize=None,
        progressive="auto",
        progressive_max_step: float = 64.0,
        eval_after_hard_prune: bool = True,
        **kwargs,
    ) -> None:
        check_known("ADMM", kwargs, OPTIONS)
        super().__init__(compression, **kwargs)
        self.rho0 = self.rho = check_number("rho", rho, 0.0)
        self.rho_max = None if rho_max is None else check_number("rho_max", rho_max, 0.0)
        if rho_growth == AUTO_GROWTH:
            if self.rho_max is None:
                raise ValueError("pruning.rho_growth='auto' needs pruning.rho_max (the ρ reached at the hard prune)")
            self.rho_growth = AUTO_GROWTH
        else:
            self.rho_growth = check_number("rho_growth", rho_growth, 1.0, low_open=False)
        if self.rho_max is not None and self.rho_max < self.rho0 and self.rho_growth != 1.0:
            raise ValueError(
                f"pruning.rho_max={rho_max!r} must be >= pruning.rho={rho!r} (rho_growth='auto' raises ρ "
                "from rho to rho_max; rho_growth=1.0 keeps ρ fixed)"
            )
        self.growth = 1.0 if self.rho_growth == AUTO_GROWTH else self.rho_growth  # per update; auto: per stage
        self.update_every = check_int("update_every", update_every)
        self.update_unit = check_choice("update_unit", update_unit, UPDATE_UNITS)
        self.admm_fraction = check_number("admm_fraction", admm_fraction, 0.0, 1.0)
        self.retrain = check_choice("retrain", retrain, RETRAIN)
        self.quant = QuantSpec.from_config(quantize)
        self.max_step = check_number("progressive_max_step", progressive_max_step, 1.0)
        self.ratios = check_progressive(progressive, self.compression, self.max_step, self.granularity)
        self.kinds = [PRUNE] * len(self.ratios) + ([QUANTIZE] if self.quant is not None else [])
        self.eval_after_hard_prune = bool(eval_after_hard_prune)
        self.Z: dict[str, torch.Tensor] = {}
        self.U: dict[str, torch.Tensor] = {}
        self.stage, self.stage_hard = 0, False  # the stage now, and whether its hard event is behind it
        self.target_sparsity: float | None = None  # Π's sparsity in an intermediate prune stage
        self.last_update = -1  # global step of the last Z/U update (or of the stage's initialisation)
        self.q: dict[str, float] = {}  # quantization step per layer, fixed when the quantize stage starts
        self.latent: dict[str, torch.Tensor] = {}  # float weights behind the quantized ones while retraining
        self.acc_after_hard_prune: float | None = None
        self.bounds: list[tuple[int, int]] = []  # (start, hard) step of every stage
        self.total, self.per_epoch, self.period = 0, 1, 1
        self._stepped = False  # the optimizer stepped the float copy: snap to the levels after the step

    # ----------------------------------------------------------------- projection Π and the levels Q
    def bind(self, model: torch.nn.Module) -> None:
        super().bind(model)
        if self.quant is not None:
            self.quant.check_layers(list(self.masks.modules))

    @property
    def kind(self) -> str:
        return self.kinds[self.stage]

    def stage_sparsity(self) -> float:
        """The sparsity Π keeps in this stage: the target's in the last prune stage (and after it)."""
        if self.stage >= len(self.ratios) - 1 or self.target_sparsity is None:
            return self.final_sparsity
        return self.target_sparsity

    @torch.no_grad()
    def project(self, xs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Euclidean projection onto this stage's sparsity constraint: keep the top groups by the exact allocator.

        Exact for ``weight`` granularity and within a layer (``scope=layer`` or ``layer_sparsity``); for structured
        ``global`` scope the groups are ranked by RMS norm, the greedy order for the size-weighted knapsack. With
        ``scope=lamp`` LAMP scores of ``xs`` set the per-layer counts and the projection is exact within each layer
        for those counts (the constraint set then depends on ``xs``: a projection onto its own per-layer budgets).
        Groups already pruned by an earlier stage count as zero, so they are never kept again.
        """
        xs = {n: x * self.masks.masks[n] if n in self.masks.masks else x for n, x in xs.items()}
        masks = self.allocator.allocation(self.stage_sparsity(), xs)
        return {n: x * masks[n] for n, x in xs.items()}

    def _constrained_weights(self) -> dict[str, torch.Tensor]:
        """Weights of the layers with a Z/U pair: those pruned at this granularity, every pruned layer in the
        quantize stage."""
        modules = self.masks.modules
        return {n: modules[n].weight.detach() for n in modules if self.kind == QUANTIZE or n in self._eligible}

    # ----------------------------------------------------------------- schedule
    def _growth(self) -> float:
        """ρ's factor per update in this stage (``auto``: ``rho`` to ``rho_max`` at its last update)."""
        if self.rho_growth != AUTO_GROWTH:
            return self.rho_growth
        return growth_to(self.rho0, self.rho_max, self.bounds[self.stage], self.period)

    @property
    def hard_prune_step(self) -> int:
        """Step of the last prune stage's hard prune."""
        return self.bounds[len(self.ratios) - 1][1] if self.bounds else 0

    def _restart(self, trainer: pl.Trainer) -> None:
        """Fresh optimizer state and the cosine LR restarted over what is left of this stage."""
        end = self.bounds[self.stage + 1][0] if self.stage + 1 < len(self.bounds) else self.total
        restart_training(trainer, self.method, until=end, per_epoch=self.per_epoch)

    # ----------------------------------------------------------------- ADMM iterations
    @torch.no_grad()
    def init_admm(self) -> None:
        """Z ← Π(W) (or Q(W), with each layer's step q searched on its weights now), U ← 0."""
        w = self._constrained_weights()
        if self.kind == QUANTIZE:
            self.q = {n: search_step(w[n], self.quant.levels(n)) for n in w}
            self.Z = project_levels(w, self.q, self.quant)
        else:
            self.Z = self.project(w)
        self.U = {n: torch.zeros_like(x) for n, x in w.items()}

    @torch.no_grad()
    def admm_update(self) -> dict[str, float]:
        """One ADMM iteration (paper eqs. 8–9): Z ← Π(W + U), then U ← U + W − Z with the new Z; then ρ grows
        (optional), with the scaled dual rescaled by ρ_old/ρ_new (Boyd et al. 2011 §3.4.1)."""
        w = self._constrained_weights()
        xs = {n: w[n] + self.U[n] for n in w}
        z = project_levels(xs, self.q, self.quant) if self.kind == QUANTIZE else self.project(xs)
        z_change = math.sqrt(sum(float((z[n] - self.Z[n]).square().sum()) for n in w))
        for n in w:
            self.U[n].add_(w[n] - z[n])
        self.Z = z
        primal = math.sqrt(sum(float((w[n] - z[n]).square().sum()) for n in w))
        self.grow_rho()
        return {"admm/primal_residual": primal, "admm/z_change": z_change, "admm/rho": self.rho}

    @torch.no_grad()
    def grow_rho(self) -> None:
        """ρ ← min(ρ·growth, rho_max) after an update, the scaled dual U = Λ/ρ rescaled by ρ_old/ρ_new so that the
        multiplier Λ itself is unchanged (Boyd et al. 2011 §3.4.1)."""
        new_rho = self.rho * self.growth
        new_rho = min(new_rho, self.rho_max) if self.rho_max is not None else new_rho
        if self.growth != 1.0 and new_rho != self.rho:  # a fixed ρ is never capped
            for u in self.U.values():
                u.mul_(self.rho / new_rho)
            self.rho = new_rho

    @torch.no_grad()
    def hard_prune(self, trainer: pl.Trainer | None) -> None:
        """Masks = support of Π(W) at this stage's sparsity; zero the pruned weights and their optimizer state (or
        momentum regrows them)."""
        self.prune_to(self.stage_sparsity(), trainer)
        self.Z, self.U = {}, {}

    @torch.no_grad()
    def hard_quantize(self) -> None:
        """Snap every pruned layer to its levels, keeping the float weights behind them for the retraining."""
        if not self.q:  # training ended before the quantize stage: its steps from the weights now
            self.q = {n: search_step(m.weight.detach(), self.quant.levels(n)) for n, m in self.masks.modules.items()}
        for n, module in self.masks.modules.items():
            self.latent[n] = module.weight.detach().clone()
            module.weight.copy_(quantize(module.weight, self.q[n], self.quant.levels(n)))
        self.Z, self.U = {}, {}

    # ----------------------------------------------------------------- stages
    def _enter(self, stage: int, trainer: pl.Trainer) -> None:
        """Start a stage after the first: its ADMM phase from the retrained weights, Z, U and ρ afresh."""
        self.stage, self.stage_hard, self.rho = stage, False, self.rho0
        self.growth = self._growth()
        self.target_sparsity = self._target_sparsity() if self.kind == PRUNE else None
        self.init_admm()
        self.last_update = trainer.global_step
        if self.retrain == "restart":
            self._restart(trainer)

    def _target_sparsity(self) -> float | None:
        """Sparsity of this prune stage's ratio (searched on the compacted model where that is the count)."""
        if self.stage >= len(self.ratios) - 1:
            return None
        ratio = self.ratios[self.stage]
        if self.counts_compacted and not self.layer_sparsity:
            return self.allocator.search(min_sparsity=self.current_sparsity, compression=ratio)[0]
        return compression_to_sparsity(ratio)

    def _hard_event(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.kind == PRUNE:
            self.hard_prune(trainer)
            pl_module.log("prune/target_sparsity", self.current_sparsity, on_step=False, on_epoch=True)
        else:
            self.hard_quantize()
        self.stage_hard = True
        if self.retrain == "restart":
            self._restart(trainer)
        if self.eval_after_hard_prune:
            self.acc_after_hard_prune = val_accuracy(trainer, pl_module)
            if self.acc_after_hard_prune is not None:
                pl_module.log(
                    f"{self.method}/acc_after_hard_prune", self.acc_after_hard_prune, on_step=False, on_epoch=True
                )

    # ----------------------------------------------------------------- the core's method hooks
    @property
    def done(self) -> bool:
        """The last stage's hard event is behind: masks (and levels) fixed from here."""
        return self.stage == len(self.kinds) - 1 and self.stage_hard

    def start(self, trainer: pl.Trainer) -> None:
        # stage bounds from the fit's length: the prune stages share it in proportion to the doublings of their
        # ratios (log2 r_i, what the auto budget gives a one-shot prune to r_i: the later, harder steps get more), a
        # quantize stage takes its ``share`` of it
        self.total = int(trainer.estimated_stepping_batches)
        shares = [math.log2(r) for r in self.ratios]
        if self.quant is not None:
            shares.append(self.quant.share / (1.0 - self.quant.share) * sum(shares))
        self.per_epoch, self.period, self.bounds = stage_layout(
            self.total, trainer.max_epochs, shares, self.admm_fraction, self.update_every, self.update_unit
        )
        self.growth = self._growth()
        if self.stage == 0 and not self.stage_hard and not self.Z:  # a fresh fit (a resume keeps its Z/U)
            self.target_sparsity = self._target_sparsity()
            self.init_admm()
            self.last_update = trainer.global_step

    def before_batch(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        step = trainer.global_step
        while not self.done:
            start, hard = self.bounds[self.stage]
            if self.stage_hard:
                if step < self.bounds[self.stage + 1][0]:
                    return
                self._enter(self.stage + 1, trainer)
            elif step >= hard:
                self._hard_event(trainer, pl_module)
            else:
                if step > start and (step - start) % self.period == 0 and step != self.last_update:
                    signals = self.admm_update()
                    self.last_update = step
                    for key, value in signals.items():
                        pl_module.log(key, value, on_step=False, on_epoch=True)
                return

    @torch.no_grad()
    def regularize(self, trainer: pl.Trainer | None) -> None:
        if self.latent:  # straight-through: gradient taken at the levels, step applied to the float copy
            for n, latent in self.latent.items():
                self.masks.modules[n].weight.copy_(latent)
            self._stepped = True
            return
        for n in self.Z:  # ∂/∂W of ρ/2‖W − Z + U‖²_F (paper eq. 7), added to the task gradient
            w = self.masks.modules[n].weight
            if w.grad is not None:
                w.grad.add_(w - self.Z[n] + self.U[n], alpha=self.rho)

    @torch.no_grad()
    def after_step(self, trainer: pl.Trainer) -> None:
        if self._stepped:
            for n, latent in self.latent.items():
                w = self.masks.modules[n].weight
                latent.copy_(w)
                w.copy_(quantize(w, self.q[n], self.quant.levels(n)))
            self._stepped = False

    def finalize(self, trainer: pl.Trainer | None) -> None:
        """Training ended before the last stage's hard event: prune to the target and quantize now."""
        if self.current_sparsity < self.final_sparsity:
            self.stage, self.target_sparsity = len(self.ratios) - 1, None
            self.hard_prune(trainer)
        if self.quant is not None and not self.latent:
            self.stage = len(self.kinds) - 1
            self.hard_quantize()
        self.stage, self.stage_hard, self.Z, self.U = len(self.kinds) - 1, True, {}, {}

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if len(self.kinds) > 1:  # which stage the epoch ended in, and the ratio it prunes to
            pl_module.log(f"{self.method}/stage", float(self.stage))
            pl_module.log(f"{self.method}/step_target", self.ratios[min(self.stage, len(self.ratios) - 1)])

    # ----------------------------------------------------------------- storage and state
    def stored_bytes(self, path: str | os.PathLike) -> int | None:
        """Write the quantized stored form of the fitted network to ``path`` and return its size in bytes;
        ``None`` when not quantizing (the generic bitmask + float32 form applies)."""
        if self.quant is None or self.net is None or not self.done:
            return None
        return save_quantized(self.net, path, {n: (self.q[n], self.quant.levels(n)) for n in self.masks.modules})

    def layer_tensors(self) -> dict[str, dict[str, torch.Tensor]]:
        return {"Z": self.Z, "U": self.U, "latent": self.latent}

    def extra_state(self) -> dict[str, Any]:
        return {
            "rho": self.rho,
            "last_update": self.last_update,
            "q": dict(self.q),
            "acc_after_hard_prune": self.acc_after_hard_prune,
            "stage": self.stage,
            "stage_hard": self.stage_hard,
            "target_sparsity": self.target_sparsity,
        }

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.rho, self.last_update, self.q = state["rho"], state["last_update"], dict(state["q"])
        self.acc_after_hard_prune = state["acc_after_hard_prune"]
        if "stage" in state:
            self.stage, self.stage_hard = state["stage"], state["stage_hard"]
            self.target_sparsity = state["target_sparsity"]
        else:  # a checkpoint of one-stage ADMM
            old_done = self.current_sparsity >= self.final_sparsity
            self.stage, self.stage_hard = (len(self.kinds) - 1, True) if old_done else (0, False)

    def describe(self) -> dict[str, Any]:
        steps = ",".join(f"{r:.4g}" for r in self.ratios) if len(self.ratios) > 1 else None
        return {**super().describe(), "rho": self.rho0, "quantized": self.quant is not None, "progressive": steps}
