"""What makes a run usable beyond its numbers: the pruned model as an MLflow model, the data splits as MLflow
datasets, and (optionally) MLflow's system metrics."""

from __future__ import annotations

import hashlib
import json
import logging
import time
from typing import Any

import mlflow
import numpy as np
import torch
from mlflow.data.code_dataset_source import CodeDatasetSource
from mlflow.data.meta_dataset import MetaDataset
from mlflow.exceptions import MlflowException
from mlflow.types import Schema, TensorSpec

log = logging.getLogger(__name__)


def _import_mlflow_pytorch() -> None:
    """``import mlflow.pytorch``, undoing what it does to the root logger: its Lightning autolog module calls
    ``logging.basicConfig(level=ERROR)`` on import, which would hide every warning of the process from then on
    (prunelab's own included) wherever logging was not configured yet (a library user, a test session)."""
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    import mlflow.pytorch  # noqa: F401

    root.setLevel(level)
    root.handlers[:] = handlers


_import_mlflow_pytorch()

MODEL_NAME = "model"  # runs:/<run id>/model
# data options that change neither the samples nor their order of splits
_DATA_KEYS_IGNORED = ("data_dir", "num_workers", "download", "batch_size")


def log_model(net: torch.nn.Module, example_input: torch.Tensor, step: int = 0) -> str:
    """Log ``net`` (its weights as they are: pruned weights are zeros) as the run's MLflow model; return its URI.

    Metrics the run logs at ``step`` are the model's in MLflow (its Models view shows them).

    The model is saved with ``torch.export`` (MLflow's ``pt2`` format): the graph travels with the weights, so it
    loads in a fresh process with torch alone, also after a method changed the architecture. A forward that
    ``torch.export`` cannot trace falls back to the pickled module, whose classes must then import from prunelab.
    The input example has a batch of two: ``torch.export`` fixes a dimension of size 1 to a constant.
    """
    example = example_input.detach().cpu().float().expand(2, *example_input.shape[1:]).contiguous()
    mode = net.training
    net.eval()  # BatchNorm and dropout as at inference, in the exported graph too
    kwargs: dict[str, Any] = {
        "name": MODEL_NAME,
        "step": step,
        "input_example": example.numpy(),
        # given, not inferred: MLflow infers requirements by importing the model in a subprocess (~20 s per run)
        "pip_requirements": mlflow.pytorch.get_default_pip_requirements(),
    }
    try:
        try:
            info = mlflow.pytorch.log_model(net, serialization_format="pt2", **kwargs)
        except Exception as exc:  # noqa: BLE001 - torch.export rejects some forwards (data-dependent control flow)
            log.warning("torch.export failed (%s: %s); logging the pickled module instead", type(exc).__name__, exc)
            info = mlflow.pytorch.log_model(net, serialization_format="pickle", **kwargs)
    finally:
        net.train(mode)
    return info.model_uri


def _digest(identity: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:10]


def log_datasets(name: str, datamodule: Any, data_cfg: dict[str, Any]) -> None:
    """Record the train, validation and test splits as the run's dataset inputs (the run list's Datasets column).

    Only metadata is logged: the dataset's name, the datamodule that builds it, the shape of its tensors and a digest
    of what decides its samples (data options and split sizes), so runs on the same split share one dataset entry.
    """
    datamodule.setup()
    identity = {k: v for k, v in data_cfg.items() if k not in _DATA_KEYS_IGNORED}
    source = CodeDatasetSource({"datamodule": str(data_cfg.get("_target_", type(datamodule).__name__))})
    image = (-1, datamodule.num_channels, datamodule.image_size, datamodule.image_size)
    schema = Schema([TensorSpec(np.dtype(np.float32), image, "image"), TensorSpec(np.dtype(np.int64), (-1,), "label")])
    for context, split in (("train", datamodule.train_set), ("validation", datamodule.val_set),
                           ("test", datamodule.test_set)):
        digest = _digest({**identity, "split": context, "size": len(split)})
        _log_input(MetaDataset(source, name=name, digest=digest, schema=schema), context)


# what the SQL stores say when an insert meets a row another writer has just added (PostgreSQL, SQLite, MySQL)
_DUPLICATE_KEY = ("duplicate key value violates unique constraint", "UNIQUE constraint failed", "Duplicate entry")


def _log_input(dataset: MetaDataset, context: str, attempts: int = 3) -> None:
    """``mlflow.log_input``, again when a concurrent run inserted the same dataset first. The tracking store creates
    a dataset's row on its first use, so the runs of a parallel sweep that log the same split at the same moment race
    to insert it, and the loser's insert fails on the store's unique key (seen with two jobs on a PostgreSQL tracking
    server); on the next attempt the row exists and is linked to the run. Any other error is raised at once."""
    for attempt in range(1, attempts + 1):
        try:
            mlflow.log_input(dataset, context=context)
            return
        except MlflowException as exc:
            if attempt == attempts or not any(text in str(exc) for text in _DUPLICATE_KEY):
                raise
            log.info("dataset %s (%s) was being inserted by another run; logging it again", dataset.name, context)
            time.sleep(0.2 * attempt)


def system_metrics(enabled: object) -> None:
    """Turn MLflow's system metrics (CPU, memory, disk, network; GPU when present) on or off for the next run.

    Raises:
        ValueError: ``enabled`` is not a bool (``logger.system_metrics``).
    """
    if not isinstance(enabled, bool):
        raise ValueError(f"logger.system_metrics={enabled!r} must be true or false")
    if enabled:
        mlflow.enable_system_metrics_logging()
    else:
        mlflow.disable_system_metrics_logging()
