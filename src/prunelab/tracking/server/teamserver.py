"""The team tracking stack of ``docker/`` without Docker: a throwaway PostgreSQL cluster and an ``mlflow server`` on
it, both on 127.0.0.1 only. The integration tests and ``bench/faults.py`` run on it; anyone can try the team set-up:

    python -m prunelab.tracking.server.teamserver        # prints the MLFLOW_TRACKING_URI to use; Ctrl-C stops both

PostgreSQL's binaries come from the system (Debian: ``apt-get install postgresql``); run as root, the cluster runs as
the ``postgres`` user, which PostgreSQL requires. Artifacts go to a local folder (``--artifacts-destination``); the
compose file puts them in S3 instead.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path


def postgres_bin() -> Path | None:
    """Folder of ``initdb`` / ``pg_ctl`` (on PATH or Debian's /usr/lib/postgresql/<version>/bin), or ``None``."""
    found = shutil.which("initdb")
    if found and shutil.which("pg_ctl"):
        return Path(found).resolve().parent
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    return Path(versions[-1]).parent if versions else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _as_postgres(cmd: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: drop to the ``postgres`` user there."""
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


def _wait(check, what: str, proc: subprocess.Popen | None = None, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            check()
            return
        except Exception:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"{what} exited with status {proc.returncode}") from None
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


@contextlib.contextmanager
def postgres(database: str = "mlflow") -> Iterator[str]:
    """A fresh PostgreSQL cluster on a free loopback port; yields ``postgresql://postgres@127.0.0.1:<port>/<db>``."""
    bindir = postgres_bin()
    if bindir is None:
        raise FileNotFoundError("PostgreSQL not found (Debian: apt-get install postgresql)")
    root = Path(tempfile.mkdtemp(prefix="prunelab-pg-"))
    if os.geteuid() == 0:
        shutil.chown(root, "postgres", "postgres")
    data, port = root / "data", free_port()
    subprocess.run(
        _as_postgres([str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8"]),
        check=True,
        capture_output=True,
    )
    options = (
        f"-c listen_addresses=127.0.0.1 -c port={port} -c unix_socket_directories='{root}' -c fsync=off "
        "-c max_connections=200"
    )
    subprocess.run(
        _as_postgres([str(bindir / "pg_ctl"), "-D", str(data), "-l", str(root / "log"), "-o", options, "-w", "start"]),
        check=True,
        capture_output=True,
    )
    try:
        import psycopg

        def create() -> None:
            with psycopg.connect(
                host="127.0.0.1", port=port, user="postgres", dbname="postgres", autocommit=True
            ) as con:
                con.execute(f'CREATE DATABASE "{database}"')

        _wait(create, "PostgreSQL")
        yield f"postgresql://postgres@127.0.0.1:{port}/{database}"
    finally:
        subprocess.run(
            _as_postgres([str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"]), capture_output=True
        )
        shutil.rmtree(root, ignore_errors=True)


@contextlib.contextmanager
def mlflow_server(backend_uri: str, artifacts: str | Path, workers: int = 2) -> Iterator[str]:
    """``mlflow server`` on a free loopback port, serving artifacts from ``artifacts``; yields its URL."""
    port = free_port()
    mlflow_cli = Path(sys.executable).with_name("mlflow")
    log = open(Path(tempfile.gettempdir()) / f"prunelab-mlflow-{port}.log", "w")  # noqa: SIM115  (closed below)
    proc = subprocess.Popen(
        [
            str(mlflow_cli),
            "server",
            "--backend-store-uri",
            backend_uri,
            "--artifacts-destination",
            str(artifacts),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            str(workers),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait(lambda: urllib.request.urlopen(url + "/health", timeout=5).close(), "mlflow server", proc)
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, 15)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()
        log.close()


@contextlib.contextmanager
def team_server(artifacts: str | Path, workers: int = 2) -> Iterator[tuple[str, str]]:
    """PostgreSQL + ``mlflow server``; yields (tracking URL, database URI)."""
    with postgres() as db, mlflow_server(db, artifacts, workers) as url:
        yield url, db


def main() -> None:
    artifacts = Path(tempfile.mkdtemp(prefix="prunelab-artifacts-"))
    with team_server(artifacts) as (url, db):
        print(
            f"MLflow server {url} on {db}, artifacts in {artifacts}\n  export MLFLOW_TRACKING_URI={url}\n"
            "Ctrl-C stops both (and deletes the database).",
            flush=True,
        )
        with contextlib.suppress(KeyboardInterrupt):
            while True:
                time.sleep(3600)


if __name__ == "__main__":
    main()
