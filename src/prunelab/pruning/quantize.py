"""ADMM-NN weight quantization (Ren et al., ASPLOS 2019, arXiv 1812.11677; Ye et al. 2018, arXiv 1811.01907;
docs/methods/admm.md, "Quantization phase").

Levels are uniform, symmetric and exclude zero: ``{±q, ±2q, …, ±Mq}``; exact zeros (pruned weights) stay zero. The
stored form written by :func:`save_quantized` is what ``bytes_stored`` counts: per quantized layer Huffman-coded
relative indices and Huffman-coded level codes plus one float32 step ``q`` (Han et al. 2016's Deep Compression
encoding, :mod:`prunelab.measure.encoding`); every other tensor as raw float32.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping

import torch
from torch import nn

from prunelab.measure.storage import load_encoded, save_encoded

SPEC_KEYS = ("bits", "levels_per_side", "share")
SHARE = 0.25  # the quantization phase's default share of the fit (finetune.epochs=auto adds it to the budget)


def levels_from_bits(bits: int) -> int:
    """Levels per side for a ``bits``-bit code including zero: M = 2^(b−1) − 1 (ADMM-NN's 63/31/7 ↔ 7/6/4 bits)."""
    return 2 ** (bits - 1) - 1


class QuantSpec:
    """Per-layer levels from ``bits`` or ``levels_per_side`` (an int for every layer, or ``{layer: int}``), and the
    ``share`` of the fit the quantization phase takes (its ADMM iterations and the retraining on its levels)."""

    def __init__(self, bits=None, levels_per_side=None, share: float = SHARE) -> None:
        if (bits is None) == (levels_per_side is None):
            raise ValueError(
                f"pruning.quantize needs exactly one of bits / levels_per_side, got bits={bits!r}, "
                f"levels_per_side={levels_per_side!r}"
            )
        key, value, low = ("bits", bits, 2) if bits is not None else ("levels_per_side", levels_per_side, 1)
        table = dict(value) if isinstance(value, Mapping) else {None: value}
        for name, v in table.items():
            if isinstance(v, bool) or not isinstance(v, int) or not low <= v <= (16 if key == "bits" else 32767):
                where = f"pruning.quantize.{key}" + (f".{name}" if name is not None else "")
                raise ValueError(f"{where}={v!r} must be an integer in [{low}, {16 if key == 'bits' else 32767}]")
        if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0.0 < share < 1.0:
            raise ValueError(f"pruning.quantize.share={share!r} must be a number in (0, 1)")
        self.share = float(share)
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
            raise ValueError(
                f"pruning.quantize.{self.key} must list every pruned layer {names}: "
                f"missing {missing}, unknown {unknown}"
            )

    def levels(self, name: str) -> int:
        return self.table.get(name, self.table.get(None))


def quantize(x: torch.Tensor, q: float, levels: int) -> torch.Tensor:
    """Nearest level of every nonzero of ``x`` in ``{±q, …, ±Mq}`` (midpoint boundaries); zeros stay zero."""
    mag = torch.clamp(torch.round(x.abs() / q), 1, levels)
    return torch.where(x == 0, torch.zeros_like(x), torch.sign(x) * (mag * q))


def search_step(w: torch.Tensor, levels: int, low: float = 0.2, high: float = 1.2, points: int = 1001) -> float:
    """Step q minimising Σ(w − nearest level)² over the nonzeros of ``w``, searched over [low·a, high·a] with
    a = max|w|/M (``points`` evenly spaced candidates). ADMM-NN's own scan (:func:`scan_step`, [0.9a, 1.1a]) puts the
    largest weight near the top level; with 3 levels a side that leaves most of the kept weights on ±q, so the range
    reaches down to where clipping the few largest weights costs less than rounding the many. Returned as a
    float32-exact value."""
    vals = w.detach()[w != 0].abs().double().cpu()
    if vals.numel() == 0:
        return 1.0
    a = float(vals.max()) / levels
    cands = torch.tensor(
        [a * (low + (high - low) * i / (points - 1)) for i in range(points)], dtype=torch.float32
    ).double()
    errs = torch.empty(points, dtype=torch.float64)
    for i in range(0, points, 64):  # chunks keep the (candidates × weights) table small
        q = cands[i : i + 64, None]
        errs[i : i + 64] = ((vals[None] - torch.clamp(torch.round(vals[None] / q), 1, levels) * q) ** 2).sum(1)
    return float(cands[int(torch.argmin(errs))])


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
def save_quantized(net: nn.Module, path: str | os.PathLike, steps: dict[str, tuple[float, int]]) -> int:
    """Write ``net`` in its stored form (:mod:`prunelab.measure.encoding`) and return the file size in bytes.

    Args:
        net: the network; weights of the layers in ``steps`` must already sit on their levels (or zero).
        path: file to write.
        steps: ``{module name: (q, levels per side)}`` of the quantized layers.
    """
    return save_encoded(net, path, list(steps), steps)


def load_quantized(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Inverse of :func:`save_quantized`: the state dict, zeros and levels restored exactly."""
    return load_encoded(path)


@torch.no_grad()
def project_levels(xs: dict[str, torch.Tensor], steps: dict[str, float], spec: QuantSpec) -> dict[str, torch.Tensor]:
    """Q: every nonzero of every layer to its nearest nonzero level, zeros stay zero (ADMM-NN's clustering
    projection), with each layer's step of ``steps`` and its levels of ``spec``."""
    return {n: quantize(x, steps[n], spec.levels(n)) for n, x in xs.items()}
