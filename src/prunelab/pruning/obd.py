"""Fisher-based filter pruning, the baselines of EigenDamage (Wang et al. 2019, §5; official code
alecwangcq/EigenDamage-Pytorch, ``pruner/fisher_diag_pruner.py`` and ``pruner/kfac_OBD_F2.py``).

Optimal Brain Damage (LeCun et al. 1990) scores a group of weights by the loss increase ½·δwᵀFδw of removing it. For a
whole filter (output unit) n with weights w̄_n = [W_n, b_n]:

- ``diagonal`` (C-OBD): F diagonal, from exact per-example gradients: Σ_i F_ii·w_i² over the filter's weights;
- ``kron`` (Kron-OBD): F ≈ A ⊗ G (K-FAC over the unfolded patch): ½·G_nn·w̄_nᵀ A w̄_n. This is the paper's formula; the
  official code computes Σ_j [(W∘W) A]_nj · G_nn instead (squared weights against row sums of A), which is not a
  quadratic form of w̄_n, so it is not reproduced here.

Both prune with the core's exact allocator (the classifier's outputs are never pruned) in ``rounds`` rounds spread over
the first ``prune_fraction`` of the fit, round r of R to compression^(r/R) on saliencies computed afresh on the network
the earlier rounds and their fine-tuning left (like the official code's iterative mode, which removes the same share of
what is left each round; one round = its one-pass mode), then fine-tune; the pruned filters take their bias and
BatchNorm channel with them and are removed physically by compaction. One-shot at 32× on ``digits``/``lenet5_classic``
gave 81.3 ± 3.2 % test accuracy (seeds 0-2), three rounds 82.4 ± 3.6, five 88.8 ± 1.7 (``bench/robustness.py``).

The official code ranks the raw saliencies of all layers together, capping each layer at ``prune_ratio_limit`` of its
filters. On small networks that ranking empties the wide fully-connected layers first (a filter's saliency estimates the
loss change of removing it alone, and fc1 of LeNet-5 has hundreds of small ones): it left fc1 of ``lenet5_classic`` one
filter of 120 at 8×, and at 32× gave 22.0 % test accuracy on ``mnist5k`` (3 seeds). The default ``scope=lamp`` ranks the
LAMP-normalised saliencies instead (Lee et al., ICLR 2021): same order within a layer, scale-free across layers (94.1 %
there; ``bench/robustness.py``); ``scope=global`` is the official ranking without the cap (``min_keep_fraction`` sets a
floor).
"""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
from torch import nn

from prunelab.pruning import kfac, schedules
from prunelab.pruning.base import PruningCallback, network_of
from prunelab.pruning.checks import check_choice, check_int, check_known, check_number
from prunelab.pruning.masks import prunable_layers

CRITERIA = ("diagonal", "kron")
OPTIONS = (
    "criterion",
    "fisher_type",
    "fisher_batches",
    "seed",
    "rounds",
    "prune_fraction",
    "layers",
    "exclude",
    "min_keep",
    "min_keep_fraction",
    "round_to",
    "target",
)


class OBDPruning(PruningCallback):
    """Filter pruning in rounds by an Optimal-Brain-Damage saliency with a Fisher curvature.

    Args:
        compression: requested ratio, prunable weights before / nonzero prunable weights after.
        criterion: ``diagonal`` (C-OBD) or ``kron`` (Kron-OBD).
        fisher_type: ``true`` (labels sampled from the model) or ``empirical`` (the data's labels).
        fisher_batches: training batches of the Fisher pass (``None``: the whole training set).
        seed: seed of the label sampling (``None``: the run's seed).
        scope: ``lamp`` (LAMP-normalised saliencies ranked across layers), ``global`` (raw saliencies, the
            official ranking) or ``layer`` (one ratio for every layer).
        rounds: pruning rounds, each on fresh saliencies (1: one-shot at the first step).
        prune_fraction: share of the fit's steps over which the rounds are spread evenly.
        **kwargs: layers, exclude, min_keep, min_keep_fraction, round_to, target (see :class:`PruningCallback`);
            granularity is ``filter``.
    """

    method = "obd"
    ranks_at_start = False  # saliencies come from the Fisher pass at the prune step

    def __init__(
        self,
        compression: float,
        criterion: str = "diagonal",
        fisher_type: str = "true",
        fisher_batches: int | None = None,
        seed: int | None = None,
        scope: str = "lamp",
        rounds: int = 5,
        prune_fraction: float = 0.5,
        **kwargs,
    ) -> None:
        check_known("OBD", kwargs, OPTIONS)
        super().__init__(compression, granularity="filter", scope=scope, **kwargs)
        self.criterion = check_choice("criterion", criterion, CRITERIA)
        fisher_type = "true" if fisher_type is True else fisher_type  # YAML reads an unquoted true as a boolean
        self.fisher_type = check_choice("fisher_type", fisher_type, kfac.FISHER_TYPES)
        self.fisher_batches = None if fisher_batches is None else check_int("fisher_batches", fisher_batches)
        self.seed = None if seed is None else check_int("seed", seed, 0)
        self.rounds = check_int("rounds", rounds)
        self.prune_fraction = check_number("prune_fraction", prune_fraction, 0.0, 1.0)
        self.scores: dict[str, torch.Tensor] = {}
        self.generator: torch.Generator | None = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(method=self.method, criterion=self.criterion, compression=self.compression)

    def validate(self, model: nn.Module, example_input: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Base checks, plus: a Fisher pass can read every layer to score."""
        kfac.refuse_unfactorable("OBD", model, prunable_layers(model, self.layers, self.exclude))
        return super().validate(model, example_input)

    def start(self, trainer: pl.Trainer) -> None:
        super().start(trainer)
        if self.generator is None:
            seed = torch.initial_seed() if self.seed is None else self.seed
            self.generator = torch.Generator().manual_seed(seed % 2**63)

    @torch.no_grad()
    def saliencies(self, trainer: pl.Trainer) -> dict[str, torch.Tensor]:
        """Saliency of every filter of every eligible layer, from one Fisher pass over the training data."""
        net = network_of(trainer.lightning_module)
        layers = {n: m for n, m in self.masks.modules.items() if n in self._eligible}
        options = dict(fisher_type=self.fisher_type, generator=self.generator, precision=trainer.precision_plugin)
        batches = kfac.training_batches(trainer, self.fisher_batches)
        if self.criterion == "diagonal":
            fisher = kfac.collect_diagonal(net, layers, batches, trainer=trainer, **options)
            scores = {}
            for n, m in layers.items():
                terms = [(m.weight.double().square() * fisher[n][0]).flatten(1).sum(1)]
                if m.bias is not None:
                    terms.append(m.bias.double().square() * fisher[n][1])
                scores[n] = sum(terms)
            return scores
        factors = kfac.collect_factors(net, layers, batches, patch=False, trainer=trainer, **options)
        scores = {}
        for n, m in layers.items():
            w = m.weight.double().flatten(1)  # im2col rows, in the order of the unfolded patch A is taken over
            if m.bias is not None:
                w = torch.cat([w, m.bias.double()[:, None]], 1)
            scores[n] = 0.5 * factors[n].G.diagonal() * torch.einsum("ni,ij,nj->n", w, factors[n].A, w)
        return scores

    def group_scores(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        return self.scores[name]

    def targets(self, trainer: pl.Trainer) -> dict[int, float]:
        """Round r of R (evenly spaced over the first ``prune_fraction`` of the fit) prunes to compression^(r/R)."""
        steps = schedules.round_steps(int(trainer.estimated_stepping_batches), self.prune_fraction, self.rounds)
        return {s: schedules.round_compression(i, len(steps), self.compression) for i, s in enumerate(steps)}

    def before_batch(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        ratio = self._targets.get(trainer.global_step)
        if ratio is None:
            return
        self.scores = self.saliencies(trainer)  # on the network the earlier rounds left
        self.allocator.prune_to_compression(ratio, trainer)
        self.scores = {}  # only needed for this allocation; the masks carry the result
        pl_module.log("prune/target_sparsity", self.current_sparsity, on_step=True, on_epoch=False)

    def finalize(self, trainer: pl.Trainer | None) -> None:
        self.scores = self.saliencies(trainer)
        super().finalize(trainer)
        self.scores = {}

    def extra_state(self) -> dict[str, Any]:
        return {"generator": None if self.generator is None else self.generator.get_state()}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        if state.get("generator") is not None:
            self.generator = torch.Generator()
            self.generator.set_state(state["generator"])

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "criterion": self.criterion, "rounds": self.rounds}
