"""The contract every method of ``prunelab.pruning.METHODS`` meets, checked in real Lightning fits on the digits:

- the requested compression within 2 %, as the run measures it (on the compacted model for filter/channel/column);
- every pruned value exactly zero right after every optimizer step (SGD with momentum, Adam, AdamW; weight decay);
- a fit killed mid-prune and resumed from its checkpoint ends with the masks, method state and weights of the
  uninterrupted fit, bit for bit;
- method state on the weights' device and dtype (float64 on the CPU; CUDA and a GPU checkpoint resumed on the CPU
  where a GPU is present), checkpointed as CPU tensors.

A new method is checked by its entry in ``METHODS``; an entry in ``CASES`` only makes its fits shorter or makes the
kill land mid-prune.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint

from callbacks import OPTIMIZERS, KillAt, Killed, pruned_values, same_init
from prunelab.data import DigitsDataModule
from prunelab.measure import compact, layer_table, sparsity_metrics
from prunelab.models import LeNet5, LeNet300
from prunelab.models.classifier import Classifier
from prunelab.pruning import METHODS, PruningCallback

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@dataclass(frozen=True)
class Case:
    """How a method is fitted here: its options, the network, epochs (11 steps each), and the epoch at whose start
    the first fit of the resume test dies (``mid_prune``: the method is not done by then)."""

    options: dict[str, Any] = field(default_factory=dict)
    compression: float = 8.0
    net: Callable = partial(LeNet300, image_size=8)
    epochs: int = 4
    kill_at: int = 2
    mid_prune: bool = False


CASES = {
    "magnitude": Case({"frequency": 2, "prune_fraction": 0.8}, mid_prune=True),
    "admm": Case({"update_every": 4, "admm_fraction": 0.8}, mid_prune=True),
    "slr": Case({"update_every": 4, "admm_fraction": 0.8}, mid_prune=True),
    "increg": Case({"ramp": 0.1}, compression=2, net=partial(LeNet5, image_size=8), mid_prune=True),
    "spp": Case({"A": 0.08}, compression=4, net=partial(LeNet5, image_size=8), mid_prune=True),
    "autoprune": Case({"prune_fraction": 0.8}, mid_prune=True),
    "eigendamage": Case(
        {"mode": "iterative", "rounds": 2, "prune_fraction": 0.8, "prune_ratio_limit": 0.9, "fisher_batches": 2},
        compression=4,
        net=partial(LeNet5, image_size=8),
        kill_at=1,
        mid_prune=True,
    ),
    "obd": Case(
        {"rounds": 3, "prune_fraction": 0.8, "fisher_batches": 2}, net=partial(LeNet5, image_size=8), mid_prune=True
    ),
}
NAMES = sorted(METHODS)
# A contract a method does not meet yet: (test, method) → why. Strict: once it holds, the entry must go.
KNOWN: dict[tuple[str, str], str] = {}


def _names(test: str) -> list:
    return [
        pytest.param(n, marks=pytest.mark.xfail(strict=True, reason=KNOWN[test, n])) if (test, n) in KNOWN else n
        for n in NAMES
    ]


def _case(name: str) -> Case:
    return CASES.get(name, Case())


def _make(name: str) -> PruningCallback:
    case = _case(name)
    return METHODS[name](compression=case.compression, **case.options)


def _fit(net, pruning, case: Case, optimizer=OPTIMIZERS["adam"], callbacks=(), ckpt_path=None, **trainer_kwargs):
    pl.seed_everything(0, workers=True)
    trainer_kwargs = {"accelerator": "cpu", "enable_checkpointing": False, **trainer_kwargs}
    trainer = pl.Trainer(
        max_epochs=case.epochs,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[pruning, *callbacks],
        num_sanity_val_steps=0,
        **trainer_kwargs,
    )
    trainer.fit(
        Classifier(net, 10, optimizer=optimizer), datamodule=DigitsDataModule(batch_size=128), ckpt_path=ckpt_path
    )
    return trainer


def _compression(pruning: PruningCallback, net, dense) -> float:
    """The ``compression`` the run records (measure's counting, without its other measurements): from the weights,
    on the compacted model for a method held to its ratio there, layers a method replaced counted against the dense
    ones."""
    names = pruning.layer_names
    if not pruning.counts_compacted:
        return sparsity_metrics(net, names, dense)["compression"]
    example = torch.zeros(1, 1, 8, 8, dtype=next(net.parameters()).dtype)
    compacted = compact(net.cpu().eval(), example).net
    return sum(r["params"] for r in layer_table(net, names, dense)) / sum(
        r["nonzero"] for r in layer_table(compacted, names, dense)
    )


def _same(a, b, path="state") -> None:
    """``a`` and ``b`` equal bit for bit (nested dicts, lists, tensors, numbers)."""
    assert type(a) is type(b), f"{path}: {type(a).__name__} vs {type(b).__name__}"
    if isinstance(a, dict):
        assert a.keys() == b.keys(), f"{path}: keys {sorted(map(str, a))} vs {sorted(map(str, b))}"
        for k in a:
            _same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{path}: length {len(a)} vs {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            _same(x, y, f"{path}[{i}]")
    elif torch.is_tensor(a):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.cpu(), b.cpu()), path
    else:
        assert a == b, f"{path}: {a!r} vs {b!r}"


class Watch(pl.Callback):
    """After every step of every optimizer the fit uses (a method may renew them), counts the pruned values that
    are nonzero before any re-masking, and the steps taken with something pruned."""

    def __init__(self, pruning: PruningCallback) -> None:
        self.pruning, self.hooked, self.steps, self.pruned_steps, self.violations = pruning, set(), 0, 0, 0

    def on_train_batch_start(self, trainer, pl_module, *args):
        for optimizer in trainer.optimizers:
            if id(optimizer) not in self.hooked:
                self.hooked.add(id(optimizer))
                optimizer.register_step_post_hook(self._check)

    def _check(self, optimizer, args, kwargs):
        values = pruned_values(self.pruning)
        self.steps += 1
        self.pruned_steps += any(v.numel() for v in values)
        self.violations += sum(int(v.count_nonzero()) for v in values)


def test_every_registered_method_is_a_pruning_callback():
    assert NAMES and set(CASES) <= set(METHODS), "a case for a method that is not registered"
    for name, cls in METHODS.items():
        assert issubclass(cls, PruningCallback) and cls.method == name


@pytest.mark.parametrize("opt", list(OPTIMIZERS))
@pytest.mark.parametrize("name", NAMES)
def test_exact_compression_and_zeros_stay_zero(name, opt):
    case, pruning = _case(name), _make(name)
    fresh = same_init(case.net)
    net, watch = fresh(), Watch(pruning)
    _fit(net, pruning, case, OPTIMIZERS[opt], callbacks=[watch])
    assert pruning.done and watch.steps >= case.epochs * 5 and watch.violations == 0
    assert watch.pruned_steps > 0 or pruning.changes_architecture  # replaced layers leave no masked value
    ratio = _compression(pruning, net, fresh())
    assert abs(ratio - case.compression) / case.compression < 0.02, f"{name}: {ratio:.3f}× for {case.compression}×"


def _checkpointed(pruning: PruningCallback, path) -> dict:
    return torch.load(path, weights_only=False)["callbacks"][pruning.state_key]


@pytest.mark.parametrize("name", NAMES)
def test_resume_after_a_kill_is_bit_identical(name, tmp_path):
    case = _case(name)
    fresh = same_init(case.net)
    full, full_net = _make(name), fresh()
    _fit(full_net, full, case)
    first = _make(name)
    with pytest.raises(Killed):
        _fit(
            fresh(),
            first,
            case,
            callbacks=[ModelCheckpoint(dirpath=tmp_path, save_last=True), KillAt(case.kill_at)],
            enable_checkpointing=True,
        )
    assert not (case.mid_prune and first.done), f"{name}: done before the kill; move kill_at earlier"
    saved = _checkpointed(first, tmp_path / "last.ckpt")
    resumed, net, seen = _make(name), fresh(), {}

    class Peek(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            seen.update(copy.deepcopy(resumed.state_dict()))  # deep: some state (Adam's step) changes in place

    _fit(
        net,
        resumed,
        case,
        callbacks=[Peek(), ModelCheckpoint(dirpath=tmp_path / "b")],
        ckpt_path=tmp_path / "last.ckpt",
        enable_checkpointing=True,
    )
    _same(seen, saved)  # the method goes on from the state it saved
    assert resumed.done
    _same(resumed.state_dict(), full.state_dict())
    _same(dict(net.state_dict()), dict(full_net.state_dict()), "weights")


def _weight_shaped(pruning: PruningCallback) -> list[tuple[str, str, torch.Tensor, torch.Tensor]]:
    """(kind, layer, tensor, the layer's weight) of every floating-point state tensor shaped like its weight."""
    return [
        (kind, n, t, pruning.masks.modules[n].weight)
        for kind, d in pruning.layer_tensors().items()
        for n, t in d.items()
        if t.is_floating_point() and t.shape == pruning.masks.modules[n].weight.shape
    ]


class Placement(pl.Callback):
    """Records, after every training batch, where the masks and the method's state tensors are and their dtype
    against their layer's weight."""

    def __init__(self, pruning: PruningCallback) -> None:
        self.pruning, self.wrong, self.batches = pruning, [], 0

    def on_train_batch_end(self, trainer, pl_module, *args):
        self.batches += 1
        p = self.pruning
        for n, mask in p.masks.masks.items():
            if mask.device != p.masks.modules[n].weight.device:
                self.wrong.append(("mask", n, mask.device))
        for kind, d in p.layer_tensors().items():
            for n, t in d.items():
                if t.device != p.masks.modules[n].weight.device:
                    self.wrong.append((kind, n, t.device))
        self.wrong += [(kind, n, t.dtype) for kind, n, t, w in _weight_shaped(p) if t.dtype != w.dtype]


@pytest.mark.parametrize("name", _names("float64"))
def test_state_follows_a_float64_model_and_is_checkpointed_on_the_cpu(name):
    """Lightning converts the model after the callbacks' ``setup`` (as it moves it to a GPU): the state follows."""
    case, pruning = _case(name), _make(name)
    fresh = same_init(case.net)
    net, placement = fresh(), Placement(pruning)
    _fit(net, pruning, case, precision="64-true", callbacks=[placement])
    assert next(net.parameters()).dtype == torch.float64 and pruning.done
    assert placement.batches and not placement.wrong, placement.wrong[:5]
    state = pruning.state_dict()
    assert all(t.device.type == "cpu" for d in state["tensors"].values() for t in d.values())
    ratio = _compression(pruning, net, fresh())
    assert abs(ratio - case.compression) / case.compression < 0.02


def _resume_elsewhere(name, tmp_path, first_kwargs, then_kwargs):
    """Kill a fit run with ``first_kwargs`` mid-way, resume its checkpoint with ``then_kwargs``; returns the state
    saved, the resumed method's state at the start of training (tensors as they are), and the resumed method."""
    case = _case(name)
    fresh = same_init(case.net)
    first = _make(name)
    with pytest.raises(Killed):
        _fit(
            fresh(),
            first,
            case,
            callbacks=[ModelCheckpoint(dirpath=tmp_path, save_last=True), KillAt(case.kill_at)],
            enable_checkpointing=True,
            **first_kwargs,
        )
    saved = _checkpointed(first, tmp_path / "last.ckpt")
    resumed, seen = _make(name), {}

    class Peek(pl.Callback):
        def on_train_start(self, trainer, pl_module):  # copies: some state changes in place as training goes on
            seen.update({(kind, n): (t.clone(), w.dtype) for kind, n, t, w in _weight_shaped(resumed)})
            seen["masks"] = {n: m.clone() for n, m in resumed.masks.masks.items()}

    placement = Placement(resumed)
    _fit(fresh(), resumed, case, callbacks=[Peek(), placement], ckpt_path=tmp_path / "last.ckpt", **then_kwargs)
    assert resumed.done and placement.batches and not placement.wrong, placement.wrong[:5]
    return saved, seen, resumed


@pytest.mark.slow
@pytest.mark.parametrize("name", _names("float64 resume"))
def test_a_float32_checkpoint_resumes_in_a_float64_fit(name, tmp_path):
    """As a GPU checkpoint resumes on a CPU: state arrives as saved, then takes the weights' dtype."""
    saved, seen, _ = _resume_elsewhere(name, tmp_path, {}, {"precision": "64-true"})
    masks = seen.pop("masks")
    assert masks and all(torch.equal(m, saved["masks"][n]) for n, m in masks.items())
    for (kind, n), (t, dtype) in seen.items():
        assert t.dtype == dtype == torch.float64 and torch.equal(t.float(), saved["tensors"][kind][n]), (kind, n)


@pytest.mark.gpu
@CUDA
@pytest.mark.parametrize("name", NAMES)
def test_state_lives_on_the_gpu_and_its_checkpoint_resumes_on_the_cpu(name, tmp_path):
    saved, seen, resumed = _resume_elsewhere(
        name, tmp_path, {"accelerator": "gpu", "devices": 1}, {"accelerator": "cpu"}
    )
    masks = seen.pop("masks")
    assert all(m.device.type == "cpu" and torch.equal(m, saved["masks"][n]) for n, m in masks.items())
    assert all(
        t.device.type == "cpu" and torch.equal(t, saved["tensors"][kind][n]) for (kind, n), (t, _) in seen.items()
    )
    assert all(t.device.type == "cpu" for d in saved["tensors"].values() for t in d.values())


@pytest.mark.gpu
@CUDA
@pytest.mark.parametrize("name", NAMES)
def test_state_follows_the_model_to_the_gpu(name):
    case, pruning = _case(name), _make(name)
    net, placement = same_init(case.net)(), Placement(pruning)
    _fit(net, pruning, case, callbacks=[placement], accelerator="gpu", devices=1)
    assert pruning.done and placement.batches and not placement.wrong, placement.wrong[:5]
    assert all(m.device.type == "cuda" for m in pruning.masks.masks.values())
    state = pruning.state_dict()
    assert all(t.device.type == "cpu" for d in state["tensors"].values() for t in d.values())
