"""Shared fixtures: compose the real Hydra config tree for tests, with every path under a temporary folder."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import mlflow
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict

from prunelab.train import CONF_DIR

# The tests' networks are tiny: one intra-op thread computes them as fast as several, without the threads spinning
# against each other and against the other processes a test starts on a small machine. The CLI runs a test starts
# inherit the setting, so that a run in a subprocess computes as one in the test's process does (a kill-and-resume
# test compares their curves). OMP_NUM_THREADS set by hand wins.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

# small, fast defaults for integration tests: 8×8 digits, LeNet-300-100, short schedules
FAST = [
    "data=digits",
    "model=lenet300",
    "dense.epochs=2",
    "finetune.epochs=2",
    "logger.log_model=false",
    "measure.onnx=false",
]


@pytest.fixture(scope="session", autouse=True)
def _migrated_sqlite_stores(tmp_path_factory):
    """A new MLflow SQLite store is a copy of one migrated once per session, in this process: migrating a new file
    takes dozens of transactions, each synced to disk (seconds of waiting per store, and most tests make one). Files
    with some tables already (a half-migrated store, say) and other databases are migrated as MLflow does; so is
    every store of a subprocess."""
    import sqlalchemy
    from mlflow.store.db import utils

    migrate = utils._initialize_tables
    template = tmp_path_factory.mktemp("mlflow_template") / "mlflow.db"
    engine = sqlalchemy.create_engine(f"sqlite:///{template}")
    migrate(engine)
    engine.dispose()

    def initialize(engine) -> None:
        if (
            engine.dialect.name != "sqlite"
            or engine.url.database in (None, "", ":memory:")
            or (sqlalchemy.inspect(engine).get_table_names())
        ):
            return migrate(engine)
        with sqlite3.connect(template) as source, engine.connect() as connection:
            source.backup(connection.connection.driver_connection)
        engine.dispose()

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(utils, "_initialize_tables", initialize)
        yield


@pytest.fixture(scope="session")
def cache_root(tmp_path_factory) -> Path:
    """Dense-baseline cache shared by the whole session (the cache is part of what is tested)."""
    return tmp_path_factory.mktemp("dense_cache")


@pytest.fixture
def make_cfg(tmp_path, cache_root, monkeypatch):
    """``make_cfg(*overrides)`` → composed config as the CLI would build it, tracking in ``tmp_path``."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)

    def _make(*overrides: str, fast: bool = True):
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            cfg = compose(
                config_name="train",
                overrides=[
                    *(FAST if fast else []),
                    *overrides,
                    f"paths.root_dir={tmp_path}",
                    f"paths.run_dir={tmp_path}/run",
                    f"paths.cache_dir={cache_root}",
                ],
                return_hydra_config=True,
            )
        HydraConfig.instance().set_config(cfg)
        with open_dict(cfg):
            del cfg["hydra"]  # the CLI hands the task a config without it
        return cfg

    yield _make
    GlobalHydra.instance().clear()


def method_config(method: str) -> DictConfig:
    """``conf/pruning/<method>.yaml`` as ``pruning=<method>`` composes it (its defaults list merged in), on its own."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"pruning={method}"])
    GlobalHydra.instance().clear()
    return OmegaConf.create(OmegaConf.to_container(cfg.pruning))


def runs_in(tmp_path: Path, experiment: str = "prunelab") -> list:
    """Every run recorded in the test's SQLite store (empty when the store was never created)."""
    db = tmp_path / "outputs" / "mlflow.db"
    if not db.exists():
        return []
    mlflow.set_tracking_uri(f"sqlite:///{db}")
    return mlflow.search_runs(experiment_names=[experiment], output_format="list")


@pytest.fixture(autouse=True)
def _no_tracking_uri_leak():
    """MLflow's set_tracking_uri exports MLFLOW_TRACKING_URI; without this, a test's subprocess would record into
    the store of the test before it (or into the developer's own server)."""
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    yield
    os.environ.pop("MLFLOW_TRACKING_URI", None)
