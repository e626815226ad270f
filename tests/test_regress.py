"""Regression gate: band arithmetic, verdicts, and a real weakened configuration failing the gate."""

import json
import os
import subprocess
import sys

import pytest

from prunelab.tracking.sweeps import regress

GRID = [
    "data=digits",
    "model=lenet300",
    "pruning=magnitude",
    "pruning.scope=layer",
    "pruning.compression=4,32",
    "seed=0,1",
    "dense.epochs=4",
    "finetune.epochs=3",
]


def _cell(mean, std=0.5, n=3):
    return {"mean": mean, "std": std, "n": n, "failed": 0, "seeds": {}}


def test_band_is_twice_the_std_or_the_floor():
    base = {"floor": 1.0, "cells": {"a": _cell(98.0, std=2.0), "b": _cell(98.0, std=0.1), "c": _cell(90.0)}}
    now = {"a": _cell(94.1), "b": _cell(96.9), "c": _cell(None, n=0), "d": _cell(50.0)}
    table = regress.compare(base, now).set_index("cell")
    assert table.loc["a", "band"] == 4.0 and table.loc["a", "verdict"] == "ok"  # 98 − 94.1 = 3.9 ≤ 4
    assert table.loc["b", "band"] == 1.0 and table.loc["b", "verdict"] == "REGRESSED"  # 1.1 > floor 1.0
    assert table.loc["c", "verdict"] == "missing"
    assert table.loc["d", "verdict"] == "new"


def _gate(tmp_path, baseline, *extra):
    env = {**os.environ, "PRUNELAB_ROOT": str(tmp_path)}
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "prunelab.tracking.sweeps.regress",
            "--baseline",
            str(baseline),
            "--grid",
            "regress",
            *(e for e in extra if e.startswith("--")),
            "--",  # --grid takes one or more names: overrides go after --
            *(e for e in extra if not e.startswith("--")),
            *GRID,
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=1200,
    )


@pytest.mark.slow
def test_gate_passes_unchanged_and_fails_weakened(tmp_path):
    baseline = tmp_path / "baseline.json"
    made = _gate(tmp_path, baseline, "--update")
    assert made.returncode == 0, made.stderr[-3000:]
    cells = json.loads(baseline.read_text())["cells"]
    assert set(cells) == {"digits/lenet300/magnitude/4", "digits/lenet300/magnitude/32"}

    same = _gate(tmp_path, baseline)
    assert same.returncode == 0, same.stdout + same.stderr[-3000:]
    assert "PASS" in same.stdout

    # no fine-tuning: prune once, then train with a zero learning rate
    weak = _gate(tmp_path, baseline, "pruning.mode=one_shot", "finetune.optimizer.lr=0.0")
    assert weak.returncode == 1, weak.stdout + weak.stderr[-3000:]
    assert "digits/lenet300/magnitude/32 |" in weak.stdout and "REGRESSED" in weak.stdout
    assert "FAIL" in weak.stdout and "digits/lenet300/magnitude/32" in weak.stdout.split("FAIL")[1]


def test_one_wild_cell_does_not_widen_every_band():
    from prunelab.tracking.sweeps.regress import noise_floor

    assert noise_floor([0.1, 0.2, 0.3, 35.0]) == 0.5  # median 0.25 → 0.5, not the wild cell's 35
    assert noise_floor([0.4, 0.5, 0.6, 35.0]) == pytest.approx(1.1)  # 2 × median 0.55, rounded up to 0.1
    assert noise_floor([]) == 0.5
