"""ADMM-NN weight quantization (Ye et al. 2019, arXiv 1812.11677; METHODS.md §1 "ADMM-NN quantization projection").

Levels are uniform, symmetric and exclude zero: ``{±q, ±2q, …, ±Mq}``; exact zeros (pruned weights) stay zero. The
stored form written by :func:`save_quantized` is what ``bytes_stored`` counts: per quantized layer the positions of the
nonzeros (a bitmask, or relative indices with an escape code, whichever is smaller), one sign+magnitude code of
``1 + ⌈log2 M⌉`` bits per nonzero and one float32 step ``q``; every other tensor as raw float32.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from torch import nn

MAGIC = b"PLQ1"
SPEC_KEYS = ("bits", "levels_per_side")


def levels_from_bits(bits: int) -> int:
    """Levels per side for a ``bits``-bit code including zero: M = 2^(b−1) − 1 (ADMM-NN's 63/31/7 ↔ 7/6/4 bits)."""
    return 2 ** (bits - 1) - 1


def code_bits(levels: int) -> int:
    """Bits of one stored code: a sign bit and the magnitude index 1…M."""
    return 1 + math.ceil(math.log2(levels)) if levels > 1 else 1


class QuantSpec:
    """Per-layer levels from ``bits`` or ``levels_per_side`` (an int for every layer, or ``{layer: int}``)."""

    def __init__(self, bits=None, levels_per_side=None) -> None:
        if (bits is None) == (levels_per_side is None):
            raise ValueError(f"pruning.quantize needs exactly one of bits / levels_per_side, got bits={bits!r}, "
                             f"levels_per_side={levels_per_side!r}")
        key, value, low = ("bits", bits, 2) if bits is not None else ("levels_per_side", levels_per_side, 1)
        table = dict(value) if isinstance(value, Mapping) else {None: value}
        for name, v in table.items():
            if isinstance(v, bool) or not isinstance(v, int) or not low <= v <= (16 if key == "bits" else 32767):
                where = f"pruning.quantize.{key}" + (f".{name}" if name is not None else "")
                raise ValueError(f"{where}={v!r} must be an integer in [{low}, {16 if key == 'bits' else 32767}]")
        self.key = key
        self.table = {n: levels_from_bits(v) if key == "bits" else v for n, v in table.items()}

    @classmethod
    def from_config(cls, spec) -> QuantSpec | None:
        """``None`` (no quantization) or a mapping with ``bits`` or ``levels_per_side``."""
        if spec is None:
            return None
        if not isinstance(spec, Mapping):
            raise ValueError(f"pruning.quantize={spec!r} must be null or a mapping with bits or levels_per_side")
        unknown = sorted(set(spec) - set(SPEC_KEYS))
        if unknown:
            raise ValueError(f"Unknown option(s) {unknown} in pruning.quantize; valid: {', '.join(SPEC_KEYS)}")
        return cls(**{k: spec[k] for k in spec})

    def check_layers(self, names: list[str]) -> None:
        """Raise unless a per-layer table names exactly the quantized layers."""
        if None in self.table:
            return
        missing, unknown = sorted(set(names) - set(self.table)), sorted(set(self.table) - set(names))
        if missing or unknown:
            raise ValueError(f"pruning.quantize.{self.key} must list every pruned layer {names}: "
                             f"missing {missing}, unknown {unknown}")

    def levels(self, name: str) -> int:
        return self.table.get(name, self.table.get(None))


def quantize(x: torch.Tensor, q: float, levels: int) -> torch.Tensor:
    """Nearest level of every nonzero of ``x`` in ``{±q, …, ±Mq}`` (midpoint boundaries); zeros stay zero."""
    mag = torch.clamp(torch.round(x.abs() / q), 1, levels)
    return torch.where(x == 0, torch.zeros_like(x), torch.sign(x) * (mag * q))


def scan_step(w: torch.Tensor, levels: int) -> float:
    """Step q minimising Σ(w − nearest level)² over the nonzeros of ``w``, scanned over [0.9a, 1.1a] in steps of
    0.001a with a = max|w|/M (ADMM-NN's interval initialisation). Returned as a float32-exact value."""
    vals = w.detach()[w != 0].abs().double().cpu()
    if vals.numel() == 0:
        return 1.0
    a = float(vals.max()) / levels
    best_q, best_err = a, math.inf
    for i in range(201):
        q = float(torch.tensor(a * (0.9 + 0.001 * i), dtype=torch.float32))
        err = float(((vals - torch.clamp(torch.round(vals / q), 1, levels) * q) ** 2).sum())
        if err < best_err:
            best_q, best_err = q, err
    return best_q


# ----------------------------------------------------------------------------- stored form
def _pack(values: np.ndarray, width: int) -> bytes:
    """Big-endian bit-packing of unsigned ints, ``width`` bits each."""
    if width == 0 or values.size == 0:
        return b""
    bits = (values.astype(np.uint64)[:, None] >> np.arange(width - 1, -1, -1, dtype=np.uint64)) & np.uint64(1)
    return np.packbits(bits.astype(np.uint8).reshape(-1)).tobytes()


def _unpack(buf: bytes, count: int, width: int) -> np.ndarray:
    if width == 0 or count == 0:
        return np.zeros(count, dtype=np.int64)
    bits = np.unpackbits(np.frombuffer(buf, dtype=np.uint8), count=count * width).reshape(count, width)
    return (bits.astype(np.int64) << np.arange(width - 1, -1, -1)).sum(axis=1)


def _relative_entries(positions: np.ndarray, width: int) -> np.ndarray:
    """Gaps between nonzeros (first one from −1), ``width`` bits each; 0 is an escape meaning "skip 2^width − 1
    positions" (Han et al. 2016's filler idea, without a stored filler value)."""
    top = 2**width - 1
    gaps = np.diff(positions, prepend=-1)
    escapes = (gaps - 1) // top
    out = np.zeros(int((escapes + 1).sum()), dtype=np.int64)
    out[np.cumsum(escapes + 1) - 1] = gaps - escapes * top
    return out


def _positions(entries: np.ndarray, width: int) -> np.ndarray:
    steps = np.where(entries == 0, 2**width - 1, entries)
    return (np.cumsum(steps) - 1)[entries != 0]


def _encode_layer(w: np.ndarray, q: float, levels: int) -> tuple[dict, bytes]:
    flat = w.reshape(-1)
    positions = np.flatnonzero(flat)
    k = np.rint(np.abs(flat[positions]) / np.float32(q)).astype(np.int64)
    if positions.size and (k.min() < 1 or k.max() > levels or not np.array_equal(
            np.sign(flat[positions]) * (k.astype(np.float32) * np.float32(q)), flat[positions])):
        raise ValueError("weights are not on their quantization levels; snap them before saving")
    width = code_bits(levels)
    codes = ((flat[positions] < 0).astype(np.int64) << (width - 1)) | (k - 1)
    best = ("bitmask", 0, np.packbits(flat != 0).tobytes(), 0)
    for iw in range(1, 25):
        entries = _relative_entries(positions, iw)
        if (entries.size * iw + 7) // 8 < len(best[2]):
            best = ("relative", iw, _pack(entries, iw), int(entries.size))
    kind, iw, index, n_index = best
    meta = {"enc": kind, "iw": iw, "n_index": n_index, "nnz": int(positions.size), "q": float(q), "levels": levels,
            "index_bytes": len(index)}
    return meta, index + _pack(codes, width)


def save_quantized(net: nn.Module, path: str | os.PathLike, steps: dict[str, tuple[float, int]]) -> int:
    """Write ``net`` in its stored form and return the file size in bytes.

    Args:
        net: the network; weights of the layers in ``steps`` must already sit on their levels (or zero).
        path: file to write.
        steps: ``{module name: (q, levels per side)}`` of the quantized layers.
    """
    header, blobs, offset = [], [], 0
    for name, tensor in net.state_dict().items():
        arr = tensor.detach().cpu().numpy()
        module = name[: -len(".weight")] if name.endswith(".weight") else None
        entry = {"name": name, "shape": list(arr.shape)}
        if module in steps:
            meta, blob = _encode_layer(arr.astype(np.float32), *steps[module])
            entry.update(meta)
        else:
            arr = arr.astype(np.float32) if arr.dtype.kind == "f" else arr
            entry.update(enc="raw", dtype=str(arr.dtype))
            blob = np.ascontiguousarray(arr).tobytes()
        entry["offset"], entry["nbytes"] = offset, len(blob)
        header.append(entry)
        blobs.append(blob)
        offset += len(blob)
    head = json.dumps(header, separators=(",", ":")).encode()
    with open(path, "wb") as f:
        f.write(MAGIC + struct.pack("<I", len(head)) + head + b"".join(blobs))
    return Path(path).stat().st_size


def load_quantized(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Inverse of :func:`save_quantized`: the state dict, zeros and levels restored exactly."""
    data = Path(path).read_bytes()
    if data[:4] != MAGIC:
        raise ValueError(f"{path} is not a prunelab quantized file")
    (n,) = struct.unpack("<I", data[4:8])
    header, body = json.loads(data[8 : 8 + n]), data[8 + n :]
    state = {}
    for e in header:
        blob, shape = body[e["offset"] : e["offset"] + e["nbytes"]], tuple(e["shape"])
        if e["enc"] == "raw":
            state[e["name"]] = torch.from_numpy(np.frombuffer(blob, dtype=e["dtype"]).reshape(shape).copy())
            continue
        count = int(np.prod(shape))
        index, codes = blob[: e["index_bytes"]], blob[e["index_bytes"] :]
        if e["enc"] == "bitmask":
            positions = np.flatnonzero(np.unpackbits(np.frombuffer(index, dtype=np.uint8), count=count))
        else:
            positions = _positions(_unpack(index, e["n_index"], e["iw"]), e["iw"])
        width = code_bits(e["levels"])
        c = _unpack(codes, e["nnz"], width)
        sign = np.where(c >> (width - 1) == 1, -1.0, 1.0).astype(np.float32)
        k = ((c & (2 ** (width - 1) - 1)) + 1).astype(np.float32)
        flat = np.zeros(count, dtype=np.float32)
        flat[positions] = sign * (k * np.float32(e["q"]))
        state[e["name"]] = torch.from_numpy(flat.reshape(shape))
    return state
