"""One MLflow parent run per Hydra sweep; every job of the sweep is a child run tagged ``sweep_id``.

The parent is created by the Hydra callback in the launching process before any job starts. Jobs find it through
two environment variables, which local launchers (basic, joblib, a local Ray instance) and SLURM (submitit) pass on
to the processes they start.
"""

from __future__ import annotations

import os
import secrets
import time
from dataclasses import dataclass

from mlflow.tracking import MlflowClient

from prunelab.tracking.runs.lifecycle import process_tags

PARENT_ENV = "PRUNELAB_PARENT_RUN_ID"
SWEEP_ENV = "PRUNELAB_SWEEP_ID"
KIND_TAG = "prunelab.kind"


@dataclass(frozen=True)
class Sweep:
    sweep_id: str
    parent_run_id: str


def current() -> Sweep | None:
    """The sweep this process runs in, or ``None`` for a single run."""
    parent, sweep_id = os.environ.get(PARENT_ENV), os.environ.get(SWEEP_ENV)
    return Sweep(sweep_id, parent) if parent and sweep_id else None


def start(uri: str, experiment_id: str, overrides: list[str], sweep_dir: str) -> Sweep:
    """Create the parent run (left RUNNING until :func:`finish`) and export it to the jobs' environment."""
    sweep_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"
    client = MlflowClient(tracking_uri=uri)
    run = client.create_run(
        experiment_id,
        run_name=f"sweep-{sweep_id}",
        tags={"sweep_id": sweep_id, KIND_TAG: "sweep", "sweep_dir": sweep_dir, **process_tags()},
    )
    client.log_param(run.info.run_id, "sweep_overrides", " ".join(overrides)[:6000])
    os.environ[PARENT_ENV], os.environ[SWEEP_ENV] = run.info.run_id, sweep_id
    return Sweep(sweep_id, run.info.run_id)


def finish(uri: str, sweep: Sweep, status: str) -> None:
    MlflowClient(tracking_uri=uri).set_terminated(sweep.parent_run_id, status)
    for key in (PARENT_ENV, SWEEP_ENV):
        os.environ.pop(key, None)
