"""Shared pieces of the latency measurement: the result record, input batches, interleaving and summaries."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass
class LatencyResult:
    """Metrics with docs/mlflow.md names (ms, speedups), every raw sample (ms, JSON-ready) and run params (strings)."""

    metrics: dict[str, float] = field(default_factory=dict)
    samples: dict = field(default_factory=dict)
    params: dict[str, str] = field(default_factory=dict)

    def update(self, other: LatencyResult) -> None:
        self.metrics.update(other.metrics)
        self.samples.update(other.samples)
        self.params.update(other.params)


def make_batch(example_input: torch.Tensor, size: int, device=None, dtype=None) -> torch.Tensor:
    """A random batch of ``size`` inputs shaped like ``example_input`` (seeded by the size, so reruns match)."""
    gen = torch.Generator().manual_seed(size)
    x = torch.randn((size, *example_input.shape[1:]), generator=gen)
    return x.to(device=device or example_input.device, dtype=dtype or example_input.dtype)


def interleave(time_block: Callable, models: dict, blocks: int) -> dict[str, list]:
    """``time_block(model) -> list of ms`` for every model in every block, order alternating; raw lists per model."""
    raw: dict[str, list] = {name: [] for name in models}
    names = list(models)
    for b in range(blocks):
        for name in names if b % 2 == 0 else names[::-1]:
            raw[name].append(time_block(models[name]))
    return raw


def record(prefix: str, batch: int, raw: dict[str, list], result: LatencyResult, labels=("dense", "pruned")) -> None:
    """Median/IQR of the block medians of both models, the median paired speedup, and the raw samples."""
    tag = f"{prefix}_b{batch}"
    medians = {k: [float(np.median(block)) for block in raw[k]] for k in labels}
    dense, pruned = medians[labels[0]], medians[labels[1]]
    for name, values in (("latency", pruned), ("dense_latency", dense)):
        q1, med, q3 = np.percentile(values, [25, 50, 75])
        result.metrics[f"{name}_{tag}_ms"] = float(med)
        result.metrics[f"{name}_{tag}_iqr_ms"] = float(q3 - q1)
    result.metrics[f"speedup_{tag}"] = float(np.median([d / p for d, p in zip(dense, pruned)]))
    result.samples[tag] = {k: raw[k] for k in labels}
