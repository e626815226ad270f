"""The rank increment Δ(r) shared by SPP and IncReg, on hand-checkable ranks, and live-group ranking."""

import math

import pytest
import torch

from prunelab.pruning.increments import increment, live_ranks


def test_exponential_increment_by_hand():
    # N_p = 3, u = 1/4: α = ln 8 / 3 = ln 2, so e^{−αr} = 2^{−r}, and N₁ = ln 4 / ln 2 = 2
    delta = increment(torch.arange(7.0), to_prune=3, amplitude=1.0, u=0.25)
    expected = torch.tensor([1.0, 0.5, 0.25, 0.0, -0.5, -1.5, -3.5], dtype=torch.float64)
    torch.testing.assert_close(delta, expected)


@pytest.mark.parametrize("to_prune", [1, 2, 7, 40, 451])
@pytest.mark.parametrize("u", [0.1, 0.25, 0.4])
def test_exponential_increment_landmarks(to_prune, u):
    a = 2.5e-4
    alpha = math.log(2 / u) / to_prune
    n1 = math.log(1 / u) / alpha
    at = lambda r: float(increment(torch.tensor([float(r)]), to_prune, a, u))  # noqa: E731
    assert at(0) == pytest.approx(a)
    assert at(n1) == pytest.approx(u * a)  # centre of symmetry
    assert at(to_prune) == pytest.approx(0.0, abs=1e-15)
    assert at(to_prune + 1) < 0 and at(10 * to_prune + 5) < at(to_prune + 1)
    ranks = torch.arange(0.0, 3 * to_prune + 3)
    d = increment(ranks, to_prune, a, u)
    assert torch.all(d[1:] <= d[:-1]) and torch.isfinite(d).all()  # decreasing, no overflow far out
    # central symmetry about (N₁, uA) on the exponential part: Δ(N₁ − x) + Δ(N₁ + x) = 2uA
    x = torch.linspace(0, n1, 9, dtype=torch.float64)
    torch.testing.assert_close(
        increment(n1 - x, to_prune, a, u) + increment(n1 + x, to_prune, a, u), torch.full_like(x, 2 * u * a)
    )


def test_linear_increment_and_bad_input():
    torch.testing.assert_close(
        increment(torch.tensor([0.0, 2.0, 4.0, 6.0]), 4, 1.0, shape="linear"),
        torch.tensor([1.0, 0.5, 0.0, -0.5], dtype=torch.float64),
    )
    with pytest.raises(ValueError, match="to_prune=0"):
        increment(torch.zeros(3), 0, 1.0)


def test_live_ranks_skip_dead_groups_and_break_ties_by_index():
    scores = torch.tensor([[0.5, 0.1], [0.1, 0.9], [0.0, 0.3]])
    live = torch.tensor([[True, True], [True, True], [False, True]])
    assert live_ranks(scores, live).tolist() == [[3, 0], [1, 4], [-1, 2]]
