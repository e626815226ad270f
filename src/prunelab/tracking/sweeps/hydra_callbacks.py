"""Hydra callbacks: prepare MLflow in the launching process, before any job starts, and report after a sweep."""

from __future__ import annotations

import logging
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from prunelab.tracking.server.store import open_experiment
from prunelab.tracking.sweeps import sweep

log = logging.getLogger(__name__)


def _prepare(config: DictConfig) -> tuple[str, str]:
    HydraConfig.instance().set_config(config)  # not yet set when the callbacks run; paths interpolate hydra:
    uri, exp_id = open_experiment(config.logger, config.paths.output_dir)
    log.info("MLflow: %s, experiment %s (%s)", uri, config.logger.experiment_name, exp_id)
    return uri, exp_id


class MlflowSetupCallback(Callback):
    """For a sweep: creates the tracking store, the experiment and the parent run before any job starts, and the
    sweep report at its end. A single run creates its store itself, after its config was checked."""

    def __init__(self, report: bool = True) -> None:
        self.report = report
        self._sweep: sweep.Sweep | None = None
        self._uri = ""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            self._uri, exp_id = _prepare(config)
        except Exception as exc:  # Hydra would turn it into a warning and start every job against a dead store
            log.error("%s: %s", type(exc).__name__, exc)
            raise SystemExit(1) from None
        overrides = list(OmegaConf.to_container(config.hydra.overrides.task, resolve=False))
        params = config.hydra.sweeper.get("params") or {}
        overrides += [f"{k}={v}" for k, v in params.items()]
        self._sweep = sweep.start(self._uri, exp_id, overrides, str(config.hydra.sweep.dir))
        log.info("sweep %s: parent run %s", self._sweep.sweep_id, self._sweep.parent_run_id)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if self._sweep is None:
            return
        from prunelab.tracking.sweeps import report  # plotting libraries only when a sweep ends

        failed = []
        try:
            if self.report:
                result = report.build(
                    self._uri,
                    config.logger.experiment_name,
                    sweep_id=self._sweep.sweep_id,
                    parent_run_id=self._sweep.parent_run_id,
                )
                print(result.markdown)
                failed = result.failed
        finally:
            sweep.finish(self._uri, self._sweep, "FAILED" if failed else "FINISHED")
        if failed:  # Hydra turns a callback's exception into a warning, so say it plainly instead
            log.error(
                "%d sweep job(s) FAILED (reasons in MLflow, tag failure_reason): %s", len(failed), ", ".join(failed)
            )
