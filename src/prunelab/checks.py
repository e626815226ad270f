"""Checks of config values that no single component owns; each error names the key and the value."""

from __future__ import annotations

import numbers

from omegaconf import DictConfig, OmegaConf


def _positive_int(cfg: DictConfig, key: str) -> None:
    value = OmegaConf.select(cfg, key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{key}={value!r} must be an integer ≥ 1")


def check_config(cfg: DictConfig) -> None:
    """Epoch counts and tracking options, before anything is built."""
    _positive_int(cfg, "dense.epochs")
    if cfg.finetune.epochs != "auto":
        _positive_int(cfg, "finetune.epochs")
    _positive_int(cfg, "finetune.min_epochs")
    _positive_int(cfg, "finetune.steps_per_doubling")
    timeout = cfg.logger.get("connect_timeout", 10)
    if isinstance(timeout, bool) or not isinstance(timeout, numbers.Real) or not 0 < timeout < float("inf"):
        raise ValueError(f"logger.connect_timeout={timeout!r} must be a number of seconds > 0")
