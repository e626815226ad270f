"""Operations on a running fit that methods share: BatchNorm statistics recomputed, the fit carried on after a
method replaced parameters (DDP's wrapper and the optimizers re-created through Lightning), a warm restart of the
optimizers and the cosine schedule, and the validation accuracy measured in the middle of the fit."""

from __future__ import annotations

import logging
import math

import pytorch_lightning as pl
import torch
from pytorch_lightning.strategies import DDPStrategy
from torch import nn

from prunelab import distributed

log = logging.getLogger(__name__)


@torch.no_grad()
def recalibrate_batchnorm(net: nn.Module, batches, precision=None, trainer: pl.Trainer | None = None) -> bool:
    """Recompute every BatchNorm's running statistics as the plain average over ``batches`` (the rest of the network
    in eval mode), then average them over the ranks of ``trainer``'s fit, so every rank holds the same; the global RNG
    is left as it was. Returns whether there was any BatchNorm."""
    norms = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not norms:
        return False
    device, was_training, rng = next(net.parameters()).device, net.training, torch.get_rng_state()
    momenta = [m.momentum for m in norms]
    net.eval()
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
        m.train()
    try:
        for x, _ in batches:
            x = x.to(device)
            net(x if precision is None else precision.convert_input(x))
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        net.train(was_training)
        torch.set_rng_state(rng)
    for m in norms:  # every rank saw its own shard (equal sizes: DistributedSampler pads)
        distributed.all_mean(trainer, m.running_mean)
        distributed.all_mean(trainer, m.running_var)
    return True


def rewrap(trainer: pl.Trainer) -> None:
    """Under DDP, wrap the LightningModule in a new ``DistributedDataParallel`` after its parameters were replaced
    (the old wrapper would wait for gradients of parameters that are gone). Every rank calls it at the same step."""
    strategy = trainer.strategy
    if isinstance(strategy, DDPStrategy) and isinstance(strategy.model, nn.parallel.DistributedDataParallel):
        strategy.model = strategy.lightning_module
        strategy.configure_ddp()


def renew_optimizers(trainer: pl.Trainer) -> None:
    """Re-create DDP's wrapper (:func:`rewrap`) and the fit's optimizers and schedulers through Lightning after
    parameters were replaced, carrying on the learning rates, the schedulers' position and the state of every
    parameter that is still there."""
    rewrap(trainer)
    old = trainer.optimizers
    lrs = [[group["lr"] for group in opt.param_groups] for opt in old]
    states = [opt.state for opt in old]
    scheduled = [config.scheduler.state_dict() for config in trainer.lr_scheduler_configs]
    trainer.strategy.setup_optimizers(trainer)
    for opt, group_lrs, state in zip(trainer.optimizers, lrs, states):
        for group, lr in zip(opt.param_groups, group_lrs):
            group["lr"] = lr
            for p in group["params"]:
                if p in state:
                    opt.state[p] = state[p]
    for config, saved in zip(trainer.lr_scheduler_configs, scheduled):
        config.scheduler.load_state_dict(saved)


def example_input_of(trainer: pl.Trainer, pl_module: pl.LightningModule) -> torch.Tensor | None:
    """One all-zeros input of the fit's shape: from a datamodule with ``num_channels`` and ``image_size``, else from
    the LightningModule's ``example_input_array`` (Lightning's own convention); ``None`` when neither says."""
    datamodule = getattr(trainer, "datamodule", None)
    if datamodule is not None and hasattr(datamodule, "num_channels"):
        return torch.zeros((1, datamodule.num_channels, datamodule.image_size, datamodule.image_size))
    if getattr(pl_module, "example_input_array", None) is not None:
        return torch.zeros_like(pl_module.example_input_array[:1])
    return None


def restart_training(trainer: pl.Trainer, method: str, until: int | None = None, per_epoch: int = 1) -> None:
    """Go on as a fresh training run of the pruned network would: every optimizer's state (moments, step counts)
    is cleared and a cosine LR schedule restarts at its initial LR over the epochs (or steps) left until step
    ``until`` (default: the end of the fit; ``per_epoch`` steps make an epoch), a warm restart (Loshchilov & Hutter
    2017, arXiv 1608.03983). Other schedulers go on as they were, with a warning naming ``method``."""
    for optimizer in trainer.optimizers:
        optimizer.state.clear()
    for config in trainer.lr_scheduler_configs:
        scheduler = config.scheduler
        if type(scheduler) is not torch.optim.lr_scheduler.CosineAnnealingLR:
            log.warning(
                "%s: the retraining goes on with %s as it was (only a cosine schedule is restarted)",
                method,
                type(scheduler).__name__,
            )
            continue
        if config.interval == "step":
            left = (int(trainer.estimated_stepping_batches) if until is None else until) - trainer.global_step
        else:
            left = (int(trainer.max_epochs) if until is None else math.ceil(until / per_epoch)) - trainer.current_epoch
        scheduler.T_max, scheduler.last_epoch = max(left, 1), 0
        for group, lr in zip(scheduler.optimizer.param_groups, scheduler.base_lrs):
            group["lr"] = lr
        scheduler._last_lr = list(scheduler.base_lrs)  # what get_last_lr() reports


@torch.no_grad()
def val_accuracy(trainer: pl.Trainer, pl_module: pl.LightningModule) -> float | None:
    """Accuracy (fraction) on the validation set now, without touching the training run's random stream."""
    datamodule = getattr(trainer, "datamodule", None)
    if datamodule is None:
        return None
    rng, was_training = torch.get_rng_state(), pl_module.training
    pl_module.eval()
    precision = trainer.precision_plugin  # the run's input dtype and autocast, as in Lightning's own loops
    correct = total = 0
    for x, y in datamodule.val_dataloader():
        x, y = precision.convert_input(x.to(pl_module.device)), y.to(pl_module.device)
        with precision.val_step_context():
            correct += int((pl_module(x).argmax(1) == y).sum())
        total += y.numel()
    pl_module.train(was_training)
    torch.set_rng_state(rng)
    return correct / max(total, 1)
