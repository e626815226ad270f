"""Entry point: one run = dense baseline (cached) → prune + fine-tune → measure → record in MLflow.

``python -m prunelab.train data=mnist5k model=lenet5 pruning=magnitude pruning.compression=8 seed=0``
"""

from __future__ import annotations

import logging
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import hydra
import mlflow
import pytorch_lightning as pl
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import ModelCheckpoint

from prunelab import budget
from prunelab.checks import check_config
from prunelab.dense import dense_baseline
from prunelab.measure import LATENCY_FILE, check_options, format_table, measure
from prunelab.models.architecture import log_description
from prunelab.models.classifier import Classifier
from prunelab.progress import EpochLine
from prunelab.pruning import PruningCallback
from prunelab.tracking import collapse, model_log, resume, sweep, ui
from prunelab.tracking.lifecycle import deferred_signals, interrupted, reconcile, stop_on_signals
from prunelab.tracking.record import rounded, run_params, summary
from prunelab.tracking.store import RunLogger, open_experiment

log = logging.getLogger(__name__)
CONF_DIR = str(Path(__file__).resolve().parents[2] / "conf")


@dataclass
class Parts:
    datamodule: pl.LightningDataModule
    net: torch.nn.Module
    dense_net: torch.nn.Module
    pruning: PruningCallback | None
    resume: resume.Resume | None = None


def _instantiate(node: DictConfig, **kwargs):
    """``hydra.utils.instantiate`` that lets our own bad-value errors through unwrapped (they already name the
    key and value); other failures keep Hydra's message, which names the config key and target."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as exc:
        if isinstance(exc.__cause__, (ValueError, FileNotFoundError)):
            raise exc.__cause__ from None
        raise


def build(cfg: DictConfig) -> Parts:
    """Instantiate and check everything a run needs; raises on bad input before any training or MLflow run."""
    if isinstance(cfg.seed, bool) or not isinstance(cfg.seed, int):
        raise ValueError(f"seed={cfg.seed!r} must be an integer")
    check_config(cfg)
    check_options(OmegaConf.to_container(cfg.measure, resolve=True))
    pl.seed_everything(cfg.seed, workers=True)  # the seed decides the dense model's initial weights too
    datamodule = _instantiate(cfg.data)
    datamodule.prepare_data()  # a missing downloadable dataset fails here, naming its folder and the flag
    budget.resolve(cfg, len(datamodule.train_dataloader()))
    shape = {"in_channels": datamodule.num_channels, "image_size": datamodule.image_size,
             "num_classes": datamodule.num_classes}
    net, dense_net = _instantiate(cfg.model, **shape), _instantiate(cfg.model, **shape)
    pruning = None
    if cfg.pruning.get("_target_") is not None:
        pruning = _instantiate(cfg.pruning)
        if not isinstance(pruning, PruningCallback):
            raise TypeError(f"pruning._target_={cfg.pruning._target_} is not a PruningCallback")
        pruning.validate(net, torch.zeros(1, shape["in_channels"], shape["image_size"], shape["image_size"]))
    elif float(cfg.pruning.compression) != 1.0:
        raise ValueError(f"pruning=none runs the dense model; pruning.compression={cfg.pruning.compression} must be 1")
    return Parts(datamodule, net, dense_net, pruning, resume.check_checkpoint(cfg, pruning, net))


def _fit_pruning(cfg: DictConfig, parts: Parts, logger: RunLogger) -> float:
    """Prune + fine-tune ``parts.net`` (already holding the dense weights); return its test accuracy (%)."""
    pl.seed_everything(int(cfg.seed), workers=True)
    module = Classifier(parts.net, parts.datamodule.num_classes,
                        optimizer=instantiate(cfg.finetune.optimizer), scheduler=instantiate(cfg.finetune.scheduler))
    folder = resume.checkpoint_dir(cfg)
    # every epoch; always the same last.ckpt (RunIdentity writes it first, a resume goes on in the same folder)
    checkpoints = ModelCheckpoint(dirpath=folder, save_last=True, enable_version_counter=False)
    identity = resume.RunIdentity(logger.run_id, resume.identity(cfg, parts.pruning.describe()), folder)
    trainer = instantiate(cfg.trainer, max_epochs=int(cfg.finetune.epochs), logger=logger,
                          callbacks=[parts.pruning, checkpoints, identity,
                                     EpochLine(f"pruning ({parts.pruning.method})")])
    trainer.fit(module, datamodule=parts.datamodule, ckpt_path=cfg.ckpt_path)
    test = trainer.test(module, datamodule=parts.datamodule, verbose=False)[0]
    return 100.0 * float(test["test/acc"])


def _record_model(cfg: DictConfig, parts: Parts, prunable: list[str], example: torch.Tensor,
                  step: int) -> dict[str, float]:
    """Measure the pruned model against the dense one; log the per-layer table, latency samples, datasets and model
    (at ``step``, the last training step: the final metrics logged there are the model's in MLflow's Models view)."""
    log.info("measuring the pruned model against the dense one (compaction, MACs, bytes%s)",
             ", latency" if cfg.measure.latency else "")
    with tempfile.TemporaryDirectory() as tmp:
        compacted = parts.pruning is not None and parts.pruning.counts_compacted
        metrics, rows, latency_params = measure(parts.net, parts.dense_net, prunable, example, tmp, compacted,
                                                **OmegaConf.to_container(cfg.measure, resolve=True))
        with deferred_signals():  # a SIGTERM / Ctrl-C waits for these store writes (lifecycle.deferred_signals)
            mlflow.log_params(latency_params)  # timing device, GPU mode/dtype/channels_last, 2:4 backend
            mlflow.log_text(format_table(rows), "sparsity_per_layer.md")
            stored = getattr(parts.pruning, "stored_bytes", None)
            quantized = stored(Path(tmp) / "model_quantized.npz") if stored else None
            if quantized is not None:  # the method's stored form (e.g. ADMM-NN: indices + codes + one step per layer)
                metrics["bytes_stored"] = float(quantized)
                metrics["storage_compression"] = metrics["bytes_dense"] / metrics["bytes_stored"]
            if (Path(tmp) / LATENCY_FILE).exists():
                mlflow.log_artifact(str(Path(tmp) / LATENCY_FILE))
            if cfg.logger.log_model:
                log.info("logging the model to MLflow")
                model_log.log_model(parts.net, example, step)  # runs:/<run id>/model
                torch.save(parts.net.state_dict(), Path(tmp) / "model_state.pt")
                files = ["model_state.pt", "model_sparse.npz"]
                for name in files + (["model_quantized.npz"] if quantized is not None else []):
                    mlflow.log_artifact(str(Path(tmp) / name), "weights")
                log_description(parts.net)  # weights/architecture.json: rebuild(net, it) before loading the weights
            model_log.log_datasets(cfg.names.data, parts.datamodule, OmegaConf.to_container(cfg.data, resolve=True))
            mlflow.log_metrics(rounded({f"layer_sparsity/{r['layer']}": r["sparsity"] for r in rows}), step=step)
    return metrics


def _experiment(cfg: DictConfig) -> tuple[str, str]:
    """Tracking URI (set as MLflow's current one) and the experiment id, created if missing; runs of this
    experiment left RUNNING by a dead process of this host are ended KILLED."""
    uri, exp_id = open_experiment(cfg.logger, cfg.paths.output_dir)
    mlflow.set_tracking_uri(uri)
    reconcile(uri, [exp_id])
    return uri, exp_id


def _end_failed(exc: BaseException) -> None:
    """End the active run as FAILED (KILLED on SIGTERM / Ctrl-C) with the reason as the ``failure_reason`` tag."""
    stop = interrupted() or (exc if isinstance(exc, KeyboardInterrupt) else None)
    mlflow.set_tag("failure_reason", f"{type(stop or exc).__name__}: {stop or exc}"[:5000])
    mlflow.end_run(status="KILLED" if stop else "FAILED")


def _record_failed_job(cfg: DictConfig, job_sweep: sweep.Sweep, exc: BaseException) -> None:
    """In a sweep, a job rejected before it started still gets a FAILED child run, so the sweep's report can
    mark its cell; a single run with bad input creates no run at all."""
    _, exp_id = _experiment(cfg)
    params = run_params(cfg, {"method": cfg.names.pruning, "granularity": cfg.pruning.get("granularity", "none")})
    with mlflow.start_run(experiment_id=exp_id, run_name=f"failed-{cfg.names.pruning}",
                          parent_run_id=job_sweep.parent_run_id, tags={"sweep_id": job_sweep.sweep_id}):
        mlflow.log_params(params)
        _end_failed(exc)


def train(cfg: DictConfig) -> dict[str, float]:
    """Run one experiment and return its final metrics."""
    job_sweep = sweep.current()
    if cfg.get("num_threads"):
        torch.set_num_threads(int(cfg.num_threads))
    try:
        parts = build(cfg)
    except Exception as exc:
        if job_sweep is not None:
            _record_failed_job(cfg, job_sweep, exc)
        raise
    model_log.system_metrics(cfg.logger.get("system_metrics", False))
    uri, exp_id = _experiment(cfg)
    describe = parts.pruning.describe() if parts.pruning else {"method": "none", "granularity": "none"}
    params = run_params(cfg, describe)
    run_name = cfg.logger.run_name or (
        f"{params['method']}-c{float(cfg.pruning.compression):g}-{cfg.names.data}-{cfg.names.model}-s{cfg.seed}")
    parent = job_sweep.parent_run_id if job_sweep else None
    tags = {"sweep_id": job_sweep.sweep_id} if job_sweep else {}
    with resume.start_run(parts.resume, experiment_id=exp_id, run_name=run_name, parent_run_id=parent,
                          tags=tags) as run:
        try:
            with deferred_signals():  # every store write of the run ends before a SIGTERM / Ctrl-C stops it
                mlflow.log_params(resume.new_params(run, params))
                mlflow.log_text(OmegaConf.to_yaml(cfg, resolve=True), "config.yaml")
            logger = RunLogger(experiment_name=cfg.logger.experiment_name, tracking_uri=uri, run_id=run.info.run_id)
            dense = dense_baseline(cfg, parts.dense_net, parts.datamodule,
                                   logger=RunLogger(experiment_name=cfg.logger.experiment_name, tracking_uri=uri,
                                                    run_id=run.info.run_id, prefix="dense"))
            with deferred_signals():
                mlflow.set_tags({"dense_cache_hit": str(dense.cache_hit), "dense_cache_dir": str(dense.path),
                                 "mlflow.runColor": ui.method_color(params["method"])})
            parts.net.load_state_dict(dense.state_dict)
            dense_acc = 100.0 * dense.meta["test_acc"]
            if parts.pruning is not None:
                log.info("pruning: %s to %g× in %d epochs", params["method"], float(cfg.pruning.compression),
                         int(cfg.finetune.epochs))
                test_acc = _fit_pruning(cfg, parts, logger)
                prunable = parts.pruning.layer_names  # as built: a replaced layer is measured against its dense self
            else:
                test_acc = dense_acc
                prunable = [n for n, m in parts.net.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
            example = torch.zeros(1, parts.datamodule.num_channels, parts.datamodule.image_size,
                                  parts.datamodule.image_size)
            metrics = {"test_acc": test_acc, "dense_test_acc": dense_acc, "acc_drop": dense_acc - test_acc}
            parts.net.cpu(), parts.dense_net.cpu()
            metrics.update(_record_model(cfg, parts, prunable, example, logger.last_step))
            verdict = collapse.check(parts.net, prunable, example, test_acc, parts.datamodule.num_classes)
            metrics = rounded(metrics)
            with deferred_signals():
                mlflow.set_tags(verdict.tags())
                mlflow.log_metric("test_acc", metrics["dense_test_acc"], step=0)  # the model before pruning
                mlflow.log_metrics(metrics, step=logger.last_step)  # final values at the last training step
        except BaseException as exc:
            _end_failed(exc)
            raise
    print(summary(params, metrics, run.info.run_id, uri, warning=verdict.warning,
                  link=ui.browse_hint(uri, exp_id, run.info.run_id)))
    return metrics


def _quiet_libraries() -> None:
    """Keep the console to our summary: Lightning's banners and tips, and known third-party deprecations."""
    for name in ("pytorch_lightning", "lightning_fabric", "lightning.pytorch"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
def main(cfg: DictConfig) -> float:
    """Hydra entry point; returns test accuracy so sweepers can optimise it."""
    _quiet_libraries()
    with stop_on_signals():  # SIGTERM / Ctrl-C: run KILLED, exit status 128 + signal
        try:
            return train(cfg)["test_acc"]
        except Exception as exc:
            if sweep.current() is None:
                raise
            # the run is FAILED in MLflow with its reason; the other jobs of the sweep go on
            log.error("sweep job failed: %s: %s", type(exc).__name__, exc)
            return float("nan")


if __name__ == "__main__":
    main()
