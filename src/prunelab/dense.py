"""Dense baseline cache: train a dense model once per (data, model, seed, dense schedule) and reuse it.

Entries live under ``paths.cache_dir/<data>-<model>-s<seed>-<digest>/`` as ``model.pt`` (state dict) and
``meta.json`` (the identity that was hashed, accuracy, training time). A file lock makes parallel jobs of one sweep
wait for the first one to finish training instead of training the same baseline twice.
"""

from __future__ import annotations

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
        net, datamodule.num_classes, optimizer=instantiate(cfg.dense.optimizer), scheduler=instantiate(cfg.dense.scheduler)
    )
    trainer = instantiate(
        cfg.trainer, max_epochs=int(cfg.dense.epochs), logger=logger, enable_checkpointing=False,
        callbacks=[EpochLine("dense baseline")],
    )
    start = time.perf_counter()
    trainer.fit(module, datamodule=datamodule)
    seconds = time.perf_counter() - start
    test = trainer.test(module, datamodule=datamodule, verbose=False)[0]
    val = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    return {"test_acc": float(test["test/acc"]), "val_acc": val.get("val/acc"), "train_seconds": seconds}


def dense_baseline(cfg: DictConfig, net: torch.nn.Module, datamodule: pl.LightningDataModule, logger=None) -> DenseBaseline:
    """Load the cached dense weights into ``net``, or train ``net`` and cache it."""
    folder = cache_dir(cfg)
    folder.parent.mkdir(parents=True, exist_ok=True)
    weights, meta_file = folder / "model.pt", folder / "meta.json"
    with FileLock(str(folder) + ".lock"):
        if weights.exists() and meta_file.exists():
            meta = json.loads(meta_file.read_text())
            state = torch.load(weights, map_location="cpu", weights_only=True)
            net.load_state_dict(state)
            log.info("dense baseline: cache hit %s", folder)
            return DenseBaseline(state, meta, folder, cache_hit=True)
        log.info("dense baseline: training %s", folder.name)
        result = _train(cfg, net, datamodule, logger)
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}
        tmp = weights.with_suffix(".tmp")
        torch.save(state, tmp)
        tmp.replace(weights)  # atomic: a reader never sees half a file
        meta = {"identity": identity(cfg), **result, "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
        meta_file.write_text(json.dumps(meta, indent=2))
        return DenseBaseline(state, meta, folder, cache_hit=False)
