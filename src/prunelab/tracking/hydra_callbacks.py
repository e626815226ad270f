"""Hydra callbacks: prepare the MLflow store once, in the launching process, before any job starts."""

from __future__ import annotations

import logging
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from prunelab.tracking.store import ensure_experiment, tracking_uri

log = logging.getLogger(__name__)


def _prepare(config: DictConfig) -> None:
    HydraConfig.instance().set_config(config)  # not yet set when the callbacks run; paths interpolate hydra:
    uri = tracking_uri(config.logger.tracking_uri, config.paths.output_dir)
    exp_id = ensure_experiment(uri, config.logger.experiment_name, config.logger.artifact_location)
    log.info("MLflow: %s, experiment %s (%s)", uri, config.logger.experiment_name, exp_id)


class MlflowSetupCallback(Callback):
    """Creates the tracking store and experiment before jobs run, so parallel jobs never race on a fresh
    SQLite file's schema migration."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        _prepare(config)

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        _prepare(config)
