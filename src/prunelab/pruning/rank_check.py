"""A check that every rank of a DDP fit holds the same pruning state: masks, the method's tensors and scalars, and the
weights, hashed on each rank and gathered at every checkpoint and at the end of the fit.

Add it to a run with ``+callbacks.rank_check._target_=prunelab.pruning.rank_check.RankCheck`` (and
``+callbacks.rank_check.record=<file>`` to keep the gathered hashes as JSON lines).
"""

from __future__ import annotations

import hashlib
import json
import pickle
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch

from prunelab.pruning.base import PruningCallback


class RankDivergenceError(RuntimeError):
    """Two ranks of a fit hold different pruning state."""


def _feed(digest: Any, value: Any) -> None:
    if isinstance(value, torch.Tensor):
        digest.update(str((value.dtype, tuple(value.shape))).encode())
        digest.update(value.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(value, dict):
        for key in sorted(value, key=str):
            digest.update(str(key).encode())
            _feed(digest, value[key])
    elif isinstance(value, (list, tuple)):
        for item in value:
            _feed(digest, item)
    else:
        digest.update(pickle.dumps(value))


def _hash(value: Any) -> str:
    digest = hashlib.sha256()
    _feed(digest, value)
    return digest.hexdigest()


def state_hashes(trainer: pl.Trainer) -> dict[str, str]:
    """SHA-256 of the network's weights, of every pruning callback's ``state_dict()`` (under its state key) and of
    its masks alone (``masks``; of the first pruning callback)."""
    hashes = {"weights": _hash(trainer.lightning_module.state_dict())}
    for callback in trainer.callbacks:
        if isinstance(callback, PruningCallback):
            hashes[callback.state_key] = _hash(callback.state_dict())
            hashes.setdefault("masks", _hash(callback.masks.state_dict()))
    return hashes


class RankCheck(pl.Callback):
    """Gathers :func:`state_hashes` from every rank when a checkpoint is saved and when the fit ends; raises
    :class:`RankDivergenceError` naming what differs.

    Args:
        record: a file rank 0 appends one JSON line to per check (``{"when", "step", "ranks": [hashes per rank]}``).
    """

    def __init__(self, record: str | None = None) -> None:
        self.record = Path(record) if record else None

    def check(self, trainer: pl.Trainer, when: str) -> None:
        mine = state_hashes(trainer)
        gathered = [mine]
        if trainer.world_size > 1:
            gathered = [None] * trainer.world_size
            torch.distributed.all_gather_object(gathered, mine)
        if self.record is not None and trainer.is_global_zero:
            with self.record.open("a") as f:
                f.write(json.dumps({"when": when, "step": trainer.global_step, "ranks": gathered}) + "\n")
        differ = sorted(k for k in mine if len({str(h.get(k)) for h in gathered}) > 1)
        if differ:
            raise RankDivergenceError(f"ranks differ at {when} (step {trainer.global_step}) in: {', '.join(differ)}")

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        self.check(trainer, "checkpoint")

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.check(trainer, "end")
