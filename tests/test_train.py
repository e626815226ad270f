"""End-to-end runs through `train(cfg)`: MLflow record, dense cache, bad input, NaN handling."""

import logging
import subprocess
import sys

import mlflow
import pytest
import torch
from hydra.errors import ConfigCompositionException, MissingConfigException

from conftest import runs_in
from prunelab.data import DatasetNotFoundError
from prunelab.models.classifier import NonFiniteLossError
from prunelab.tracking.runs.record import FINAL_METRICS, summary
from prunelab.train import train


def test_run_records_every_final_metric_and_reaches_compression(make_cfg, tmp_path, capsys, caplog):
    caplog.set_level(logging.INFO, logger="prunelab.progress")
    cfg = make_cfg("pruning.compression=4", "logger.log_model=true")
    metrics = train(cfg)
    (run,) = runs_in(tmp_path)
    assert run.info.status == "FINISHED"
    assert set(FINAL_METRICS) <= set(run.data.metrics)
    assert abs(run.data.metrics["compression"] - 4) / 4 < 0.02
    assert run.data.metrics["test_acc"] == pytest.approx(metrics["test_acc"])
    p = run.data.params
    assert (p["method"], p["dataset"], p["model"], p["compression_target"], p["granularity"], p["seed"]) == (
        "magnitude",
        "digits",
        "lenet300",
        "4",
        "weight",
        "0",
    )
    assert p["pruning.mode"] == "gradual" and p["finetune.epochs"] == "2" and p["finetune.optimizer"] == "Adam"
    assert not [k for k in p if k.endswith(("_target_", "_partial_")) or k.startswith(("names.", "paths."))]
    assert run.data.tags["collapsed"] == "false" and run.data.tags["mlflow.runColor"].startswith("#")
    client = mlflow.MlflowClient()
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "sparsity_per_layer.md", "weights"} <= artifacts
    val_acc = client.get_metric_history(run.info.run_id, "val/acc")
    assert len(val_acc) == 2 and all(1.0 < m.value <= 100.0 for m in val_acc)  # percent, like test_acc
    assert not [k for k in run.data.metrics if "test/" in k]  # one test accuracy: test_acc
    test_acc = client.get_metric_history(run.info.run_id, "test_acc")  # dense at step 0, pruned after the last step
    assert [m.value for m in test_acc] == [metrics["dense_test_acc"], metrics["test_acc"]]
    assert test_acc[1].step > max(m.step for m in val_acc)
    assert len(client.get_metric_history(run.info.run_id, "train/sparsity")) == 2
    out = capsys.readouterr().out
    assert "compression   requested 4.00×" in out and "WARNING" not in out
    assert "after compaction" not in out  # unstructured at 4×: compaction removes no whole channel
    assert f"make ui, then http://127.0.0.1:5000/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}" in out
    epochs = [r.getMessage() for r in caplog.records if r.name == "prunelab.progress"]
    dense_epochs = 0 if run.data.tags["dense_cache_hit"] == "True" else 2
    assert [e.split(":")[0] for e in epochs] == ["dense baseline"] * dense_epochs + ["pruning (magnitude)"] * 2
    assert "epoch 2/2" in epochs[-1] and "val acc" in epochs[-1]


def test_summary_says_when_compaction_removes_more_than_the_masks():
    params = {
        "method": "obd",
        "granularity": "filter",
        "dataset": "d",
        "model": "m",
        "seed": "0",
        "compression_target": "8",
    }
    metrics = {
        "compression": 8.0,
        "sparsity": 0.875,
        "dense_test_acc": 90.0,
        "test_acc": 89.0,
        "acc_drop": 1.0,
        "params": 10.0,
        "params_nonzero": 10.0,
        "macs": 5.0,
        "dense_macs": 50.0,
        "macs_reduction": 10.0,
        "bytes_stored": 1.0,
        "bytes_dense": 8.0,
        "storage_compression": 8.0,
    }
    assert "after compaction" not in summary(params, {**metrics, "compression_compacted": 8.1}, "r", "u")
    line = summary(params, {**metrics, "compression_compacted": 17.25}, "r", "u").splitlines()[3]
    assert line.startswith(" compression") and line.endswith("17.25× after compaction")


def test_summary_hints_round_to_when_onnx_runtime_is_slower_on_unaligned_channels():
    params = {"method": "magnitude", "granularity": "channel", "dataset": "d", "model": "m", "seed": "0"}
    params |= {"compression_target": "2", "pruning.round_to": "auto"}
    metrics = dict.fromkeys(("compression", "dense_test_acc", "test_acc", "acc_drop", "params", "params_nonzero"), 1.0)
    metrics |= dict.fromkeys(("macs", "dense_macs", "macs_reduction", "bytes_stored", "bytes_dense"), 1.0)
    metrics |= {"sparsity": 0.5, "storage_compression": 1.0, "latency_onnx_b64_ms": 2.0}

    def hinted(p, **m):
        return "pruning.round_to=8" in summary(p, {**metrics, **m}, "r", "u")

    assert hinted(params, speedup_onnx_b64=0.4)
    assert not hinted(params, speedup_onnx_b64=1.3)  # faster: nothing to say
    assert not hinted({**params, "pruning.round_to": "8"}, speedup_onnx_b64=0.9)  # already aligned
    assert not hinted({**params, "granularity": "weight"}, speedup_onnx_b64=0.9)  # channel counts unchanged
    assert not hinted(params)  # ONNX not measured


def test_dense_baseline_trained_once_and_reused(make_cfg, tmp_path):
    first = train(make_cfg("pruning.compression=2", "seed=7"))
    second = train(make_cfg("pruning.compression=16", "seed=7"))
    runs = sorted(runs_in(tmp_path), key=lambda r: r.info.start_time)
    assert [r.data.tags["dense_cache_hit"] for r in runs] == ["False", "True"]
    assert runs[0].data.tags["dense_cache_dir"] == runs[1].data.tags["dense_cache_dir"]
    assert first["dense_test_acc"] == second["dense_test_acc"]
    assert abs(second["compression"] - 16) / 16 < 0.02


def test_pruning_none_is_the_dense_run(make_cfg, tmp_path):
    metrics = train(make_cfg("pruning=none"))
    assert metrics["test_acc"] == metrics["dense_test_acc"] and metrics["acc_drop"] == 0
    assert metrics["compression"] == pytest.approx(1.0, abs=1e-3)
    assert runs_in(tmp_path)[0].data.params["method"] == "none"


@pytest.mark.parametrize(
    "override, error, message",
    [
        ("pruning.compression=1", ValueError, r"pruning.compression=1 must be a finite ratio > 1"),
        ("pruning.compression=0.5", ValueError, r"pruning.compression=0.5"),
        ("pruning.compression=abc", ValueError, r"pruning.compression='abc' is not a number"),
        ("pruning.layers=[fc1,fc9]", ValueError, r"\['fc9'\].*fc1, fc2, fc3"),
        ("pruning.granularity=rows", ValueError, r"'rows'.*weight, filter, channel, column"),
        ("pruning.mode=sometimes", ValueError, r"pruning.mode='sometimes'"),
        ("pruning.granularity=filter pruning.compression=5000", ValueError, r"compression=5000 .* cannot be reached"),
        ("data.batch_size=0", Exception, r"batch_size.*0"),
        ("data=mnist", DatasetNotFoundError, r"data.download=true"),
        ("seed=abc", ValueError, r"seed='abc' must be an integer"),
    ],
)
def test_bad_input_fails_before_any_run(make_cfg, tmp_path, override, error, message):
    cfg = make_cfg(*override.split())
    with pytest.raises(error, match=message):
        train(cfg)
    assert runs_in(tmp_path) == []


@pytest.mark.parametrize(
    "override, message",
    [
        ("data=imagenet", r"(?s)data/imagenet.*Available options.*mnist5k"),
        ("model=alexnet", r"(?s)model/alexnet.*Available options.*lenet5"),
        ("pruning=lottery", r"(?s)pruning/lottery.*Available options.*magnitude"),
        ("pruning.compresion=4", r"compresion"),
    ],
)
def test_unknown_names_and_typos_list_the_choices(make_cfg, override, message):
    with pytest.raises((MissingConfigException, ConfigCompositionException), match=message):
        make_cfg(override)


@pytest.mark.slow  # the real CLI in a subprocess; the in-process composition errors are checked above
def test_cli_bad_name_exits_nonzero_and_creates_no_run(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "prunelab.train", "data=nope", f"paths.root_dir={tmp_path}"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode != 0
    assert "data/nope" in proc.stderr and "mnist5k" in proc.stderr
    assert runs_in(tmp_path) == []


def test_nan_loss_ends_the_run_failed_with_reason(make_cfg, tmp_path):
    cfg = make_cfg("dense.optimizer.lr=1e30", "seed=3")
    with pytest.raises(NonFiniteLossError):
        train(cfg)
    (run,) = runs_in(tmp_path)
    assert run.info.status == "FAILED"
    assert "NonFiniteLossError" in run.data.tags["failure_reason"]


@pytest.mark.slow  # the default run's test_sweep.py checks the sharing too, on its 2×2 sweep
def test_multirun_sweep_shares_one_dense_baseline(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "prunelab.train",
            "-m",
            "data=digits",
            "model=lenet300",
            "dense.epochs=1",
            "finetune.epochs=1",
            "logger.log_model=false",
            "pruning.compression=2,8",
            f"paths.root_dir={tmp_path}",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = sorted(
        (r for r in runs_in(tmp_path) if "sweep_overrides" not in r.data.params), key=lambda r: r.info.start_time
    )  # the children, without the sweep's parent run
    assert [r.data.params["compression_target"] for r in runs] == ["2", "8"]
    assert [r.data.tags["dense_cache_hit"] for r in runs] == ["False", "True"]
    assert len({r.data.tags["dense_cache_dir"] for r in runs}) == 1
    for run in runs:
        target = float(run.data.params["compression_target"])
        assert abs(run.data.metrics["compression"] - target) / target < 0.02


def test_mlflow_tracking_uri_points_at_another_store(make_cfg, tmp_path, monkeypatch):
    other = tmp_path / "elsewhere.db"
    cfg = make_cfg("pruning.compression=2")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{other}")
    train(cfg)
    assert not (tmp_path / "outputs" / "mlflow.db").exists()
    mlflow.set_tracking_uri(f"sqlite:///{other}")
    (run,) = mlflow.search_runs(experiment_names=["prunelab"], output_format="list")
    assert run.info.status == "FINISHED" and run.data.params["compression_target"] == "2"


def test_seed_decides_the_initial_weights(make_cfg):
    from prunelab.train import build

    def first_weight(seed):
        return next(build(make_cfg(f"seed={seed}")).dense_net.parameters()).detach().clone()

    assert torch.equal(first_weight(1), first_weight(1))
    assert not torch.equal(first_weight(1), first_weight(2))
