"""Magnitude pruning baselines: one-shot and iterative prune–retrain (Han et al. 2015, arXiv 1506.02626) and
gradual pruning with the cubic schedule (Zhu & Gupta 2017, arXiv 1710.01878). docs/methods/magnitude.md."""

from __future__ import annotations

import pytorch_lightning as pl

from prunelab.pruning import schedules
from prunelab.pruning.base import PruningCallback

MODES = ("one_shot", "iterative", "gradual")


class MagnitudePruning(PruningCallback):
    """Keep the groups of largest magnitude; masks fixed between updates and during the final fine-tuning.

    Args:
        compression: requested ratio (see :class:`PruningCallback`).
        mode: ``one_shot`` (prune once at the start, then fine-tune), ``iterative`` (``rounds`` prune–retrain
            rounds, each removing the same fraction of the surviving weights) or ``gradual`` (cubic schedule,
            masks recomputed every ``frequency`` steps).
        rounds: number of rounds for ``iterative``.
        frequency: steps between mask updates for ``gradual`` (Zhu & Gupta's Δt).
        prune_fraction: share of the fine-tuning steps over which ``iterative``/``gradual`` prune; the rest
            fine-tunes with fixed masks.
        exponent: exponent of the gradual schedule (3 in the paper).
        **kwargs: granularity, scope, layers, exclude, layer_sparsity, min_keep (see :class:`PruningCallback`).
    """

    method = "magnitude"
    auto_scope = "global"  # scope=auto under target=params

    def __init__(
        self,
        compression: float,
        mode: str = "gradual",
        rounds: int = 3,
        frequency: int = 10,
        prune_fraction: float = 0.5,
        exponent: float = 3.0,
        **kwargs,
    ) -> None:
        super().__init__(compression, **kwargs)
        if mode not in MODES:
            raise ValueError(f"pruning.mode={mode!r} is not one of: {', '.join(MODES)}")
        if not isinstance(rounds, int) or rounds < 1:
            raise ValueError(f"pruning.rounds={rounds!r} must be an integer ≥ 1")
        if not isinstance(frequency, int) or frequency < 1:
            raise ValueError(f"pruning.frequency={frequency!r} must be an integer ≥ 1")
        if not 0.0 < float(prune_fraction) <= 1.0:
            raise ValueError(f"pruning.prune_fraction={prune_fraction!r} must be in (0, 1]")
        self.mode = mode
        self.rounds = rounds
        self.frequency = frequency
        self.prune_fraction = float(prune_fraction)
        self.exponent = float(exponent)

    @property
    def state_key(self) -> str:
        return self._generate_state_key(method=self.method, mode=self.mode, compression=self.compression)

    def targets(self, trainer: pl.Trainer) -> dict[int, float]:
        total = int(trainer.estimated_stepping_batches)
        prune_steps = max(int(self.prune_fraction * total), 0)
        steps = schedules.update_steps(self.mode, prune_steps, self.rounds, self.frequency)
        s_f = self.final_sparsity
        if self.mode == "one_shot":
            return {0: s_f}
        if self.mode == "iterative":
            return {s: schedules.iterative_round_sparsity(i, len(steps), s_f) for i, s in enumerate(steps)}
        return {s: schedules.cubic(s, 0, prune_steps, s_f, exponent=self.exponent) for s in steps}

    def describe(self) -> dict:
        return {**super().describe(), "mode": self.mode}
