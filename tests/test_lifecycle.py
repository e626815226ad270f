"""A run's whole life in one MLflow record: kill -9 + resume, reconcile, SIGTERM / Ctrl-C, bad input rejected
before any store exists, checkpoints of another run refused."""

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import torch

from conftest import runs_in
from prunelab.tracking.runs.lifecycle import deferred_signals, reconcile, stop_on_signals
from prunelab.train import train

# long enough a fit (3 epochs of LeNet-5 on mnist5k) that a signal lands inside it
RUN = [
    "data=mnist5k",
    "model=lenet5",
    "dense.epochs=1",
    "finetune.epochs=3",
    "logger.log_model=false",
    "measure.latency=false",
]


# the CLI, SIGKILLing itself at the worst moment of a fit: the first epoch's checkpoint is written (Lightning saves
# it in on_train_epoch_end), the epoch's training metrics are not logged yet (update_train_epoch_metrics comes after)
_KILLED_BETWEEN_CHECKPOINT_AND_LOG = """
import os, runpy, signal
from pytorch_lightning.trainer.connectors.logger_connector.logger_connector import _LoggerConnector
_LoggerConnector.update_train_epoch_metrics = lambda self: os.kill(os.getpid(), signal.SIGKILL)
runpy.run_module("prunelab.train", run_name="__main__", alter_sys=True)
"""


def _start(
    root: Path, cache_root: Path, *overrides: str, entry: tuple[str, ...] = ("-m", "prunelab.train")
) -> subprocess.Popen:
    """The CLI run of RUN recording into ``root``'s store, its checkpoints in ``root/job/checkpoints``."""
    return subprocess.Popen(
        [
            sys.executable,
            *entry,
            *RUN,
            *overrides,
            f"paths.root_dir={root}",
            f"paths.cache_dir={cache_root}",
            f"hydra.run.dir={root / 'job'}",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def _wait_for_epoch(proc: subprocess.Popen, folder: Path, timeout: float = 600) -> None:
    """Until the first epoch's checkpoint is written and ``last.ckpt`` holds it (ModelCheckpoint writes the two
    one after the other, so the epoch file alone does not say ``last.ckpt`` has moved past step 0)."""
    deadline = time.monotonic() + timeout
    while not (list(folder.glob("epoch=0-*.ckpt")) and _last_step(folder) > 0):
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.02)


def _last_step(folder: Path) -> int:
    """``global_step`` of ``folder/last.ckpt``; -1 while it is missing or half written."""
    try:
        return int(torch.load(folder / "last.ckpt", map_location="cpu", weights_only=True)["global_step"])
    except Exception:
        return -1


def _masks(ckpt: Path) -> dict[str, torch.Tensor]:
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["callbacks"]
    (pruning,) = [v for k, v in state.items() if "method" in k]
    return pruning["masks"]


@pytest.fixture
def dense_cached(make_cfg, cache_root):
    """Train the dense baseline of RUN once in-process, so subprocesses reach the fit quickly."""
    from prunelab.dense import dense_baseline
    from prunelab.train import build

    cfg = make_cfg(*RUN, fast=False)
    parts = build(cfg)
    dense_baseline(cfg, parts.dense_net, parts.datamodule)


def _curves(uri: str, run_id: str) -> dict[str, dict[int, float]]:
    client = mlflow.MlflowClient(tracking_uri=uri)
    keys = ("train/loss", "val/acc", "train/sparsity", "epoch")
    return {k: {m.step: m.value for m in client.get_metric_history(run_id, k)} for k in keys}


@pytest.mark.slow  # three fits of RUN; the default run resumes every method (test_core_contract) and kills a CLI run
def test_kill9_then_resume_continues_the_same_run_with_identical_masks(dense_cached, make_cfg, cache_root, tmp_path):
    ref_uri = f"sqlite:///{tmp_path / 'reference.db'}"
    os.environ["MLFLOW_TRACKING_URI"] = ref_uri  # the uninterrupted reference run, in a store of its own
    train(make_cfg(*RUN, fast=False))
    os.environ.pop("MLFLOW_TRACKING_URI")
    (ref_run,) = mlflow.search_runs(experiment_names=["prunelab"], output_format="list")

    proc = _start(tmp_path, cache_root, entry=("-c", _KILLED_BETWEEN_CHECKPOINT_AND_LOG))
    ckpts = tmp_path / "job" / "checkpoints"
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == -signal.SIGKILL, err[-3000:]
    assert torch.load(ckpts / "last.ckpt", weights_only=True)["global_step"] > 0  # resumes mid-fit, not from 0
    assert sorted(p.name for p in ckpts.glob("last*")) == ["last.ckpt"]
    (run,) = runs_in(tmp_path)
    assert run.info.status == "RUNNING"
    (orphan,) = reconcile(mlflow.get_tracking_uri())
    assert orphan.run_id == run.info.run_id
    (run,) = runs_in(tmp_path)
    assert run.info.status == "KILLED" and "marked KILLED by reconcile" in run.data.tags["failure_reason"]
    assert f"ckpt_path={ckpts / 'last.ckpt'}" in run.data.tags["failure_reason"]

    metrics = train(make_cfg(*RUN, f"ckpt_path={ckpts / 'last.ckpt'}", fast=False))
    (resumed,) = runs_in(tmp_path)
    assert resumed.info.run_id == run.info.run_id and resumed.info.status == "FINISHED"
    assert "failure_reason" not in resumed.data.tags and resumed.data.tags["prunelab.resumes"] == "1"
    assert resumed.data.metrics["test_acc"] == pytest.approx(metrics["test_acc"])
    curves, ref_curves = _curves(mlflow.get_tracking_uri(), run.info.run_id), _curves(ref_uri, ref_run.info.run_id)
    assert {k: c.keys() for k, c in curves.items()} == {k: c.keys() for k, c in ref_curves.items()}
    assert all(curves[k][s] == pytest.approx(v, rel=1e-5) for k, c in ref_curves.items() for s, v in c.items())
    reference, resumed_masks = _masks(tmp_path / "run" / "checkpoints" / "last.ckpt"), _masks(ckpts / "last.ckpt")
    assert reference.keys() == resumed_masks.keys()
    assert sum(int((~m).sum()) for m in reference.values()) > 0  # the final masks, not the fit's first ones
    assert all(torch.equal(reference[k], resumed_masks[k]) for k in reference)
    assert resumed.data.metrics["test_acc"] == pytest.approx(ref_run.data.metrics["test_acc"])


@pytest.mark.parametrize(
    "signum, status",
    [
        pytest.param(signal.SIGTERM, 143, marks=pytest.mark.slow),
        pytest.param(signal.SIGINT, 130, marks=pytest.mark.slow),
    ],
)
def test_signal_stops_the_run_killed_with_a_checkpoint_and_nonzero_exit(
    dense_cached, cache_root, tmp_path, signum, status
):
    proc = _start(tmp_path, cache_root)
    ckpts = tmp_path / "job" / "checkpoints"
    _wait_for_epoch(proc, ckpts)
    os.killpg(proc.pid, signum)  # as a terminal's Ctrl-C or a scheduler's SIGTERM reach the whole group
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == status, err[-3000:]
    (run,) = runs_in(tmp_path)
    assert run.info.status == "KILLED", err[-3000:]
    assert run.data.tags["failure_reason"] == f"Interrupted: {signal.Signals(signum).name} received"
    assert run.data.tags["prunelab.checkpoint"] == str(ckpts / "last.ckpt")
    assert (ckpts / "last.ckpt").exists()


@pytest.mark.parametrize("deferred", [False, True])
def test_a_signal_during_a_store_write_waits_for_the_write_to_end(deferred):
    """SIGTERM raised inside a SQLite transaction left the run RUNNING ("database is locked" when ending it KILLED):
    inside deferred_signals() the write finishes first, and the interrupt comes when the block ends."""
    steps = []
    with pytest.raises(SystemExit) as stopped, stop_on_signals():
        with deferred_signals() if deferred else contextlib.nullcontext():
            os.kill(os.getpid(), signal.SIGTERM)
            steps.append("write finished")
        steps.append("after the block")
    assert stopped.value.code == 143
    assert steps == (["write finished"] if deferred else [])


def test_a_signal_during_the_runs_own_writes_lets_them_finish_then_ends_killed(make_cfg, tmp_path, monkeypatch):
    """Every store write of train() waits out a SIGTERM, not only the curves: here it lands as the run's params are
    being logged; they are all recorded, then the run ends KILLED with exit status 143."""
    cfg = make_cfg("pruning=magnitude", "logger.log_model=false", "measure.latency=false")
    log_params = mlflow.log_params

    def interrupted_write(params, *args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)  # the handler runs here, before the write itself
        return log_params(params, *args, **kwargs)

    monkeypatch.setattr(mlflow, "log_params", interrupted_write)
    with pytest.raises(SystemExit) as stopped, stop_on_signals():
        train(cfg)
    assert stopped.value.code == 143
    (run,) = runs_in(tmp_path)
    assert run.info.status == "KILLED"
    assert run.data.tags["failure_reason"] == "Interrupted: SIGTERM received"
    assert run.data.params["method"] == "magnitude" and run.data.params["seed"] == "0"


@pytest.mark.parametrize(
    "override, message",
    [
        ("dense.epochs=-1", r"dense.epochs=-1 must be an integer ≥ 1"),
        ("dense.epochs=0", r"dense.epochs=0 must be an integer"),
        ("dense.epochs=1.5", r"dense.epochs=1.5 must be an integer"),
        ("finetune.epochs=-1", r"finetune.epochs=-1 must be an integer ≥ 1"),
        ("finetune.epochs=0", r"finetune.epochs=0 must be an integer"),
        ("finetune.epochs=two", r"finetune.epochs='two' must be an integer"),
        ("pruning.compression=1e9", r"pruning.compression=1e\+09 cannot be reached.*max compression"),
        ("ckpt_path=/nowhere/last.ckpt", r"ckpt_path='/nowhere/last.ckpt' does not exist"),
        ("logger.connect_timeout=0", r"logger.connect_timeout=0 must be a number of seconds > 0"),
        ("pruning=none ckpt_path=/nowhere/last.ckpt", r"ckpt_path='/nowhere/last.ckpt' resumes a pruning fit"),
    ],
)
def test_bad_value_fails_before_the_store_exists(make_cfg, tmp_path, override, message):
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        train(make_cfg(*override.split()))
    assert not (tmp_path / "outputs").exists()


@pytest.fixture(scope="module")
def magnitude_ckpt(tmp_path_factory, cache_root):
    """``last.ckpt`` of a finished magnitude run at 4× (weight granularity) on digits / lenet300."""
    root = tmp_path_factory.mktemp("magnitude")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "prunelab.train",
            "data=digits",
            "model=lenet300",
            "dense.epochs=2",
            "finetune.epochs=2",
            "logger.log_model=false",
            "measure.latency=false",
            "pruning.compression=4",
            f"paths.root_dir={root}",
            f"paths.cache_dir={cache_root}",
            f"hydra.run.dir={root}/run",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root / "run" / "checkpoints" / "last.ckpt"


@pytest.mark.parametrize(
    "override, message",
    [
        ("pruning=admm", r"holds no state for pruning=admm.*written by \[\"MagnitudePruning"),
        ("pruning.granularity=filter", r"another configuration \(granularity: checkpoint 'weight', now 'filter'"),
        ("pruning.compression=8", r"holds no state for pruning=magnitude.*'compression': 8.0"),
        ("model=lenet5", r"weights of another network than model=lenet5"),
        ("finetune.epochs=3", r"another configuration \(finetune.epochs: checkpoint '2', now '3'"),
        ("seed=1", r"another configuration \(.*seed: checkpoint '0', now '1'"),
    ],
)
def test_checkpoint_of_another_run_is_refused_before_any_run(make_cfg, tmp_path, magnitude_ckpt, override, message):
    cfg = make_cfg("pruning.compression=4", *override.split(), f"ckpt_path={magnitude_ckpt}")
    with pytest.raises(ValueError, match=rf"ckpt_path='{magnitude_ckpt}' .*{message}"):
        train(cfg)
    assert not (tmp_path / "outputs").exists()


def test_a_file_that_is_not_a_checkpoint_is_refused(make_cfg, tmp_path):
    bogus = tmp_path / "notes.ckpt"
    bogus.write_text("not a checkpoint")
    with pytest.raises(ValueError, match=rf"ckpt_path='{bogus}' is not a Lightning checkpoint"):
        train(make_cfg(f"ckpt_path={bogus}"))
    assert not (tmp_path / "outputs").exists()
