"""How a run starts: bad values rejected before any store, experiment or run exists (naming the key or variable),
a dense cache entry that does not load trained again, and a FINISHED run not reopened."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import mlflow
import pytest
import torch

from conftest import runs_in
from prunelab.dense import cache_dir
from prunelab.tracking.runs.resume import FinishedRunError
from prunelab.train import train


@pytest.mark.parametrize(
    "override, message",
    [
        ("seed=-1", r"seed=-1 must be an integer in \[0, 2\*\*32\)"),
        ("seed=4294967296", r"seed=4294967296 must be an integer"),
        ("num_threads=-1", r"num_threads=-1 must be an integer ≥ 1"),
        ("num_threads=0", r"num_threads=0 must be an integer ≥ 1"),
        ("finetune.optimizer.lr=-1", r"finetune.optimizer is not valid: ValueError: Invalid learning rate: -1"),
        ("dense.optimizer.lr=-1", r"dense.optimizer is not valid: ValueError: Invalid learning rate: -1"),
        ("+finetune.scheduler.gamma=2", r"finetune.scheduler is not valid: TypeError: .*gamma"),
        ("trainer.strategy=ddp_spawn", r"trainer.strategy='ddp_spawn' is not supported"),
        ("paths.output_dir=/proc/forbidden/outputs", r"paths.output_dir='/proc/forbidden/outputs' cannot be created"),
    ],
)
def test_bad_value_is_rejected_before_the_store(make_cfg, tmp_path, override, message):
    with pytest.raises(ValueError, match=message):
        train(make_cfg(override))
    assert not (tmp_path / "outputs").exists()


def test_a_tracking_uri_mlflow_cannot_record_in_names_the_variable(make_cfg, tmp_path, monkeypatch):
    cfg = make_cfg()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "garbage://nowhere")
    with pytest.raises(ValueError, match=r"MLFLOW_TRACKING_URI='garbage://nowhere' is not a tracking store"):
        train(cfg)
    with pytest.raises(ValueError, match=r"logger.tracking_uri='/tmp/mlruns' is not a tracking store"):
        monkeypatch.delenv("MLFLOW_TRACKING_URI")
        train(make_cfg("logger.tracking_uri=/tmp/mlruns"))
    assert not (tmp_path / "outputs").exists()


@pytest.mark.slow  # the real CLI in a subprocess, ~10 s
def test_an_unwritable_prunelab_root_fails_in_one_line_before_hydra(tmp_path):
    env = {**os.environ, "PRUNELAB_ROOT": "/proc/forbidden"}
    proc = subprocess.run(
        [sys.executable, "-m", "prunelab.train"], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120
    )
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        "ValueError: PRUNELAB_ROOT='/proc/forbidden' cannot hold prunelab's data and outputs: nothing can be created "
        "in /proc (No such file or directory). Point it at a folder you can write to, or unset it to use the current "
        "folder"
    ]
    assert not (tmp_path / "outputs").exists()


@pytest.mark.parametrize("broken", ["model.pt", "meta.json"])
def test_a_dense_cache_entry_that_does_not_load_is_trained_again(make_cfg, tmp_path, caplog, broken):
    cfg = make_cfg("pruning.compression=2")
    train(cfg)  # the entry exists (trained now or by an earlier test of the session)
    folder = cache_dir(cfg)
    file = folder / broken
    file.write_bytes(file.read_bytes()[: len(file.read_bytes()) // 2])  # truncated, as a full disk leaves it
    with caplog.at_level(logging.WARNING, logger="prunelab.dense"):
        metrics = train(make_cfg("pruning.compression=2"))
    assert f"the cache entry {folder} does not load" in caplog.text
    assert metrics["compression"] == pytest.approx(2.0, rel=0.02)
    torch.load(folder / "model.pt", weights_only=True)  # written again, whole
    assert json.loads((folder / "meta.json").read_text())["test_acc"] > 0
    (_, second) = sorted(runs_in(tmp_path), key=lambda r: r.info.start_time)
    assert second.data.tags["dense_cache_hit"] == "False"


def test_resuming_a_finished_run_is_refused_and_logs_nothing(make_cfg, tmp_path):
    train(make_cfg("pruning.compression=2"))
    (run,) = runs_in(tmp_path)
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    client = mlflow.MlflowClient()
    before = client.get_metric_history(run.info.run_id, "test_acc")
    with pytest.raises(FinishedRunError, match=rf"belongs to MLflow run {run.info.run_id}, which FINISHED"):
        train(make_cfg("pruning.compression=2", f"ckpt_path={ckpt}"))
    (after,) = runs_in(tmp_path)
    assert after.info.status == "FINISHED"
    assert client.get_metric_history(run.info.run_id, "test_acc") == before
