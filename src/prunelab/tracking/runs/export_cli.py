"""``prunelab-export``: a recorded run's model as an ONNX file or a ``torch.export`` program (.pt2).

    prunelab-export <run id> --format onnx|pt2 [--tracking-uri URI] [--out PATH] [--atol 1e-4]

The model is the run's MLflow model (``runs:/<run id>/model``). Where that does not load (a pickled module whose
classes moved, or ``MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false``), the network is built again from the run's
``config.yaml``, changed by ``weights/architecture.json`` where a method changed it, and ``weights/model_state.pt`` is
loaded into it. Input shape and classes come from the MLflow model's signature. The written file is checked against
the PyTorch model (ONNX in ONNX Runtime; the .pt2 loaded again) and the largest logit difference is printed.

The store is ``--tracking-uri``, else ``MLFLOW_TRACKING_URI``, else ``$PRUNELAB_ROOT/outputs/mlflow.db``
(``PRUNELAB_ROOT`` defaults to the current folder), as for ``prunelab-train``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
from pathlib import Path

import mlflow
import torch
from omegaconf import OmegaConf
from torch import nn

from prunelab.measure.export import export_onnx, export_pt2
from prunelab.models import instantiate_model
from prunelab.models.architecture import rebuild
from prunelab.tracking.runs.model_log import MODEL_NAME
from prunelab.tracking.server.store import tracking_uri

log = logging.getLogger(__name__)
FORMATS = ("onnx", "pt2")


class ExportError(RuntimeError):
    """A run's model could not be found, loaded or exported."""


def signature_shape(run_id: str) -> tuple[tuple[int, ...], int]:
    """``(C, H, W)`` of one input and the number of classes, from the signature of the run's MLflow model."""
    try:
        signature = mlflow.models.get_model_info(f"runs:/{run_id}/{MODEL_NAME}").signature
    except Exception as exc:  # noqa: BLE001 - MLflow raises several kinds for a missing run or model
        raise ExportError(f"run {run_id} has no MLflow model '{MODEL_NAME}' ({type(exc).__name__}: {exc})") from exc
    if signature is None or signature.outputs is None:
        raise ExportError(f"run {run_id}: its MLflow model has no signature to read the input shape from")
    inputs, outputs = signature.inputs.inputs[0].shape, signature.outputs.inputs[0].shape
    return tuple(int(d) for d in inputs[1:]), int(outputs[-1])


def rebuild_from_weights(run_id: str, shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """The run's network built from its ``config.yaml`` (and ``weights/architecture.json``) with the weights of
    ``weights/model_state.pt``."""
    files = {a.path for a in mlflow.MlflowClient().list_artifacts(run_id, "weights")}
    if "weights/model_state.pt" not in files:
        raise ExportError(f"run {run_id} has no weights/model_state.pt artifact to rebuild the model from")
    with tempfile.TemporaryDirectory() as tmp:

        def fetch(name: str) -> Path:
            return Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=name, dst_path=tmp))

        cfg = OmegaConf.load(fetch("config.yaml"))
        data = {"in_channels": shape[0], "image_size": shape[1], "num_classes": num_classes}
        net = instantiate_model(cfg.model, data)  # as the run built it: shape arguments its constructor takes
        if "weights/architecture.json" in files:
            rebuild(net, json.loads(fetch("weights/architecture.json").read_text()))
        net.load_state_dict(torch.load(fetch("weights/model_state.pt"), map_location="cpu", weights_only=True))
    return net.eval()


def load_run_model(run_id: str) -> tuple[nn.Module, torch.Tensor]:
    """The run's model (CPU, eval mode) and a zero input batch of one example, see the module docstring."""
    shape, num_classes = signature_shape(run_id)
    try:
        net = mlflow.pytorch.load_model(f"runs:/{run_id}/{MODEL_NAME}", map_location="cpu")
    except Exception as exc:  # noqa: BLE001 - any failure to unpickle: the weights artifacts are the way back
        log.warning(
            "run %s: the MLflow model does not load (%s: %s); rebuilding it from its weights",
            run_id,
            type(exc).__name__,
            exc,
        )
        try:
            net = rebuild_from_weights(run_id, shape, num_classes)
        except ExportError:
            raise
        except Exception as again:
            raise ExportError(
                f"run {run_id}: neither the MLflow model ({type(exc).__name__}: {exc}) nor the weights "
                f"({type(again).__name__}: {again}) load"
            ) from again
    return net.cpu().eval(), torch.zeros(1, *shape)


def export_run(run_id: str, fmt: str, out: str | Path | None = None, atol: float = 1e-4) -> tuple[Path, float]:
    """Write the run's model as ``fmt`` (onnx or pt2) to ``out`` (default ``<run id>.<fmt>`` here); return the path
    and the largest logit difference to the PyTorch model."""
    if fmt not in FORMATS:
        raise ExportError(f"--format {fmt!r} must be one of {', '.join(FORMATS)}")
    path = Path(out) if out is not None else Path(f"{run_id}.{fmt}")
    net, example = load_run_model(run_id)
    try:
        diff = (export_onnx if fmt == "onnx" else export_pt2)(net, example, path, atol=atol)
    except Exception as exc:
        raise ExportError(f"run {run_id}: export as {fmt} failed ({type(exc).__name__}: {exc})") from exc
    return path, diff


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="prunelab-export", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("run_id", help="the MLflow run whose model to export")
    parser.add_argument("--format", required=True, choices=FORMATS, help="onnx or pt2 (torch.export.save)")
    parser.add_argument("--tracking-uri", default=None)
    parser.add_argument("--out", default=None, help="file to write (default: <run id>.<format> here)")
    parser.add_argument(
        "--atol", type=float, default=1e-4, help="tolerance on the logit difference, relative to max(1, max|logit|)"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # a bar per downloaded file otherwise
    root = Path(os.environ.get("PRUNELAB_ROOT", ".")) / "outputs"
    mlflow.set_tracking_uri(args.tracking_uri or tracking_uri(None, root))
    try:
        path, diff = export_run(args.run_id, args.format, args.out, args.atol)
    except ExportError as exc:
        print(f"prunelab-export {args.run_id} --format {args.format}: {exc}", file=sys.stderr)
        return 1
    print(path)
    print(f"max |logit difference| to PyTorch: {diff:.3g} (atol {args.atol:g} × max(1, max|logit|))")
    return 0


if __name__ == "__main__":
    sys.exit(main())
