"""The fine-tuning budget: steps that grow with log2 of the compression, as epochs of the dataset at hand."""

import pytest
from omegaconf import OmegaConf

from prunelab.budget import extreme_factor, finetune_epochs


def _cfg(epochs="auto", compression=8.0, per_doubling=200, min_epochs=6, quantize=None, **finetune):
    return OmegaConf.create(
        {
            "finetune": {"epochs": epochs, "steps_per_doubling": per_doubling, "min_epochs": min_epochs, **finetune},
            "pruning": {"compression": compression, "quantize": quantize},
        }
    )


@pytest.mark.parametrize(
    "compression, batches, expected",
    [
        (8, 57, 11),  # mnist5k: 600 steps
        (64, 57, 22),  # 1200 steps
        (8, 20, 30),  # 8×8 digits: same steps, more epochs
        (2, 57, 6),  # 200 steps: the floor of min_epochs holds
        (1, 57, 6),  # pruning=none
    ],
)
def test_auto_budget_in_steps(compression, batches, expected):
    assert finetune_epochs(_cfg(compression=compression), batches) == expected


@pytest.mark.parametrize(
    "compression, batches, expected",
    [
        (128, 57, 25),  # 1400 steps: the rule as below 128×
        (256, 57, 57),  # 2 × 1600 steps
        (1000, 57, 70),  # 2 × 1993 steps
        (181.02, 57, 40),  # halfway (in log2) from 128× to 256×: 1.5 × 1500 steps
    ],
)
def test_extreme_ratios_get_up_to_twice_the_steps(compression, batches, expected):
    assert finetune_epochs(_cfg(compression=compression), batches) == expected


def test_extreme_factor_is_continuous_and_can_be_turned_off():
    assert extreme_factor(128) == 1.0 and extreme_factor(256) == 2.0 and extreme_factor(4096) == 2.0
    assert extreme_factor(128 * 2**0.5) == pytest.approx(1.5)
    assert finetune_epochs(_cfg(compression=1000, extreme_factor=1), 57) == 35  # the plain rule
    assert finetune_epochs(_cfg(compression=1000, extreme_from=512), 57) == 69  # 0.97 of the ramp: ×1.97


def test_quantization_phase_comes_on_top():
    """The pruning keeps its steps; the quantization phase takes its share (default 1/4) of the whole."""
    assert finetune_epochs(_cfg(compression=64, quantize={"bits": 3}), 57) == 29  # 1200 / 0.75 = 1600 steps
    assert finetune_epochs(_cfg(compression=64, quantize={"bits": 3, "share": 0.5}), 57) == 43  # 2400 steps


def test_explicit_epochs_win():
    assert finetune_epochs(_cfg(epochs=3, compression=64), 20) == 3


@pytest.mark.parametrize(
    "override, message",
    [
        ("finetune.epochs=-1", r"finetune.epochs=-1 must be an integer"),
        ("finetune.epochs=forever", r"finetune.epochs='forever' must be an integer"),
        ("finetune.min_epochs=0", r"finetune.min_epochs=0 must be an integer"),
        ("finetune.steps_per_doubling=1.5", r"finetune.steps_per_doubling=1.5 must be an integer"),
    ],
)
def test_bad_budget_is_named_before_anything_is_built(make_cfg, tmp_path, override, message):
    from prunelab.train import train

    with pytest.raises(ValueError, match=message):
        train(make_cfg(override))
    assert not (tmp_path / "outputs").exists()


def test_train_records_the_resolved_epochs(make_cfg, tmp_path):
    from conftest import runs_in
    from prunelab.train import train

    train(
        make_cfg(
            "finetune.epochs=auto",
            "finetune.steps_per_doubling=20",
            "finetune.min_epochs=1",
            "pruning.compression=4",
            "measure.latency=false",
        )
    )
    (run,) = runs_in(tmp_path)
    assert run.data.params["finetune.epochs"] == "2"  # digits: 20 batches an epoch, 40 steps for 4×


@pytest.mark.parametrize(
    "method, target, expected",
    [
        ("prunelab.pruning.EigenDamagePruning", "macs", 22),  # 2 × 600 steps: its own factor under target=macs
        ("prunelab.pruning.EigenDamagePruning", "params", 11),  # the rule as it stands
        ("prunelab.pruning.MagnitudePruning", "macs", 11),
        ("no.such.Pruning", "macs", 11),  # a bad _target_ is reported when the callback is built, not here
    ],
)
def test_a_method_can_ask_for_a_multiple_of_the_auto_budget(method, target, expected):
    cfg = _cfg(compression=8)
    cfg.pruning.update({"_target_": method, "target": target})
    assert finetune_epochs(cfg, 57) == expected
