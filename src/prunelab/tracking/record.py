"""What a run records in MLflow, and the one-screen summary printed at its end."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf

# Final metrics every run logs (DESIGN.md); dashboards and the regression gate read these names.
FINAL_METRICS = (
    "test_acc", "dense_test_acc", "acc_drop",
    "sparsity", "compression",
    "params", "params_nonzero", "macs", "dense_macs", "macs_reduction",
    "bytes_dense", "bytes_stored", "storage_compression",
)


def flatten(cfg: DictConfig) -> dict[str, str]:
    """Resolved config as ``{"a.b.c": "value"}`` strings, for MLflow params."""
    out: dict[str, str] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{prefix}.{k}" if prefix else str(k))
        else:
            out[prefix] = str(node)

    walk(OmegaConf.to_container(cfg, resolve=True), "")
    return out


def run_params(cfg: DictConfig, describe: dict[str, Any]) -> dict[str, str]:
    """The fixed params of DESIGN.md plus the flattened config."""
    fixed = {
        "method": describe.get("method", "none"),
        "dataset": cfg.names.data,
        "model": cfg.names.model,
        "compression_target": cfg.pruning.compression,
        "granularity": describe.get("granularity", "none"),
        "seed": cfg.seed,
    }
    return {**{k: str(v) for k, v in fixed.items()}, **flatten(cfg)}


def _fmt_int(x: float) -> str:
    return f"{x:,.0f}"


def summary(params: dict[str, str], metrics: dict[str, float], run_id: str, uri: str) -> str:
    """One screen: what ran, what it reached, where it is recorded."""
    m = metrics
    lines = [
        "=" * 72,
        f" prunelab run  {params['method']} ({params['granularity']})  on  {params['dataset']} / {params['model']}"
        f"  seed {params['seed']}",
        "-" * 72,
        f" compression   requested {float(params['compression_target']):.2f}×   achieved {m['compression']:.2f}×"
        f"   (sparsity {m['sparsity']:.4f})",
        f" accuracy      dense {m['dense_test_acc']:.2f}%   pruned {m['test_acc']:.2f}%   drop {m['acc_drop']:+.2f} pts",
        f" params        {_fmt_int(m['params'])} total, {_fmt_int(m['params_nonzero'])} nonzero",
        f" MACs          {_fmt_int(m['macs'])} (dense {_fmt_int(m['dense_macs'])}, {m['macs_reduction']:.2f}× fewer)",
        f" bytes         stored {_fmt_int(m['bytes_stored'])} vs dense {_fmt_int(m['bytes_dense'])}"
        f"  ({m['storage_compression']:.2f}× smaller)",
    ]
    for device in ("cpu", "gpu"):
        parts = [f"b{b} {m[f'latency_{device}_b{b}_ms']:.3f} ms ({m[f'speedup_{device}_b{b}']:.2f}× vs dense)"
                 for b in (1, 64) if f"latency_{device}_b{b}_ms" in m and f"speedup_{device}_b{b}" in m]
        if parts:
            lines.append(f" latency {device.upper()}   " + "   ".join(parts))
    lines += ["-" * 72, f" MLflow run {run_id}", f"   store {uri}", "   browse: make ui", "=" * 72]
    return "\n".join(lines)
