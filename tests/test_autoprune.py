"""AutoPrune: the gates' gradient rule by hand, exact compression, recoverable gating, no regrowth, resume,
bad input."""

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from torch import nn

from callbacks import OPTIMIZERS, KillAt, Killed, ZeroWatch, achieved, fit_digits, same_init
from prunelab.models import LeNet5, LeNet300
from prunelab.pruning import METHODS, AutoPrune


def _hand_layer(granularity, **kwargs):
    """A 2×3 layer whose weights, gates, open set and ∂L/∂T are set by hand (the last filter is not the output
    layer's, so ``filter`` gates both rows)."""
    net = nn.Sequential(nn.Linear(3, 2, bias=False), nn.Linear(2, 1, bias=False))
    w = torch.tensor([[1.0, -2.0, 0.5], [-0.1, 3.0, -1.0]])
    net[0].weight.data.copy_(w)
    cb = AutoPrune(compression=2, granularity=granularity, layers=["0"], **kwargs)
    cb.bind(net)
    cb.init_gates()
    cb._signs = {"0": torch.sign(w)}
    net[0].weight.grad = torch.tensor([[0.2, 0.4, -0.6], [1.0, -0.5, 0.3]])  # ∂L/∂T
    return cb


def test_gate_gradient_rule_by_hand():
    cb = _hand_layer("weight")
    assert torch.equal(cb.gates["0"].flatten(), torch.tensor([1.0, 2.0, 0.5, 0.1, 3.0, 1.0]))  # |W|
    cb._open = {"0": torch.tensor([[True, True, False], [False, True, True]]).reshape(2, 3, 1)}
    # ∂L/∂T ⊙ sgn(W) = [[.2, −.4, −.6], [−1, −.5, −.3]]; leaky STE′ = 1 open, 0.1 closed
    expected = torch.tensor([[0.2, -0.4, -0.06], [-0.1, -0.5, -0.3]]).reshape(2, 3, 1)
    torch.testing.assert_close(cb.gate_gradients()["0"], expected)
    cb.ste = "identity"
    torch.testing.assert_close(
        cb.gate_gradients()["0"], torch.tensor([[0.2, -0.4, -0.6], [-1.0, -0.5, -0.3]]).reshape(2, 3, 1)
    )
    cb.ste, cb.reg = "leaky_relu", 0.5  # + μ · mean|task term| (= 3.0/6) · STE′
    torch.testing.assert_close(
        cb.gate_gradients()["0"], expected + 0.25 * torch.tensor([[1.0, 1.0, 0.1], [0.1, 1.0, 1.0]]).reshape(2, 3, 1)
    )


def test_filter_gate_gradient_sums_its_row():
    cb = _hand_layer("filter")
    cb._open = {"0": torch.tensor([True, False])}
    # rows of ∂L/∂T ⊙ sgn(W): .2 − .4 − .6 = −.8 (open), −1 − .5 − .3 = −1.8 (closed: × 0.1)
    torch.testing.assert_close(cb.gate_gradients()["0"], torch.tensor([-0.8, -0.18]))


def test_gate_rule_follows_autograd_and_keeps_useful_weights_open():
    """In a real forward/backward with a gate closed, the rule uses ∂L/∂T of the *effective* weight, and a descent
    step raises the gate of a weight whose removal raises the loss (∂L/∂T · W < 0)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 2, bias=False), nn.Linear(2, 1, bias=False))
    cb = AutoPrune(compression=2, layers=["0"], gate_lr=0.5)
    cb.bind(net)
    cb.init_gates()
    cb._open = {"0": torch.tensor([[True, False, True], [True, True, False]]).reshape(2, 3, 1)}
    keep = cb._open["0"].reshape(2, 3)
    cb._signs = {"0": torch.sign(net[0].weight.detach())}
    x = torch.randn(8, 3)
    t = (net[0].weight * keep).detach().requires_grad_()  # T = W ⊙ h(M)
    loss = (net[1](x @ t.T) - 1.0).square().mean()
    (grad_t,) = torch.autograd.grad(loss, t)
    cb.masks.drop({"0": keep})
    net[1](net[0](x)).sub(1.0).square().mean().backward()
    cb.masks.restore()
    torch.testing.assert_close(net[0].weight.grad, grad_t)
    before = cb.gates["0"].clone()
    cb.regularize(None)
    useful = (grad_t * net[0].weight.detach() < 0).reshape(2, 3, 1)
    moved = cb.gates["0"] - before
    assert bool((moved[useful] > 0).all()) and bool((moved[~useful] < 0).all())


@pytest.mark.parametrize("opt", list(OPTIMIZERS))
def test_no_regrowth_exact_compression_and_gate_curves(opt):
    pruning = AutoPrune(compression=10)
    watch = ZeroWatch(pruning)
    trainer = fit_digits(LeNet300(image_size=8), pruning, OPTIMIZERS[opt], callbacks=[watch])
    assert watch.steps > 30 and watch.violations == 0
    assert pruning.done and abs(achieved(pruning) - 10) / 10 < 0.02
    assert {"autoprune/open_fraction", "autoprune/mean_gate", "autoprune/reopened"} <= set(trainer.callback_metrics)


@pytest.mark.parametrize("granularity, scope", [("weight", "layer"), ("filter", "global"), ("filter", "layer")])
def test_granularities_and_scopes_reach_the_target(granularity, scope):
    pruning = AutoPrune(compression=3, granularity=granularity, scope=scope)
    fit_digits(LeNet5(image_size=8), pruning, epochs=2)
    assert abs(achieved(pruning) - 3) / 3 < 0.02 and pruning.done


class GateWatch(pl.Callback):
    """Per step: the open set and the sparsity the forward sees, whether every gated-off weight came out of the step
    unchanged, and how many gates reopened."""

    def __init__(self, pruning):
        self.pruning, self.frozen, self.steps, self.reopened, self.sparsity = pruning, True, 0, 0, []
        self.open = self.previous = None

    def _snapshot(self):
        self.before = {n: m.weight.detach().clone() for n, m in self.pruning.masks.modules.items()}

    def on_train_start(self, trainer, pl_module):
        self._snapshot()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):  # after the gates switched weights off
        p = self.pruning
        self.open = None if p.done else {n: o.clone() for n, o in p._open.items()}
        if self.open is None:
            return
        weights = sum(m.weight.numel() for m in p.masks.modules.values())
        zeroed = sum(int((m.weight == 0).sum()) for m in p.masks.modules.values())
        self.sparsity.append((zeroed / weights, p.sparsity_at(trainer.global_step)))
        if self.previous:
            self.reopened += sum(int((o & ~self.previous[n]).sum()) for n, o in self.open.items())
        self.previous = self.open

    def on_train_batch_end(self, trainer, pl_module, *args):  # after the core restored them
        if self.open is not None:
            self.steps += 1
            for n, m in self.pruning.masks.modules.items():
                closed = ~self.open[n].reshape(m.weight.shape)
                self.frozen &= torch.equal(m.weight[closed], self.before[n][closed])
        self._snapshot()


def test_gates_follow_the_schedule_and_recover():
    pruning = AutoPrune(compression=8, gate_lr=0.1)
    watch = GateWatch(pruning)
    fit_digits(LeNet300(image_size=8), pruning, epochs=4, callbacks=[watch])
    assert watch.steps > 10 and watch.frozen  # a gated-off weight keeps its value: recoverable
    assert watch.reopened > 0  # and some did come back
    for zeroed, target in watch.sparsity:  # the forward sees the schedule's sparsity, up to one group
        assert zeroed == pytest.approx(target, abs=1e-3)


def test_resume_mid_prune_restores_gates_and_their_optimizer(tmp_path):
    kwargs = dict(compression=20, prune_fraction=0.8, gate_lr=0.1)
    fresh = same_init(lambda: LeNet300(image_size=8))

    full = AutoPrune(**kwargs)
    fit_digits(fresh(), full, epochs=4)
    first = AutoPrune(**kwargs)
    with pytest.raises(Killed):
        fit_digits(
            fresh(),
            first,
            epochs=4,
            ckpt=True,
            callbacks=[ModelCheckpoint(dirpath=tmp_path, save_last=True), KillAt(2)],
        )
    assert not first.done and first.gates
    gates = {n: g.clone() for n, g in first.gates.items()}
    moments = {i: {k: v.clone() for k, v in s.items()} for i, s in first.gate_optimizer().state_dict()["state"].items()}
    resumed, seen = AutoPrune(**kwargs), {}

    class Peek(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            seen["gates"] = {n: g.clone() for n, g in resumed.gates.items()}
            seen["state"] = {
                i: {k: v.clone() for k, v in s.items()}
                for i, s in resumed.gate_optimizer().state_dict()["state"].items()
            }
            seen["lr"] = resumed.gate_optimizer().param_groups[0]["lr"]

    fit_digits(
        fresh(),
        resumed,
        epochs=4,
        callbacks=[Peek(), ModelCheckpoint(dirpath=tmp_path / "b")],
        ckpt_path=tmp_path / "last.ckpt",
        ckpt=True,
    )
    assert all(torch.equal(seen["gates"][n], gates[n]) for n in gates)
    assert seen["lr"] == first.lr and set(seen["state"]) == set(moments)
    assert all(torch.equal(seen["state"][i][k], moments[i][k]) for i in moments for k in moments[i])
    assert resumed.done and full.done
    assert all(torch.equal(full.masks.masks[n], resumed.masks.masks[n]) for n in full.masks.masks)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"granularity": "channel"}, r"pruning.granularity='channel' is not one of: weight, filter"),
        ({"gate_lr": 0}, r"pruning.gate_lr=0 must be a number > 0"),
        ({"reg": -1.0}, r"pruning.reg=-1.0 must be a number >= 0"),
        ({"ste": "softsign"}, r"pruning.ste='softsign' is not one of: leaky_relu, identity"),
        ({"ste_slope": 2}, r"pruning.ste_slope=2 must be a number >= 0 and <= 1"),
        ({"prune_fraction": 0}, r"pruning.prune_fraction=0 must be a number > 0"),
        ({"mu": 1e-3}, r"Unknown AutoPrune option\(s\) \['mu'\]"),
    ],
)
def test_bad_hyperparameters_name_the_value(kwargs, message):
    with pytest.raises(ValueError, match=message):
        AutoPrune(compression=8, **kwargs)


def test_registered_experiment_composes_and_curves_reach_mlflow(make_cfg, tmp_path):
    import mlflow
    from hydra.utils import instantiate

    from conftest import runs_in
    from prunelab.train import train

    assert METHODS["autoprune"] is AutoPrune
    cfg = make_cfg("experiment=autoprune_lenet5_mnist", fast=False)
    assert (cfg.names.data, cfg.names.model, cfg.names.pruning) == ("mnist5k", "lenet5", "autoprune")
    pruning = instantiate(cfg.pruning)
    assert pruning.compression == 310 and pruning.granularity == "weight"
    pruning.validate(LeNet5())
    train(make_cfg("pruning=autoprune", "pruning.compression=4"))
    (run,) = runs_in(tmp_path)
    history = {
        k: mlflow.MlflowClient().get_metric_history(run.info.run_id, k)
        for k in ("autoprune/open_fraction", "autoprune/mean_gate", "autoprune/reopened")
    }
    assert all(history.values()), {k: len(v) for k, v in history.items()}
