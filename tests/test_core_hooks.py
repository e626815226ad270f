"""The pruning core's hooks for methods: state follows the weights, transient masks, per-layer pruning, gradient terms,
the loss each step. Every registered method's own contract is in test_core_contract.py."""

from functools import partial

import pytest
import pytorch_lightning as pl
import torch
from torch import nn

from callbacks import ZeroWatch
from prunelab.data import DigitsDataModule
from prunelab.models import LeNet5, LeNet300
from prunelab.models.classifier import Classifier
from prunelab.pruning import ADMMPruning, MagnitudePruning, PruningCallback, groups

SGD = partial(torch.optim.SGD, lr=0.05, momentum=0.9, weight_decay=5e-4)


def _fit(net, pruning, epochs=2, callbacks=(), precision="32-true", optimizer=SGD):
    pl.seed_everything(0, workers=True)
    trainer = pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        callbacks=[pruning, *callbacks],
        num_sanity_val_steps=0,
        precision=precision,
    )
    trainer.fit(Classifier(net, 10, optimizer=optimizer), datamodule=DigitsDataModule(batch_size=128))
    return trainer


@pytest.mark.parametrize(
    "make",
    [
        # every registered method at its defaults: test_core_contract.py; here ADMM-NN's quantization, whose Z/U cover
        # every layer
        lambda: ADMMPruning(compression=8, update_every=3, quantize={"bits": 5}),
    ],
)
def test_state_follows_a_model_converted_after_setup(make):
    """Lightning converts the model to float64 after the callbacks' ``setup`` (as it moves it to a GPU): masks and
    method state must follow, or the first ``apply`` fails on mismatched tensors."""
    pruning = make()
    seen = {}

    class Peek(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            for kind, tensors in pruning.layer_tensors().items():
                seen.update({(kind, n): t.dtype for n, t in tensors.items()})
            seen.update({("mask", n): m.device for n, m in pruning.masks.masks.items()})

    net = LeNet300(image_size=8)
    _fit(net, pruning, precision="64-true", callbacks=[Peek()])
    assert net.fc1.weight.dtype == torch.float64 and pruning.done
    assert abs(pruning.masks.counts()[0] / pruning.masks.counts()[1] - 8) / 8 < 0.02
    floats = {k: v for k, v in seen.items() if k[0] in ("Z", "U", "latent")}
    if isinstance(pruning, ADMMPruning):
        assert floats and set(floats.values()) == {torch.float64}


def test_follow_moves_weight_shaped_state_and_keeps_accumulators():
    net = nn.Sequential(nn.Linear(6, 4))
    cb = ADMMPruning(compression=2)
    cb.bind(net)
    cb.init_admm()
    counts = {"0": torch.zeros(6, dtype=torch.float32)}  # a per-group accumulator keeps its own dtype
    cb.layer_tensors = lambda: {"Z": cb.Z, "U": cb.U, "count": counts}
    net.double()
    cb.masks.follow(cb.layer_tensors())
    assert cb.Z["0"].dtype == cb.U["0"].dtype == torch.float64 and counts["0"].dtype == torch.float32
    state = cb.state_dict()
    assert all(t.device.type == "cpu" for d in state["tensors"].values() for t in d.values())


class RandomDrop(MagnitudePruning):
    """A test method: one-shot magnitude masks, plus a fresh random transient mask at every step."""

    def __init__(self, **kwargs):
        super().__init__(mode="one_shot", **kwargs)
        self.gen = torch.Generator().manual_seed(0)
        self.log_before, self.log_after = [], []

    def transient_masks(self, trainer):
        keep = {n: torch.rand(m.weight.shape, generator=self.gen) > 0.5 for n, m in self.masks.modules.items()}
        self.log_before.append({n: m.weight.detach().clone() for n, m in self.masks.modules.items()})
        self.last_keep = keep
        return keep

    def after_step(self, trainer):
        self.log_after.append({n: m.weight.detach().clone() for n, m in self.masks.modules.items()})


def test_transient_masks_restore_dropped_weights_exactly():
    pruning = RandomDrop(compression=4)
    dropped_at_forward = []

    class AtForward(pl.Callback):
        def on_before_backward(self, trainer, pl_module, loss):
            dropped_at_forward.append(
                all(bool((m.weight[~pruning.last_keep[n]] == 0).all()) for n, m in pruning.masks.modules.items())
            )

    watch = ZeroWatch(pruning)
    _fit(LeNet300(image_size=8), pruning, epochs=1, callbacks=[AtForward(), watch])
    assert watch.violations == 0 and all(dropped_at_forward) and len(dropped_at_forward) > 5
    # replay exactness step by step: a weight dropped at a step is bit-identical after it, a kept live one moved
    gen = torch.Generator().manual_seed(0)
    for before, after in zip(pruning.log_before, pruning.log_after):
        keep = {n: torch.rand(w.shape, generator=gen) > 0.5 for n, w in before.items()}
        for n in before:
            live = pruning.masks.masks[n]
            assert torch.equal(after[n][~keep[n] & live], before[n][~keep[n] & live])
            assert not torch.equal(after[n][keep[n] & live], before[n][keep[n] & live])
            assert not after[n][~live].any()


def test_prune_groups_touches_one_layer_and_its_optimizer_state():
    torch.manual_seed(0)
    net = LeNet5(image_size=8)
    cb = PruningCallback(compression=4, granularity="column")
    cb.bind(net)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    net(torch.randn(4, 1, 8, 8)).sum().backward()
    opt.step()
    trainer = type("T", (), {"optimizers": [opt]})()
    before = {n: m.weight.detach().clone() for n, m in cb.masks.modules.items()}
    pruned = torch.zeros(groups.group_shape(net.conv2.weight, "column"), dtype=torch.bool)
    pruned[3, 1] = pruned[7, 0] = True
    cb.allocator.prune_groups("conv2", pruned, trainer)
    w = net.conv2.weight.reshape(net.conv2.weight.shape[0], net.conv2.weight.shape[1], -1)
    assert not w[:, 3, 1].any() and not w[:, 7, 0].any()
    assert int((~cb.masks.masks["conv2"]).sum()) == 2 * w.shape[0]
    buf = opt.state[net.conv2.weight]["momentum_buffer"].reshape(w.shape)
    assert not buf[:, 3, 1].any() and buf[:, 2, 1].any()
    for n, m in cb.masks.modules.items():
        if n != "conv2":
            assert torch.equal(m.weight, before[n]) and cb.masks.masks[n].all()


class GrowPruned(MagnitudePruning):
    """Pushes every weight, pruned or not, in ``regularize``: the core must mask that gradient afterwards."""

    def regularize(self, trainer):
        for m in self.masks.modules.values():
            m.weight.grad.add_(1.0)


@pytest.mark.parametrize("opt", ["sgd", "adamw"])
def test_regularize_runs_before_gradient_masking(opt):
    optimizer = SGD if opt == "sgd" else partial(torch.optim.AdamW, lr=1e-3, weight_decay=1e-2)
    pruning = GrowPruned(compression=8, mode="one_shot")
    watch = ZeroWatch(pruning)
    _fit(LeNet300(image_size=8), pruning, epochs=1, callbacks=[watch], optimizer=optimizer)
    assert watch.steps > 5 and watch.violations == 0


def test_finalize_reaches_the_target_when_training_stops_early():
    pruning = ADMMPruning(compression=8, admm_fraction=1.0)  # never reaches the hard prune by itself
    _fit(LeNet300(image_size=8), pruning, epochs=1)
    assert pruning.done and pruning.state_dict()["phase"] == "finetune"
    total, nonzero = pruning.masks.counts()
    assert abs(total / nonzero - 8) / 8 < 0.02


def test_checkpoint_state_follows_a_model_of_another_dtype(tmp_path):
    """A checkpoint written by a float32 run mid-ADMM resumes in a float64 run (as one written on a GPU resumes
    on a CPU): Z/U arrive as saved, then take the weights' dtype, and the masks are those of the checkpoint."""
    from pytorch_lightning.callbacks import ModelCheckpoint

    from callbacks import KillAt, Killed

    kwargs = dict(compression=8, update_every=3, admm_fraction=0.8)
    torch.manual_seed(0)
    init = LeNet300(image_size=8).state_dict()
    first = ADMMPruning(**kwargs)
    net = LeNet300(image_size=8)
    net.load_state_dict(init)
    pl.seed_everything(0, workers=True)
    trainer = pl.Trainer(
        max_epochs=3,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[first, ModelCheckpoint(dirpath=tmp_path, save_last=True), KillAt(2)],
    )
    with pytest.raises(Killed):
        trainer.fit(Classifier(net, 10, optimizer=SGD), datamodule=DigitsDataModule(batch_size=128))
    saved = torch.load(tmp_path / "last.ckpt", weights_only=False)["callbacks"]
    (state,) = [v for k, v in saved.items() if k.startswith("ADMMPruning")]
    resumed, seen = ADMMPruning(**kwargs), {}

    class Peek(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, *args):
            if not seen:
                seen.update(
                    {n: (z.dtype, torch.equal(z.float(), state["tensors"]["Z"][n])) for n, z in resumed.Z.items()}
                )

    net = LeNet300(image_size=8)
    pl.seed_everything(0, workers=True)
    trainer = pl.Trainer(
        max_epochs=3,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        precision="64-true",
        enable_checkpointing=False,
        callbacks=[resumed, Peek()],
    )
    trainer.fit(
        Classifier(net, 10, optimizer=SGD),
        datamodule=DigitsDataModule(batch_size=128),
        ckpt_path=tmp_path / "last.ckpt",
    )
    assert seen and all(dtype == torch.float64 and same for dtype, same in seen.values())
    assert resumed.done and net.fc1.weight.dtype == torch.float64


class LossLog(MagnitudePruning):
    """Records what the core hands to ``observe_loss``."""

    def __init__(self, **kwargs):
        super().__init__(mode="one_shot", **kwargs)
        self.seen = []

    def observe_loss(self, trainer, loss):
        self.seen.append((trainer.global_step, loss))


def test_observe_loss_gets_the_loss_of_every_stepped_batch():
    pruning, at_backward = LossLog(compression=4), []

    class AtBackward(pl.Callback):
        def on_before_backward(self, trainer, pl_module, loss):
            at_backward.append(loss.detach().clone())

    _fit(LeNet300(image_size=8), pruning, epochs=1, callbacks=[AtBackward()])
    assert len(pruning.seen) == len(at_backward) > 5
    assert all(not loss.requires_grad and torch.equal(loss, ref) for (_, loss), ref in zip(pruning.seen, at_backward))
    assert [step for step, _ in pruning.seen] == list(range(1, len(at_backward) + 1))  # after the optimizer step
