"""ADMM pruning: exact projections, Z/U arithmetic, no regrowth, resume, ADMM-NN quantization, bad input."""

import math
from functools import partial

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from torch import nn

from callbacks import OPTIMIZERS, KillAt, Killed, ZeroWatch, fit_digits, same_init
from prunelab.measure.storage import save_sparse
from prunelab.models import LeNet5, LeNet300
from prunelab.pruning import METHODS, ADMMPruning, groups
from prunelab.pruning.quantize import load_quantized, quantize

PAPER_TABLE = {"conv1": 0.8, "conv2": 0.92, "fc1": 0.991, "fc2": 0.93}  # Zhang et al. 2018, LeNet-5


def _compression(pruning):
    total, nonzero = pruning.masks.counts()
    return total / nonzero


@pytest.mark.parametrize("scope", ["global", "layer"])
@pytest.mark.parametrize("granularity", ["weight", "filter", "channel", "column"])
def test_projection_is_exact_top_k_of_group_norms(granularity, scope):
    torch.manual_seed(0)
    cb = ADMMPruning(compression=6, granularity=granularity, scope=scope)
    cb.bind(LeNet5(image_size=8))
    x = {n: torch.randn_like(m.weight) for n, m in cb.masks.modules.items()}
    z = cb.project(x)
    total = sum(t.numel() for t in x.values())
    assert abs(total / sum(int(t.count_nonzero()) for t in z.values()) - 6) / 6 < 0.02
    kept_scores, dropped_scores = {}, {}
    for n in x:
        keep = z[n] != 0
        assert torch.equal(z[n][keep], x[n][keep])  # kept groups untouched, whole groups dropped
        gm = groups.group_mask_of(keep, granularity)
        assert torch.equal(groups.expand(gm, x[n], granularity), keep)
        s = cb.group_scores(n, x[n])
        if n in cb._eligible:  # ineligible layers (classifier outputs, image input) stay whole
            kept_scores[n], dropped_scores[n] = s[gm], s[~gm]
            assert int(gm.sum()) > cb.min_keep  # no layer at its floor, so the ranking alone decides
    # Euclidean projection = keep the largest groups: no dropped group outranks a kept one in its ranking set
    sets = [list(kept_scores)] if scope == "global" else [[n] for n in kept_scores]
    for names in sets:
        kept = torch.cat([kept_scores[n] for n in names])
        dropped = torch.cat([dropped_scores[n] for n in names])
        if len(kept) and len(dropped):
            assert dropped.max() <= kept.min()
    assert all(torch.equal(a, b) for a, b in zip(cb.project(z).values(), z.values()))  # idempotent


def test_projection_follows_per_layer_table():
    cb = ADMMPruning(compression=71.2, layer_sparsity=PAPER_TABLE)
    net = LeNet5()  # 28×28: the paper's shapes
    cb.validate(net)
    cb.bind(net)
    z = cb.project({n: m.weight.detach() for n, m in cb.masks.modules.items()})
    for n, frac in PAPER_TABLE.items():
        assert abs((z[n] == 0).float().mean().item() - frac) < 1e-3
    with pytest.raises(ValueError, match=r"compression=32 disagrees with pruning.layer_sparsity.*71\.1"):
        ADMMPruning(compression=32, layer_sparsity=PAPER_TABLE).validate(net)


def test_z_u_update_and_gradient_by_hand():
    net = nn.Sequential(nn.Linear(4, 2, bias=False))
    w = torch.tensor([[0.5, -2.0, 1.0, 0.1], [3.0, -0.2, 0.4, -1.5]])
    net[0].weight.data.copy_(w)
    cb = ADMMPruning(compression=2, rho=0.5, rho_growth=1.0)  # keep 4 of 8; ρ fixed (the paper)
    cb.bind(net)
    cb.init_admm()
    assert torch.equal(cb.Z["0"], torch.tensor([[0.0, -2.0, 1.0, 0.0], [3.0, 0.0, 0.0, -1.5]]))  # Π(W)
    cb.U["0"] = torch.tensor([[0.1, 0.1, -0.5, 0.0], [0.0, 0.0, 0.0, 0.2]])
    signals = cb.admm_update()
    # W + U = [[.6, -1.9, .5, .1], [3, -.2, .4, -1.3]] → keep 3, 1.9, 1.3, .6
    torch.testing.assert_close(cb.Z["0"], torch.tensor([[0.6, -1.9, 0.0, 0.0], [3.0, 0.0, 0.0, -1.3]]))
    u = torch.tensor([[0.0, 0.0, 0.5, 0.1], [0.0, -0.2, 0.4, 0.0]])  # U + W − Z_new
    torch.testing.assert_close(cb.U["0"], u)
    assert signals["admm/z_change"] == pytest.approx(math.sqrt(0.36 + 0.01 + 1.0 + 0.04))
    assert signals["admm/primal_residual"] == pytest.approx(math.sqrt(0.01 + 0.01 + 1.0 + 0.01 + 0.04 + 0.16 + 0.04))
    net[0].weight.grad = torch.zeros_like(w)
    cb.on_before_optimizer_step(None, None, None)  # adds ρ(W − Z + U)
    torch.testing.assert_close(net[0].weight.grad, torch.tensor([[-0.05, -0.05, 0.75, 0.1], [0.0, -0.2, 0.4, -0.1]]))
    grow = ADMMPruning(compression=2, rho=0.5, rho_growth=2.0, rho_max=0.8)
    grow.bind(net)
    grow.init_admm()
    grow.U["0"] = torch.tensor([[0.1, 0.1, -0.5, 0.0], [0.0, 0.0, 0.0, 0.2]])
    assert grow.admm_update()["admm/rho"] == grow.rho == 0.8
    torch.testing.assert_close(grow.U["0"], u * 0.625)  # scaled dual rescaled by ρ_old/ρ_new


@pytest.mark.parametrize("update_every, unit", [(3, "steps"), (7, "steps"), (1, "epochs")])
def test_auto_rho_growth_reaches_rho_max_at_the_last_update(update_every, unit):
    pruning = ADMMPruning(compression=10, rho=0.01, rho_max=0.3, update_every=update_every, update_unit=unit)
    seen = []

    class Watch(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            if not pruning.done and (not seen or seen[-1] != pruning.rho):
                seen.append(pruning.rho)

    fit_digits(LeNet300(image_size=8), pruning, OPTIMIZERS["adam"], epochs=4, callbacks=[Watch()])
    assert pruning.done and len(seen) >= 2  # at least one update changed ρ before the hard prune
    assert seen[0] == 0.01 and seen[-1] == pytest.approx(0.3)
    assert all(b / a == pytest.approx(pruning.growth) for a, b in zip(seen, seen[1:]))  # geometric


def test_auto_rho_growth_needs_rho_max():
    with pytest.raises(ValueError, match=r"pruning.rho_growth='auto' needs pruning.rho_max"):
        ADMMPruning(compression=4, rho_max=None)


@pytest.mark.parametrize("opt", ["sgd_momentum", "adam"])  # ADMM is not run under AdamW
def test_no_regrowth_in_retrain_phase(opt):
    pruning = ADMMPruning(compression=10, rho=0.05, update_every=3, admm_fraction=0.5)
    watch = ZeroWatch(pruning)
    trainer = fit_digits(LeNet300(image_size=8), pruning, OPTIMIZERS[opt], callbacks=[watch])
    assert watch.steps > 30 and watch.violations == 0
    assert pruning.done and pruning.hard_prune_step == trainer.estimated_stepping_batches // 2
    assert abs(_compression(pruning) - 10) / 10 < 0.02
    assert 0.0 <= pruning.acc_after_hard_prune <= 1.0  # a fraction, like val/acc
    assert {"admm/primal_residual", "admm/z_change", "admm/rho", "admm/acc_after_hard_prune"} <= set(
        trainer.callback_metrics
    )


def test_resume_mid_admm_restores_z_u_and_gives_identical_masks(tmp_path):
    kwargs = dict(compression=20, rho=0.05, update_every=4, admm_fraction=0.8, rho_growth=1.1)
    opt = OPTIMIZERS["sgd_momentum"]
    fresh = same_init(lambda: LeNet300(image_size=8))

    full = ADMMPruning(**kwargs)
    fit_digits(fresh(), full, opt, epochs=4)
    first = ADMMPruning(**kwargs)
    with pytest.raises(Killed):
        fit_digits(
            fresh(),
            first,
            opt,
            epochs=4,
            ckpt=True,
            callbacks=[ModelCheckpoint(dirpath=tmp_path, save_last=True), KillAt(2)],
        )
    assert not first.done and first.last_update > 0 and first.rho > first.rho0  # killed mid-ADMM
    saved = {k: {n: t.clone() for n, t in getattr(first, k).items()} for k in ("Z", "U")}
    resumed, seen = ADMMPruning(**kwargs), {}

    class Peek(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            seen.update({k: {n: t.clone() for n, t in getattr(resumed, k).items()} for k in ("Z", "U")})
            seen["rho"], seen["last"] = resumed.rho, resumed.last_update

    fit_digits(
        fresh(),
        resumed,
        opt,
        epochs=4,
        callbacks=[Peek(), ModelCheckpoint(dirpath=tmp_path / "b")],
        ckpt_path=tmp_path / "last.ckpt",
        ckpt=True,
    )
    for k in ("Z", "U"):
        assert all(torch.equal(seen[k][n], saved[k][n]) for n in saved[k])
    assert (seen["rho"], seen["last"]) == (first.rho, first.last_update)
    assert all(torch.equal(full.masks.masks[n], resumed.masks.masks[n]) for n in full.masks.masks)
    assert resumed.done and full.done


@pytest.mark.parametrize("retrain", ["restart", "continue"])
def test_masked_retraining_restarts_the_optimizer_and_the_cosine_schedule(retrain):
    """retrain=restart: from the hard prune on, Adam starts afresh (step count 1 after the first retraining step) and
    the cosine LR is back at its initial value, decaying to zero by the end; continue: both go on."""
    pruning, seen = ADMMPruning(compression=8, update_every=3, retrain=retrain), {}
    cosine = partial(torch.optim.lr_scheduler.CosineAnnealingLR, T_max=6)

    class Peek(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            optimizer = trainer.optimizers[0]
            steps = {float(optimizer.state[p]["step"]) for p in pl_module.parameters()}
            seen.setdefault(trainer.global_step - 1, (optimizer.param_groups[0]["lr"], steps))

    trainer = fit_digits(LeNet300(image_size=8), pruning, epochs=6, scheduler=cosine, callbacks=[Peek()])
    prune_step = pruning.hard_prune_step
    assert 0 < prune_step < trainer.global_step - 1 and pruning.done
    lr, steps = seen[prune_step]
    before, _ = seen[prune_step - 1]
    if retrain == "restart":
        assert lr == pytest.approx(1e-3) and before < 0.9e-3 and steps == {1.0}
    else:
        assert lr == before and steps == {float(prune_step + 1)}
    assert trainer.lr_scheduler_configs[0].scheduler.get_last_lr()[0] == pytest.approx(0.0, abs=1e-12)
    assert all(
        int(m.weight.detach()[~pruning.masks.masks[n]].count_nonzero()) == 0 for n, m in pruning.masks.modules.items()
    )


def test_resume_after_the_restart_keeps_the_restarted_schedule(tmp_path):
    """Killed during the masked retraining, the run resumes on the restarted cosine (its horizon and position) and
    is not restarted a second time: the LR at every later step and the final masks equal the uninterrupted run's."""
    kwargs, cosine = dict(compression=8, update_every=3), partial(torch.optim.lr_scheduler.CosineAnnealingLR, T_max=6)
    fresh = same_init(lambda: LeNet300(image_size=8))
    lrs = {"full": {}, "resumed": {}}

    def peek(key):
        class Peek(pl.Callback):
            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
                lrs[key][trainer.global_step] = trainer.optimizers[0].param_groups[0]["lr"]

        return Peek()

    full = ADMMPruning(**kwargs)
    fit_digits(fresh(), full, epochs=6, scheduler=cosine, callbacks=[peek("full")])
    first = ADMMPruning(**kwargs)
    with pytest.raises(Killed):
        fit_digits(
            fresh(),
            first,
            epochs=6,
            scheduler=cosine,
            ckpt=True,
            callbacks=[ModelCheckpoint(dirpath=tmp_path, save_last=True), KillAt(4)],
        )
    assert first.done  # killed in the masked retraining, after the restart
    resumed = ADMMPruning(**kwargs)
    fit_digits(
        fresh(),
        resumed,
        epochs=6,
        scheduler=cosine,
        ckpt=True,
        ckpt_path=tmp_path / "last.ckpt",
        callbacks=[peek("resumed"), ModelCheckpoint(dirpath=tmp_path / "b")],
    )
    assert lrs["resumed"] and all(lr == pytest.approx(lrs["full"][step]) for step, lr in lrs["resumed"].items())
    assert all(torch.equal(full.masks.masks[n], resumed.masks.masks[n]) for n in full.masks.masks)


def test_quantized_weights_stay_on_levels_and_zeros(tmp_path):
    bits = {"conv1": 6, "conv2": 5, "fc1": 4, "fc2": 5}
    pruning = ADMMPruning(compression=8, rho=0.05, update_every=3, quantize={"bits": bits})
    watch = ZeroWatch(pruning)
    fit_digits(LeNet5(image_size=8), pruning, OPTIMIZERS["sgd_momentum"], callbacks=[watch])
    assert watch.violations == 0 and abs(_compression(pruning) - 8) / 8 < 0.02
    for n, module in pruning.masks.modules.items():
        w, levels, q = module.weight.detach(), 2 ** (bits[n] - 1) - 1, pruning.q[n]
        allowed = torch.cat([torch.zeros(1), torch.arange(1, levels + 1, dtype=torch.float32) * q])
        assert torch.isin(w.abs(), allowed).all(), n
        assert torch.equal(w != 0, pruning.masks.masks[n])  # kept weights sit on a nonzero level
        assert torch.equal(quantize(w, q, levels), w)
    size = pruning.stored_bytes(tmp_path / "model.plq")
    state = load_quantized(tmp_path / "model.plq")
    net = pruning.net
    assert all(torch.equal(state[k], v) for k, v in net.state_dict().items())
    assert size < save_sparse(net, tmp_path / "generic.npz", list(pruning.masks.modules)) / 3


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"rho": 0}, r"pruning.rho=0 must be a number > 0"),
        ({"rho": -1e-3}, r"pruning.rho=-0.001"),
        ({"rho_growth": 0.5}, r"pruning.rho_growth=0.5"),
        ({"rho": 0.1, "rho_max": 0.01}, r"pruning.rho_max=0.01"),
        ({"update_every": 0}, r"pruning.update_every=0"),
        ({"update_unit": "minutes"}, r"pruning.update_unit='minutes'"),
        ({"admm_fraction": 0.0}, r"pruning.admm_fraction=0.0"),
        ({"retrain": "rewind"}, r"pruning.retrain='rewind' is not one of: restart, continue"),
        ({"quantize": {"bits": 1}}, r"pruning.quantize.bits=1 must be an integer in \[2, 16\]"),
        ({"quantize": {"bits": {"fc1": 1}}}, r"pruning.quantize.bits.fc1=1"),
        ({"quantize": {"bitz": 4}}, r"\['bitz'\] in pruning.quantize"),
        ({"quantize": {"bits": 4, "levels_per_side": 7}}, r"exactly one of bits / levels_per_side"),
        ({"tau": 3}, r"Unknown ADMM option\(s\) \['tau'\]"),
    ],
)
def test_bad_hyperparameters_name_the_value(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ADMMPruning(compression=8, **kwargs)


def test_registered_and_experiment_config_composes(make_cfg):
    from hydra.utils import instantiate

    assert METHODS["admm"] is ADMMPruning
    cfg = make_cfg("experiment=admm_lenet5_mnist", fast=False)
    assert (cfg.names.data, cfg.names.model, cfg.names.pruning) == ("mnist5k", "lenet5", "admm")
    pruning = instantiate(cfg.pruning)
    pruning.validate(LeNet5())  # the paper table on 28×28 LeNet-5 agrees with the requested compression
    assert dict(pruning.layer_sparsity) == PAPER_TABLE
    with pytest.raises(ValueError, match=r"pruning.quantize.bits must list every pruned layer"):
        ADMMPruning(compression=8, quantize={"bits": {"fc1": 4}}).validate(LeNet300())


def test_train_records_admm_curves_in_mlflow(make_cfg, tmp_path):
    import mlflow

    from conftest import runs_in
    from prunelab.train import train

    metrics = train(make_cfg("pruning=admm", "pruning.compression=4", "pruning.update_every=5"))
    assert abs(metrics["compression"] - 4) / 4 < 0.02
    (run,) = runs_in(tmp_path)
    assert run.data.params["method"] == "admm"
    history = {
        k: mlflow.MlflowClient().get_metric_history(run.info.run_id, k)
        for k in ("admm/primal_residual", "admm/z_change", "admm/rho", "admm/acc_after_hard_prune", "train/sparsity")
    }
    assert all(history.values()), {k: len(v) for k, v in history.items()}
