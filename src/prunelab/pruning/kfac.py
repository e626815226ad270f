"""Kronecker-factored (K-FAC) and diagonal Fisher of Conv2d/Linear layers, from one pass over the training data.

For a layer s = W ā (ā: input, with a trailing 1 when the layer has a bias) the Fisher block is approximated by
A ⊗ G with A the second moment of ā and G that of g = ∂ℓ/∂s for one example (Martens & Grosse 2015; convolutions as
Grosse & Martens 2016, KFC). EigenDamage ranks directions of different layers against each other, so the factors keep
the scaling of the official code (alecwangcq/EigenDamage-Pytorch, ``utils/kfac_utils.py``), with T output positions
and P = kh·kw kernel offsets of a convolution:

- Linear: A = E[ā āᵀ], G = E[g gᵀ];
- Conv2d: G = T·E[Σ_t g_t g_tᵀ]; A = E[Σ_t ā_t ā_tᵀ] / T² over the unfolded C·P patch (bias coordinate 1), or, in
  *patch* mode, over the C input channels with each kernel offset a sample of its own (bias coordinate 1/P):
  A = E[Σ_{t,k} ā ā ᵀ] / (P·T²). Patch mode is what turns EigenDamage's input rotation into a 1×1 convolution.

Labels are sampled from the model's own predictive distribution (the true Fisher) with a caller-owned
``torch.Generator``, or taken from the data (the empirical Fisher). The loss is summed over the batch, so the gradient
a backward hook sees is already the per-example one; the model runs in eval mode, so no example influences another.
"""

from __future__ import annotations

import hashlib
import math
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from itertools import islice

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn

from prunelab import distributed

FISHER_TYPES = ("true", "empirical")
EIGEN_FLOOR = 1e-10  # eigenvalues below this are set to zero (the official code's threshold)


@dataclass
class Factors:
    """K-FAC factors of one layer (float64, on the layer's device)."""

    A: torch.Tensor
    G: torch.Tensor


def _input_geometry(module: nn.Conv2d, x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """How many (output position, kernel offset) pairs read each input pixel, shaped (H·W,), and T."""
    h, w = x.shape[-2:]
    ones = torch.ones(1, 1, h, w, device=x.device, dtype=torch.float64)
    cols = F.unfold(ones, module.kernel_size, module.dilation, module.padding, module.stride)  # (1, P, T)
    counts = F.fold(cols, (h, w), module.kernel_size, module.dilation, module.padding, module.stride)
    return counts.reshape(-1), cols.shape[-1]


def _positions(t: torch.Tensor) -> int:
    """Positions per example of a Linear layer's input or output gradient (tokens; 1 for a plain (B, D) batch)."""
    return t[0].numel() // t.shape[-1]


def input_moment(module: nn.Module, x: torch.Tensor, patch: bool) -> torch.Tensor:
    """Σ over the batch of the per-example A contribution (divide by the number of examples for A)."""
    x = x.detach().to(torch.float64)
    bias = module.bias is not None
    if isinstance(module, nn.Linear):  # tokens (B, T, …, D) are positions, as a conv's are: A / T², G · T
        a = x.reshape(-1, x.shape[-1])
        if bias:
            a = torch.cat([a, a.new_ones(a.shape[0], 1)], 1)
        return a.T @ a / _positions(x) ** 2
    p = math.prod(module.kernel_size)
    if not patch:
        cols = F.unfold(x, module.kernel_size, module.dilation, module.padding, module.stride)  # (B, C·P, T)
        t = cols.shape[-1]
        a = cols.transpose(1, 2).reshape(-1, cols.shape[1])
        if bias:
            a = torch.cat([a, a.new_ones(a.shape[0], 1)], 1)
        return a.T @ a / t**2
    # patch mode without unfolding: Σ_{t,k} x_{pos(t,k)} x_{pos(t,k)}ᵀ = Σ_pixels count(pixel) · x xᵀ
    counts, t = _input_geometry(module, x)
    a = x.permute(0, 2, 3, 1).reshape(x.shape[0], -1, x.shape[1])  # (B, H·W, C)
    weighted = a * counts[None, :, None]
    xx = torch.einsum("bpc,bpd->cd", weighted, a)
    if bias:
        x1 = weighted.sum((0, 1))[:, None] / p
        one = torch.full((1, 1), x.shape[0] * t / p, dtype=torch.float64, device=x.device)
        xx = torch.cat([torch.cat([xx, x1], 1), torch.cat([x1.T, one], 1)], 0)
    return xx / (p * t**2)


def output_moment(module: nn.Module, g: torch.Tensor) -> torch.Tensor:
    """Σ over the batch of the per-example G contribution, from the per-example output gradients ``g``."""
    g = g.detach().to(torch.float64)
    if isinstance(module, nn.Linear):
        t = _positions(g)
        g = g.reshape(-1, g.shape[-1])
        return t * (g.T @ g)
    t = g.shape[-2] * g.shape[-1]
    g = g.permute(0, 2, 3, 1).reshape(-1, g.shape[1])
    return t * (g.T @ g)


def square_grad(module: nn.Module, x: torch.Tensor, g: torch.Tensor, chunk: int = 16) -> list[torch.Tensor]:
    """Σ over the batch of the squared per-example gradients of ``weight`` (and ``bias``): the diagonal Fisher."""
    x, g = x.detach().to(torch.float64), g.detach().to(torch.float64)
    if isinstance(module, nn.Linear) and x.dim() == 2:  # per-example gradient g aᵀ, so its square is (g²)(a²)ᵀ
        out = [(g * g).T @ (x * x)]
        return out + ([(g * g).sum(0)] if module.bias is not None else [])
    if isinstance(module, nn.Linear):  # tokens: the per-example gradient sums g_t a_tᵀ over positions t
        weight, bias = torch.zeros_like(module.weight, dtype=torch.float64), None
        for xs, gs in zip(x.split(chunk), g.split(chunk)):
            xs, gs = xs.reshape(xs.shape[0], -1, xs.shape[-1]), gs.reshape(gs.shape[0], -1, gs.shape[-1])
            weight += torch.bmm(gs.transpose(1, 2), xs).square().sum(0)
            gsum = gs.sum(1).square().sum(0)
            bias = gsum if bias is None else bias + gsum
        return [weight] + ([bias] if module.bias is not None else [])
    weight, bias = torch.zeros_like(module.weight, dtype=torch.float64).flatten(1), None
    for xs, gs in zip(x.split(chunk), g.split(chunk)):
        cols = F.unfold(xs, module.kernel_size, module.dilation, module.padding, module.stride)  # (b, C·P, T)
        per_example = torch.bmm(gs.flatten(2), cols.transpose(1, 2))  # (b, N, C·P)
        weight += per_example.square().sum(0)
        gsum = gs.flatten(2).sum(-1).square().sum(0)
        bias = gsum if bias is None else bias + gsum
    return [weight.view_as(module.weight)] + ([bias] if module.bias is not None else [])


def unfactorable(net: nn.Module, modules: dict[str, nn.Module]) -> dict[str, str]:
    """The layers of ``modules`` whose Fisher statistics a pass cannot collect, each with the reason: the pass reads
    a layer's input and output gradient through its forward and backward hooks, and unfolds convolutions as dense
    ones."""
    attention = {f"{n}.out_proj" for n, m in net.named_modules() if isinstance(m, nn.MultiheadAttention)}
    reasons = {}
    for name, m in modules.items():
        if name in attention:
            reasons[name] = "the out_proj of an nn.MultiheadAttention, whose forward uses its weight without calling it"
        elif isinstance(m, nn.Conv2d) and m.groups != 1:
            reasons[name] = f"a grouped (depthwise) Conv2d, groups={m.groups}"
        elif isinstance(m, nn.Conv2d) and m.padding_mode != "zeros":
            reasons[name] = f"a Conv2d with padding_mode={m.padding_mode!r}"
    return reasons


def refuse_unfactorable(method: str, net: nn.Module, modules: dict[str, nn.Module]) -> None:
    """Raise a ValueError naming every layer of ``modules`` :func:`unfactorable` finds, and how to leave them out."""
    reasons = unfactorable(net, modules)
    if reasons:
        shown = "; ".join(f"{n!r}: {why}" for n, why in list(reasons.items())[:3])
        raise ValueError(
            f"{method} cannot compute Fisher statistics for {len(reasons)} layer(s) ({shown}"
            f"{'; …' if len(reasons) > 3 else ''}); leave them out with "
            f"pruning.exclude=[{','.join(reasons)}]"
        )


def training_batches(trainer: pl.Trainer, limit: int | None = None) -> Iterable:
    """The fit's own training batches (at most ``limit``): its train dataloader, whether a datamodule or
    ``train_dataloaders=`` gave it, with the fit's sampler (under DDP each rank reads its shard: sum the statistics
    over ranks with :func:`prunelab.distributed.all_sum`)."""
    loader = getattr(trainer, "train_dataloader", None)
    if loader is None:  # before the fit set up its data
        datamodule = getattr(trainer, "datamodule", None)
        if datamodule is None:
            raise RuntimeError("a pass over the training data needs the fit's train dataloader; the trainer has none")
        loader = datamodule.train_dataloader()
    return islice(loader, limit)


def backprop_pass(
    net: nn.Module,
    modules: dict[str, nn.Module],
    batches: Iterable,
    on_layer: Callable[[str, nn.Module, torch.Tensor, torch.Tensor], None],
    fisher_type: str = "true",
    generator: torch.Generator | None = None,
    precision: pl.plugins.Precision | None = None,
) -> int:
    """Forward and backward over ``batches`` calling ``on_layer(name, module, input, output_grad)`` for every layer
    in ``modules``; returns the number of examples. Hooks are removed and gradients cleared afterwards; the model's
    mode and the global RNG are restored."""
    device = next(net.parameters()).device
    inputs: dict[str, torch.Tensor] = {}
    names = {m: n for n, m in modules.items()}

    def save_input(module, args):
        inputs[names[module]] = args[0].detach()

    def save_grad(module, grad_input, grad_output):
        name = names[module]
        on_layer(name, module, inputs.pop(name), grad_output[0].detach())

    handles = [
        h
        for m in modules.values()
        for h in (m.register_forward_pre_hook(save_input), m.register_full_backward_hook(save_grad))
    ]
    was_training, rng, count = net.training, torch.get_rng_state(), 0
    net.eval()
    try:
        with torch.enable_grad(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            for x, y in batches:
                x = x.to(device) if precision is None else precision.convert_input(x.to(device))
                logits = net(x).float()
                if fisher_type == "true":
                    probs = torch.softmax(logits.detach(), 1).cpu()
                    y = torch.multinomial(probs, 1, generator=generator).squeeze(1)
                F.cross_entropy(logits, y.to(device), reduction="sum").backward()
                count += x.shape[0]
    finally:
        for h in handles:
            h.remove()
        net.zero_grad(set_to_none=True)
        net.train(was_training)
        torch.set_rng_state(rng)
    return count


def _summed_pass(net, modules, batches, on_layer, sums, trainer: pl.Trainer | None, pass_kwargs: dict) -> int:
    """:func:`backprop_pass` on this rank's shard, then ``sums`` and the example count summed over the ranks.

    Sampled labels (``fisher_type="true"``) come from the shared ``generator`` on rank 0, so a run of one process
    draws as it always did; any other rank draws from a generator seeded by the shared one's state and its rank, so
    the ranks' draws are independent, as one process's draws over the whole data are (with one stream on every rank,
    the draws of different ranks are correlated: an unlikely label falls at the same position of every shard). The
    shared generator then takes rank 0's state on every rank, so the method's state stays identical."""
    shared = pass_kwargs.get("generator")
    rank = int(getattr(trainer, "global_rank", 0))
    if shared is not None and rank > 0:
        key = hashlib.sha256(shared.get_state().numpy().tobytes() + rank.to_bytes(4, "little")).digest()
        seed = int.from_bytes(key[:8], "little") >> 1
        pass_kwargs = {**pass_kwargs, "generator": torch.Generator().manual_seed(seed)}
    count = backprop_pass(net, modules, batches, on_layer, **pass_kwargs)
    if shared is not None and distributed.world_size(trainer) > 1:
        shared.set_state(trainer.strategy.broadcast(shared.get_state(), src=0))
    return _total(count, sums, trainer)


def _total(count: int, sums: dict[str, list[torch.Tensor]], trainer: pl.Trainer | None) -> int:
    """Sum ``sums`` (in place) and the example count over the ranks of ``trainer``'s fit; return the count."""
    if distributed.world_size(trainer) == 1:
        return count
    for name in sorted(sums):  # the same order on every rank
        for tensor in sums[name]:
            distributed.all_sum(trainer, tensor)
    device = next(t for s in sums.values() for t in s).device if sums else None
    return int(distributed.all_sum(trainer, torch.tensor(float(count), device=device)).item())


def collect_factors(
    net: nn.Module,
    modules: dict[str, nn.Module],
    batches: Iterable,
    patch: bool = True,
    trainer: pl.Trainer | None = None,
    **pass_kwargs,
) -> dict[str, Factors]:
    """K-FAC factors of every layer in ``modules`` over ``batches`` (see :func:`backprop_pass` for the options),
    summed over the ranks of ``trainer``'s fit."""
    sums: dict[str, list[torch.Tensor]] = {}

    def add(name, module, x, g):
        moments = (input_moment(module, x, patch), output_moment(module, g))
        sums[name] = list(moments) if name not in sums else [s + m for s, m in zip(sums[name], moments)]

    n = _summed_pass(net, modules, batches, add, sums, trainer, pass_kwargs)
    if n == 0:
        raise ValueError("K-FAC needs at least one batch of training data")
    return {name: Factors(a / n, g / n) for name, (a, g) in sums.items()}


def collect_diagonal(
    net: nn.Module, modules: dict[str, nn.Module], batches: Iterable, trainer: pl.Trainer | None = None, **pass_kwargs
) -> dict[str, list[torch.Tensor]]:
    """Diagonal Fisher E[(∂ℓ/∂θ)²] of each layer's weight (and bias), from exact per-example gradients, summed over
    the ranks of ``trainer``'s fit."""
    sums: dict[str, list[torch.Tensor]] = {}

    def add(name, module, x, g):
        squares = square_grad(module, x, g)
        sums[name] = squares if name not in sums else [s + q for s, q in zip(sums[name], squares)]

    n = _summed_pass(net, modules, batches, add, sums, trainer, pass_kwargs)
    if n == 0:
        raise ValueError("the diagonal Fisher needs at least one batch of training data")
    return {name: [s / n for s in squares] for name, squares in sums.items()}


def eigh_clamped(matrix: torch.Tensor, floor: float = EIGEN_FLOOR) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (ascending, those below ``floor`` set to 0) and orthonormal eigenvectors of a symmetric PSD
    matrix, in float64 on its device (on the CPU if the device's solver does not converge)."""
    m = matrix.to(torch.float64)
    if not torch.isfinite(m).all():
        raise FloatingPointError("Fisher factor has NaN/inf entries: the network or its loss diverged")
    m = (m + m.T) / 2
    try:
        values, vectors = torch.linalg.eigh(m)
    except torch.linalg.LinAlgError:
        values, vectors = (t.to(m.device) for t in torch.linalg.eigh(m.cpu()))
    return torch.where(values > floor, values, torch.zeros_like(values)), vectors
