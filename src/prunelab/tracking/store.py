"""Where runs are recorded: tracking URI, experiment, and the Lightning logger bound to our run."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient
from pytorch_lightning.loggers import MLFlowLogger

log = logging.getLogger(__name__)


def tracking_uri(configured: str | None, output_dir: str | os.PathLike) -> str:
    """``MLFLOW_TRACKING_URI`` when set, else ``configured``, else a SQLite file under ``output_dir``."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or configured
    if uri:
        return uri
    path = Path(output_dir).resolve() / "mlflow.db"
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path}"


def ensure_experiment(uri: str, name: str, artifact_location: str | os.PathLike | None = None) -> str:
    """Create the experiment if missing (this also runs the store's schema migration) and return its id.

    Call it once before parallel jobs start: concurrent first use of a fresh SQLite file races on the migration.
    """
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = None
    if artifact_location is not None and "://" not in str(artifact_location):
        location = Path(artifact_location).resolve().as_uri()
    elif artifact_location is not None:
        location = str(artifact_location)
    try:
        return client.create_experiment(name, artifact_location=location)
    except mlflow.exceptions.MlflowException:  # created meanwhile by another process
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


class RunLogger(MLFlowLogger):
    """Lightning's MLflow logger attached to a run that ``train`` owns.

    Lightning marks the run terminated when a ``fit`` ends; here the run outlives several fits (dense baseline,
    pruning, test) and ``train`` ends it itself, FINISHED or FAILED.
    """

    def finalize(self, status: str) -> None:
        return None
