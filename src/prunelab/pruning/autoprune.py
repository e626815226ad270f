"""AutoPrune: pruning by training auxiliary gate parameters (Xiao, Wang, Rajasekaran, NeurIPS 2019).

What the paper's abstract and public reviews establish, and this follows: pruning is decided by trainable auxiliary
parameters M (gates), not by regularizing the weights; weights and gates have *separate* gradient rules, the gates'
through a straight-through estimator (STE) whose plain linear form the paper finds poor (a leaky-ReLU-shaped one is
suggested); pruning is recoverable (a weight switched off keeps its value and comes back when its gate reopens).
The method section itself could not be read (no public copy or code was found), so every detail below is prunelab's
choice, not the paper's:

- one gate per weight (``granularity=weight``) or per output filter/neuron (``filter``), initialised to the group's
  magnitude score, so the first masks are the magnitude masks (equal gates would be ranked by index);
- forward with T = W ⊙ h(M); h opens the top gates at the step's sparsity s_t, which follows Zhu & Gupta's cubic
  schedule to the target over ``prune_fraction`` of the fit (the paper thresholds at a fixed value and lets the
  regulariser decide how much is pruned; prunelab must reach ``pruning.compression`` within 2 %);
- weights: ∂L/∂W = ∂L/∂T ⊙ h(M) (a gated-off weight is frozen for that step and restored bit for bit);
- gates: ∂L/∂M = Σ_group ∂L/∂T ⊙ sgn(W) · STE′(M) + μ·STE′(M) · mean|task term|. sgn(W) instead of W keeps the
  update independent of the weight's magnitude; STE′ is 1 for open gates and ``ste_slope`` for closed ones
  (``leaky_relu``) or 1 everywhere (``identity``); the μ term pushes every gate down (a penalty on the number of
  open gates through the same STE), scaled by the mean task term so that μ does not depend on the model's gradient
  scale. Weights and gates are updated in the same step; the gates by their own Adam, whose learning rate is
  ``gate_lr`` times the mean initial gate;
- at the end of the prune phase the gates, ranked by the exact allocator, give the final masks (the last gate
  masks); the weights they remove are zeroed with their optimizer state, then masked fine-tuning.

A filter's gate switches off its weights only; its bias (and BatchNorm channel) is removed at the final prune.
"""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch

from prunelab.pruning import groups
from prunelab.pruning.allocate import allocate
from prunelab.pruning.base import PruningCallback
from prunelab.pruning.checks import BASE_OPTIONS, check_choice, check_known, check_number
from prunelab.pruning.schedules import cubic

STES = ("leaky_relu", "identity")
GRANULARITIES = ("weight", "filter")


def _tensor_state(state: Any) -> Any:
    """An optimizer state dict with every tensor on the CPU (checkpoints move between devices)."""
    if torch.is_tensor(state):
        return state.detach().cpu()
    if isinstance(state, dict):
        return {k: _tensor_state(v) for k, v in state.items()}
    if isinstance(state, list):
        return [_tensor_state(v) for v in state]
    return state


class AutoPrune(PruningCallback):
    """Gate-trained pruning to an exact sparsity, at weight or filter granularity.

    Args:
        compression: requested ratio (see :class:`PruningCallback`).
        gate_lr: the gates' Adam learning rate, as a fraction of the mean initial gate value (scale-free).
        reg: μ, the push on every gate relative to the mean magnitude of the gates' task gradient (0: none).
        ste: ``leaky_relu`` (STE′ = 1 open, ``ste_slope`` closed) or ``identity`` (STE′ = 1).
        ste_slope: STE′ of a closed gate for ``leaky_relu``, in [0, 1].
        prune_fraction: share of the fit's steps over which the gates prune; the rest fine-tunes with fixed masks.
        exponent: exponent of the cubic sparsity schedule (3: Zhu & Gupta).
        **kwargs: granularity (``weight`` or ``filter``), scope, layers, exclude, layer_sparsity, min_keep.
    """

    method = "autoprune"

    def __init__(
        self,
        compression: float,
        gate_lr: float = 0.1,
        reg: float = 0.0,
        ste: str = "leaky_relu",
        ste_slope: float = 0.1,
        prune_fraction: float = 0.5,
        exponent: float = 3.0,
        **kwargs,
    ) -> None:
        check_known("AutoPrune", kwargs, BASE_OPTIONS)
        super().__init__(compression, **kwargs)
        check_choice("granularity", self.granularity, GRANULARITIES)
        self.gate_lr = check_number("gate_lr", gate_lr, 0.0)
        self.reg = check_number("reg", reg, 0.0, low_open=False)
        self.ste = check_choice("ste", ste, STES)
        self.ste_slope = check_number("ste_slope", ste_slope, 0.0, 1.0, low_open=False)
        self.prune_fraction = check_number("prune_fraction", prune_fraction, 0.0, 1.0)
        self.exponent = check_number("exponent", exponent, 0.0)
        self.gates: dict[str, torch.Tensor] = {}  # group-shaped, one per eligible layer
        self.lr = 0.0  # the gates' Adam learning rate, fixed when the gates are made
        self.prune_steps = 0
        self._optimizer: torch.optim.Adam | None = None
        self._optimizer_state: dict | None = None  # loaded from a checkpoint, applied when the optimizer is built
        self._open: dict[str, torch.Tensor] = {}  # this step's open gates
        self._signs: dict[str, torch.Tensor] = {}  # sgn(W) of this step, taken before the gates switch weights off

    # ----------------------------------------------------------------- gates
    def group_scores(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        """The gate values once the gates exist (so the allocator ranks gates), else the magnitude scores."""
        return self.gates[name] if self.gates else super().group_scores(name, weight)

    @torch.no_grad()
    def init_gates(self) -> None:
        weights = self.masks.weights()
        self.gates = {
            n: super(AutoPrune, self).group_scores(n, weights[n]).detach().float().clone()
            for n in sorted(self._eligible)
        }
        mean = torch.cat([g.flatten().cpu() for g in self.gates.values()]).mean()
        self.lr = self.gate_lr * float(mean)

    def gate_optimizer(self) -> torch.optim.Adam:
        """The gates' Adam, rebuilt (state kept) if the gate tensors were replaced, e.g. moved to another device."""
        params = [self.gates[n] for n in sorted(self.gates)]
        current = self._optimizer.param_groups[0]["params"] if self._optimizer is not None else []
        if len(current) != len(params) or any(a is not b for a, b in zip(current, params)):
            state = self._optimizer.state_dict() if self._optimizer is not None else self._optimizer_state
            self._optimizer = torch.optim.Adam(params, lr=self.lr)
            if state is not None:
                self._optimizer.load_state_dict(state)
            self._optimizer_state = None
        return self._optimizer

    def sparsity_at(self, step: int) -> float:
        return cubic(step, 0, self.prune_steps, self.final_sparsity, exponent=self.exponent)

    # ----------------------------------------------------------------- the core's method hooks
    def start(self, trainer: pl.Trainer) -> None:
        self.prune_steps = int(self.prune_fraction * int(trainer.estimated_stepping_batches))
        if not self.done and not self.gates:
            self.init_gates()

    def open_gates(self, sparsity: float) -> dict[str, torch.Tensor]:
        """The gates open at ``sparsity``: the top gates by the exact allocator. Weight gates ranked globally take
        the same set through one k-th value (ties aside), which is linear time instead of a sort per step."""
        if self.granularity == "weight" and self.scope == "global" and not self.layer_sparsity:
            flat = torch.cat([g.flatten() for g in self.gates.values()])
            k = round(sparsity * flat.numel())
            if k == 0:
                return {n: torch.ones_like(g, dtype=torch.bool) for n, g in self.gates.items()}
            threshold = flat.kthvalue(k).values
            gates = {n: g > threshold for n, g in self.gates.items()}
            if all(int(o.sum()) >= self.min_keep for o in gates.values()):
                return gates
        masks = allocate(
            self.masks.weights(),
            self.gates,
            sparsity,
            self.granularity,
            self.scope,
            self.min_keep,
            self.allocator.layer_targets(sparsity),
        )
        return {n: groups.group_mask_of(masks[n], self.granularity) for n in self.gates}

    def before_batch(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        step = trainer.global_step
        if step >= self.prune_steps:
            self.finalize(trainer)
            pl_module.log("prune/target_sparsity", self.final_sparsity, on_step=False, on_epoch=True)
            return
        sparsity = self.sparsity_at(step)
        previous, self._open = self._open, self.open_gates(sparsity)
        self._signs = {n: torch.sign(self.masks.modules[n].weight.detach()) for n in self.gates}
        opened = sum(int(o.sum()) for o in self._open.values())
        reopened = sum(int((o & ~previous[n]).sum()) for n, o in self._open.items()) if previous else 0
        for key, value in (
            ("open_fraction", opened / sum(o.numel() for o in self._open.values())),
            (
                "mean_gate",
                float(sum(g.sum() for g in self.gates.values())) / sum(g.numel() for g in self.gates.values()),
            ),
            ("reopened", float(reopened)),
            ("target_sparsity", sparsity),
        ):
            pl_module.log(f"autoprune/{key}", value, on_step=False, on_epoch=True)

    def transient_masks(self, trainer: pl.Trainer) -> dict[str, torch.Tensor] | None:
        if self.done or not self._open:
            return None
        return {n: groups.expand(o, self.masks.modules[n].weight, self.granularity) for n, o in self._open.items()}

    @torch.no_grad()
    def gate_gradients(self) -> dict[str, torch.Tensor]:
        """∂L/∂M from ∂L/∂T (the weights' gradient, before masking) for this step's open set (see module doc)."""
        task = {}
        for n, gate in self.gates.items():
            grad = self.masks.modules[n].weight.grad
            signed = grad * self._signs[n] if grad is not None else torch.zeros_like(self._signs[n])
            summed = signed.reshape(gate.shape) if self.granularity == "weight" else signed.flatten(1).sum(1)
            ste = torch.ones_like(gate) if self.ste == "identity" else self._open[n].to(gate.dtype)
            if self.ste == "leaky_relu":
                ste += (1 - ste) * self.ste_slope
            task[n] = (summed.to(gate.dtype), ste)
        scale = torch.cat([t.abs().flatten() for t, _ in task.values()]).mean() if self.reg else 0.0
        return {n: (t + self.reg * scale) * ste for n, (t, ste) in task.items()}

    @torch.no_grad()
    def regularize(self, trainer: pl.Trainer) -> None:
        if self.done or not self._open:
            return
        optimizer = self.gate_optimizer()
        for n, grad in self.gate_gradients().items():
            self.gates[n].grad = grad
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def finalize(self, trainer: pl.Trainer | None) -> None:
        """Final masks = the top gates at the target (exact allocator); weights and optimizer state zeroed."""
        self.prune_to(self.final_sparsity, trainer)
        self.gates, self._open, self._signs, self._optimizer = {}, {}, {}, None

    # ----------------------------------------------------------------- state
    def layer_tensors(self) -> dict[str, dict[str, torch.Tensor]]:
        return {"gates": self.gates}

    def extra_state(self) -> dict[str, Any]:
        state = self._optimizer.state_dict() if self._optimizer is not None else self._optimizer_state
        return {"lr": self.lr, "gate_optimizer": _tensor_state(state)}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.lr, self._optimizer_state, self._optimizer = state["lr"], state["gate_optimizer"], None

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "gate_lr": self.gate_lr, "reg": self.reg, "ste": self.ste}
