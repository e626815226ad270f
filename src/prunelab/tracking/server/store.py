"""Where runs are recorded: tracking URI, a checked and locked first use of the store, the experiment, and the
Lightning logger bound to our run."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import sqlite3
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow
from filelock import FileLock
from mlflow.tracking import MlflowClient
from pytorch_lightning.loggers import MLFlowLogger

from prunelab.tracking.runs.lifecycle import deferred_signals
from prunelab.tracking.runs.record import rounded
from prunelab.tracking.server.ui import experiment_tags

log = logging.getLogger(__name__)

TMP_TABLE_PREFIX = "_alembic_tmp_"  # what an interrupted SQLite schema migration (alembic batch mode) leaves


class TrackingUnavailableError(RuntimeError):
    """The tracking server or database does not answer."""


class StoreBrokenError(RuntimeError):
    """The tracking database was left half-migrated (e.g. by processes that raced on its first use)."""


# where prunelab records runs: a tracking server or a database (SQLAlchemy dialect[+driver]); never a file store
_URI_SCHEMES = ("http", "https", "sqlite", "postgresql", "mysql", "mssql", "databricks")


def check_tracking_uri(configured: str | None) -> None:
    """Raise a ValueError naming ``MLFLOW_TRACKING_URI`` or ``logger.tracking_uri`` when its scheme is none that
    MLflow records runs in (before MLflow's own, less telling, errors)."""
    source = "MLFLOW_TRACKING_URI" if os.environ.get("MLFLOW_TRACKING_URI") else "logger.tracking_uri"
    uri = os.environ.get("MLFLOW_TRACKING_URI") or configured
    if not uri:
        return
    scheme = str(uri).split("://", 1)[0].split("+", 1)[0].lower() if "://" in str(uri) else ""
    if scheme not in _URI_SCHEMES:
        raise ValueError(
            f"{source}={uri!r} is not a tracking store MLflow can record runs in: use http(s)://host:port "
            f"(a tracking server), sqlite:///path/mlflow.db, postgresql://… or mysql://…, or unset it "
            f"for the local SQLite store"
        )


def tracking_uri(configured: str | None, output_dir: str | os.PathLike) -> str:
    """``MLFLOW_TRACKING_URI`` when set, else ``configured``, else a SQLite file under ``output_dir``.

    Creates nothing: the store is made by :func:`ensure_experiment`, after the run's config was checked.
    """
    uri = os.environ.get("MLFLOW_TRACKING_URI") or configured
    if uri:
        return uri
    return f"sqlite:///{Path(output_dir).resolve() / 'mlflow.db'}"


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (``None`` for other stores and in-memory SQLite)."""
    if not uri.startswith("sqlite:///"):
        return None
    path = uri.removeprefix("sqlite:///").split("?", 1)[0]
    return Path(path).resolve() if path and path != ":memory:" else None


def artifact_location(uri: str, configured: str | None, output_dir: str | os.PathLike) -> str | None:
    """Artifact root for a new experiment: ``configured`` when set; for a tracking server, the server's own (its
    S3 bucket in docker/); else ``<output_dir>/mlartifacts``."""
    if configured:
        return configured if "://" in str(configured) else Path(configured).resolve().as_uri()
    if uri.startswith(("http://", "https://")):
        return None
    return (Path(output_dir).resolve() / "mlartifacts").as_uri()


def check_server(uri: str, timeout: float) -> None:
    """Fail within ``timeout`` seconds, with one message, when a tracking server or database does not answer.

    MLflow's own client retries a dead server for minutes (``MLFLOW_HTTP_REQUEST_MAX_RETRIES``); this check runs
    before any MLflow call so that a wrong or dead address is reported at once.
    """
    if uri.startswith(("http://", "https://")):
        probe, what = lambda t: _http_health(uri, t), "tracking server"
    elif uri.startswith(("postgresql", "mysql")):
        probe, what = lambda t: _db_connect(uri, t), "tracking database"
    else:
        return
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        try:
            probe(max(left, 0.5))
            return
        except Exception as exc:  # connection refused, DNS, timeout, authentication …
            if time.monotonic() + 1.0 >= deadline:
                raise TrackingUnavailableError(
                    f"{what} {_redact(uri)} did not answer within logger.connect_timeout={timeout:g} s "
                    f"({type(exc).__name__}: {exc}). Start it, or point MLFLOW_TRACKING_URI / logger.tracking_uri "
                    f"at one that runs (unset both for the local SQLite store)"
                ) from None
            time.sleep(1.0)


def _http_health(uri: str, timeout: float) -> None:
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout):
            return
    except urllib.error.HTTPError:  # the server answered (auth, proxy path …): it is up
        return


def _db_connect(uri: str, timeout: float) -> None:
    import sqlalchemy

    args = {"connect_timeout": max(int(timeout), 1)} if uri.startswith("postgresql") else {}
    engine = sqlalchemy.create_engine(uri, connect_args=args, poolclass=sqlalchemy.pool.NullPool)
    try:
        with engine.connect():
            return
    finally:
        engine.dispose()


def _redact(uri: str) -> str:
    """The URI without a password."""
    if "@" not in uri or "://" not in uri:
        return uri
    scheme, rest = uri.split("://", 1)
    cred, host = rest.rsplit("@", 1)
    return f"{scheme}://{cred.split(':', 1)[0]}:***@{host}" if ":" in cred else uri


@contextlib.contextmanager
def store_lock(uri: str) -> Iterator[None]:
    """Serialize the first use of a store across processes: a file lock beside a SQLite file, an advisory lock in
    PostgreSQL. Creating tables, running MLflow's schema migration and creating the experiment happen under it."""
    path = sqlite_path(uri)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(path) + ".lock", timeout=600):
            yield
    elif uri.startswith("postgresql"):
        import sqlalchemy

        key = int.from_bytes(hashlib.sha256(b"prunelab.store").digest()[:8], "big", signed=True)
        engine = sqlalchemy.create_engine(uri, poolclass=sqlalchemy.pool.NullPool)
        try:
            with engine.connect() as conn:
                conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:k)"), {"k": key})
                try:
                    yield
                finally:
                    conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:k)"), {"k": key})
        finally:
            engine.dispose()
    else:  # a tracking server migrates its database once, when it starts
        yield


def schema_problems(path: Path) -> list[str]:
    """What is wrong with an existing MLflow SQLite file (empty list: nothing; a missing or empty file is fine)."""
    if not path.exists() or path.stat().st_size == 0:
        return []
    from mlflow.store.db.utils import _get_latest_schema_revision

    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=60)
    try:
        tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        version = (
            (con.execute("SELECT version_num FROM alembic_version").fetchone() or [None])[0]
            if "alembic_version" in tables
            else None
        )
    except sqlite3.DatabaseError as exc:
        return [f"not a readable SQLite database ({exc})"]
    finally:
        con.close()
    if not tables:
        return []
    problems = []
    leftovers = sorted(t for t in tables if t.startswith(TMP_TABLE_PREFIX))
    if leftovers:
        problems.append(f"leftover tables of an interrupted schema migration: {', '.join(leftovers)}")
    head = _get_latest_schema_revision()
    if version != head:
        problems.append(f"schema version {version} where this MLflow ({mlflow.__version__}) expects {head}")
    return problems


def check_store(uri: str) -> None:
    """Raise :class:`StoreBrokenError`, saying how to repair it, when a SQLite store is half-migrated."""
    path = sqlite_path(uri)
    problems = schema_problems(path) if path is not None else []
    if problems:
        raise StoreBrokenError(
            f"MLflow store {path} is broken: {'; '.join(problems)}. Repair it with `prunelab-runs repair-store "
            f"--tracking-uri {uri}` (it keeps a copy of the file first); stop other runs on it before."
        )


def ensure_experiment(uri: str, name: str, artifact_location: str | None = None, connect_timeout: float = 10.0) -> str:
    """Create the store and the experiment if missing and return the experiment's id.

    Safe when many processes start at once on a fresh store: everything runs under :func:`store_lock`, and a
    store broken by an earlier interrupted migration is reported instead of being migrated again.
    """
    check_server(uri, connect_timeout)
    with store_lock(uri):
        check_store(uri)
        client = MlflowClient(tracking_uri=uri)
        exp = client.get_experiment_by_name(name)
        if exp is not None:
            return exp.experiment_id
        try:
            return client.create_experiment(name, artifact_location=artifact_location, tags=experiment_tags())
        except mlflow.exceptions.MlflowException:  # created meanwhile by a process on another host
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise
            return exp.experiment_id


def open_experiment(logger: Any, output_dir: str | os.PathLike) -> tuple[str, str]:
    """Tracking URI and experiment id for the ``logger`` config group (``conf/logger/mlflow.yaml``)."""
    uri = tracking_uri(logger.tracking_uri, output_dir)
    location = artifact_location(uri, logger.get("artifact_location"), output_dir)
    return uri, ensure_experiment(uri, logger.experiment_name, location, float(logger.get("connect_timeout", 10)))


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
        kept = {
            k: float(v) * (100.0 if k.rsplit("/", 1)[-1].startswith("acc") else 1.0)
            for k, v in metrics.items()
            if "test/" not in k
        }
        self.last_step = max(self.last_step, step or 0)
        if kept:
            with deferred_signals():  # a SIGTERM waits for the write: the run can then be ended KILLED
                super().log_metrics(rounded(kept), step)
