"""The fine-tuning budget: steps that grow with log2 of the compression, as epochs of the dataset at hand."""

import pytest
from omegaconf import OmegaConf

from prunelab.budget import finetune_epochs


def _cfg(epochs="auto", compression=8.0, per_doubling=200, min_epochs=6):
    return OmegaConf.create({"finetune": {"epochs": epochs, "steps_per_doubling": per_doubling,
                                          "min_epochs": min_epochs}, "pruning": {"compression": compression}})


@pytest.mark.parametrize("compression, batches, expected", [
    (8, 57, 11),    # mnist5k: 600 steps
    (64, 57, 22),   # 1200 steps
    (8, 20, 30),    # 8×8 digits: same steps, more epochs
    (2, 57, 6),     # 200 steps: the floor of min_epochs holds
    (1, 57, 6),     # pruning=none
])
def test_auto_budget_in_steps(compression, batches, expected):
    assert finetune_epochs(_cfg(compression=compression), batches) == expected


def test_explicit_epochs_win():
    assert finetune_epochs(_cfg(epochs=3, compression=64), 20) == 3


@pytest.mark.parametrize("override, message", [
    ("finetune.epochs=-1", r"finetune.epochs=-1 must be an integer"),
    ("finetune.epochs=forever", r"finetune.epochs='forever' must be an integer"),
    ("finetune.min_epochs=0", r"finetune.min_epochs=0 must be an integer"),
    ("finetune.steps_per_doubling=1.5", r"finetune.steps_per_doubling=1.5 must be an integer"),
])
def test_bad_budget_is_named_before_anything_is_built(make_cfg, tmp_path, override, message):
    from prunelab.train import train

    with pytest.raises(ValueError, match=message):
        train(make_cfg(override))
    assert not (tmp_path / "outputs").exists()


def test_train_records_the_resolved_epochs(make_cfg, tmp_path):
    from conftest import runs_in
    from prunelab.train import train

    train(make_cfg("finetune.epochs=auto", "finetune.steps_per_doubling=20", "finetune.min_epochs=1",
                   "pruning.compression=4", "measure.latency=false"))
    (run,) = runs_in(tmp_path)
    assert run.data.params["finetune.epochs"] == "2"  # digits: 20 batches an epoch, 40 steps for 4×
