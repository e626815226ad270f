"""What the benchmark scripts of ``bench/`` share: a config composed as the CLI composes it, and a private, quiet
``PRUNELAB_ROOT`` for in-process runs of :func:`prunelab.train.train`."""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from prunelab.train import CONF_DIR, _quiet_libraries


def compose(overrides: list[str], run_dir: Path) -> DictConfig:
    """``conf/train.yaml`` with ``overrides``, the run folder at ``run_dir``: the config the CLI hands ``train``."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = hydra_compose(
            config_name="train", overrides=[*overrides, f"paths.run_dir={run_dir}"], return_hydra_config=True
        )
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


def private_root(path: str | os.PathLike) -> Path:
    """Record into ``path`` (PRUNELAB_ROOT: store, dense-baseline cache, run folders), quietly: in-process runs of
    the benchmarks print their own table, not every library's warnings."""
    root = Path(path).resolve()
    root.mkdir(parents=True, exist_ok=True)
    os.environ["PRUNELAB_ROOT"] = str(root)
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    _quiet_libraries()
    logging.getLogger("prunelab").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore")
    return root
