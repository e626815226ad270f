"""SLR pruning: step-size sequence, acceptance logic on scripted losses, no regrowth, resume, structured, bad input."""

from copy import copy

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from torch import nn

from callbacks import OPTIMIZERS, KillAt, Killed, ZeroWatch, achieved, fit_digits, same_init
from prunelab.models import LeNet5, LeNet300
from prunelab.pruning import METHODS, ADMMPruning, SLRPruning
from prunelab.pruning.slr import step_decay


def test_step_decay_sequence():
    # α_1 = 1 − 1/M; α_2 = 1 − 1/(M·2^(1 − 2^−r)) worked by hand for M = 2, r = 0.5: 2^0.292893 = 1.225092
    assert step_decay(1, 2.0, 0.5) == 0.5
    assert step_decay(2, 2.0, 0.5) == pytest.approx(1 - 1 / (2 * 1.225092), abs=1e-6)
    code_defaults = [step_decay(k, 300.0, 0.1) for k in range(1, 50)]
    assert code_defaults[0] == pytest.approx(1 - 1 / 300)
    assert all(a < b < 1 for a, b in zip(code_defaults, code_defaults[1:]))  # decays the step less and less


def _set(net, values):
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([values]))


def _window(cb, *losses):
    for loss in losses:
        cb.observe_loss(None, torch.tensor(loss))


def test_acceptance_and_step_size_on_scripted_losses():
    """Four updates on a 4-weight layer kept at 2 weights, ρ = 1, s₀ = 0.5, M = 2, r = 0.5, all worked by hand."""
    net = nn.Sequential(nn.Linear(4, 1, bias=False))
    _set(net, [3.0, -2.0, 0.5, 0.1])
    cb = SLRPruning(compression=2, rho=1.0, initial_s=0.5, M=2.0, r=0.5, rho_growth=1.0)
    cb.bind(net)
    cb.init_admm()
    z0 = torch.tensor([[3.0, -2.0, 0.0, 0.0]])
    assert torch.equal(cb.Z["0"], z0) and torch.equal(cb.Z_prev["0"], z0)

    # 1: k = 1 is always accepted; W = W_prev, so s = α_1·s₀ = 0.25 and Λ = 0.25·(W − Z₀). Π(W + U) = Z₀: the
    # Z-step leaves the Lagrangian equal, not lower, so it is rejected
    _window(cb, 2.0, 2.0)
    signals = cb.admm_update()
    assert (signals["slr/condition1"], signals["slr/condition2"], cb.k, cb.s) == (1.0, 0.0, 2, 0.25)
    torch.testing.assert_close(cb.U["0"], torch.tensor([[0.0, 0.0, 0.125, 0.025]]))
    assert cb.loss_prev == 2.0 and cb.loss_count == 0

    # 2: same W, higher loss: the W-step is rejected and nothing moves
    _window(cb, 3.0)
    signals = cb.admm_update()
    assert (signals["slr/condition1"], signals["slr/condition2"], cb.k, cb.s) == (0.0, 0.0, 2, 0.25)
    torch.testing.assert_close(cb.U["0"], torch.tensor([[0.0, 0.0, 0.125, 0.025]]))

    # 3: W₂ = (3, −2, .2, .1), loss 1.5: 1.5 + 0.0606 < 2 + 0.2031, accepted with
    # s = α_2 · 0.25 · ‖W₀ − Z₀‖/‖W₂ − Z₀‖ = 0.591868 · 0.25 · √0.26/√0.05 = 0.337417
    _set(net, [3.0, -2.0, 0.2, 0.1])
    _window(cb, 1.5)
    signals = cb.admm_update()
    assert (signals["slr/condition1"], signals["slr/condition2"], cb.k) == (1.0, 0.0, 3)
    assert cb.s == pytest.approx(0.337417, abs=1e-6)
    torch.testing.assert_close(cb.U["0"], torch.tensor([[0.0, 0.0, 0.192483, 0.058742]]))
    w_prev = cb.W_prev["0"].clone()
    net[0].weight.data.mul_(7.0)  # W_prev is a copy, not the live weight (the co-authors' code keeps a reference)
    assert torch.equal(cb.W_prev["0"], w_prev)

    # 4: W₄ = (3, −1, 1.5, .1), loss 1.0: 1.0 + 1.9448 > 1.5 + 0.0896, W-step rejected although the loss fell.
    # Π(W₄ + U) = (3, 0, 1.692483, 0) lowers the penalty from 1.9448 to 0.5126: Z-step accepted with
    # s = α_3 · 0.337417 · ‖W₂ − Z₀‖/‖W₄ − Z₄‖ = 0.685721 · 0.337417 · √0.05/1.023255 = 0.050561
    _set(net, [3.0, -1.0, 1.5, 0.1])
    _window(cb, 1.0)
    signals = cb.admm_update()
    assert (signals["slr/condition1"], signals["slr/condition2"], cb.k) == (0.0, 1.0, 4)
    assert cb.s == pytest.approx(0.050561, abs=1e-6) and cb.accepted == [2, 1]
    z4 = torch.tensor([[3.0, 0.0, 1.692483, 0.0]])
    torch.testing.assert_close(cb.Z["0"], z4)
    torch.testing.assert_close(cb.Z_prev["0"], z4)
    torch.testing.assert_close(cb.U["0"], torch.tensor([[0.0, -0.050561, 0.182751, 0.063798]]))
    assert cb.loss_prev == 1.5  # the loss recorded with W_prev = W₂


def test_growing_rho_rescales_u_and_leaves_the_multiplier_unchanged():
    """ρ doubles after each update up to rho_max; the step rule moves Λ = ρU, which must not jump when ρ does."""
    fixed, growing = (
        SLRPruning(compression=2, rho=0.1, initial_s=0.5, M=2.0, r=0.5, rho_growth=g, rho_max=0.3) for g in (1.0, 2.0)
    )
    for cb in (fixed, growing):
        net = nn.Sequential(nn.Linear(4, 1, bias=False))
        _set(net, [3.0, -2.0, 0.5, 0.1])
        cb.bind(net)
        cb.init_admm()
        _window(cb, 2.0)
        cb.admm_update()
    assert fixed.rho == 0.1 and growing.rho == pytest.approx(0.2) and fixed.s == growing.s
    torch.testing.assert_close(growing.rho * growing.U["0"], fixed.rho * fixed.U["0"])
    assert growing.U["0"].abs().sum() > 0  # a multiplier did move
    growing.admm_update()
    assert growing.rho == 0.3  # capped


@pytest.mark.parametrize("opt", list(OPTIMIZERS))
def test_no_regrowth_and_curves(opt):
    pruning = SLRPruning(compression=10, update_every=3)
    watch = ZeroWatch(pruning)
    trainer = fit_digits(LeNet300(image_size=8), pruning, OPTIMIZERS[opt], callbacks=[watch])
    assert watch.steps > 30 and watch.violations == 0
    assert pruning.done and abs(achieved(pruning) - 10) / 10 < 0.02
    assert pruning.k > 1 and 0.0 <= pruning.acc_after_hard_prune <= 1.0
    keys = {
        "slr/condition1",
        "slr/condition2",
        "slr/s",
        "slr/alpha",
        "slr/k",
        "slr/primal_residual",
        "slr/acc_after_hard_prune",
    }
    assert keys <= set(trainer.callback_metrics)


@pytest.mark.parametrize("granularity", ["filter", "channel", "column", "2:4"])
def test_structured_granularities_reach_the_target(granularity):
    compression = 2 if granularity == "2:4" else 4
    pruning = SLRPruning(compression=compression, update_every=3, granularity=granularity)
    net = LeNet300(image_size=8) if granularity == "2:4" else LeNet5(image_size=8)  # rows a multiple of 4
    fit_digits(net, pruning, OPTIMIZERS["sgd_momentum"], epochs=2)
    assert abs(achieved(pruning) - compression) / compression < 0.02 and pruning.done


@pytest.mark.slow  # the contract suite (test_core_contract.py) resumes every method in the default run
def test_resume_mid_slr_restores_multipliers_and_gives_identical_masks(tmp_path):
    kwargs = dict(compression=20, update_every=4, admm_fraction=0.8)
    opt = OPTIMIZERS["sgd_momentum"]
    fresh = same_init(lambda: LeNet300(image_size=8))

    full = SLRPruning(**kwargs)
    fit_digits(fresh(), full, opt, epochs=4)
    first = SLRPruning(**kwargs)
    with pytest.raises(Killed):
        fit_digits(
            fresh(),
            first,
            opt,
            epochs=4,
            ckpt=True,
            callbacks=[ModelCheckpoint(dirpath=tmp_path, save_last=True), KillAt(2)],
        )
    assert not first.done and first.k > 2 and first.loss_count > 0  # killed mid-SLR, mid-period
    kinds = ("Z", "U", "W_prev", "Z_prev")
    scalars = ("s", "k", "loss_prev", "loss_count", "accepted", "last_update")
    saved = {k: {n: t.clone() for n, t in getattr(first, k).items()} for k in kinds}
    saved_scalars = {k: copy(getattr(first, k)) for k in scalars} | {"loss_sum": float(first.loss_sum)}
    resumed, seen = SLRPruning(**kwargs), {}

    class Peek(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            seen.update({k: {n: t.clone() for n, t in getattr(resumed, k).items()} for k in kinds})
            seen.update({k: copy(getattr(resumed, k)) for k in scalars} | {"loss_sum": float(resumed.loss_sum)})

    fit_digits(
        fresh(),
        resumed,
        opt,
        epochs=4,
        callbacks=[Peek(), ModelCheckpoint(dirpath=tmp_path / "b")],
        ckpt_path=tmp_path / "last.ckpt",
        ckpt=True,
    )
    for k in kinds:
        assert saved[k] and all(torch.equal(seen[k][n], saved[k][n]) for n in saved[k])
    assert {k: seen[k] for k in saved_scalars} == saved_scalars
    assert resumed.done and full.done and (resumed.k, resumed.s) == (full.k, full.s)
    assert all(torch.equal(full.masks.masks[n], resumed.masks.masks[n]) for n in full.masks.masks)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"initial_s": 0}, r"pruning.initial_s=0 must be a number > 0"),
        ({"M": 1}, r"pruning.M=1 must be a number > 1"),
        ({"r": 1.0}, r"pruning.r=1.0 must be a number > 0 and < 1"),
        ({"r": "0.1"}, r"pruning.r='0.1'"),
        ({"rho": -1}, r"pruning.rho=-1"),
        ({"update_every": 0}, r"pruning.update_every=0"),
        ({"rho_growth": 0.5}, r"pruning.rho_growth=0.5"),
        ({"rho": 0.5}, r"pruning.rho_max=0.3 must be >= pruning.rho=0.5"),
        ({"quantize": {"bits": 4}}, r"Unknown SLR option\(s\) \['quantize'\]"),
    ],
)
def test_bad_hyperparameters_name_the_value(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SLRPruning(compression=8, **kwargs)


def test_registered_and_records_curves_in_mlflow(make_cfg, tmp_path):
    import mlflow

    from conftest import runs_in
    from prunelab.train import train

    assert METHODS["slr"] is SLRPruning and issubclass(SLRPruning, ADMMPruning)
    metrics = train(make_cfg("pruning=slr", "pruning.compression=4", "pruning.update_every=5"))
    assert abs(metrics["compression"] - 4) / 4 < 0.02
    (run,) = runs_in(tmp_path)
    assert run.data.params["method"] == "slr" and run.data.params["pruning.M"] == "300"
    history = {
        k: mlflow.MlflowClient().get_metric_history(run.info.run_id, k)
        for k in ("slr/condition1", "slr/condition2", "slr/s", "slr/k", "slr/acc_after_hard_prune")
    }
    assert all(history.values()), {k: len(v) for k, v in history.items()}
