"""Stored form (Deep Compression encoding): bit-exact round trips, fillers, canonical Huffman, size on LeNet-5."""

from fractions import Fraction

import numpy as np
import pytest
import torch

from prunelab.measure import encoding
from prunelab.measure.encoding import (
    canonical_codes,
    code_lengths,
    decode,
    encode,
    huffman_decode,
    huffman_encode,
    relative_entries,
)
from prunelab.measure.storage import load_encoded, save_encoded, save_sparse
from prunelab.models import LeNet5
from prunelab.pruning.quantize import levels_from_bits, quantize, scan_step

PRUNABLE = ["conv1", "conv2", "fc1", "fc2"]


def _sparse(shape, density, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g)
    return w * (torch.rand(shape, generator=g) < density)


def _same(a, b):
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("density", [0.5, 0.01, 0.001, 0.0, 1.0])
def test_float32_round_trip_is_bit_exact(density):
    state = {
        "fc.weight": _sparse((300, 200), density),
        "fc.bias": torch.randn(300),
        "bn.num_batches_tracked": torch.tensor(7),
        "flags": torch.tensor([True, False]),
        "conv.weight": _sparse((8, 3, 5, 5), density, seed=1),
    }
    blob = encode(state, ["fc.weight", "conv.weight"])
    _same(decode(blob), state)
    nonzero = int(state["fc.weight"].count_nonzero() + state["conv.weight"].count_nonzero())
    if density < 1:  # ≤ 4 bytes per value plus the Huffman-coded gaps, the bias raw, names and tables
        assert len(blob) < 8 * nonzero + 4 * 300 + 400


def test_relative_indices_insert_fillers_where_a_gap_overflows():
    flat = np.zeros(40, dtype=np.float32)
    flat[[1, 20, 21]] = 1.0  # Deep Compression Fig. 2: 3-bit gaps, at most 7 zeros skipped per entry
    symbols, at = relative_entries(flat, 3)
    assert symbols.tolist() == [1, 7, 7, 2, 0]  # 18 zeros before position 20: two fillers, then 2
    assert at.tolist() == [1, 9, 17, 20, 21] and (flat[at] == 0).tolist() == [False, True, True, False, False]


@pytest.mark.parametrize("width", [1, 3, 5])
def test_forced_narrow_widths_round_trip_through_fillers(monkeypatch, width):
    monkeypatch.setattr(encoding, "WIDTHS", range(width, width + 1))
    w = torch.zeros(50_000)
    w[[0, 3, 4, 9_000, 9_001, 49_999]] = torch.tensor([1.5, -2.0, 3.0, 1e-30, -7.0, 0.25])
    state = {"w": w, "dense": _sparse((50, 50), 0.999)}
    _same(decode(encode(state, ["w", "dense"])), state)


@pytest.mark.parametrize("bits", [2, 3, 8])
@pytest.mark.parametrize("density", [0.3, 0.001, 0.0])
def test_quantized_codes_round_trip_to_the_same_levels(bits, density):
    levels = levels_from_bits(bits)
    w = _sparse((120, 400), density, seed=bits)
    q = scan_step(w, levels)
    wq = quantize(w, q, levels)
    state = {"fc.weight": wq, "fc.bias": torch.randn(120)}
    back = decode(encode(state, ["fc.weight"], {"fc.weight": (q, levels)}))
    _same(back, state)
    assert torch.equal(quantize(back["fc.weight"], q, levels), back["fc.weight"])


def test_off_level_weights_are_refused():
    w = quantize(_sparse((10, 10), 0.5), 0.25, 3)
    w.view(-1)[torch.nonzero(w.view(-1))[0]] += 1e-3
    with pytest.raises(ValueError, match=r"w: weights are not on their levels"):
        encode({"w": w}, ["w"], {"w": (0.25, 3)})


def test_save_encoded_writes_the_blob_and_loads_back(tmp_path):
    net = LeNet5(in_channels=1, image_size=28, num_classes=10)
    with torch.no_grad():
        for n in PRUNABLE:
            getattr(net, n).weight.mul_(torch.rand_like(getattr(net, n).weight) < 0.05)
    size = save_encoded(net, tmp_path / "m.plse", PRUNABLE)
    assert size == (tmp_path / "m.plse").stat().st_size
    _same(load_encoded(tmp_path / "m.plse"), net.state_dict())


@pytest.mark.parametrize("seed", range(5))
def test_canonical_code_lengths_fill_the_code_space(seed):
    rng = np.random.default_rng(seed)
    counts = rng.geometric(0.05, size=int(rng.integers(2, 400))) * (rng.random(1) > 0.2)
    counts[:2] = [1, 3]
    lengths = code_lengths(counts)
    used = counts > 0
    assert ((lengths > 0) == used).all()
    assert sum(Fraction(1, 2 ** int(n)) for n in lengths[used]) == 1  # Kraft equality: a complete prefix code
    codes, order = canonical_codes(lengths)
    words = [format(int(codes[s]), f"0{lengths[s]}b") for s in order]
    assert not any(b.startswith(a) for i, a in enumerate(words) for b in words[i + 1 :])  # prefix-free


def test_code_lengths_are_limited_and_still_complete():
    fib = [1, 1]
    while len(fib) < 40:
        fib.append(fib[-1] + fib[-2])
    lengths = code_lengths(np.asarray(fib))  # plain Huffman would need 39 bits
    assert lengths.max() <= encoding.MAX_CODE_LEN
    assert sum(Fraction(1, 2 ** int(n)) for n in lengths) == 1


@pytest.mark.parametrize("alphabet", [8, 300, 2 * 127 + 1])
def test_huffman_stream_round_trip(alphabet):
    rng = np.random.default_rng(alphabet)
    symbols = np.minimum(rng.geometric(0.3, size=5_000) - 1, alphabet - 1)
    blob = huffman_encode(symbols, alphabet)
    back, end = huffman_decode(memoryview(blob), 0, symbols.size, alphabet)
    assert end == len(blob) and np.array_equal(back, symbols)


@pytest.mark.parametrize("count", [0, 1, 1000])
def test_single_symbol_stream_costs_no_bits(count):
    blob = huffman_encode(np.full(count, 5, dtype=np.int64), 16)
    back, end = huffman_decode(memoryview(blob), 0, count, 16)
    assert end == len(blob) and back.tolist() == [5] * count
    assert blob[-4:] == b"\0\0\0\0"  # zero stream bytes


def _pruned_lenet(ratio, bits=3):
    """LeNet-5 (431,080 params) pruned by global magnitude to ``ratio`` and quantized to ``bits``-bit codes."""
    torch.manual_seed(0)
    net = LeNet5(in_channels=1, image_size=28, num_classes=10)
    weights = [getattr(net, n).weight for n in PRUNABLE]
    scores = torch.cat([w.detach().abs().flatten() for w in weights])
    keep = round(scores.numel() / ratio)
    threshold = scores.topk(keep).values.min()
    levels, codes = levels_from_bits(bits), {}
    with torch.no_grad():
        for n, w in zip(PRUNABLE, weights):
            w.mul_(w.abs() >= threshold)
            codes[n] = (scan_step(w, levels), levels)
            w.copy_(quantize(w, codes[n][0], levels))
    return net, codes


@pytest.mark.parametrize("ratio", [500, 1000])
def test_lenet5_quantized_stores_smaller_than_bitmask_and_values(tmp_path, ratio):
    net, codes = _pruned_lenet(ratio)
    stored = save_encoded(net, tmp_path / "m.plse", PRUNABLE, codes)
    bitmask = save_sparse(net, tmp_path / "m.npz", PRUNABLE)
    _same(load_encoded(tmp_path / "m.plse"), net.state_dict())
    assert stored < bitmask
    sd = net.state_dict()
    weights = {f"{n}.weight": sd[f"{n}.weight"] for n in PRUNABLE}
    weights_only = len(encode(weights, list(weights), {f"{n}.weight": c for n, c in codes.items()}))
    dense_all = 4 * sum(t.numel() for t in sd.values())
    dense_w = 4 * sum(t.numel() for t in weights.values())
    kept = sum(int(t.count_nonzero()) for t in weights.values())
    print(
        f"\nLeNet-5 {ratio}x ({kept} weights kept, 3-bit codes): stored {stored} B (bitmask+values npz {bitmask} B); "
        f"vs dense float32 with biases {dense_all / stored:.0f}x; weights only {weights_only} B, "
        f"{dense_w / weights_only:.0f}x"
    )
