"""ADMM weight pruning (Zhang et al. 2018, arXiv 1804.03294) with structured projections and ADMM-NN joint
quantization (Ye et al. 2019, arXiv 1812.11677). docs/methods/admm.md.

Phases: ``prune`` (the ADMM phase) trains the dense weights with the augmented-Lagrangian term Σ ρ/2‖W − Z + U‖²_F,
updating Z ← Π(W + U), U ← U + W − Z every period; then a hard prune (masks = support of Π(W)); then ``finetune``
(masked retraining). Quantized layers are retrained with a straight-through estimator: the forward/backward pass sees the weights
on their levels, the optimizer steps a float copy (zero where pruned), and the weights are re-snapped after every
optimizer step, so both the zeros and the levels hold exactly at every forward pass, validation and checkpoint.
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any

import pytorch_lightning as pl
import torch

from prunelab.pruning.base import BASE_OPTIONS, PruningCallback
from prunelab.pruning.checks import check_choice, check_int, check_known, check_number
from prunelab.pruning.quantize import QuantSpec, quantize, save_quantized, scan_step

log = logging.getLogger(__name__)

UPDATE_UNITS = ("steps", "epochs")
RETRAIN = ("restart", "continue")
AUTO_GROWTH = "auto"
OPTIONS = ("rho", "rho_growth", "rho_max", "update_every", "update_unit", "admm_fraction", "retrain", "quantize",
           "eval_after_hard_prune", *BASE_OPTIONS)


class ADMMPruning(PruningCallback):
    """ADMM pruning to an exact sparsity, optionally with per-layer quantization (ADMM-NN).

    Args:
        compression: requested ratio (see :class:`PruningCallback`); with ``layer_sparsity`` it must agree with it.
        rho: penalty ρ of the augmented Lagrangian at the start of the ADMM phase (fixed in the paper).
        rho_growth: factor applied to ρ after every Z/U update (1.0 = paper, ρ fixed; 1.3 as the later PyTorch
            code), or ``"auto"``: the factor that takes ρ from ``rho`` to ``rho_max`` at the phase's last update,
            whatever the number of updates (a growing ρ as in the later ADMM code, github.com/yeshaokai/
            Robustness-Aware-Pruning-ADMM ``admm_multi_rho_scheduler``, with its end point fixed instead of its
            factor). Default: 0.001 (the RAP MNIST config's ρ) → 0.3; a fixed ρ either left the weights far from Z
            at the hard prune or chose the support before the loss had a say (``bench/robustness.py``, README "Why ρ
            rises").
        rho_max: cap on ρ when it grows (``None``: no cap); with ``rho_growth="auto"`` the ρ of the hard prune.
        update_every: Z/U update period, in ``update_unit``.
        update_unit: ``steps`` (optimizer steps) or ``epochs``.
        admm_fraction: share of the fit's steps spent in the ADMM phase; the rest retrains with fixed masks.
        retrain: ``restart`` (the masked retraining starts with a fresh optimizer state and the cosine LR schedule
            restarted over the steps left, as the authors' TF code retrains with a new Adam at the initial LR and the
            RAP code's retrain stage is a run of its own; see :meth:`PruningCallback.restart_training`) or
            ``continue`` (optimizer state and schedule go on).
        quantize: ``None`` or ``{bits: int | {layer: int}}`` or ``{levels_per_side: int | {layer: int}}``.
        eval_after_hard_prune: validation accuracy right after the hard prune (``<method>/acc_after_hard_prune``).
        **kwargs: granularity, scope, layers, exclude, layer_sparsity, min_keep (see :class:`PruningCallback`).
    """

    method = "admm"

    def __init__(self, compression: float, rho: float = 1e-3, rho_growth: float | str = AUTO_GROWTH,
                 rho_max: float | None = 0.3,
                 update_every: int = 20, update_unit: str = "steps", admm_fraction: float = 0.5,
                 retrain: str = "restart", quantize=None, eval_after_hard_prune: bool = True, **kwargs) -> None:
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
            raise ValueError(f"pruning.rho_max={rho_max!r} must be >= pruning.rho={rho!r} (rho_growth='auto' raises ρ "
                             "from rho to rho_max; rho_growth=1.0 keeps ρ fixed)")
        self.growth = 1.0 if self.rho_growth == AUTO_GROWTH else self.rho_growth  # per update; auto: set by _schedule
        self.update_every = check_int("update_every", update_every)
        self.update_unit = check_choice("update_unit", update_unit, UPDATE_UNITS)
        self.admm_fraction = check_number("admm_fraction", admm_fraction, 0.0, 1.0)
        self.retrain = check_choice("retrain", retrain, RETRAIN)
        self.quant = QuantSpec.from_config(quantize)
        self.eval_after_hard_prune = bool(eval_after_hard_prune)
        self.Z: dict[str, torch.Tensor] = {}
        self.U: dict[str, torch.Tensor] = {}
        self.last_update = -1  # global step of the last Z/U update (or of the initialisation)
        self.q: dict[str, float] = {}  # quantization step per layer, fixed once
        self.latent: dict[str, torch.Tensor] = {}  # float weights behind the quantized ones while retraining
        self.acc_after_hard_prune: float | None = None
        self.hard_prune_step, self.period = 0, 1
        self._stepped = False  # the optimizer stepped the float copy: snap to the levels after the step

    # ----------------------------------------------------------------- projection Π (and Q for ADMM-NN)
    def bind(self, model: torch.nn.Module) -> None:
        super().bind(model)
        if self.quant is not None:
            self.quant.check_layers(list(self.masks.modules))

    def constrained(self) -> list[str]:
        """Layers with a Z/U pair: those pruned at this granularity, and every layer when quantizing."""
        return [n for n in self.masks.modules if self.quant is not None or n in self._eligible]

    @torch.no_grad()
    def project(self, xs: dict[str, torch.Tensor], quantized: bool = True) -> dict[str, torch.Tensor]:
        """Euclidean projection onto the sparsity constraint: keep the top groups by the exact allocator.

        Exact for ``weight`` granularity and within a layer (``scope=layer`` or ``layer_sparsity``); for structured
        ``global`` scope the groups are ranked by RMS norm, the greedy order for the size-weighted knapsack. With
        ``scope=lamp`` LAMP scores of ``xs`` set the per-layer counts and the projection is exact within each layer
        for those counts (the constraint set then depends on ``xs``: a projection onto its own per-layer budgets).
        Quantized layers then go to their nearest nonzero level (ADMM-NN: prune, then quantize the survivors).
        """
        masks = self.allocation(self.final_sparsity, xs)
        out = {n: x * masks[n] for n, x in xs.items()}
        if quantized and self.quant is not None:
            out = {n: quantize(z, self.q[n], self.quant.levels(n)) for n, z in out.items()}
        return out

    def _constrained_weights(self) -> dict[str, torch.Tensor]:
        return {n: self.masks.modules[n].weight.detach() for n in self.constrained()}

    # ----------------------------------------------------------------- schedule
    def _schedule(self, trainer: pl.Trainer) -> None:
        total = int(trainer.estimated_stepping_batches)
        if self.update_unit == "epochs":
            epochs = max(int(trainer.max_epochs or 1), 1)
            per_epoch = max(total // epochs, 1)
            self.period = self.update_every * per_epoch
            self.hard_prune_step = round(self.admm_fraction * epochs) * per_epoch
        else:
            self.period = self.update_every
            self.hard_prune_step = int(self.admm_fraction * total)
        if self.rho_growth == AUTO_GROWTH:  # updates at period, 2·period, … before the hard prune
            updates = len(range(self.period, self.hard_prune_step, self.period))
            self.growth = (self.rho_max / self.rho0) ** (1.0 / max(updates, 1))

    # ----------------------------------------------------------------- ADMM iterations
    @torch.no_grad()
    def init_admm(self) -> None:
        """Z ← Π(W), U ← 0 (and the per-layer quantization steps, fixed from here on)."""
        w = self._constrained_weights()
        if self.quant is not None and not self.q:
            pruned = self.project(w, quantized=False)
            self.q = {n: scan_step(pruned[n], self.quant.levels(n)) for n in w}
        self.Z = self.project(w)
        self.U = {n: torch.zeros_like(x) for n, x in w.items()}

    @torch.no_grad()
    def admm_update(self) -> dict[str, float]:
        """One ADMM iteration (paper eqs. 8–9): Z ← Π(W + U), then U ← U + W − Z with the new Z; then ρ grows
        (optional), with the scaled dual rescaled by ρ_old/ρ_new (Boyd et al. 2011 §3.4.1)."""
        w = self._constrained_weights()
        z = self.project({n: w[n] + self.U[n] for n in w})
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
        """Masks = support of Π(W); zero the pruned weights and their optimizer state (or momentum regrows them);
        snap quantized layers to their levels."""
        self.prune_to(self.final_sparsity, trainer)
        if self.quant is not None:
            for n, module in self.masks.modules.items():
                self.latent[n] = module.weight.detach().clone()
                module.weight.copy_(quantize(module.weight, self.q[n], self.quant.levels(n)))
        self.Z, self.U = {}, {}

    # ----------------------------------------------------------------- the core's method hooks
    def start(self, trainer: pl.Trainer) -> None:
        self._schedule(trainer)
        if not self.done and not self.Z:
            self.init_admm()
            self.last_update = trainer.global_step

    def before_batch(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        step = trainer.global_step
        if step >= self.hard_prune_step:
            self.hard_prune(trainer)
            if self.retrain == "restart":
                self.restart_training(trainer)
            pl_module.log("prune/target_sparsity", self.final_sparsity, on_step=False, on_epoch=True)
            if self.eval_after_hard_prune:
                self.acc_after_hard_prune = self.val_accuracy(trainer, pl_module)
                if self.acc_after_hard_prune is not None:
                    pl_module.log(f"{self.method}/acc_after_hard_prune", self.acc_after_hard_prune,
                                  on_step=False, on_epoch=True)
        elif step % self.period == 0 and step != self.last_update:
            signals = self.admm_update()
            self.last_update = step
            for key, value in signals.items():
                pl_module.log(key, value, on_step=False, on_epoch=True)

    @torch.no_grad()
    def regularize(self, trainer: pl.Trainer | None) -> None:
        if not self.done:
            for n in self.Z:  # ∂/∂W of ρ/2‖W − Z + U‖²_F (paper eq. 7), added to the task gradient
                w = self.masks.modules[n].weight
                if w.grad is not None:
                    w.grad.add_(w - self.Z[n] + self.U[n], alpha=self.rho)
        elif self.latent:  # straight-through: gradient taken at the levels, step applied to the float copy
            for n, latent in self.latent.items():
                self.masks.modules[n].weight.copy_(latent)
            self._stepped = True

    @torch.no_grad()
    def after_step(self, trainer: pl.Trainer) -> None:
        if self._stepped:
            for n, latent in self.latent.items():
                w = self.masks.modules[n].weight
                latent.copy_(w)
                w.copy_(quantize(w, self.q[n], self.quant.levels(n)))
            self._stepped = False

    def finalize(self, trainer: pl.Trainer | None) -> None:
        self.hard_prune(trainer)

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
        return {"rho": self.rho, "last_update": self.last_update, "q": dict(self.q),
                "acc_after_hard_prune": self.acc_after_hard_prune}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.rho, self.last_update, self.q = state["rho"], state["last_update"], dict(state["q"])
        self.acc_after_hard_prune = state["acc_after_hard_prune"]

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "rho": self.rho0, "quantized": self.quant is not None}
