"""Torch-Pruning's uniform channel pruning as a pruning callback, for ``bench/structured_macs.py`` to run beside the
project's methods through the same CLI: same data split, same dense model (the cache), same fine-tuning budget, same
measurement. Not a method of the project (``conf/pruning`` does not list it); ``bench/conf/pruning/tp_uniform.yaml``
builds it.

Torch-Pruning (Fang et al., CVPR 2023, arXiv 2301.12900; VainF/Torch-Pruning) prunes coupled channel groups (a
layer's filters with the next layer's inputs and every BatchNorm between) by ``MagnitudeImportance`` (L2 norm over
the whole group) at one ratio in every layer (``global_pruning=False``, its default), once, before fine-tuning. Here
``tp.pruner.MetaPruner`` chooses the channels on a copy of the network; they become filter masks of the network
trained, so the core keeps them at zero and compaction removes them as Torch-Pruning's own ``prune()`` would. The
ratio is found by bisection so that the compacted network has ``1 / compression`` of the dense MACs.
"""

from __future__ import annotations

import copy
import logging

import pytorch_lightning as pl
import torch
import torch_pruning as tp
from torch import nn

from prunelab.pruning import macs_target
from prunelab.pruning.base import PruningCallback

log = logging.getLogger(__name__)


class TorchPruningUniform(PruningCallback):
    """One-shot uniform channel pruning by Torch-Pruning's group magnitude importance, to a MACs ratio.

    Args:
        compression: dense MACs / MACs of the compacted network.
        steps: bisection steps over the per-layer ratio.
    """

    method = "tp_uniform"
    ranks_at_start = False

    def __init__(self, compression: float, steps: int = 20) -> None:
        super().__init__(compression, granularity="filter", target="macs", scope="layer", min_keep=1)
        self.steps = steps
        self.pruned = False
        self.ratio = 0.0

    def channels(self, ratio: float) -> dict[str, torch.Tensor]:
        """Filter keep-masks (per eligible layer) of Torch-Pruning's uniform pruning at ``ratio``."""
        net = copy.deepcopy(self.net).eval()
        names = {m: n for n, m in net.named_modules()}
        classifier = [m for m in net.modules() if isinstance(m, (nn.Conv2d, nn.Linear))][-1]
        with torch.enable_grad():  # Torch-Pruning traces the graph through autograd
            pruner = tp.pruner.MetaPruner(
                net,
                self.allocator.example(),
                importance=tp.importance.MagnitudeImportance(p=2),
                pruning_ratio=ratio,
                ignored_layers=[classifier],
            )
        keep = {n: torch.ones(m.weight.shape[0], dtype=torch.bool) for n, m in self.masks.modules.items()}
        for group in pruner.step(interactive=True):  # indices of the unpruned copy: no group is pruned here
            for dep, idxs in group:
                name = names.get(dep.target.module)
                if name in keep and pruner.DG.is_out_channel_pruning_fn(dep.handler):
                    keep[name][idxs] = False
        return {
            n: k.view(-1, *[1] * (m.weight.dim() - 1)).expand_as(m.weight).clone()
            for (n, k), m in zip(keep.items(), self.masks.modules.values())
        }

    def _reached(self, masks: dict[str, torch.Tensor]) -> float:
        example = self.allocator.example()
        dense = macs_target.count_macs(self.net, example)
        return dense / macs_target.compacted_cost(self.net, masks, self.masks.dependents, example, "macs", list(masks))

    @torch.no_grad()
    def prune_to(self, sparsity: float, trainer: pl.Trainer | None = None) -> None:
        lo, hi, best = 0.0, 0.85, None  # beyond, Torch-Pruning keeps some layers whole: not monotone
        for _ in range(self.steps):
            mid = (lo + hi) / 2
            masks = self.channels(mid)
            reached = self._reached(masks)
            if best is None or abs(reached - self.compression) < abs(best[0] - self.compression):
                best = (reached, mid, masks)
            if abs(reached - self.compression) / self.compression <= 0.005:
                break
            lo, hi = (mid, hi) if reached < self.compression else (lo, mid)
        self.reached, self.ratio, masks = best
        for name, mask in masks.items():
            self.masks.set(name, mask.to(self.masks.masks[name].device))
        self.masks.apply()
        if trainer is not None:
            self.masks.mask_optimizer_state(trainer.optimizers)
        self.pruned = True
        self.current_sparsity = self.final_sparsity = self.masks.sparsity()
        log.info("tp_uniform: ratio %.3f per layer, %.3fx fewer MACs", self.ratio, self.reached)

    @property
    def done(self) -> bool:
        return self.pruned

    def extra_state(self) -> dict:
        return {"pruned": self.pruned, "ratio": self.ratio}

    def load_extra_state(self, state: dict) -> None:
        self.pruned, self.ratio = state["pruned"], state["ratio"]

    def describe(self) -> dict:
        return {**super().describe(), "ratio": self.ratio}
