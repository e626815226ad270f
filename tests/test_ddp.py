"""More than one process (CPU, gloo, 2 processes): one MLflow run, identical pruning state on every rank, every way of
starting (Lightning's launcher, torchrun over two node processes), faults (kill -9 of one rank, resume).

Every run gathers a hash of the pruning callback's state and of the weights from each rank at every checkpoint and at
the end of the fit (prunelab.pruning.rank_check.RankCheck) and records them as JSON lines."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import psutil
import pytest
import torch

from prunelab.pruning import METHODS

pytestmark = pytest.mark.slow

RUN = [
    "data=digits",
    "model=lenet300",
    "dense.epochs=2",
    "finetune.epochs=3",
    "logger.log_model=false",
    "measure.latency=false",
    "measure.onnx=false",
    "trainer=ddp",
    "trainer.accelerator=cpu",
    "pruning.compression=4",
    "+callbacks.rank_check._target_=prunelab.pruning.rank_check.RankCheck",
]
TIMEOUT = 600


def _args(root: Path, cache: Path, *overrides: str, job: str = "job") -> list[str]:
    return [
        *RUN,
        *overrides,
        f"paths.root_dir={root}",
        f"paths.cache_dir={cache}",
        f"hydra.run.dir={root}/{job}",
        f"+callbacks.rank_check.record={root}/ranks.jsonl",
    ]


def _cli(root: Path, cache: Path, *overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "prunelab.train", *_args(root, cache, *overrides)],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )


def _runs(root: Path) -> list:
    mlflow.set_tracking_uri(f"sqlite:///{root}/outputs/mlflow.db")
    return mlflow.search_runs(experiment_names=["prunelab"], output_format="list")


def _checks(root: Path) -> list[dict]:
    return [json.loads(line) for line in (root / "ranks.jsonl").read_text().splitlines()]


def _assert_identical_ranks(root: Path) -> list[dict]:
    checks = _checks(root)
    assert any(c["when"] == "checkpoint" and c["step"] > 0 for c in checks), checks  # mid-run
    assert checks[-1]["when"] == "end"
    for check in checks:
        assert len(check["ranks"]) == 2
        assert check["ranks"][0] == check["ranks"][1], check
    return checks


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("ddp_cache")


def test_a_run_with_no_dense_baseline_cached_trains_it_with_ddp_and_records_one_run(tmp_path):
    """The dense baseline is trained by both ranks and cached by rank 0; no rank waits on the other's lock."""
    cache = tmp_path / "cache"
    proc = _cli(tmp_path, cache)
    assert proc.returncode == 0, proc.stderr[-4000:]
    (run,) = _runs(tmp_path)
    assert run.info.status == "FINISHED"
    assert run.data.tags["dense_cache_hit"] == "False" and run.data.tags["prunelab.world_size"] == "2"
    assert run.data.metrics["compression"] == pytest.approx(4.0, rel=0.02)
    assert len(list(cache.glob("*/model.pt"))) == 1
    assert proc.stdout.count("prunelab run ") == 1  # one summary
    _assert_identical_ranks(tmp_path)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_one_finished_run_and_identical_state_on_both_ranks(tmp_path, cache, method):
    proc = _cli(tmp_path, cache, f"pruning={method}")
    assert proc.returncode == 0, proc.stderr[-4000:]
    (run,) = _runs(tmp_path)
    assert run.info.status == "FINISHED"
    assert run.data.params["method"] == method
    assert run.data.metrics["compression"] == pytest.approx(4.0, rel=0.02)
    _assert_identical_ranks(tmp_path)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_nodes_one_process_each_records_one_run(tmp_path, cache):
    port = _free_port()
    nodes = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes",
                "2",
                "--nproc-per-node",
                "1",
                "--node-rank",
                str(rank),
                "--master-addr",
                "127.0.0.1",
                "--master-port",
                str(port),
                "-m",
                "prunelab.train",
                *_args(tmp_path, cache, "trainer.devices=1", "trainer.num_nodes=2", job=f"node{rank}"),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in (0, 1)
    ]
    outputs = [node.communicate(timeout=TIMEOUT) for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], [err[-3000:] for _, err in outputs]
    (run,) = _runs(tmp_path)
    assert run.info.status == "FINISHED" and run.data.tags["prunelab.world_size"] == "2"
    _assert_identical_ranks(tmp_path)
    assert "prunelab run " in outputs[0][0] and "prunelab run " not in outputs[1][0]  # the summary once, on rank 0


def test_bad_input_is_rejected_on_every_rank_before_anything(tmp_path, cache):
    port = _free_port()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            "2",
            "--master-addr",
            "127.0.0.1",
            "--master-port",
            str(port),
            "-m",
            "prunelab.train",
            *_args(tmp_path, cache, "finetune.optimizer.lr=-1"),
        ],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert proc.returncode != 0
    assert proc.stderr.count("finetune.optimizer is not valid: ValueError: Invalid learning rate: -1") == 2
    assert not (tmp_path / "outputs").exists()


def _rank1(parent: psutil.Process) -> psutil.Process | None:
    for child in parent.children(recursive=True):
        try:
            if child.environ().get("LOCAL_RANK") == "1":
                return child
        except psutil.Error:
            continue
    return None


def _wait_for_step(folder: Path, proc: subprocess.Popen, deadline: float) -> None:
    """Until the pruning fit has written its first epoch's checkpoint."""
    while not list(folder.glob("epoch=*.ckpt")):
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.1)


def _kill_rank1_mid_fit(root: Path, cache: Path, *overrides: str) -> psutil.Process:
    """Start a run, kill -9 its rank 1 once the pruning fit wrote a checkpoint; assert every process is gone
    within 60 s with a non-zero exit. Returns the killed process."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "prunelab.train", *_args(root, cache, *overrides)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    _wait_for_step(root / "job" / "checkpoints", proc, time.monotonic() + TIMEOUT)
    victim = _rank1(psutil.Process(proc.pid))
    assert victim is not None
    victim.send_signal(signal.SIGKILL)
    killed_at = time.monotonic()
    try:
        proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode != 0
    assert time.monotonic() - killed_at < 60
    return victim


def test_kill9_of_rank1_ends_every_process_and_the_run_then_resume_gives_the_uninterrupted_masks(tmp_path, cache):
    long = ["pruning=magnitude", "finetune.epochs=12"]
    reference = tmp_path / "reference"
    assert _cli(reference, cache, *long).returncode == 0
    expected = _checks(reference)[-1]["ranks"][0]

    root = tmp_path / "killed"
    victim = _kill_rank1_mid_fit(root, cache, *long)
    assert not psutil.pid_exists(victim.pid) or victim.status() == psutil.STATUS_ZOMBIE
    (run,) = _runs(root)
    assert run.info.status in ("FAILED", "KILLED"), run.info.status
    assert run.data.tags.get("failure_reason")

    resumed = _cli(root, cache, *long, f"ckpt_path={root}/job/checkpoints/last.ckpt")
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    (run,) = _runs(root)
    assert run.info.status == "FINISHED" and run.data.tags["prunelab.resumes"] == "1"
    final = _checks(root)[-1]
    assert final["ranks"][0] == final["ranks"][1]
    assert final["ranks"][0]["masks"] == expected["masks"]


two_gpus = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 CUDA devices"
)


@pytest.mark.gpu
@two_gpus
@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_on_two_gpus_with_nccl(tmp_path, cache, method):
    """The CPU checks above on CUDA: NCCL, 2 GPUs, one run, identical state on both ranks."""
    proc = _cli(tmp_path, cache, f"pruning={method}", "trainer.accelerator=gpu", "trainer.devices=2")
    assert proc.returncode == 0, proc.stderr[-4000:]
    (run,) = _runs(tmp_path)
    assert run.info.status == "FINISHED" and run.data.metrics["compression"] == pytest.approx(4.0, rel=0.02)
    _assert_identical_ranks(tmp_path)


@pytest.mark.gpu
@two_gpus
def test_kill9_of_rank1_on_two_gpus_ends_every_process(tmp_path, cache):
    _kill_rank1_mid_fit(
        tmp_path / "killed", cache, "finetune.epochs=12", "trainer.accelerator=gpu", "trainer.devices=2"
    )
