"""K-FAC and diagonal Fisher: factors equal their explicit definitions, passes leave no trace, eigh never NaNs."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from prunelab.pruning import kfac, kfe


def _per_example_output_grads(net, layer, x, y):
    """g_n = ∂ℓ_n/∂s_n of ``layer``'s output for every example, one backward per example."""
    grads = []
    for xn, yn in zip(x, y):
        out = {}
        handle = layer.register_forward_hook(lambda m, a, o, out=out: out.setdefault("s", o))
        loss = F.cross_entropy(net(xn[None]), yn[None])
        handle.remove()
        grads.append(torch.autograd.grad(loss, out["s"])[0][0])
    return torch.stack(grads).double()


def test_linear_factors_equal_explicit_moments():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3)).double()
    x, y = torch.randn(7, 5, dtype=torch.float64), torch.randint(0, 3, (7,))
    factors = kfac.collect_factors(
        net, {"0": net[0], "2": net[2]}, [(x[:4], y[:4]), (x[4:], y[4:])], fisher_type="empirical"
    )
    a = torch.cat([x, torch.ones(7, 1, dtype=torch.float64)], 1)
    torch.testing.assert_close(factors["0"].A, a.T @ a / 7)
    g = _per_example_output_grads(net, net[0], x, y)
    torch.testing.assert_close(factors["0"].G, g.T @ g / 7)
    h = torch.cat([torch.relu(net[0](x)), torch.ones(7, 1, dtype=torch.float64)], 1).detach()
    torch.testing.assert_close(factors["2"].A, h.T @ h / 7)


def test_conv_factors_equal_explicit_patch_and_unfold_moments():
    torch.manual_seed(1)
    conv = nn.Conv2d(3, 4, 3, stride=2, padding=1).double()
    net = nn.Sequential(conv, nn.Flatten(), nn.Linear(4 * 3 * 3, 5)).double()
    x, y = torch.randn(6, 3, 5, 5, dtype=torch.float64), torch.randint(0, 5, (6,))
    cols = F.unfold(x, 3, padding=1, stride=2)  # (B, C·P, T), channel-major like the weight
    b, t, p = 6, cols.shape[-1], 9
    samples = cols.reshape(b, 3, p, t).permute(0, 2, 3, 1).reshape(-1, 3)  # one row per (example, offset, position)
    a = torch.cat([samples, torch.full((len(samples), 1), 1 / p, dtype=torch.float64)], 1)
    patch = kfac.collect_factors(net, {"c": conv}, [(x, y)], fisher_type="empirical")["c"]
    torch.testing.assert_close(patch.A, a.T @ a / (b * p * t**2))
    unfolded = torch.cat([cols.transpose(1, 2).reshape(-1, 27), torch.ones(b * t, 1, dtype=torch.float64)], 1)
    full = kfac.collect_factors(net, {"c": conv}, [(x, y)], patch=False, fisher_type="empirical")["c"]
    torch.testing.assert_close(full.A, unfolded.T @ unfolded / (b * t**2))
    g = _per_example_output_grads(net, conv, x, y).permute(0, 2, 3, 1).reshape(-1, 4)
    torch.testing.assert_close(patch.G, t * g.T @ g / b)
    torch.testing.assert_close(full.G, patch.G)


def test_diagonal_fisher_equals_squared_per_example_gradients():
    torch.manual_seed(2)
    net = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 16, 4)).double()
    x, y = torch.randn(5, 2, 4, 4, dtype=torch.float64), torch.randint(0, 4, (5,))
    diag = kfac.collect_diagonal(net, {"0": net[0], "3": net[3]}, [(x, y)], fisher_type="empirical")
    sq = [torch.zeros_like(p) for p in net.parameters()]
    for xn, yn in zip(x, y):
        grads = torch.autograd.grad(F.cross_entropy(net(xn[None]), yn[None]), list(net.parameters()))
        sq = [s + gr.square() / 5 for s, gr in zip(sq, grads)]
    for got, want in zip([*diag["0"], *diag["3"]], sq):
        torch.testing.assert_close(got, want)


def test_true_fisher_labels_come_from_the_generator_and_the_pass_leaves_no_trace():
    torch.manual_seed(3)
    net = nn.Sequential(nn.Linear(6, 5), nn.Dropout(0.5), nn.Linear(5, 4))
    net.train()
    batches = [(torch.randn(8, 6), torch.zeros(8, dtype=torch.long))]
    rng = torch.get_rng_state()

    def g_factor(seed):
        return kfac.collect_factors(net, {"0": net[0]}, batches, generator=torch.Generator().manual_seed(seed))["0"].G

    assert torch.equal(g_factor(0), g_factor(0)) and not torch.equal(g_factor(0), g_factor(1))
    assert torch.equal(torch.get_rng_state(), rng)  # the training run's random stream is untouched
    assert net.training and all(p.grad is None for p in net.parameters())
    assert not net[0]._forward_pre_hooks and not net[0]._backward_hooks  # hooks removed


class _RankOfTwo:
    """Stand-in for the trainer of one rank of a two-process fit: sums over ranks are left as they are; a broadcast
    from rank 0 gives ``rank0_state``."""

    world_size = 2

    def __init__(self, rank: int, rank0_state: torch.Tensor):
        self.global_rank, self.rank0_state = rank, rank0_state
        self.strategy = self

    def reduce(self, tensor, reduce_op):
        return tensor

    def broadcast(self, obj, src=0):
        return self.rank0_state


def test_ranks_draw_their_own_true_fisher_labels_and_end_with_rank_0s_generator():
    torch.manual_seed(3)
    net = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4))
    batches = [(torch.randn(64, 6), torch.zeros(64, dtype=torch.long))]

    def g_factor(generator, trainer=None):
        return kfac.collect_factors(net, {"0": net[0]}, batches, trainer=trainer, generator=generator)["0"].G

    one = torch.Generator().manual_seed(0)
    alone = g_factor(one)  # one process: the shared generator draws, as it always did
    rank0_state = one.get_state()
    zero, first = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    assert torch.equal(g_factor(zero, _RankOfTwo(0, rank0_state)), alone)  # rank 0 draws as one process does
    # rank 1, with the same generator state, draws other labels for its shard (here the same batch, to compare)
    assert not torch.equal(g_factor(first, _RankOfTwo(1, rank0_state)), alone)
    assert torch.equal(first.get_state(), rank0_state)  # and leaves with rank 0's state: the method state agrees


def test_ill_conditioned_factors_never_give_nan():
    gen = torch.Generator().manual_seed(4)
    layer = nn.Linear(12, 9).double()
    for _ in range(100):
        pair = []
        for n in (13, 9):
            q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
            s = 10 ** (torch.rand(n, generator=gen, dtype=torch.float64) * 25 - 20)  # 1e-20 … 1e5
            s[torch.rand(n, generator=gen) < 0.3] = 0.0  # rank-deficient
            pair.append((q * s) @ q.T)
        k = kfe.decompose(layer, kfac.Factors(*pair))
        values = kfac.eigh_clamped(pair[0])[0]
        assert (values >= 0).all() and values[(values > 0)].min() > kfac.EIGEN_FLOOR
        for t in (k.w_star, k.in_scores, k.out_scores, k.q_in, k.q_out):
            assert torch.isfinite(t).all()
        built = kfe.build(k, torch.arange(6), torch.arange(5))
        assert all(torch.isfinite(p).all() for p in built.parameters())
    with pytest.raises(FloatingPointError, match="NaN/inf"):
        kfac.eigh_clamped(torch.full((3, 3), math.nan))
