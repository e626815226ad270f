"""Entry point: one run = dense baseline (cached) → prune + fine-tune → measure → record in MLflow.

``python -m prunelab.train data=mnist5k model=lenet5 pruning=magnitude pruning.compression=8 seed=0``
"""

from __future__ import annotations

import logging
import math
import sys
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import hydra
import pytorch_lightning as pl
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.utilities import rank_zero_only

from prunelab import budget, collapse, distributed
from prunelab.checks import check_config, check_optimizers, check_root_env
from prunelab.data.shape import adopt_shape
from prunelab.dense import dense_baseline
from prunelab.distributed import test_accuracy
from prunelab.measure import ONNX_FILE, STORED_FILE, check_options, format_table, measure
from prunelab.models.classifier import Classifier
from prunelab.models.factory import input_shape, instantiate_model
from prunelab.pretrained import load_dense_checkpoint
from prunelab.progress import EpochLine
from prunelab.pruning import PruningCallback
from prunelab.tracking.runs import resume
from prunelab.tracking.runs.lifecycle import stop_on_signals
from prunelab.tracking.runs.record import rounded, summary
from prunelab.tracking.runs.session import RunSession, record_failed_job
from prunelab.tracking.server import ui
from prunelab.tracking.sweeps import sweep

log = logging.getLogger(__name__)
CONF_DIR = str(Path(__file__).resolve().parents[2] / "conf")
QUANTIZED_FILE = "model_quantized.plse"


@dataclass
class Parts:
    datamodule: pl.LightningDataModule
    net: torch.nn.Module
    dense_net: torch.nn.Module
    pruning: PruningCallback | None
    example: torch.Tensor  # one input (batch of 1) of the data's shape
    resume: resume.Resume | None = None
    ranks: distributed.Ranks = field(default_factory=distributed.Ranks)

    def describe(self) -> dict:
        return self.pruning.describe() if self.pruning else {"method": "none", "granularity": "none"}


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
    """Instantiate and check everything a run needs; raises on bad input before any training or MLflow run (on
    every rank: each builds the same)."""
    check_config(cfg)
    if cfg.num_threads is not None:
        torch.set_num_threads(int(cfg.num_threads))
    check_options(OmegaConf.to_container(cfg.measure, resolve=True))
    ranks = distributed.plan(cfg.trainer)
    pl.seed_everything(cfg.seed, workers=True)  # the seed decides the dense model's initial weights too
    datamodule = _instantiate(cfg.data)
    datamodule.prepare_data()  # a missing downloadable dataset fails here, naming its folder and the flag
    shape = adopt_shape(datamodule)
    budget.resolve(cfg, math.ceil(len(datamodule.train_dataloader()) / ranks.world_size))
    check_optimizers(cfg)
    _name_model(cfg)
    net, dense_net = instantiate_model(cfg.model, shape), instantiate_model(cfg.model, shape)
    if cfg.dense.get("checkpoint"):  # the user's trained weights: checked against the network now
        load_dense_checkpoint(str(cfg.dense.checkpoint), dense_net)
    example = torch.zeros(1, *input_shape(shape))
    pruning = None
    if cfg.pruning.get("_target_") is not None:
        pruning = _instantiate(cfg.pruning)
        if not isinstance(pruning, PruningCallback):
            raise TypeError(f"pruning._target_={cfg.pruning._target_} is not a PruningCallback")
        pruning.validate(net, example)
    elif float(cfg.pruning.compression) != 1.0:
        raise ValueError(f"pruning=none runs the dense model; pruning.compression={cfg.pruning.compression} must be 1")
    return Parts(datamodule, net, dense_net, pruning, example, resume.check_checkpoint(cfg, pruning, net), ranks)


def _name_model(cfg: DictConfig) -> None:
    """``names.model`` (the MLflow param ``model``, run and cache names) says which network a library config
    builds: ``torchvision-resnet18``, ``timm-vit_tiny_patch16_224``, ``custom-MyNet``."""
    name = cfg.model.get("name") or (
        str(cfg.model._target_).rsplit(".", 1)[-1] if cfg.names.model == "custom" else None
    )
    if name:
        with open_dict(cfg):
            cfg.names.model = f"{cfg.names.model}-{name}"


def extra_callbacks(cfg: DictConfig) -> list[pl.Callback]:
    """The Lightning callbacks of the ``callbacks`` config block (name → node with ``_target_``), for the pruning
    fit (e.g. ``+callbacks.lr._target_=pytorch_lightning.callbacks.LearningRateMonitor``)."""
    return [_instantiate(node) for node in (cfg.get("callbacks") or {}).values()]


def _fit_pruning(cfg: DictConfig, parts: Parts, run: RunSession) -> tuple[float, int]:
    """Prune + fine-tune ``parts.net`` (already holding the dense weights); return its test accuracy (%) and the
    last step curves were logged at."""
    pl.seed_everything(int(cfg.seed), workers=True)
    module = Classifier(
        parts.net,
        parts.datamodule.num_classes,
        optimizer=instantiate(cfg.finetune.optimizer),
        scheduler=instantiate(cfg.finetune.scheduler),
    )
    folder = resume.checkpoint_dir(cfg)
    # every epoch; always the same last.ckpt (RunIdentity writes it first, a resume goes on in the same folder)
    checkpoints = ModelCheckpoint(dirpath=folder, save_last=True, enable_version_counter=False)
    identity = resume.RunIdentity(run.run_id, resume.identity(cfg, parts.pruning.describe()), folder)
    logger = run.logger()
    trainer = instantiate(
        cfg.trainer,
        max_epochs=int(cfg.finetune.epochs),
        logger=logger,
        callbacks=[
            parts.pruning,
            checkpoints,
            identity,
            *extra_callbacks(cfg),
            EpochLine(f"pruning ({parts.pruning.method})"),
        ],
    )
    trainer.fit(module, datamodule=parts.datamodule, ckpt_path=cfg.ckpt_path)
    return 100.0 * test_accuracy(trainer, module, parts.datamodule), getattr(logger, "last_step", 0)


def _measure(
    cfg: DictConfig, parts: Parts, run: RunSession, accuracy: dict[str, float], prunable: list[str], step: int
) -> tuple[dict[str, float], str | None]:
    """Rank 0: measure the pruned model against the dense one, record it (the per-layer table, latency samples,
    datasets, model, final metrics at ``step``, the last training step: they are the model's in MLflow's Models
    view) and return the final metrics and a collapse warning."""
    log.info(
        "measuring the pruned model against the dense one (compaction, MACs, bytes%s)",
        ", latency" if cfg.measure.latency else "",
    )
    parts.net.cpu(), parts.dense_net.cpu()
    example = parts.example
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        compacted = parts.pruning is not None and parts.pruning.counts_compacted
        metrics, rows, latency_params = measure(
            parts.net,
            parts.dense_net,
            prunable,
            example,
            tmp,
            compacted,
            **OmegaConf.to_container(cfg.measure, resolve=True),
        )
        metrics.update(accuracy)
        stored = parts.pruning.stored_bytes(folder / QUANTIZED_FILE) if parts.pruning else None
        weights = ["model_state.pt", STORED_FILE] + ([ONNX_FILE] if cfg.measure.onnx else [])
        if stored is not None:  # the method's own stored form (ADMM-NN: quantization codes instead of values)
            metrics["bytes_stored"] = float(stored)
            metrics["storage_compression"] = metrics["bytes_dense"] / metrics["bytes_stored"]
            weights.append(QUANTIZED_FILE)
        torch.save(parts.net.state_dict(), folder / "model_state.pt")
        run.record_measurement(
            parts.net,
            example,
            folder,
            format_table(rows),
            latency_params,
            weights,
            {r["layer"]: r["sparsity"] for r in rows},
            parts.datamodule,
            step,
        )
    verdict = collapse.check(
        parts.net,
        prunable,
        example,
        accuracy["test_acc"],
        parts.datamodule.num_classes,
        dense_acc=accuracy["dense_test_acc"],
    )
    metrics = rounded(metrics)
    run.finish(metrics, verdict, step)
    return metrics, verdict.warning


def train(cfg: DictConfig) -> dict[str, float]:
    """Run one experiment and return its final metrics (on every rank of a run of several processes)."""
    job_sweep = sweep.current()
    try:
        parts = build(cfg)
    except Exception as exc:
        if job_sweep is not None and rank_zero_only.rank == 0:
            record_failed_job(cfg, job_sweep, exc)
        raise
    ranks = parts.ranks
    ranks.start()
    with RunSession(cfg, parts.describe(), ranks, job_sweep, parts.resume) as run:
        dense = dense_baseline(cfg, parts.dense_net, parts.datamodule, logger=run.logger("dense"), ranks=ranks)
        run.set_tags(
            {"dense_cache_hit": str(dense.cache_hit), "dense_cache_dir": str(dense.path)}
            if not cfg.dense.checkpoint
            else {"dense_checkpoint": str(cfg.dense.checkpoint)}
        )
        parts.net.load_state_dict(dense.state_dict)
        dense_acc = 100.0 * dense.meta["test_acc"]
        step = 0
        if parts.pruning is not None:
            log.info(
                "pruning: %s to %g× in %d epochs",
                parts.pruning.method,
                float(cfg.pruning.compression),
                int(cfg.finetune.epochs),
            )
            test_acc, step = _fit_pruning(cfg, parts, run)
            run.set_tags(parts.pruning.allocator.tags())  # target=macs: the ratio reached, and why if off
            prunable = parts.pruning.layer_names  # as built: a replaced layer is measured against its dense self
        else:
            test_acc = dense_acc
            prunable = [n for n, m in parts.net.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
        accuracy = {"test_acc": test_acc, "dense_test_acc": dense_acc, "acc_drop": dense_acc - test_acc}
        metrics, warning = ranks.share(lambda: _measure(cfg, parts, run, accuracy, prunable, step), "measuring")
    if ranks.is_zero:
        print(
            summary(
                run.params,
                metrics,
                run.run_id,
                run.uri,
                warning=warning,
                link=ui.browse_hint(run.uri, run.exp_id, run.run_id),
            )
        )
    return metrics


def _quiet_libraries() -> None:
    """Keep the console to our summary: Lightning's banners and tips, and known third-party deprecations."""
    for name in ("pytorch_lightning", "lightning_fabric", "lightning.pytorch", "torch.onnx", "onnx_ir", "onnxscript"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    # under DDP: the pruning callbacks' own values are the same on every rank (nothing to reduce)
    warnings.filterwarnings("ignore", message=".*sync_dist=True. when logging on epoch level.*")


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
def _main(cfg: DictConfig) -> float:
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


def main() -> float | None:
    """``prunelab-train`` / ``python -m prunelab.train``: what must hold before Hydra creates its run folder, then
    the Hydra entry point."""
    try:
        check_root_env()
    except ValueError as exc:
        sys.exit(f"{type(exc).__name__}: {exc}")
    return _main()


if __name__ == "__main__":
    main()
