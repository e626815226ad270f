"""Where runs are recorded: tracking URI, experiment, and the Lightning logger bound to our run."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient
from pytorch_lightning.loggers import MLFlowLogger

from prunelab.tracking.record import rounded
from prunelab.tracking.ui import experiment_tags

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
        return client.create_experiment(name, artifact_location=location, tags=experiment_tags())
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

    last_step = 0  # the largest step a metric was logged at

    def finalize(self, status: str) -> None:
        return None

    def log_metrics(self, metrics, step=None) -> None:
        """Curves as recorded: accuracies in percent like ``test_acc``, 6 significant digits, and no ``test/`` curve,
        which would repeat the final ``test_acc`` / ``dense_test_acc`` under a second name and unit."""
        kept = {k: float(v) * (100.0 if k.rsplit("/", 1)[-1].startswith("acc") else 1.0) for k, v in metrics.items()
                if "test/" not in k}
        self.last_step = max(self.last_step, step or 0)
        if kept:
            super().log_metrics(rounded(kept), step)
