"""On a CUDA machine: full pruning runs train on the GPU, and checkpoints move between GPU and CPU with their masks.

Skipped without CUDA (the `gpu` marker lets a GPU host select them: ``pytest -m gpu``)."""

from functools import partial

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint

from callbacks import KillAt, Killed, ZeroWatch
from prunelab.data import DigitsDataModule
from prunelab.models import LeNet5
from prunelab.models.classifier import Classifier
from prunelab.pruning import ADMMPruning, MagnitudePruning

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
SGD = partial(torch.optim.SGD, lr=0.05, momentum=0.9)


@pytest.mark.parametrize("method", ["magnitude", "admm"])
def test_full_run_trains_on_the_gpu_and_records_gpu_latency(make_cfg, method):
    from prunelab.train import train

    metrics = train(make_cfg(f"pruning={method}", "pruning.compression=8", "trainer.accelerator=gpu", "model=lenet5"))
    assert abs(metrics["compression"] - 8) / 8 < 0.02
    assert metrics["latency_gpu_b1_ms"] > 0 and metrics["speedup_gpu_b1"] > 0


def _fit(net, pruning, accelerator, epochs, callbacks=(), ckpt_path=None):
    pl.seed_everything(0, workers=True)
    trainer = pl.Trainer(
        max_epochs=epochs,
        accelerator=accelerator,
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[pruning, *callbacks],
    )
    trainer.fit(Classifier(net, 10, optimizer=SGD), datamodule=DigitsDataModule(batch_size=128), ckpt_path=ckpt_path)


@pytest.mark.parametrize("src, dst", [("gpu", "cpu"), ("cpu", "gpu")])
@pytest.mark.parametrize(
    "make",
    [
        lambda: MagnitudePruning(compression=8, prune_fraction=0.4),
        lambda: ADMMPruning(compression=8, update_every=3, admm_fraction=0.4),
    ],
)
def test_checkpoint_moves_between_devices_with_identical_masks(tmp_path, src, dst, make):
    torch.manual_seed(0)
    init = LeNet5(image_size=8).state_dict()
    first, net = make(), LeNet5(image_size=8)
    net.load_state_dict(init)
    with pytest.raises(Killed):  # killed in the fine-tuning phase: the masks are final
        _fit(net, first, src, 4, [ModelCheckpoint(dirpath=tmp_path, save_last=True), KillAt(3)])
    assert first.done
    saved = {n: m.cpu().clone() for n, m in first.masks.masks.items()}
    resumed, net = make(), LeNet5(image_size=8)
    watch = ZeroWatch(resumed)
    _fit(net, resumed, dst, 4, [watch], ckpt_path=tmp_path / "last.ckpt")
    device = torch.device("cuda" if dst == "gpu" else "cpu")
    assert all(m.device.type == device.type for m in resumed.masks.masks.values())
    assert all(torch.equal(resumed.masks.masks[n].cpu(), saved[n]) for n in saved)
    assert watch.steps > 0 and watch.violations == 0
