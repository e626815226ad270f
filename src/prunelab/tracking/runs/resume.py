"""One MLflow run for a run's whole life: the run id travels in the Lightning checkpoint, and ``ckpt_path=...``
continues that run, after the checkpoint was checked against the configuration (before any store or run exists).
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import pytorch_lightning as pl
import torch
from mlflow.exceptions import MlflowException
from omegaconf import DictConfig

from prunelab.models import architecture
from prunelab.tracking.runs.lifecycle import CHECKPOINT_TAG, process_tags
from prunelab.tracking.runs.record import run_params

log = logging.getLogger(__name__)

# params that decide what a fit computes: a resume must agree on them (others, e.g. paths.* or logger.*, may change)
_IDENTITY_PREFIXES = ("pruning.", "finetune.", "dense.", "model.", "data.")
_IDENTITY_KEYS = ("method", "dataset", "model", "compression_target", "granularity", "seed", "trainer.precision")
_FREE_DATA_KEYS = ("data.data_dir", "data.num_workers", "data.download")
RESUMES_TAG = "prunelab.resumes"
PENDING_KEY = "prunelab.pending_metrics"  # checkpoint entry: an epoch's metrics not yet logged when it was saved


def identity(cfg: DictConfig, describe: dict[str, Any]) -> dict[str, str]:
    """The params a resumed fit must share with the run that wrote the checkpoint."""
    params = run_params(cfg, describe)
    return {
        k: v
        for k, v in params.items()
        if (k in _IDENTITY_KEYS or k.startswith(_IDENTITY_PREFIXES)) and k not in _FREE_DATA_KEYS
    }


class RunIdentity(pl.Callback):
    """Puts the MLflow run id and the run's :func:`identity` into every checkpoint. When a fit starts from
    scratch it also writes ``last.ckpt`` at once, so a run stopped before its first epoch ends can resume too.

    Lightning saves the epoch's checkpoint in ``on_train_epoch_end`` but sends that epoch's training metrics to
    the logger only afterwards; a process killed in between would resume past an epoch whose curves never reached
    MLflow. So a checkpoint written at an epoch's end also carries those pending metrics, and a resume logs the ones
    the run lacks at their step."""

    def __init__(self, run_id: str, ident: dict[str, str], checkpoint_dir: str | Path) -> None:
        self.run_id, self.identity = run_id, ident
        self.last = Path(checkpoint_dir) / "last.ckpt"
        self._at_epoch_end = False
        self._pending: dict[str, Any] | None = None

    @property
    def state_key(self) -> str:
        return "prunelab.run"

    def state_dict(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "identity": self.identity}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        pass  # the run id is decided before the fit, by check_checkpoint + start_run

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._at_epoch_end = False

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._at_epoch_end = True  # ModelCheckpoint (a monitoring callback) saves after every other hook of here

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if self._at_epoch_end:
            # what update_train_epoch_metrics() will log once the checkpoint is written, at the same step
            # (Lightning internals: pytorch-lightning is pinned <2.7, and the kill -9 test of
            # tests/test_lifecycle.py fails if they move)
            pending = {k: float(v) for k, v in trainer._logger_connector.metrics["log"].items()}
            pending.setdefault("epoch", float(trainer.current_epoch))
            checkpoint[PENDING_KEY] = {
                "step": trainer.fit_loop.epoch_loop._batches_that_stepped - 1,
                "metrics": pending,
            }

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        self._pending = checkpoint.get(PENDING_KEY)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.ckpt_path is None:
            trainer.save_checkpoint(self.last)  # every rank: a collective (only rank 0 writes the file)
        if not trainer.is_global_zero:  # rank 0 alone writes to the store
            return
        client = mlflow.MlflowClient()
        client.set_tag(self.run_id, CHECKPOINT_TAG, str(self.last))
        if self._pending:
            step = self._pending["step"]
            missing = {
                k: v
                for k, v in self._pending["metrics"].items()
                if step not in {m.step for m in client.get_metric_history(self.run_id, k)}
            }
            if missing:
                log.info("logging %d metrics of step %d that the stopped process did not send", len(missing), step)
                for logger in trainer.loggers:
                    logger.log_metrics(missing, step=step)
            self._pending = None


class FinishedRunError(ValueError):
    """``ckpt_path`` names the checkpoint of a run that already FINISHED."""


@dataclass(frozen=True)
class Resume:
    ckpt_path: str
    run_id: str | None  # None: a checkpoint written before run ids were stored


def _load(path: str) -> dict[str, Any]:
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(
            f"ckpt_path={path!r} does not exist (a run's checkpoints are in <run dir>/"
            "checkpoints/last.ckpt; the tag prunelab.checkpoint of a KILLED run names it)"
        )
    try:
        ckpt = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"ckpt_path={path!r} is not a Lightning checkpoint ({type(exc).__name__}: {exc})") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "callbacks" not in ckpt:
        raise ValueError(f"ckpt_path={path!r} is not a Lightning checkpoint of a pruning fit")
    return ckpt


def _check_weights(path: str, ckpt: dict[str, Any], net: torch.nn.Module, model: str) -> None:
    if architecture.CHECKPOINT_KEY in ckpt:  # layers a method replaced: compare with the network rebuilt as saved
        try:
            net = architecture.rebuild(copy.deepcopy(net), ckpt[architecture.CHECKPOINT_KEY])
        except ValueError as exc:
            raise ValueError(f"ckpt_path={path!r} does not fit model={model}: {exc}") from None
    saved = {k.removeprefix("net."): tuple(v.shape) for k, v in ckpt["state_dict"].items() if k.startswith("net.")}
    wanted = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    if saved != wanted:
        diff = sorted(set(saved.items()) ^ set(wanted.items()))[:3]
        raise ValueError(
            f"ckpt_path={path!r} holds the weights of another network than model={model} on this data "
            f"(first differences, name and shape: {diff})"
        )


def check_checkpoint(cfg: DictConfig, pruning: pl.Callback | None, net: torch.nn.Module) -> Resume | None:
    """Check ``cfg.ckpt_path`` against the run about to start: it exists, is a checkpoint of this pruning method,
    granularity and compression, of this network, and of a run with the same identity params."""
    path = cfg.get("ckpt_path")
    if path is None:
        return None
    if pruning is None:
        raise ValueError(f"ckpt_path={path!r} resumes a pruning fit, but pruning=none has none to resume")
    ckpt = _load(str(path))
    callbacks = ckpt["callbacks"]
    if pruning.state_key not in callbacks:
        held = [k for k in callbacks if k != "prunelab.run" and "method" in str(k)]
        raise ValueError(
            f"ckpt_path={path!r} holds no state for pruning={cfg.names.pruning} ({pruning.state_key}); "
            f"it was written by {held or 'no pruning method'}"
        )
    _check_weights(str(path), ckpt, net, cfg.names.model)
    saved = callbacks.get("prunelab.run")
    if saved is None:
        return Resume(str(path), None)
    now = identity(cfg, pruning.describe())
    differ = sorted(k for k in set(now) | set(saved["identity"]) if now.get(k) != saved["identity"].get(k))
    if differ:
        shown = "; ".join(f"{k}: checkpoint {saved['identity'].get(k)!r}, now {now.get(k)!r}" for k in differ[:5])
        raise ValueError(
            f"ckpt_path={path!r} was written by a run with another configuration ({shown}); "
            "resume with the same overrides as the run it continues"
        )
    return Resume(str(path), saved["run_id"])


def checkpoint_dir(cfg: DictConfig) -> Path:
    """Where the pruning fit writes checkpoints: a resumed run goes on in the folder it resumes from."""
    if cfg.get("ckpt_path"):
        return Path(cfg.ckpt_path).expanduser().resolve().parent
    return Path(cfg.paths.run_dir) / "checkpoints"


@contextlib.contextmanager
def start_run(resume: Resume | None, **kwargs: Any) -> Iterator[mlflow.ActiveRun]:
    """``mlflow.start_run(**kwargs)``, or, resuming, the same run again (RUNNING, tagged with this process)."""
    run_id = resume.run_id if resume else None
    if run_id is not None:
        try:
            status = mlflow.MlflowClient().get_run(run_id).info.status
        except MlflowException:
            status = None
            log.warning(
                "ckpt_path=%s: its MLflow run %s is not in this store; recording a new run", resume.ckpt_path, run_id
            )
            kwargs["tags"] = {**kwargs.get("tags", {}), "prunelab.resumed_from_run": run_id}
            run_id = None
        if status == "FINISHED":  # reopening it would log its final metrics a second time
            raise FinishedRunError(
                f"ckpt_path={resume.ckpt_path!r} belongs to MLflow run {run_id}, which FINISHED: "
                "there is nothing to resume. Leave ckpt_path out to record a new run"
            )
    if run_id is None:
        kwargs["tags"] = {**kwargs.get("tags", {}), **process_tags()}
        with mlflow.start_run(**kwargs) as run:
            yield run
        return
    with mlflow.start_run(run_id=run_id) as run:
        count = int(run.data.tags.get(RESUMES_TAG, "0")) + 1
        mlflow.set_tags({**process_tags(), RESUMES_TAG: str(count), "prunelab.resumed_from": resume.ckpt_path})
        if "failure_reason" in run.data.tags:  # the reason it was KILLED no longer holds
            mlflow.MlflowClient().delete_tag(run_id, "failure_reason")
        yield run


def new_params(run: mlflow.ActiveRun, params: dict[str, str]) -> dict[str, str]:
    """The params not yet on ``run`` (a resumed run keeps the ones it has; MLflow forbids changing them)."""
    logged = mlflow.MlflowClient().get_run(run.info.run_id).data.params
    return {k: v for k, v in params.items() if k not in logged}
