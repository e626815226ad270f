"""The worked example of the docs' "Add a method" page: a small new pruning method, registered, built from config
the way ``conf/pruning/<name>.yaml`` builds one, and held to the core's contract (exact compression, pruned weights
exactly zero after every optimizer step)."""

import hydra
import pytest
import torch
from omegaconf import OmegaConf

from callbacks import OPTIMIZERS, ZeroWatch, fit_digits
from prunelab.models import LeNet300
from prunelab.pruning import METHODS, PruningCallback, groups, schedules
from prunelab.pruning.checks import check_int, check_number


class TaylorPruning(PruningCallback):
    """Prune the weights of least first-order Taylor importance |w · ∂L/∂w| (Molchanov et al., CVPR 2019), summed
    over the steps seen so far, on a linear schedule; then fine-tune with fixed masks.

    Args:
        compression: requested ratio (see :class:`PruningCallback`).
        prune_fraction: share of the fit's steps over which the sparsity ramps up to the target.
        frequency: steps between mask updates; the first one comes after ``frequency`` steps of scores.
        **kwargs: scope, layers, exclude, layer_sparsity, min_keep (see :class:`PruningCallback`).
    """

    method = "taylor"

    def __init__(self, compression: float, prune_fraction: float = 0.5, frequency: int = 5, **kwargs) -> None:
        if kwargs.get("granularity", "weight") != "weight":
            raise ValueError(f"pruning.granularity={kwargs['granularity']!r}: taylor scores single weights only")
        super().__init__(compression, **kwargs)
        self.prune_fraction = check_number("prune_fraction", prune_fraction, 0.0, 1.0)
        self.frequency = check_int("frequency", frequency)
        self.score: dict[str, torch.Tensor] = {}  # per layer, weight-shaped: saved in checkpoints, follows the device

    def layer_tensors(self) -> dict[str, dict[str, torch.Tensor]]:
        return {"score": self.score}

    def start(self, trainer) -> None:
        for name, module in self.masks.modules.items():  # a resumed fit already has its scores from the checkpoint
            self.score.setdefault(name, torch.zeros_like(module.weight))
        super().start(trainer)  # the schedule: self.targets(trainer)

    def targets(self, trainer) -> dict[int, float]:
        end = max(int(self.prune_fraction * trainer.estimated_stepping_batches), self.frequency)
        steps = [*range(self.frequency, end, self.frequency), end]
        return {s: schedules.linear(s, 0, end, self.final_sparsity) for s in steps}

    @torch.no_grad()
    def regularize(self, trainer) -> None:  # gradients are ready, not yet masked; the optimizer steps next
        for name, module in self.masks.modules.items():
            if module.weight.grad is not None:
                self.score[name] += (module.weight * module.weight.grad).abs()

    def group_scores(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        # pruned weights score 0, so an update never brings one back
        return groups.group_norms(self.score[name] * self.masks.masks[name], self.granularity, p=1)


def _ratio(pruning: PruningCallback) -> float:
    total, nonzero = pruning.masks.counts()
    return total / nonzero


def test_registered_and_built_from_its_config(monkeypatch):
    """What shipping it means: an entry in METHODS and a config node with ``_target_`` (conf/pruning/taylor.yaml)."""
    monkeypatch.setitem(METHODS, "taylor", TaylorPruning)
    node = OmegaConf.create(
        {"_target_": f"{__name__}.TaylorPruning", "compression": 8, "frequency": 4, "scope": "layer", "exclude": []}
    )
    pruning = hydra.utils.instantiate(node)
    assert isinstance(pruning, METHODS["taylor"]) and isinstance(pruning, PruningCallback)
    assert (pruning.compression, pruning.frequency, pruning.scope) == (8, 4, "layer")
    with pytest.raises(ValueError, match="pruning.granularity='filter'"):
        TaylorPruning(compression=8, granularity="filter")
    with pytest.raises(ValueError, match="pruning.frequency"):
        TaylorPruning(compression=8, frequency=0)


@pytest.mark.parametrize("opt", ["sgd_momentum", "adamw"])
def test_exact_compression_and_zeros_stay_zero(opt):
    pruning = TaylorPruning(compression=10, frequency=3)
    watch = ZeroWatch(pruning)  # counts pruned values that are nonzero right after each optimizer step
    fit_digits(LeNet300(image_size=8), pruning, OPTIMIZERS[opt], epochs=2, callbacks=[watch])
    assert pruning.done and watch.steps > 15 and watch.violations == 0
    assert abs(_ratio(pruning) - 10) / 10 < 0.02
    for name, module in pruning.masks.modules.items():  # the masks are the weights' own zeros
        assert not module.weight[~pruning.masks.masks[name]].any()
    # the scores are the method's state: in the checkpointed state, on the CPU, one per pruned layer
    state = pruning.state_dict()["tensors"]["score"]
    assert set(state) == set(pruning.masks.modules) and all(t.device.type == "cpu" for t in state.values())
