"""One run's life in MLflow, for every rank of it: rank 0 opens the store, the experiment and the run, writes every
record and ends the run (FINISHED, FAILED, or KILLED on SIGTERM / Ctrl-C); the other ranks write nothing and learn
the run id from rank 0."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import mlflow
import torch
from omegaconf import DictConfig, OmegaConf

from prunelab.collapse import Collapse
from prunelab.distributed import Ranks
from prunelab.measure import LATENCY_FILE
from prunelab.models.architecture import log_description
from prunelab.tracking.runs import model_log, resume
from prunelab.tracking.runs.lifecycle import deferred_signals, interrupted, reconcile
from prunelab.tracking.runs.record import rounded, run_params
from prunelab.tracking.server import ui
from prunelab.tracking.server.store import RunLogger, open_experiment
from prunelab.tracking.sweeps.sweep import Sweep

log = logging.getLogger(__name__)


def experiment(cfg: DictConfig) -> tuple[str, str]:
    """Tracking URI (set as MLflow's current one) and the experiment id, created if missing; runs of this
    experiment left RUNNING by a dead process of this host are ended KILLED."""
    uri, exp_id = open_experiment(cfg.logger, cfg.paths.output_dir)
    mlflow.set_tracking_uri(uri)
    reconcile(uri, [exp_id])
    return uri, exp_id


def end_failed(exc: BaseException) -> None:
    """End the active run (if any) as FAILED (KILLED on SIGTERM / Ctrl-C) with the reason as ``failure_reason``."""
    if mlflow.active_run() is None:
        return
    stop = interrupted() or (exc if isinstance(exc, KeyboardInterrupt) else None)
    with deferred_signals():
        mlflow.set_tag("failure_reason", f"{type(stop or exc).__name__}: {stop or exc}"[:5000])
        mlflow.end_run(status="KILLED" if stop else "FAILED")


def record_failed_job(cfg: DictConfig, job_sweep: Sweep, exc: BaseException) -> None:
    """In a sweep, a job rejected before it started still gets a FAILED child run, so the sweep's report can
    mark its cell; a single run with bad input creates no run at all."""
    _, exp_id = experiment(cfg)
    params = run_params(cfg, {"method": cfg.names.pruning, "granularity": cfg.pruning.get("granularity", "none")})
    with mlflow.start_run(
        experiment_id=exp_id,
        run_name=f"failed-{cfg.names.pruning}",
        parent_run_id=job_sweep.parent_run_id,
        tags={"sweep_id": job_sweep.sweep_id},
    ):
        mlflow.log_params(params)
        end_failed(exc)


class RunSession:
    """The MLflow run of one prunelab run, as a context manager: entered, the run is open (resumed from
    ``resumed`` when given); left with an exception, it ends FAILED or KILLED with the reason.

    The run's code is the same on every rank: entering shares the run id from rank 0, :meth:`logger` and
    :meth:`set_tags` write nothing on the other ranks, and the measurement's records (:meth:`record_measurement`,
    :meth:`finish`) are made inside the step rank 0 alone runs.
    """

    def __init__(
        self,
        cfg: DictConfig,
        describe: dict[str, Any],
        ranks: Ranks,
        job_sweep: Sweep | None,
        resumed: resume.Resume | None,
    ) -> None:
        self.cfg, self.ranks = cfg, ranks
        self.params = run_params(cfg, describe)
        self.job_sweep, self.resumed = job_sweep, resumed
        self.uri = self.exp_id = self.run_id = ""
        self._run_context = None

    @property
    def run_name(self) -> str:
        p = self.params
        return self.cfg.logger.run_name or (
            f"{p['method']}-c{float(self.cfg.pruning.compression):g}-"
            f"{self.cfg.names.data}-{self.cfg.names.model}-s{self.cfg.seed}"
        )

    # ----------------------------------------------------------------- life
    def __enter__(self) -> RunSession:
        self.ranks.on_rank_zero_error = end_failed  # a failure rank 0 shares is recorded before the others hear it
        self.run_id = self.ranks.share(self._open, "opening the MLflow run")
        return self

    def _open(self) -> str:
        model_log.system_metrics(self.cfg.logger.get("system_metrics", False))
        self.uri, self.exp_id = experiment(self.cfg)
        tags = {"sweep_id": self.job_sweep.sweep_id} if self.job_sweep else {}
        parent = self.job_sweep.parent_run_id if self.job_sweep else None
        self._run_context = resume.start_run(
            self.resumed, experiment_id=self.exp_id, run_name=self.run_name, parent_run_id=parent, tags=tags
        )
        run = self._run_context.__enter__()
        try:
            with deferred_signals():  # every store write of the run ends before a SIGTERM / Ctrl-C stops it
                mlflow.log_params(resume.new_params(run, self.params))
                mlflow.log_text(OmegaConf.to_yaml(self.cfg, resolve=True), "config.yaml")
                mlflow.set_tag("mlflow.runColor", ui.method_color(self.params["method"]))
                if self.ranks.world_size > 1:
                    mlflow.set_tag("prunelab.world_size", str(self.ranks.world_size))
        except BaseException as exc:
            end_failed(exc)
            raise
        return run.info.run_id

    def __exit__(self, kind, exc, tb) -> bool:
        if self.ranks.is_zero and self._run_context is not None:
            if exc is not None:
                end_failed(exc)
            self._run_context.__exit__(None, None, None)  # FINISHED, unless ended above
        return False

    # ----------------------------------------------------------------- records (rank 0)
    def logger(self, prefix: str = "") -> RunLogger | bool:
        """Lightning's MLflow logger bound to this run on rank 0; ``False`` (none) on the other ranks, whose
        metrics Lightning would not write anyway, so that they open no store."""
        if not self.ranks.is_zero:
            return False
        return RunLogger(
            experiment_name=self.cfg.logger.experiment_name, tracking_uri=self.uri, run_id=self.run_id, prefix=prefix
        )

    def set_tags(self, tags: dict[str, str]) -> None:
        if self.ranks.is_zero:
            with deferred_signals():
                mlflow.set_tags(tags)

    def record_measurement(
        self,
        net: torch.nn.Module,
        example: torch.Tensor,
        folder: Path,
        table: str,
        latency_params: dict[str, str],
        weights: list[str],
        layer_sparsity: dict[str, float],
        datamodule: Any,
        step: int,
    ) -> None:
        """The measurement's records: latency settings and samples, the per-layer table and values, the model with
        the files ``weights`` of ``folder`` (under ``weights/``) when ``logger.log_model``, and the datasets."""
        with deferred_signals():  # a SIGTERM / Ctrl-C waits for these store writes (lifecycle.deferred_signals)
            mlflow.log_params(latency_params)  # timing device, GPU mode/dtype/channels_last, 2:4 backend
            mlflow.log_text(table, "sparsity_per_layer.md")
            if (folder / LATENCY_FILE).exists():
                mlflow.log_artifact(str(folder / LATENCY_FILE))
            if self.cfg.logger.log_model:
                log.info("logging the model to MLflow")
                model_log.log_model(net, example, step)  # runs:/<run id>/model
                for name in weights:
                    mlflow.log_artifact(str(folder / name), "weights")
                log_description(net)  # weights/architecture.json: rebuild(net, it) before loading the weights
            model_log.log_datasets(self.cfg.names.data, datamodule, OmegaConf.to_container(self.cfg.data, resolve=True))
            mlflow.log_metrics(rounded({f"layer_sparsity/{k}": v for k, v in layer_sparsity.items()}), step=step)

    def finish(self, metrics: dict[str, float], verdict: Collapse, step: int) -> None:
        """Final metrics at the run's last training step (the dense accuracy also at step 0), the collapse verdict's
        tags and the one-line result as the run's description."""
        with deferred_signals():
            mlflow.set_tags({**verdict.tags(), ui.DESCRIPTION_TAG: ui.run_description(metrics, verdict)})
            mlflow.log_metric("test_acc", metrics["dense_test_acc"], step=0)  # the model before pruning
            mlflow.log_metrics(metrics, step=step)  # final values at the last training step
