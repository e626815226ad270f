"""Dense baseline cache: train a dense model once per (data, model, seed, dense schedule) and reuse it.

Entries live under ``paths.cache_dir/<data>-<model>-s<seed>-<digest>/`` as ``model.pt`` (state dict) and
``meta.json`` (the identity that was hashed, accuracy, training time). A file lock makes parallel jobs of one sweep
wait for the first one to finish training instead of training the same baseline twice.

In a run of several processes only rank 0 touches the cache (and its lock): it reads the entry and sends the
weights to the other ranks, or every rank trains the baseline together (DDP) and rank 0 writes it. An entry that
does not load (a truncated file) is trained again, with a warning naming its folder.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from filelock import FileLock
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from prunelab.distributed import Ranks, test_accuracy
from prunelab.models.classifier import Classifier
from prunelab.progress import EpochLine

log = logging.getLogger(__name__)

CACHE_VERSION = 2  # 2: initial weights drawn after seeding with the run seed (1 ignored it)
# data options that do not change the trained model
_DATA_KEYS_IGNORED = ("data_dir", "num_workers", "download")


@dataclass
class DenseBaseline:
    state_dict: dict[str, torch.Tensor]
    meta: dict[str, Any]
    path: Path
    cache_hit: bool


def identity(cfg: DictConfig) -> dict[str, Any]:
    """What determines the dense model: data and model configs, seed and the dense training recipe."""
    data = {k: v for k, v in OmegaConf.to_container(cfg.data, resolve=True).items() if k not in _DATA_KEYS_IGNORED}
    return {
        "version": CACHE_VERSION,
        "data": data,
        "model": OmegaConf.to_container(cfg.model, resolve=True),
        "seed": int(cfg.seed),
        "dense": OmegaConf.to_container(cfg.dense, resolve=True),
        "precision": str(cfg.trainer.get("precision", "32")),
    }


def cache_dir(cfg: DictConfig) -> Path:
    ident = identity(cfg)
    digest = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:12]
    return Path(cfg.paths.cache_dir) / f"{cfg.names.data}-{cfg.names.model}-s{cfg.seed}-{digest}"


def _train(cfg: DictConfig, net: torch.nn.Module, datamodule: pl.LightningDataModule, logger) -> dict[str, Any]:
    pl.seed_everything(int(cfg.seed), workers=True)
    module = Classifier(
        net,
        datamodule.num_classes,
        optimizer=instantiate(cfg.dense.optimizer),
        scheduler=instantiate(cfg.dense.scheduler),
    )
    trainer = instantiate(
        cfg.trainer,
        max_epochs=int(cfg.dense.epochs),
        logger=logger,
        enable_checkpointing=False,
        callbacks=[EpochLine("dense baseline")],
    )
    start = time.perf_counter()
    trainer.fit(module, datamodule=datamodule)
    seconds = time.perf_counter() - start
    val = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    return {
        "test_acc": test_accuracy(trainer, module, datamodule),
        "val_acc": val.get("val/acc"),
        "train_seconds": seconds,
    }


def _read(folder: Path, net: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    """The cached weights and meta of ``folder`` when it holds a complete entry that loads into ``net``."""
    weights, meta_file = folder / "model.pt", folder / "meta.json"
    if not (weights.exists() and meta_file.exists()):
        return None
    try:
        meta = json.loads(meta_file.read_text())
        state = torch.load(weights, map_location="cpu", weights_only=True)
        net.load_state_dict(state)
        meta["test_acc"] = float(meta["test_acc"])
    except Exception as exc:  # noqa: BLE001 - truncated, corrupted or foreign files: train the entry again
        log.warning(
            "dense baseline: the cache entry %s does not load (%s: %s); training it again",
            folder,
            type(exc).__name__,
            str(exc)[:200],
        )
        return None
    return state, meta


def _write(cfg: DictConfig, folder: Path, net: torch.nn.Module, result: dict[str, Any]) -> dict[str, Any]:
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}
    tmp = folder / "model.pt.tmp"
    torch.save(state, tmp)
    tmp.replace(folder / "model.pt")  # atomic: a reader never sees half a file
    meta = {"identity": identity(cfg), **result, "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
    tmp = folder / "meta.json.tmp"
    tmp.write_text(json.dumps(meta, indent=2))
    tmp.replace(folder / "meta.json")
    return meta


def _pretrained(cfg: DictConfig, net: torch.nn.Module, datamodule: pl.LightningDataModule) -> DenseBaseline:
    """The user's trained weights (loaded into ``net`` when the run was built) as the dense baseline: their test
    accuracy is measured (every rank of the run takes part), nothing is trained or cached."""
    log.info("dense baseline: the trained weights of dense.checkpoint=%s", cfg.dense.checkpoint)
    trainer = instantiate(cfg.trainer, logger=False, enable_checkpointing=False, callbacks=[], max_epochs=1)
    accuracy = test_accuracy(trainer, Classifier(net, datamodule.num_classes), datamodule)
    state = {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}
    return DenseBaseline(
        state,
        {"test_acc": accuracy, "checkpoint": str(cfg.dense.checkpoint)},
        Path(str(cfg.dense.checkpoint)),
        cache_hit=False,
    )


def dense_baseline(
    cfg: DictConfig, net: torch.nn.Module, datamodule: pl.LightningDataModule, logger=None, ranks: Ranks | None = None
) -> DenseBaseline:
    """Load the cached dense weights into ``net``, or train ``net`` and cache it (with every rank of ``ranks``); with
    ``dense.checkpoint``, ``net`` already holds the user's trained weights: measure their test accuracy."""
    ranks = ranks or Ranks()
    if cfg.dense.get("checkpoint"):
        return _pretrained(cfg, net, datamodule)
    folder = cache_dir(cfg)
    lock = FileLock(str(folder) + ".lock") if ranks.is_zero else contextlib.nullcontext()
    if ranks.is_zero:
        folder.parent.mkdir(parents=True, exist_ok=True)
    with lock:  # rank 0 alone holds it; the other ranks of this run never wait on it
        cached = ranks.share(lambda: _read(folder, net), "reading the dense cache")
        if cached is not None:
            state, meta = cached
            net.load_state_dict(state)
            log.info("dense baseline: cache hit %s", folder)
            return DenseBaseline(state, meta, folder, cache_hit=True)
        log.info("dense baseline: training %s", folder.name)
        result = _train(cfg, net, datamodule, logger)
        meta = ranks.share(lambda: _write(cfg, folder, net, result), "writing the dense cache")
        state = {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}
        return DenseBaseline(state, meta, folder, cache_hit=False)
