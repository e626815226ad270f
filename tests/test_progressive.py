"""Progressive ADMM / SLR (Ye et al. 2018, arXiv 1810.07378) and ADMM-NN's quantization phase: the schedule of
ratios, stage bounds, the exact final ratio with zeros that stay zero through every stage, a resume mid-progressive
that ends bit for bit where the uninterrupted fit ends, and the quantized network through the stored form."""

import math

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint

from callbacks import OPTIMIZERS, KillAt, Killed, ZeroWatch, achieved, fit_digits, same_init
from prunelab.models import LeNet5, LeNet300
from prunelab.pruning import ADMMPruning, SLRPruning
from prunelab.pruning.admm import check_progressive
from prunelab.pruning.quantize import load_quantized, quantize, scan_step, search_step
from prunelab.pruning.schedules import progressive_ratios, stage_bounds


@pytest.mark.parametrize(
    "compression, max_step, expected",
    [
        (16, 32, [16]),  # within one step: one-shot ADMM
        (32, 32, [32]),
        (64, 32, [8, 64]),  # two equal steps of 8×
        (1000, 32, [1000**0.5, 1000]),  # two of 31.6×
        (1000, 10, [10, 100, 1000]),  # three of 10×
        (500, 32, [500 ** (1 / 2), 500]),  # 22.4×, then 22.4× again
    ],
)
def test_auto_schedule_is_the_fewest_equal_geometric_steps(compression, max_step, expected):
    ratios = progressive_ratios(compression, max_step)
    assert ratios == pytest.approx(expected) and ratios[-1] == compression  # the last step is the target, exactly
    steps = [b / a for a, b in zip([1.0, *ratios], ratios)]
    assert all(s <= max_step * (1 + 1e-9) for s in steps) and steps == pytest.approx([steps[0]] * len(steps))
    assert len(ratios) == max(1, math.ceil(math.log(compression) / math.log(max_step) - 1e-9))


def test_explicit_and_auto_schedules_are_checked():
    assert check_progressive(None, 100.0, 32.0, "weight") == [100.0]
    assert check_progressive([10, 50], 100.0, 32.0, "weight") == [10.0, 50.0, 100.0]  # the target appended
    assert check_progressive([10, 100], 100.0, 32.0, "weight") == [10.0, 100.0]
    assert check_progressive("auto", 100.0, 32.0, "2:4") == [100.0]  # an N:M mask has one sparsity
    for bad, message in [
        ([50, 10], r"must increase"),
        ([10, 200], r"end at most at pruning.compression=100"),
        ([0.5, 10], r"pruning.progressive=0.5 must be a number > 1"),
        ("often", r"null, 'auto'"),
        ([], r"null, 'auto'"),
    ]:
        with pytest.raises(ValueError, match=message):
            check_progressive(bad, 100.0, 32.0, "weight")
    with pytest.raises(ValueError, match=r"has one sparsity"):
        check_progressive([2, 4], 4.0, 32.0, "2:4")
    with pytest.raises(ValueError, match=r"pruning.progressive_max_step=1"):
        ADMMPruning(compression=8, progressive="auto", progressive_max_step=1)


def test_stage_bounds_split_the_fit():
    assert stage_bounds(100, [1.0], 0.5) == [(0, 50)]  # one stage: ADMM's hard prune at admm_fraction
    assert stage_bounds(99, [1.0, 1.0, 1.0], 0.5) == [(0, 16), (33, 49), (66, 82)]
    assert stage_bounds(12, [1.0, 1.0], 0.5, unit_steps=10, nearest=True) == [(0, 30), (60, 90)]  # whole epochs
    quant = stage_bounds(100, [1.0, 1.0 / 3.0], 0.5)  # a quantize stage with a quarter of the fit
    assert quant == [(0, 37), (75, 87)]


def _nested(pruning):
    """A callback that fails when a weight pruned at some step is unpruned at a later one."""

    class Nested(pl.Callback):
        def __init__(self):
            self.pruned, self.regrown, self.stages = {}, 0, set()

        def on_train_batch_end(self, trainer, pl_module, *args):
            self.stages.add(pruning.stage)
            for n, mask in pruning.masks.masks.items():
                before = self.pruned.get(n)
                if before is not None:
                    self.regrown += int((before & mask).sum())
                self.pruned[n] = ~mask.clone()

    return Nested()


@pytest.mark.parametrize("cls", [ADMMPruning, SLRPruning])
def test_progressive_reaches_the_exact_ratio_and_zeros_stay_zero(cls):
    pruning = cls(compression=20, update_every=3, progressive="auto", progressive_max_step=3)
    assert pruning.ratios == pytest.approx([20 ** (1 / 3), 20 ** (2 / 3), 20])
    watch, nested = ZeroWatch(pruning), _nested(pruning)
    trainer = fit_digits(
        LeNet300(image_size=8), pruning, OPTIMIZERS["sgd_momentum"], epochs=6, callbacks=[watch, nested]
    )
    assert pruning.done and nested.stages == {0, 1, 2} and watch.steps > 60
    assert watch.violations == 0 and nested.regrown == 0  # no pruned weight moved, none came back
    assert abs(achieved(pruning) - 20) / 20 < 0.02
    key = pruning.method
    assert {f"{key}/step_target", f"{key}/stage", f"{key}/acc_after_hard_prune"} <= set(trainer.callback_metrics)
    assert float(trainer.callback_metrics[f"{key}/step_target"]) == pytest.approx(20)


def test_intermediate_hard_prunes_land_on_their_ratios():
    pruning, seen = ADMMPruning(compression=16, update_every=3, progressive=[2, 4]), []

    class Ratios(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            if pruning.stage_hard and (not seen or seen[-1][0] != pruning.stage):
                seen.append((pruning.stage, achieved(pruning)))

    fit_digits(LeNet300(image_size=8), pruning, epochs=6, callbacks=[Ratios()])
    assert [s for s, _ in seen] == [0, 1, 2]
    assert [r for _, r in seen] == pytest.approx([2, 4, 16], rel=0.02)


def _state(pruning):
    return {k: {n: t.clone() for n, t in getattr(pruning, k).items()} for k in ("Z", "U", "latent")}


@pytest.mark.parametrize(
    "cls, kwargs, kill_at, stage, hard",
    [
        (ADMMPruning, {}, 2, 1, False),  # stage 1 of 3, in its ADMM phase
        (SLRPruning, {}, 2, 1, False),
        (ADMMPruning, {"quantize": {"bits": 3}}, 5, 3, False),  # in the quantization ADMM
        (ADMMPruning, {"quantize": {"bits": 3, "share": 0.5}}, 5, 3, True),  # retraining on the levels
    ],
)
def test_resume_mid_progressive_is_bit_identical(tmp_path, cls, kwargs, kill_at, stage, hard):
    kwargs = dict(compression=20, update_every=3, progressive="auto", progressive_max_step=3, **kwargs)
    fresh = same_init(lambda: LeNet300(image_size=8))
    opt = OPTIMIZERS["sgd_momentum"]
    full, full_net = cls(**kwargs), fresh()
    fit_digits(full_net, full, opt, epochs=6)
    first = cls(**kwargs)
    with pytest.raises(Killed):
        fit_digits(
            fresh(),
            first,
            opt,
            epochs=6,
            ckpt=True,
            callbacks=[ModelCheckpoint(dirpath=tmp_path, save_last=True), KillAt(kill_at)],
        )
    assert (first.stage, first.stage_hard) == (stage, hard) and bool(first.latent) == hard
    saved, resumed, net, seen = _state(first), cls(**kwargs), fresh(), {}

    class Peek(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            seen.update(_state(resumed), stage=resumed.stage, hard=resumed.stage_hard, rho=resumed.rho)

    fit_digits(
        net,
        resumed,
        opt,
        epochs=6,
        ckpt=True,
        ckpt_path=tmp_path / "last.ckpt",
        callbacks=[Peek(), ModelCheckpoint(dirpath=tmp_path / "b")],
    )
    assert (seen["stage"], seen["hard"], seen["rho"]) == (first.stage, first.stage_hard, first.rho)
    for kind in saved:
        assert saved[kind].keys() == seen[kind].keys()
        assert all(torch.equal(seen[kind][n], saved[kind][n]) for n in saved[kind])
    assert resumed.done and full.done
    assert all(torch.equal(full.masks.masks[n], resumed.masks.masks[n]) for n in full.masks.masks)
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), full_net.state_dict().values()))
    assert resumed.q == full.q


def test_quantization_phase_on_the_pruned_support_round_trips_through_the_encoder(tmp_path):
    pruning, seen = ADMMPruning(compression=20, update_every=3, quantize={"bits": 3}), {}

    class Peek(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, *args):
            if pruning.kind == "quantize" and "q" not in seen and pruning.Z:
                masks = {n: m.clone() for n, m in pruning.masks.masks.items()}
                seen.update(q=dict(pruning.q), masks=masks, Z={n: z.clone() for n, z in pruning.Z.items()})

    fit_digits(LeNet5(image_size=8), pruning, OPTIMIZERS["adam"], epochs=4, callbacks=[Peek()])
    assert pruning.kinds == ["prune", "quantize"] and pruning.done
    # the quantization ADMM ran after the hard prune, with Z on the levels and on the pruned support
    for n, z in seen["Z"].items():
        assert torch.equal(z != 0, seen["masks"][n]) and torch.equal(quantize(z, seen["q"][n], 3), z)
    assert pruning.q == seen["q"]  # steps fixed when the phase starts
    assert abs(achieved(pruning) - 20) / 20 < 0.02
    for n, module in pruning.masks.modules.items():
        w = module.weight.detach()
        assert torch.equal(w != 0, pruning.masks.masks[n]) and torch.equal(quantize(w, pruning.q[n], 3), w)
    size = pruning.stored_bytes(tmp_path / "model.plse")
    assert size == (tmp_path / "model.plse").stat().st_size
    state = load_quantized(tmp_path / "model.plse")
    assert state.keys() == pruning.net.state_dict().keys()
    assert all(torch.equal(state[k], v) for k, v in pruning.net.state_dict().items())  # bit for bit


def test_step_search_beats_the_narrow_scan_on_few_levels():
    torch.manual_seed(0)
    w = torch.randn(2000) * 0.05
    w[:5] = torch.tensor([0.6, -0.5, 0.45, -0.4, 0.35])  # a few large weights set max|w|
    w[(w.abs() < 0.03) & (torch.arange(2000) >= 5)] = 0.0  # pruned

    def err(q):
        return float(((w - quantize(w, q, 3)) ** 2).sum())

    wide, narrow = search_step(w, 3), scan_step(w, 3)
    assert err(wide) < 0.5 * err(narrow)
    assert search_step(torch.zeros(4), 3) == 1.0
    assert float(torch.tensor(wide, dtype=torch.float32)) == wide  # a float32 value: stored exactly
