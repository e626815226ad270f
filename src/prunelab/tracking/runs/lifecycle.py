"""A run's life in MLflow beyond one happy process: which process owns a run, runs whose process died
(``reconcile``), and SIGTERM / Ctrl-C ending a run as KILLED with a non-zero exit.

Every run is tagged with the host, PID namespace, PID and process start time of the process that records it. A run
still ``RUNNING`` whose process is gone from this host is ended ``KILLED`` with a ``failure_reason``; runs of other
hosts, of live processes, or without these tags are never touched.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import psutil
from mlflow.entities import RunStatus
from mlflow.tracking import MlflowClient

log = logging.getLogger(__name__)

HOST_TAG, PID_TAG, PROCESS_TAG = "prunelab.host", "prunelab.pid", "prunelab.process"
CHECKPOINT_TAG = "prunelab.checkpoint"  # the checkpoint a KILLED run resumes from (ckpt_path=...)


def _pid_namespace() -> str:
    try:
        return os.readlink("/proc/self/ns/pid")  # a container sharing the host's name has its own PIDs
    except OSError:
        return ""


def _process_key(pid: int) -> str | None:
    """``<pid namespace>:<pid>:<start time>`` of a live process, ``None`` when it is gone (PIDs are reused)."""
    try:
        started = psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return None
    except psutil.AccessDenied:
        started = -1.0
    return f"{_pid_namespace()}:{pid}:{started:.2f}"


def process_tags() -> dict[str, str]:
    """Tags that let a later process on this host tell whether the run's process is still alive."""
    pid = os.getpid()
    return {HOST_TAG: socket.gethostname(), PID_TAG: str(pid), PROCESS_TAG: _process_key(pid) or ""}


@dataclass(frozen=True)
class Orphan:
    run_id: str
    run_name: str
    pid: str


def _is_orphan(tags: dict[str, str]) -> bool:
    if tags.get(HOST_TAG) != socket.gethostname() or not tags.get(PROCESS_TAG, "").startswith(_pid_namespace() + ":"):
        return False
    pid = tags.get(PID_TAG, "")
    return pid.isdigit() and _process_key(int(pid)) != tags[PROCESS_TAG]


def reconcile(uri: str, experiment_ids: list[str] | None = None, dry_run: bool = False) -> list[Orphan]:
    """End as KILLED every RUNNING run (of ``experiment_ids``, default all) whose process on this host is gone."""
    client = MlflowClient(tracking_uri=uri)
    if experiment_ids is None:
        experiment_ids = [e.experiment_id for e in client.search_experiments()]
    orphans = []
    for exp_id in experiment_ids:
        for run in client.search_runs([exp_id], filter_string="attributes.status = 'RUNNING'", max_results=5000):
            tags = run.data.tags
            if not _is_orphan(tags):
                continue
            orphan = Orphan(run.info.run_id, run.info.run_name or "", tags[PID_TAG])
            orphans.append(orphan)
            if dry_run:
                continue
            resume = tags.get(CHECKPOINT_TAG)
            client.set_tag(
                orphan.run_id,
                "failure_reason",
                f"process {orphan.pid} on {tags[HOST_TAG]} ended without ending the run (killed or "
                "crashed); marked KILLED by reconcile" + (f"; resume with ckpt_path={resume}" if resume else ""),
            )
            client.set_terminated(orphan.run_id, RunStatus.to_string(RunStatus.KILLED))
            log.warning("run %s (%s): process %s is gone; marked KILLED", orphan.run_id, orphan.run_name, orphan.pid)
    return orphans


class Interrupted(BaseException):
    """SIGTERM or SIGINT (Ctrl-C) received: the run stops, is recorded KILLED, and the process exits non-zero.

    A ``BaseException`` (like ``KeyboardInterrupt``) so no ``except Exception`` swallows it, and not a
    ``KeyboardInterrupt``, which Lightning turns into ``sys.exit(1)`` and so loses which signal it was.
    """

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(f"{signal.Signals(signum).name} received")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # the shell's convention for "ended by signal N"


_received: list[int] = []
_deferring = 0  # depth of deferred_signals() blocks
_deferred: list[int] = []  # a signal received inside one, raised when the outermost block ends


def interrupted() -> Interrupted | None:
    """The interrupt this process is stopping for, if any (it may reach ``train`` wrapped, e.g. as SystemExit)."""
    return Interrupted(_received[0]) if _received else None


def _raise(signum: int, frame) -> None:
    if _received:  # already stopping: let the run be recorded KILLED instead of breaking that off
        log.warning("%s received again while stopping; ignored", signal.Signals(signum).name)
        return
    _received.append(signum)
    if _deferring:
        _deferred.append(signum)
        return
    raise Interrupted(signum)


@contextlib.contextmanager
def deferred_signals() -> Iterator[None]:
    """Let a tracking-store write finish before a SIGTERM / Ctrl-C that arrives during it stops the run: the
    interrupt is raised when the block ends. Raised inside a SQLite transaction, it would leave that connection
    holding the database's write lock, and ending the run KILLED would then fail with "database is locked", the run
    left RUNNING (tests/test_lifecycle.py met it when the signal came while an epoch's metrics were being logged)."""
    global _deferring
    _deferring += 1
    try:
        yield
    finally:
        _deferring -= 1
    if not _deferring and _deferred:
        raise Interrupted(_deferred.pop())


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """SIGTERM and SIGINT raise :class:`Interrupted` at once (Lightning chains our SIGTERM handler to its own
    during a fit); leaving the block with it exits the process with status 128 + signal number."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, _raise) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    except BaseException as exc:
        stop = exc if isinstance(exc, Interrupted) else interrupted()
        if stop is None:
            raise
        log.error("%s: run stopped and recorded KILLED", stop)
        raise SystemExit(stop.exit_code) from None
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        _received.clear()
        _deferred.clear()
