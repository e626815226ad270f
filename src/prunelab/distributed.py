"""A run of more than one process (Lightning DDP started by its own launcher, ``torchrun`` or SLURM).

Rank 0 owns every side effect of a run: the MLflow store, experiment and run, the dense cache, measurement, export
and the summary. The other ranks create nothing; they train with rank 0 and learn what it decided (run id, whether
the dense baseline is cached, its weights, the final metrics) through the process group.

A run fits more than once (dense baseline, pruning) and rank 0 must share its decisions before the first fit, so the
process group is set up when the run starts: :func:`plan` builds a Trainer from the run's ``trainer`` config (which
checks strategy, devices and nodes before anything starts), and :meth:`Ranks.start` asks that Trainer's strategy to
launch the other processes (Lightning's own launcher starts them; under ``torchrun`` or SLURM they exist already) and
to set up the process group. Every later Trainer of the run finds the group set up and reuses it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from pytorch_lightning.overrides.distributed import UnrepeatedDistributedSampler
from pytorch_lightning.strategies import DDPStrategy, SingleDeviceStrategy
from torch.utils.data import DataLoader

log = logging.getLogger(__name__)
T = TypeVar("T")


class RankZeroFailed(RuntimeError):
    """Rank 0 failed at a step it owns; the other ranks stop with its reason."""


@dataclass
class Ranks:
    """This process's place in the run, and the collectives rank 0 shares its decisions through."""

    strategy: DDPStrategy | None = None  # None: a run of one process
    on_rank_zero_error: Callable[[BaseException], None] | None = None  # called on rank 0 before the others hear

    @property
    def world_size(self) -> int:
        return 1 if self.strategy is None else self.strategy.num_nodes * self.strategy.num_processes

    @property
    def rank(self) -> int:
        return 0 if self.strategy is None else self.strategy.global_rank

    @property
    def is_zero(self) -> bool:
        return self.rank == 0

    def start(self) -> None:
        """Start the other processes (Lightning's launcher; none under ``torchrun``/SLURM) and the process group."""
        if self.strategy is None:
            return
        self.strategy.launcher.launch(lambda: None)
        self.strategy.setup_environment()
        log.info(
            "rank %d of %d: process group set up (%s)", self.rank, self.world_size, torch.distributed.get_backend()
        )

    def share(self, step: Callable[[], T], what: str) -> T:
        """Run ``step`` on rank 0 and give its result to every rank; when it raises on rank 0, every other rank
        raises :class:`RankZeroFailed` naming ``what`` and the reason (rank 0 re-raises its own error)."""
        if self.strategy is None:
            return step()
        outcome: tuple[bool, Any] = (True, None)
        error: BaseException | None = None
        if self.is_zero:
            try:
                outcome = (True, step())
            except BaseException as exc:  # every rank must hear of it, or the others wait in the broadcast
                error, outcome = exc, (False, f"{type(exc).__name__}: {exc}")
                if self.on_rank_zero_error is not None:  # recorded first: the others exit once they hear
                    self.on_rank_zero_error(exc)
        ok, value = self.strategy.broadcast(outcome, src=0)
        if error is not None:
            raise error
        if not ok:
            raise RankZeroFailed(f"rank 0 failed at {what}: {value}")
        return value


def _refuse(strategy: object, configured: object) -> None:
    if not isinstance(strategy, (DDPStrategy, SingleDeviceStrategy)) or (
        isinstance(strategy, DDPStrategy) and getattr(strategy, "_start_method", "popen") != "popen"
    ):
        raise ValueError(
            f"trainer.strategy={configured!r} is not supported: a prunelab run of more than one process uses "
            "Lightning's DDP started as a script (trainer=ddp: strategy ddp), by Lightning's launcher, "
            "torchrun or SLURM; spawned processes (ddp_spawn, ddp_notebook) cannot share rank 0's "
            "MLflow run, and sharded strategies do not keep whole masks on every rank"
        )


def plan(trainer_cfg: DictConfig) -> Ranks:
    """The run's ranks from its ``trainer`` config, checked (strategy, devices, nodes) before anything starts."""
    trainer = instantiate(
        trainer_cfg, logger=False, enable_checkpointing=False, callbacks=[], max_epochs=1, enable_progress_bar=False
    )
    strategy = trainer.strategy
    _refuse(strategy, trainer_cfg.get("strategy"))
    if isinstance(strategy, DDPStrategy) and strategy.num_nodes * strategy.num_processes > 1:
        return Ranks(strategy)
    return Ranks()


def world_size(trainer: object) -> int:
    """Processes of ``trainer``'s fit: 1 without a trainer or for a stand-in that does not say."""
    return int(getattr(trainer, "world_size", 1))


def all_sum(trainer: pl.Trainer | None, tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` summed, in place, over the ranks of ``trainer``'s fit (left as it is in a run of one process).
    Every rank must call it at the same point, with a tensor on the fit's device."""
    if world_size(trainer) == 1:
        return tensor
    return trainer.strategy.reduce(tensor, reduce_op="sum")


def all_mean(trainer: pl.Trainer | None, tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` (floating point) averaged, in place, over the ranks of ``trainer``'s fit."""
    if world_size(trainer) == 1:
        return tensor
    return all_sum(trainer, tensor).div_(trainer.world_size)


def test_accuracy(trainer: pl.Trainer, module: pl.LightningModule, datamodule: pl.LightningDataModule) -> float:
    """Top-1 accuracy (fraction) of ``module`` over the whole test split, every sample counted exactly once whatever
    the world size: under DDP each rank tests a disjoint share (Lightning's ``UnrepeatedDistributedSampler``, where
    ``DistributedSampler`` would pad by repeating samples) and the accuracy metric sums its counts over ranks."""
    if trainer.world_size == 1:
        return float(trainer.test(module, datamodule=datamodule, verbose=False)[0]["test/acc"])
    loader = datamodule.test_dataloader()
    sampler = UnrepeatedDistributedSampler(
        loader.dataset, num_replicas=trainer.world_size, rank=trainer.global_rank, shuffle=False
    )
    loader = DataLoader(
        loader.dataset,
        batch_size=loader.batch_size,
        sampler=sampler,
        num_workers=loader.num_workers,
        collate_fn=loader.collate_fn,
        pin_memory=loader.pin_memory,
    )
    return float(trainer.test(module, dataloaders=loader, verbose=False)[0]["test/acc"])
