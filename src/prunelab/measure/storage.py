"""Bytes on disk: the dense float32 model vs the stored pruned form.

:func:`save_encoded` writes the form papers count (relative indices + Huffman coding, :mod:`.encoding`);
:func:`save_sparse` (bitmask + float32 values in an .npz) is the plain form it is compared with.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from prunelab.measure.encoding import decode, encode


def _arrays(net: nn.Module, sparse: set[str]) -> dict[str, np.ndarray]:
    """float32 arrays of every parameter and buffer; tensors named in ``sparse`` stored as a bitmask of nonzeros plus
    their values whenever that is smaller than the dense array."""
    out: dict[str, np.ndarray] = {}
    for name, tensor in net.state_dict().items():
        arr = tensor.detach().cpu().numpy()
        if arr.dtype.kind == "f":
            arr = arr.astype(np.float32)
        if name in sparse:
            flat = arr.reshape(-1)
            nz = flat != 0
            bits = np.packbits(nz)
            if bits.nbytes + int(nz.sum()) * 4 < arr.nbytes:
                out[f"{name}::bitmask"] = bits
                out[f"{name}::values"] = flat[nz]
                out[f"{name}::shape"] = np.asarray(arr.shape, dtype=np.int64)
                continue
        out[name] = arr
    return out


def save_dense(net: nn.Module, path: str | os.PathLike) -> int:
    """Write every tensor as a dense float32 array (uncompressed .npz); return the file size in bytes."""
    np.savez(path, **_arrays(net, set()))
    return Path(path).stat().st_size


def save_sparse(net: nn.Module, path: str | os.PathLike, prunable: list[str]) -> int:
    """Write the pruned model with its prunable weights as bitmask + values (uncompressed .npz); return its size."""
    np.savez(path, **_arrays(net, {f"{n}.weight" for n in prunable}))
    return Path(path).stat().st_size


def load_sparse(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Inverse of :func:`save_sparse`: a state dict with the zeros restored."""
    data = np.load(path)
    state: dict[str, torch.Tensor] = {}
    for key in data.files:
        if "::" not in key:
            state[key] = torch.from_numpy(data[key])
        elif key.endswith("::bitmask"):
            name = key[: -len("::bitmask")]
            shape = tuple(data[f"{name}::shape"])
            count = int(np.prod(shape))
            nz = np.unpackbits(data[key], count=count).astype(bool)
            flat = np.zeros(count, dtype=np.float32)
            flat[nz] = data[f"{name}::values"]
            state[name] = torch.from_numpy(flat.reshape(shape))
    return state


def save_encoded(
    net: nn.Module, path: str | os.PathLike, prunable: list[str], codes: dict[str, tuple[float, int]] | None = None
) -> int:
    """Write ``net`` in the stored form of :func:`prunelab.measure.encoding.encode`; return the file size in bytes.

    Args:
        net: the pruned network.
        path: file to write.
        prunable: module names whose ``weight`` is stored sparse (names the network no longer has, e.g. layers a
            method replaced, are skipped as in :func:`save_sparse`).
        codes: ``{module name: (q, levels per side)}`` of quantized layers (weights on ``±k·q`` or zero).
    """
    state = net.state_dict()
    blob = encode(
        state,
        [f"{n}.weight" for n in prunable if f"{n}.weight" in state],
        {f"{n}.weight": spec for n, spec in (codes or {}).items()},
    )
    Path(path).write_bytes(blob)
    return Path(path).stat().st_size


def load_encoded(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Inverse of :func:`save_encoded`: the state dict, bit for bit."""
    return decode(Path(path).read_bytes())
