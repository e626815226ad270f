"""Hydra callbacks: prepare MLflow in the launching process, before any job starts, and report after a sweep."""

from __future__ import annotations

import logging
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from prunelab.tracking import sweep
from prunelab.tracking.store import ensure_experiment, tracking_uri

log = logging.getLogger(__name__)


def _prepare(config: DictConfig) -> tuple[str, str]:
    HydraConfig.instance().set_config(config)  # not yet set when the callbacks run; paths interpolate hydra:
    uri = tracking_uri(config.logger.tracking_uri, config.paths.output_dir)
    exp_id = ensure_experiment(uri, config.logger.experiment_name, config.logger.artifact_location)
    log.info("MLflow: %s, experiment %s (%s)", uri, config.logger.experiment_name, exp_id)
    return uri, exp_id


class MlflowSetupCallback(Callback):
    """Creates the tracking store and experiment before jobs run (parallel jobs on a fresh SQLite file would race on
    its schema migration); for a sweep, also the parent run, and the sweep report at its end."""

    def __init__(self, report: bool = True) -> None:
        self.report = report
        self._sweep: sweep.Sweep | None = None
        self._uri = ""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        _prepare(config)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._uri, exp_id = _prepare(config)
        overrides = list(OmegaConf.to_container(config.hydra.overrides.task, resolve=False))
        params = config.hydra.sweeper.get("params") or {}
        overrides += [f"{k}={v}" for k, v in params.items()]
        self._sweep = sweep.start(self._uri, exp_id, overrides, str(config.hydra.sweep.dir))
        log.info("sweep %s: parent run %s", self._sweep.sweep_id, self._sweep.parent_run_id)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if self._sweep is None:
            return
        from prunelab.tracking import report  # plotting libraries only when a sweep ends

        failed = []
        try:
            if self.report:
                result = report.build(self._uri, config.logger.experiment_name, sweep_id=self._sweep.sweep_id,
                                      parent_run_id=self._sweep.parent_run_id)
                print(result.markdown)
                failed = result.failed
        finally:
            sweep.finish(self._uri, self._sweep, "FAILED" if failed else "FINISHED")
        if failed:  # Hydra turns a callback's exception into a warning, so say it plainly instead
            log.error("%d sweep job(s) FAILED (reasons in MLflow, tag failure_reason): %s", len(failed), ", ".join(failed))
