"""Checks of config values that no single component owns; each error names the key and the value."""

from __future__ import annotations

import numbers
import os
import tempfile
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from prunelab.tracking.server.store import check_tracking_uri


def _positive_int(cfg: DictConfig, key: str) -> None:
    value = OmegaConf.select(cfg, key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{key}={value!r} must be an integer ≥ 1")


def check_config(cfg: DictConfig) -> None:
    """Seed, threads, epoch counts, paths and tracking options, before anything is built."""
    seed = cfg.get("seed")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
        raise ValueError(f"seed={seed!r} must be an integer in [0, 2**32)")
    threads = cfg.get("num_threads")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ValueError(f"num_threads={threads!r} must be an integer ≥ 1, or null for torch's default")
    _positive_int(cfg, "dense.epochs")
    if cfg.finetune.epochs != "auto":
        _positive_int(cfg, "finetune.epochs")
    _positive_int(cfg, "finetune.min_epochs")
    _positive_int(cfg, "finetune.steps_per_doubling")
    timeout = cfg.logger.get("connect_timeout", 10)
    if isinstance(timeout, bool) or not isinstance(timeout, numbers.Real) or not 0 < timeout < float("inf"):
        raise ValueError(f"logger.connect_timeout={timeout!r} must be a number of seconds > 0")
    check_tracking_uri(cfg.logger.get("tracking_uri"))
    _check_writable(cfg)


def unwritable(folder: str | os.PathLike) -> str | None:
    """Why ``folder`` cannot be created or written, or ``None`` when it can: a folder is made and removed again in
    its nearest existing parent (``os.access`` says yes to root for /proc, where nothing can be made)."""
    path = Path(folder).expanduser().absolute()
    parent = next(p for p in (path, *path.parents) if p.exists())
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".prunelab-", dir=parent))
    except OSError as exc:
        return f"nothing can be created in {parent} ({exc.strerror})"
    return None


def check_root_env() -> None:
    """``PRUNELAB_ROOT``, when set, is a folder prunelab can write to (checked before Hydra creates its run folder
    under it)."""
    root = os.environ.get("PRUNELAB_ROOT")
    problem = unwritable(root) if root else None
    if problem:
        raise ValueError(
            f"PRUNELAB_ROOT={root!r} cannot hold prunelab's data and outputs: {problem}. Point it at a "
            "folder you can write to, or unset it to use the current folder"
        )


def _check_writable(cfg: DictConfig) -> None:
    problem = unwritable(cfg.paths.output_dir)
    if problem:
        raise ValueError(
            f"paths.output_dir={str(cfg.paths.output_dir)!r} cannot be created: {problem}. Set "
            "PRUNELAB_ROOT or paths.root_dir to a folder you can write to"
        )


def check_optimizers(cfg: DictConfig) -> None:
    """Build each stage's optimizer and scheduler on a stand-in parameter, so a bad value (a negative learning rate,
    an unknown argument) fails before training, naming its key."""
    for stage in ("dense", "finetune"):
        try:
            optimizer = instantiate(cfg[stage].optimizer)([torch.zeros(1, requires_grad=True)])
        except Exception as exc:
            raise ValueError(f"{stage}.optimizer is not valid: {_reason(exc)}") from None
        if cfg[stage].get("scheduler") is not None:
            try:
                instantiate(cfg[stage].scheduler)(optimizer)
            except Exception as exc:
                raise ValueError(f"{stage}.scheduler is not valid: {_reason(exc)}") from None


def _reason(exc: BaseException) -> str:
    cause = exc.__cause__ or exc
    return f"{type(cause).__name__}: {cause}"
