"""Stored form of a pruned (and quantized) network, as Deep Compression counts it.

Han et al., "Deep Compression" (ICLR 2016): Sec. 2 stores a sparse layer as relative indices (the distance to the
previous nonzero) of a fixed bit width, adding a filler zero entry where a distance overflows the width; Sec. 4
Huffman-codes the index stream and the quantization codes; its LeNet-5 figure (39×) includes that sparse
"meta-data". ADMM-NN (Ren et al., ASPLOS 2019, arXiv 1812.11677) and Ye et al. (arXiv 1811.01907) report LeNet-5 at
1,910× "when focusing on data storage" / as "storage reduction of weight data" (their abstracts): weight values
only. That is inferred from the numbers, as their tables were not at hand: at their best pruning, 167×, 1,910× leaves
32·167/1910 ≈ 2.8 bits per kept weight, while the positions of 1 weight in 167 alone need ≈ 8.8 bits each (binary
entropy), so neither indices nor biases are in it. This blob counts everything: indices, codes, tables, biases,
buffers, names and shapes.

Format (little-endian; ``u8/u16/u32`` unsigned ints, ``f32`` IEEE float):

* header: ``magic`` 4 bytes ``b"PLSE"``, ``version`` u8 (1), ``count`` u32 (tensors that follow).
* per tensor: ``name_len`` u16, ``name`` utf-8, ``kind`` u8 (0 raw, 1 sparse float32, 2 sparse coded),
  ``ndim`` u8, ``shape`` u32 × ndim, then by kind:

  - raw: ``dtype_len`` u8, ``dtype`` ascii (numpy ``dtype.str``; floats are always stored as ``<f4``), then the
    C-order data.
  - sparse (1, 2): ``width`` u8 (w), ``entries`` u32 (n: nonzeros plus fillers); kind 2 adds ``q`` f32 and
    ``levels`` u16 (M). Then the gap stream: a Huffman table and a bit stream of n symbols in [0, 2^w); symbol z
    means "skip z zeros, then this entry", and an entry whose zero run would exceed 2^w − 1 is cut by filler
    entries (symbol 2^w − 1, value zero). Then the values: kind 1, n × f32 (0 at fillers); kind 2, a Huffman
    table and a bit stream of n codes in [0, 2M]: 0 is the filler, k ∈ 1…M the level +k·q, M + k the level −k·q
    (the float32 product ``k * q``, as :func:`prunelab.pruning.quantize.quantize` makes it).
* Huffman table (canonical code: only code lengths are stored): ``symbols`` u16 (s), ``max_len`` u8 (L),
  ``counts`` u16 × L (codes of length 1…L), then the s symbols sorted by (length, symbol), u8 each when the
  alphabet has ≤ 256 symbols, else u16. A lone symbol has length 0 (L = 0) and costs no stream bits. Then
  ``stream_bytes`` u32 and the stream, codes packed most significant bit first.
"""

from __future__ import annotations

import heapq
import struct
from collections.abc import Mapping

import numpy as np
import torch

MAGIC, VERSION = b"PLSE", 1
WIDTHS = range(1, 13)  # relative-index widths tried per layer (Deep Compression uses 5 for conv, 4 for fc)
MAX_CODE_LEN = 24


# ----------------------------------------------------------------------------- canonical Huffman
def code_lengths(counts: np.ndarray, max_len: int = MAX_CODE_LEN) -> np.ndarray:
    """Huffman code length of every symbol (0 for unused ones; a lone used symbol gets 0: no bits needed).

    Lengths over ``max_len`` are avoided by halving the counts and rebuilding, which keeps the code complete.
    """
    counts = np.asarray(counts, dtype=np.int64)
    lengths = np.zeros(counts.size, dtype=np.int64)
    used = np.flatnonzero(counts)
    if used.size < 2:
        return lengths
    weights = counts[used]
    while True:
        heap = [(int(w), i, [i]) for i, w in enumerate(weights)]
        heapq.heapify(heap)
        depth = np.zeros(used.size, dtype=np.int64)
        tie = used.size
        while len(heap) > 1:
            w1, _, a = heapq.heappop(heap)
            w2, _, b = heapq.heappop(heap)
            depth[a + b] += 1
            heapq.heappush(heap, (w1 + w2, tie, a + b))
            tie += 1
        if depth.max() <= max_len:
            lengths[used] = depth
            return lengths
        weights = (weights + 1) // 2


def canonical_codes(lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Canonical codes of the used symbols: ``(codes per symbol, symbols in canonical order)``."""
    order = sorted((int(n), s) for s, n in enumerate(lengths) if n > 0)
    codes = np.zeros(len(lengths), dtype=np.uint64)
    code, prev = 0, 0
    for length, symbol in order:
        code <<= length - prev
        codes[symbol], prev = code, length
        code += 1
    return codes, np.asarray([s for _, s in order], dtype=np.int64)


def _table_bytes(lengths: np.ndarray, alphabet: int) -> int:
    used = int((lengths > 0).sum()) or int(lengths.size > 0)
    return 2 + 1 + 2 * int(lengths.max(initial=0)) + used * (1 if alphabet <= 256 else 2) + 4


def _stream_bytes(counts: np.ndarray, lengths: np.ndarray) -> int:
    return (int((counts * lengths).sum()) + 7) // 8


def huffman_encode(symbols: np.ndarray, alphabet: int) -> bytes:
    """Table (canonical code lengths) and bit stream of ``symbols`` in ``[0, alphabet)``."""
    counts = np.bincount(symbols, minlength=alphabet)
    lengths = code_lengths(counts)
    codes, order = canonical_codes(lengths)
    used = np.flatnonzero(counts)
    if order.size == 0:  # zero or one distinct symbol
        order = used
    max_len = int(lengths.max(initial=0))
    per_len = np.bincount(lengths[order], minlength=max_len + 1)[1:] if max_len else np.zeros(0, dtype=np.int64)
    head = struct.pack(f"<HB{max_len}H", order.size, max_len, *per_len.tolist())
    head += order.astype("<u1" if alphabet <= 256 else "<u2").tobytes()
    lens, vals = lengths[symbols], codes[symbols]
    starts = np.cumsum(lens) - lens
    bits = np.zeros(int(lens.sum()), dtype=np.uint8)
    for j in range(max_len):
        m = lens > j
        bits[starts[m] + j] = (vals[m] >> (lens[m] - 1 - j).astype(np.uint64)) & np.uint64(1)
    stream = np.packbits(bits).tobytes()
    return head + struct.pack("<I", len(stream)) + stream


def huffman_decode(buf: memoryview, pos: int, count: int, alphabet: int) -> tuple[np.ndarray, int]:
    """Inverse of :func:`huffman_encode`: ``count`` symbols read at ``pos``, and the position after them."""
    nsym, max_len = struct.unpack_from("<HB", buf, pos)
    per_len = np.asarray(struct.unpack_from(f"<{max_len}H", buf, pos + 3), dtype=np.int64)
    pos += 3 + 2 * max_len
    dtype = np.dtype("<u1" if alphabet <= 256 else "<u2")
    order = np.frombuffer(buf, dtype=dtype, count=nsym, offset=pos).astype(np.int64)
    pos += nsym * dtype.itemsize
    (nbytes,) = struct.unpack_from("<I", buf, pos)
    pos += 4
    if max_len == 0:
        return np.full(count, order[0] if nsym else 0, dtype=np.int64), pos + nbytes
    bits = np.unpackbits(np.frombuffer(buf, dtype=np.uint8, count=nbytes, offset=pos))
    bits = np.concatenate([bits, np.zeros(max_len, dtype=np.uint8)]).astype(np.int64)
    window = np.zeros(bits.size - max_len, dtype=np.int64)  # the next max_len bits at every bit position
    for j in range(max_len):
        window = (window << 1) | bits[j : j + window.size]
    first = np.zeros(max_len + 1, dtype=np.int64)  # first canonical code of each length
    for length in range(2, max_len + 1):
        first[length] = (first[length - 1] + per_len[length - 2]) << 1
    upper = (first[1:] + per_len) << (max_len - np.arange(1, max_len + 1))
    length_at = np.minimum(np.searchsorted(upper, window, side="right") + 1, max_len)
    offset = np.concatenate([[0], np.cumsum(per_len)])
    index = offset[length_at - 1] + (window >> (max_len - length_at)) - first[length_at]
    steps, starts, p = length_at.tolist(), [], 0
    for _ in range(count):
        starts.append(p)
        p += steps[p]
    return order[np.clip(index[starts], 0, nsym - 1)], pos + nbytes


# ----------------------------------------------------------------------------- relative indices
def relative_entries(flat: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Gap symbols (zeros skipped, ≤ 2^width − 1) and the flat positions they land on, fillers included."""
    positions = np.flatnonzero(flat)
    gaps = np.diff(positions, prepend=-1) - 1
    fillers = gaps >> width
    last = np.cumsum(fillers + 1) - 1  # entry of each nonzero
    symbols = np.full(int(last[-1]) + 1 if last.size else 0, 2**width - 1, dtype=np.int64)
    symbols[last] = gaps - (fillers << width)
    return symbols, np.cumsum(symbols + 1) - 1


def _level_symbols(values: np.ndarray, q: float, levels: int, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Code of every stored value (0 for fillers) and the level table; raise unless every value is a level."""
    mags = np.arange(1, levels + 1, dtype=np.float32) * np.float32(q)
    table = np.concatenate([np.zeros(1, np.float32), mags, -mags])
    k = np.clip(np.rint(np.abs(values) / np.float32(q)), 0, levels).astype(np.int64)
    symbols = np.where(values < 0, k + levels, k) * (values != 0)
    if not np.array_equal(table[symbols], values):
        raise ValueError(f"{name}: weights are not on their levels ±k·q (q={q}, k = 1…{levels}); snap them first")
    return symbols, table


def _encode_sparse(flat: np.ndarray, spec: tuple[float, int] | None, name: str) -> bytes:
    """Width, entry count, [q, M], gap stream and value stream of one layer, at the width that stores it smallest."""
    best = None
    for width in WIDTHS:
        symbols, at = relative_entries(flat, width)
        counts = np.bincount(symbols, minlength=2**width)
        lengths = code_lengths(counts)
        size = _table_bytes(lengths, 2**width) + _stream_bytes(counts, lengths)
        if spec is None:
            size += 4 * symbols.size
        else:
            codes, _ = _level_symbols(flat[at], *spec, name)
            c_counts = np.bincount(codes, minlength=2 * spec[1] + 1)
            c_lengths = code_lengths(c_counts)
            size += _table_bytes(c_lengths, c_counts.size) + _stream_bytes(c_counts, c_lengths)
        if best is None or size < best[0]:
            best = (size, width, symbols, at)
        if symbols.size == np.count_nonzero(flat):  # no filler left: wider gaps only cost more
            break
    _, width, symbols, at = best
    out = struct.pack("<BI", width, symbols.size)
    if spec is not None:
        out += struct.pack("<fH", spec[0], spec[1])
    out += huffman_encode(symbols, 2**width)
    if spec is None:
        return out + flat[at].astype("<f4").tobytes()
    return out + huffman_encode(_level_symbols(flat[at], *spec, name)[0], 2 * spec[1] + 1)


def encode(state_dict: Mapping[str, torch.Tensor], prunable_names, codes=None) -> bytes:
    """The stored form of ``state_dict`` (format in the module docstring).

    Args:
        state_dict: tensors to store, in order.
        prunable_names: keys of the pruned weights, stored sparse (relative indices + values).
        codes: ``{key: (q, levels per side M)}`` of quantized weights (values on ``±k·q``, k = 1…M, or zero),
            stored as Huffman-coded level codes instead of float32.
    """
    codes = dict(codes or {})
    sparse = set(prunable_names) | set(codes)
    missing = sorted(sparse - set(state_dict))
    if missing:
        raise KeyError(f"not in the state dict: {missing}")
    out = [MAGIC, struct.pack("<BI", VERSION, len(state_dict))]
    for name, tensor in state_dict.items():
        t = tensor.detach().cpu()
        arr = (t.float() if t.is_floating_point() else t).numpy()
        head = name.encode()
        head = struct.pack("<H", len(head)) + head
        shape = struct.pack(f"<B{arr.ndim}I", arr.ndim, *arr.shape)
        raw = np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<"))
        dtype = raw.dtype.str.encode()
        raw_blob = struct.pack("<B", len(dtype)) + dtype + raw.tobytes()
        if name in sparse:
            kind = 2 if name in codes else 1
            blob = _encode_sparse(arr.reshape(-1), codes.get(name), name)
            if kind == 2 or len(blob) < len(raw_blob):
                out.append(head + struct.pack("<B", kind) + shape + blob)
                continue
        out.append(head + struct.pack("<B", 0) + shape + raw_blob)
    return b"".join(out)


def decode(blob: bytes) -> dict[str, torch.Tensor]:
    """Inverse of :func:`encode`: the state dict, with every stored weight restored bit for bit."""
    buf = memoryview(blob)
    if bytes(buf[:4]) != MAGIC:
        raise ValueError("not a prunelab stored model (bad magic)")
    version, count = struct.unpack_from("<BI", buf, 4)
    if version != VERSION:
        raise ValueError(f"stored model version {version} is not supported (expected {VERSION})")
    pos, state = 9, {}
    for _ in range(count):
        (n,) = struct.unpack_from("<H", buf, pos)
        name = bytes(buf[pos + 2 : pos + 2 + n]).decode()
        kind, ndim = struct.unpack_from("<BB", buf, pos + 2 + n)
        pos += 4 + n
        shape = struct.unpack_from(f"<{ndim}I", buf, pos)
        pos += 4 * ndim
        size = int(np.prod(shape))
        if kind == 0:
            (n,) = struct.unpack_from("<B", buf, pos)
            dtype = np.dtype(bytes(buf[pos + 1 : pos + 1 + n]).decode())
            pos += 1 + n
            arr = np.frombuffer(buf, dtype=dtype, count=size, offset=pos).copy()
            pos += size * dtype.itemsize
        else:
            width, entries = struct.unpack_from("<BI", buf, pos)
            pos += 5
            if kind == 2:
                q, levels = struct.unpack_from("<fH", buf, pos)
                pos += 6
            gaps, pos = huffman_decode(buf, pos, entries, 2**width)
            if kind == 1:
                values = np.frombuffer(buf, dtype="<f4", count=entries, offset=pos)
                pos += 4 * entries
            else:
                symbols, pos = huffman_decode(buf, pos, entries, 2 * levels + 1)
                mags = np.arange(1, levels + 1, dtype=np.float32) * np.float32(q)
                values = np.concatenate([np.zeros(1, np.float32), mags, -mags])[symbols]
            arr = np.zeros(size, dtype=np.float32)
            arr[np.cumsum(gaps + 1) - 1] = values
        state[name] = torch.from_numpy(arr.astype(arr.dtype.newbyteorder("="), copy=False).reshape(shape))
    return state
