"""EigenDamage's arithmetic in the Kronecker-factored eigenbasis (KFE): rotate a layer, score its eigen-directions,
choose how many to keep for a parameter budget, and build the bottleneck that keeps them.

With A = Q_A diag(s_A) Q_Aᵀ and G = Q_G diag(s_G) Q_Gᵀ, the weights in the eigenbasis are W* = Q_Gᵀ W̄ Q_A (W̄ = [W, b]
with the bias as the last input column; in patch mode one such product per kernel offset). The Fisher is diagonal in
that basis, so removing W*_ij costs about ½·s_G,i·s_A,j·(W*_ij)² (Wang et al. 2019: OBD in the KFE; the ½ is dropped
as in the official code): an input direction j scores Σ_i, an output direction i scores Σ_j (summed over offsets).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from prunelab.models.architecture import BottleneckLayer, layer_spec
from prunelab.pruning.allocate import lamp_scores
from prunelab.pruning.kfac import Factors, eigh_clamped


def weight_count(module: nn.Module, nonzero: bool = False) -> int:
    """Weights (or nonzero weights) of every Conv2d/Linear in ``module``; biases are not counted, as in the
    project's compression (prunable weights before / nonzero prunable weights after)."""
    layers = [m.weight for m in module.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    return sum(int(torch.count_nonzero(w)) if nonzero else w.numel() for w in layers)


def param_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@dataclass
class LayerKFE:
    """One layer seen in its eigenbasis. ``layer`` is the module being replaced (an original Conv2d/Linear or a
    bottleneck from an earlier round, whose ``core`` was the factored layer)."""

    layer: nn.Module
    w_star: torch.Tensor  # (N', P, C') float64
    q_in: torch.Tensor  # (C [+1], C') eigenvectors of A
    q_out: torch.Tensor  # (N, N') eigenvectors of G
    in_scores: torch.Tensor
    out_scores: torch.Tensor
    live_in: int  # outer inputs that ever carry a signal (a dead one is an exact zero row of A: Q_A is 0 there)
    live_out: int  # outer outputs that ever get a gradient (likewise for G and Q_G)

    @property
    def factored(self) -> nn.Module:
        return self.layer.core if isinstance(self.layer, BottleneckLayer) else self.layer

    def _sizes(self) -> tuple[int, int, int, bool]:
        """(C outer inputs, N outer outputs, P kernel offsets, whether rotate_in has a bias)."""
        if isinstance(self.layer, BottleneckLayer):
            first, last = self.layer.rotate_in, self.layer.rotate_out
            c, n, bias = first.weight.shape[1], last.weight.shape[0], first.bias is not None
        else:
            c, n, bias = self.layer.weight.shape[1], self.layer.weight.shape[0], self.layer.bias is not None
        return c, n, self.w_star.shape[1], bias

    def bottleneck_weights(self, k_in: torch.Tensor, k_out: torch.Tensor) -> torch.Tensor:
        """Nonzero weights of the bottleneck (the rotations are zero on dead inputs and outputs)."""
        p = self.w_star.shape[1]
        return self.live_in * k_in + p * k_in * k_out + self.live_out * k_out

    def bottleneck_params(self, k_in: torch.Tensor, k_out: torch.Tensor) -> torch.Tensor:
        """Parameters of the bottleneck, zeros included."""
        c, n, p, bias = self._sizes()
        return c * k_in + p * k_in * k_out + n * k_out + (k_in if bias else 0)

    def bottleneck_macs(self, k_in: torch.Tensor, k_out: torch.Tensor, positions: tuple[int, int]) -> torch.Tensor:
        """MACs of the bottleneck on one input, counted as Torch-Pruning counts them (a bias adds one per output):
        ``rotate_in`` at ``positions[0]`` output positions, ``core`` and ``rotate_out`` at ``positions[1]``."""
        c, n, p, bias = self._sizes()
        first, rest = positions
        return first * (c * k_in + (k_in if bias else 0)) + rest * (p * k_in * k_out + k_out * n)

    def direction_macs(self, positions: tuple[int, int]) -> tuple[int, int]:
        """MACs one input direction and one output direction add to the bottleneck that keeps every direction."""
        k_in, k_out = len(self.in_scores), len(self.out_scores)
        full = self.bottleneck_macs(k_in, k_out, positions)
        return full - self.bottleneck_macs(k_in - 1, k_out, positions), full - self.bottleneck_macs(
            k_in, k_out - 1, positions
        )


def layer_macs(layer: nn.Module, positions: tuple[int, int]) -> int:
    """MACs of a Conv2d/Linear (``positions[1]``: its output positions) or of a bottleneck (``positions`` as in
    :meth:`LayerKFE.bottleneck_macs`), counted as Torch-Pruning counts them."""
    if isinstance(layer, BottleneckLayer):
        return sum(
            layer_macs(stage, (0, pos))
            for stage, pos in zip(
                (layer.rotate_in, layer.core, layer.rotate_out), (positions[0], positions[1], positions[1])
            )
        )
    per_output = layer.weight[0].numel() + (layer.bias is not None)
    return positions[1] * layer.weight.shape[0] * per_output


@torch.no_grad()
def positions(net: nn.Module, layers: dict[str, nn.Module], example: torch.Tensor) -> dict[str, tuple[int, int]]:
    """Per layer, the output positions (per input, per channel) of its bottleneck's ``rotate_in`` and of its
    ``core``/``rotate_out``, read on ``example`` (1 for a Linear). A plain conv's ``rotate_in`` is 1×1 at the input's
    size, padded by the conv's padding when it carries the bias (:func:`build`); a bottleneck keeps its stages'."""
    seen: dict[nn.Module, tuple[torch.Size, torch.Size]] = {}
    watched = [*layers.values(), *(m.rotate_in for m in layers.values() if isinstance(m, BottleneckLayer))]

    def record(mod: nn.Module, args: tuple, out: torch.Tensor) -> None:  # a hook that returns a value replaces out
        seen.setdefault(mod, (args[0].shape, out.shape))

    hooks = [m.register_forward_hook(record) for m in watched]
    mode = net.training
    try:
        net.eval()
        net(example)
    finally:
        net.train(mode)
        for h in hooks:
            h.remove()
    out = {}
    for name, layer in layers.items():
        if isinstance(layer, nn.Linear) or (isinstance(layer, BottleneckLayer) and isinstance(layer.core, nn.Linear)):
            out[name] = (1, 1)
        elif isinstance(layer, BottleneckLayer):
            out[name] = (seen[layer.rotate_in][1][2:].numel(), seen[layer][1][2:].numel())
        else:
            (h, w), (ph, pw) = seen[layer][0][2:], layer.padding
            padded = layer.bias is not None and (ph or pw)
            out[name] = ((h + 2 * ph) * (w + 2 * pw) if padded else h * w, seen[layer][1][2:].numel())
    return out


def layer_matrix(layer: nn.Module) -> torch.Tensor:
    """W̄ as (N, P, C [+1]): per kernel offset the N×C matrix, the bias appended as an input column to each."""
    w = layer.weight.detach().to(torch.float64)
    w = w.flatten(2).permute(0, 2, 1) if w.dim() == 4 else w[:, None, :]
    if layer.bias is not None:
        w = torch.cat([w, layer.bias.detach().to(torch.float64)[:, None, None].expand(-1, w.shape[1], 1)], 2)
    return w


def _eigenbasis(factor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`eigh_clamped`, with exact zeros where they belong: a PSD matrix with a zero row i (an input that is
    always 0, an output whose gradient always is) has v_i = 0 in every eigenvector of positive eigenvalue. The solver
    leaves ~1e-17 there instead, which would bring a dead unit back to life during fine-tuning."""
    values, vectors = eigh_clamped(factor)
    dead = factor.diagonal() == 0
    vectors[dead[:, None] & (values > 0)[None, :]] = 0.0
    return values, vectors


def decompose(layer: nn.Module, factors: Factors) -> LayerKFE:
    """Rotate ``layer`` (or the core of a bottleneck) into the eigenbasis of its factors and score the directions."""
    if isinstance(layer, BottleneckLayer):
        factored = layer.core
        live_in = int(layer.rotate_in.weight.flatten(1).ne(0).any(0).sum())
        live_out = int(layer.rotate_out.weight.flatten(1).ne(0).any(1).sum())
    else:
        factored, c = layer, layer.weight.shape[1]
        live_in, live_out = int((factors.A.diagonal()[:c] > 0).sum()), int((factors.G.diagonal() > 0).sum())
    s_a, q_a = _eigenbasis(factors.A)
    s_g, q_g = _eigenbasis(factors.G)
    w_star = torch.einsum("ni,nkc,cj->ikj", q_g, layer_matrix(factored), q_a)
    damage = (w_star.square() * s_g[:, None, None] * s_a[None, None, :]).sum(1)
    return LayerKFE(layer, w_star, q_a, q_g, damage.sum(0), damage.sum(1), live_in, live_out)


def build(kfe: LayerKFE, keep_in: torch.Tensor, keep_out: torch.Tensor) -> BottleneckLayer:
    """The bottleneck keeping input directions ``keep_in`` and output directions ``keep_out`` (index tensors).

    Before any direction is dropped it computes what the layer did (Q orthogonal). The bias of an original layer is the
    last coordinate of the rotated input, i.e. a bias of ``rotate_in``; in a padded conv that bias must also reach the
    padded border (it did in the original), so ``rotate_in`` does the padding and ``core`` none.
    """
    layer, factored = kfe.layer, kfe.factored
    q_in, q_out = kfe.q_in[:, keep_in], kfe.q_out[:, keep_out]
    core_w = kfe.w_star[keep_out][:, :, keep_in]  # (k_out, P, k_in)
    conv = isinstance(factored, nn.Conv2d)
    if isinstance(layer, BottleneckLayer):  # fold the new rotations into the old ones: depth does not grow
        old_in, old_out = layer.rotate_in, layer.rotate_out
        in_w = q_in.T @ old_in.weight.detach().double().flatten(1)
        in_b = q_in.T @ old_in.bias.detach().double() if old_in.bias is not None else None
        out_w = old_out.weight.detach().double().flatten(1) @ q_out
        specs = [layer_spec(old_in), layer_spec(factored), layer_spec(old_out)]
    else:
        c = layer.weight.shape[1]
        in_w, out_w = q_in[:c].T, q_out
        scale = 1.0 / math.prod(layer.kernel_size) if conv else 1.0  # the bias coordinate A was collected with
        in_b = scale * q_in[c] if layer.bias is not None else None
        spec = layer_spec(layer)
        specs = [dict(spec, bias=in_b is not None), dict(spec, bias=False), dict(spec, bias=False)]
        if conv:
            ones = {"kernel": [1, 1], "stride": [1, 1], "dilation": [1, 1]}
            pad_first = in_b is not None and any(spec["padding"])
            specs[0].update(ones, padding=spec["padding"] if pad_first else [0, 0])
            specs[1].update(padding=[0, 0] if pad_first else spec["padding"])
            specs[2].update(ones, padding=[0, 0])
    specs[0]["out"] = specs[1]["in"] = len(keep_in)
    specs[1]["out"] = specs[2]["in"] = len(keep_out)
    param = layer.weight if not isinstance(layer, BottleneckLayer) else layer.core.weight
    new = BottleneckLayer(specs, device=param.device, dtype=param.dtype)
    with torch.no_grad():
        new.rotate_in.weight.copy_(in_w.reshape(new.rotate_in.weight.shape))
        if in_b is not None:
            new.rotate_in.bias.copy_(in_b)
        if conv:
            kh, kw = factored.kernel_size
            core_w = core_w.reshape(len(keep_out), kh, kw, len(keep_in)).permute(0, 3, 1, 2)
        new.core.weight.copy_(core_w.reshape(new.core.weight.shape))
        new.rotate_out.weight.copy_(out_w.reshape(new.rotate_out.weight.shape))
    return new


@dataclass
class Plan:
    """Directions kept per rebuilt layer, and the compression (dense weights / weights now) that results."""

    keep: dict[str, tuple[torch.Tensor, torch.Tensor]]
    compression: float
    pruned_units: int


@dataclass
class MacsBudget:
    """``target=macs``: the dense network's MACs, the MACs now outside the layers being planned (everything but
    their Conv2d/Linear stages, which EigenDamage leaves as they are), and each planned layer's positions."""

    dense: int
    fixed: int
    positions: dict[str, tuple[int, int]]


def plan(
    kfes: dict[str, LayerKFE],
    fixed_weights: int,
    dense_weights: int,
    target: float,
    limit: float,
    normalize: bool | str = False,
    macs: MacsBudget | None = None,
) -> Plan:
    """Global threshold over every in/out direction of every layer, searched so that dense / after ≈ ``target``
    (``fixed_weights``: the nonzero weights of the prunable layers not in ``kfes``; ``normalize``: rank LAMP scores of
    each layer side's directions, :func:`prunelab.pruning.allocate.lamp_scores`, instead of the raw ones (``True`` or
    ``"lamp"``), or their share of the side, so that every side drops the same share of its directions (``"layer"``,
    Torch-Pruning's uniform ratio, or ``"lamp_per_mac"``: LAMP scores divided by the MACs each direction costs,
    :meth:`LayerKFE.direction_macs`, so that the ranking is one of importance per MAC; on LeNet-5 a direction of
    ``conv2``'s input costs 80 times one of ``fc1``'s, and LAMP scores alone cut the cheap fully connected layers to a
    few directions each); ``macs``: the ratio is one of MACs, and a layer is replaced when its bottleneck has fewer
    MACs.

    The m lowest-scoring directions over all layers are dropped, but at most ⌊limit·n⌋ (and n − 1) of a layer side's
    n; a layer is replaced only when its bottleneck has fewer parameters than what it replaces. Every m is evaluated
    at once (the bottleneck size is not linear in m) and the one closest to ``target`` wins. One direction of a small
    layer can move the count by a few percent, so when that is still more than 1 % off, single directions are dropped
    or kept back, one side at a time, while that brings the result closer.
    """
    names = list(kfes)
    sides = [s for n in names for s in (kfes[n].in_scores, kfes[n].out_scores)]
    if normalize == "layer":  # (position in the side's ascending order + 1) / side size
        ranked = [
            torch.empty(len(s), dtype=torch.float64).index_put_(
                (torch.argsort(s.cpu(), stable=True),), torch.arange(1, len(s) + 1, dtype=torch.float64) / len(s)
            )
            for s in sides
        ]
    else:
        ranked = list(lamp_scores(dict(enumerate(sides))).values()) if normalize else sides
    if normalize == "lamp_per_mac":  # importance per MAC: of two equal scores, the costlier direction goes first
        if macs is None:
            raise ValueError("kfe.plan: normalize='lamp_per_mac' needs a MACs budget")
        costs = [c for name in names for c in kfes[name].direction_macs(macs.positions[name])]
        ranked = [r / cost for r, cost in zip(ranked, costs)]
    scores = torch.cat([s.cpu() for s in ranked])
    owner = torch.cat([torch.full((len(s),), i) for i, s in enumerate(sides)])
    onehot = torch.zeros(len(scores) + 1, len(sides), dtype=torch.long)
    onehot[torch.arange(1, len(scores) + 1), owner[torch.argsort(scores, stable=True)]] = 1
    sizes = torch.tensor([len(s) for s in sides])
    caps = torch.minimum((limit * sizes.double()).floor().long(), sizes - 1)
    kept = sizes - torch.minimum(onehot.cumsum(0), caps)  # (m + 1, sides): directions kept after dropping m

    def compression(k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """dense / cost after, and which layers are replaced, for each row of kept counts ``k``."""
        total = torch.full((len(k),), macs.fixed if macs else fixed_weights, dtype=torch.long)
        replaced = []
        for i, name in enumerate(names):
            kfe, k_in, k_out = kfes[name], k[:, 2 * i], k[:, 2 * i + 1]
            if macs:
                now = layer_macs(kfe.layer, macs.positions[name])
                after = kfe.bottleneck_macs(k_in, k_out, macs.positions[name])
                replaced.append(after < now)
                total += torch.where(replaced[-1], after, now)
                continue
            replaced.append(kfe.bottleneck_params(k_in, k_out) < param_count(kfe.layer))
            total += torch.where(replaced[-1], kfe.bottleneck_weights(k_in, k_out), weight_count(kfe.layer, True))
        return (macs.dense if macs else dense_weights) / total.double(), torch.stack(replaced, 1)

    ratio = compression(kept)[0]
    m = int(torch.argmin((ratio - target).abs()))
    best, error = kept[m], abs(float(ratio[m]) - target)
    moves = torch.cat([torch.eye(len(sides)), -torch.eye(len(sides))]).long()
    while error > 0.01 * target:
        options = best + moves
        options = options[((options >= sizes - caps) & (options <= sizes)).all(1)]
        errors = (compression(options)[0] - target).abs() if len(options) else torch.empty(0)
        if not len(errors) or float(errors.min()) >= error:
            break
        best, error = options[int(torch.argmin(errors))], float(errors.min())
    ratio, replaced = compression(best[None])
    keep = {
        name: (_top(sides[2 * i], int(best[2 * i])), _top(sides[2 * i + 1], int(best[2 * i + 1])))
        for i, name in enumerate(names)
        if replaced[0, i]
    }
    return Plan(keep, float(ratio[0]), int((sizes - best).sum()))


def _top(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices (ascending, on the scores' device) of the ``k`` highest scores; ties keep the earlier index."""
    drop = torch.argsort(scores, stable=True)[: len(scores) - k]
    keep = torch.ones(len(scores), dtype=torch.bool, device=scores.device)
    keep[drop] = False
    return keep.nonzero().squeeze(1)
