"""Operations on a running fit that methods share: BatchNorm statistics recomputed, and the fit carried on after a
method replaced parameters (DDP's wrapper and the optimizers re-created through Lightning)."""

from __future__ import annotations

import pytorch_lightning as pl
import torch
from pytorch_lightning.strategies import DDPStrategy
from torch import nn

from prunelab import distributed


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
