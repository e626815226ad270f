"""What makes a run usable beyond its numbers: the pruned model as an MLflow model, the data splits as MLflow
datasets, and (optionally) MLflow's system metrics."""

from __future__ import annotations

import hashlib
import io
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

from prunelab.data.shape import describe, splits
from prunelab.models.factory import input_shape

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


class _NoPt2Advice(logging.Filter):
    """Drops MLflow's advice to log with ``serialization_format='pt2'`` (see :func:`log_model` for why not)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "to 'pt2'" not in record.getMessage()


def _reloaded(module: torch.nn.Module) -> torch.nn.Module:
    """``module`` saved and loaded again as MLflow's pickle format does it (cloudpickle out, pickle in)."""
    import mlflow.pytorch.pickle_module as pickle_module

    buffer = io.BytesIO()
    torch.save(module, buffer, pickle_module=pickle_module)
    buffer.seek(0)
    return torch.load(buffer, pickle_module=pickle_module, weights_only=False)


def _exported_graph(net: torch.nn.Module, example: torch.Tensor) -> torch.fx.GraphModule:
    """``net``'s inference graph captured by ``torch.export`` (batch dimension dynamic), as a plain GraphModule.

    ``ExportedProgram.module()`` refuses ``.train()``/``.eval()`` and carries export's input hooks; a new
    GraphModule over its graph keeps only the parameters, buffers and code. Its tracer class is dropped because
    unpickling a GraphModule re-traces its code with that class, and export's tracer cannot be built without
    arguments.
    """
    program = torch.export.export(net, (example,), dynamic_shapes=({0: torch.export.Dim.AUTO},))
    unlifted = program.module(check_guards=False)
    graph = unlifted.graph
    graph._tracer_cls, graph._tracer_extras = None, None
    return torch.fx.GraphModule(unlifted, graph)


def portable_module(net: torch.nn.Module, example: torch.Tensor, rtol: float = 1e-4) -> torch.nn.Module | None:
    """A copy of ``net`` (on the CPU) at inference as a ``torch.fx`` graph of torch modules and ops, which loads
    without the classes that built ``net``; ``None`` when no graph reproduces ``net``.

    ``torch.fx.symbolic_trace`` keeps torch's own layers as modules, so BatchNorm and dropout follow ``.train()`` and
    ``.eval()``, and inlines the rest (prunelab's containers, the layers a method put in). A forward that it cannot
    trace (Python control flow on shapes) is captured with ``torch.export``, whose graph is that of inference
    (``.train()`` does not change it); neither takes control flow on tensor values. A graph is kept only when, saved
    and loaded again, it gives ``net``'s logits (within ``rtol``·max(1, max|logit|)) at batch sizes 1 and 3.
    """
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randn((n, *example.shape[1:]), generator=gen) for n in (1, 3)]
    mode = net.training
    net.eval()
    try:
        for capture in (lambda: torch.fx.symbolic_trace(net), lambda: _exported_graph(net, example)):
            try:
                module = _reloaded(capture())
                with torch.no_grad():
                    for x in batches:
                        expected = net(x)
                        if not (module(x) - expected).abs().max() <= rtol * max(1.0, float(expected.abs().max())):
                            raise ValueError("the graph's logits differ from the network's")
                return module
            except Exception as exc:  # noqa: BLE001 - whatever a capture rejects or gets wrong
                log.info("graph capture of %s failed (%s: %s)", type(net).__name__, type(exc).__name__, exc)
        return None
    finally:
        net.train(mode)


def log_model(net: torch.nn.Module, example_input: torch.Tensor, step: int = 0) -> str:
    """Log ``net`` (on the CPU; its weights as they are: pruned weights are zeros) as the run's MLflow model; return
    its URI.

    Metrics the run logs at ``step`` are the model's in MLflow (its Models view shows them).

    What is logged is :func:`portable_module` of ``net``: a graph of torch modules and ops, so that
    ``mlflow.pytorch.load_model`` gives back an ``nn.Module`` (``.eval()``, ``.to(device)``, ``.state_dict()`` with
    ``net``'s keys) in a fresh process with torch alone, also after a method changed the architecture. MLflow's
    ``pt2`` format is not used: it loads as ``ExportedProgram.module()``, which raises on ``.eval()``. Where no graph
    reproduces ``net``, the module itself is pickled, and its classes must then import from prunelab.
    The input example has a batch of two: ``torch.export`` fixes a dimension of size 1 to a constant.
    """
    example = example_input.detach().cpu().float().expand(2, *example_input.shape[1:]).contiguous()
    portable = portable_module(net, example)
    if portable is None:
        log.warning(
            "no torch graph reproduces %s; logging the pickled module (loading needs prunelab)", type(net).__name__
        )
    mode, advice = net.training, _NoPt2Advice()
    net.eval()
    logging.getLogger("mlflow.pytorch").addFilter(advice)
    try:
        info = mlflow.pytorch.log_model(
            portable if portable is not None else net,
            name=MODEL_NAME,
            step=step,
            input_example=example.numpy(),
            serialization_format="pickle",
            # given, not inferred: MLflow infers requirements by importing the model in a subprocess (~20 s per run)
            pip_requirements=mlflow.pytorch.get_default_pip_requirements(),
        )
    finally:
        logging.getLogger("mlflow.pytorch").removeFilter(advice)
        net.train(mode)
    return info.model_uri


def _digest(identity: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:10]


def log_datasets(name: str, datamodule: Any, data_cfg: dict[str, Any]) -> None:
    """Record the train, validation and test splits as the run's dataset inputs (the run list's Datasets column).

    Only metadata is logged: the dataset's name, the datamodule that builds it, the shape of its tensors and a digest
    of what decides its samples (data options and split sizes), so runs on the same split share one dataset entry.
    """
    datamodule.setup("fit")
    identity = {k: v for k, v in data_cfg.items() if k not in _DATA_KEYS_IGNORED}
    source = CodeDatasetSource({"datamodule": str(data_cfg.get("_target_", type(datamodule).__name__))})
    image = (-1, *input_shape(describe(datamodule)))
    schema = Schema([TensorSpec(np.dtype(np.float32), image, "image"), TensorSpec(np.dtype(np.int64), (-1,), "label")])
    for context, split in splits(datamodule).items():
        if split is None:
            continue
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
