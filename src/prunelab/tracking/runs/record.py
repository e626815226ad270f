"""What a run records in MLflow, and the one-screen summary printed at its end."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf

# Final metrics every run logs (docs/mlflow.md); dashboards and the regression gate read these names.
FINAL_METRICS = (
    "test_acc",
    "dense_test_acc",
    "acc_drop",
    "sparsity",
    "compression",
    "compression_compacted",
    "params",
    "params_nonzero",
    "macs",
    "dense_macs",
    "macs_reduction",
    "bytes_dense",
    "bytes_stored",
    "storage_compression",
)


# Config keys left out of the params: the fixed params name the data, model and method (``names.*`` and the groups'
# ``_target_``), and paths and the logger's own settings describe the machine, not the experiment. config.yaml, an
# artifact of every run, keeps everything.
_GROUP_TARGETS = ("data", "model", "pruning", "trainer")
_MACHINE_KEYS = (
    "names.",
    "paths.",
    "data.data_dir",
    "trainer.default_root_dir",
    "logger.experiment_name",
    "logger.tracking_uri",
    "logger.artifact_location",
    "logger.run_name",
)


def flatten(cfg: DictConfig) -> dict[str, str]:
    """Resolved config as ``{"a.b.c": "value"}`` strings, for MLflow params.

    A nested object's ``_target_`` becomes the value of its own key with the class name only
    (``finetune.optimizer: Adam``); ``_partial_`` flags, the groups' targets and machine-specific keys are left out.
    """
    out: dict[str, str] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            target = node.get("_target_")
            if target is not None and prefix not in _GROUP_TARGETS:
                out[prefix] = str(target).rsplit(".", 1)[-1]
            for k, v in node.items():
                if k not in ("_target_", "_partial_"):
                    walk(v, f"{prefix}.{k}" if prefix else str(k))
        elif not prefix.startswith(_MACHINE_KEYS):
            out[prefix] = str(node)

    walk(OmegaConf.to_container(cfg, resolve=True), "")
    return out


def run_params(cfg: DictConfig, describe: dict[str, Any]) -> dict[str, str]:
    """The fixed params (docs/mlflow.md) plus the flattened config."""
    fixed = {
        "method": describe.get("method", "none"),
        "dataset": cfg.names.data,
        "model": cfg.names.model,
        "compression_target": cfg.pruning.compression,
        "granularity": describe.get("granularity", "none"),
        "seed": cfg.seed,
    }
    return {**{k: str(v) for k, v in fixed.items()}, **flatten(cfg)}


def rounded(metrics: dict[str, float], digits: int = 6) -> dict[str, float]:
    """Metrics to ``digits`` significant digits: float32 arithmetic leaves ``84.9999986`` for 85 %, which the UI's
    run list shows as it is. Whole numbers (counts of params, MACs, bytes) are kept exact."""
    return {k: v if float(v).is_integer() else float(f"{v:.{digits}g}") for k, v in metrics.items()}


def _fmt_int(x: float) -> str:
    return f"{x:,.0f}"


def _onnx_slower_unaligned(params: dict[str, str], m: dict[str, float]) -> bool:
    """A network pruned by filters or channels with no ``round_to`` that ONNX Runtime runs slower than the dense one:
    its NCHWc kernels take a convolution only when the channel counts are multiples of the block size."""
    speedups = [m[k] for k in ("speedup_onnx_b64", "speedup_onnx_b1") if k in m]
    aligned = str(params.get("pruning.round_to", "")).isdigit()
    return params.get("granularity") in ("filter", "channel") and bool(speedups) and speedups[0] < 1 and not aligned


def _compacted(m: dict[str, float]) -> str:
    """The compacted model's compression, where compaction removed more than 2 % beyond the masks (filter pruning
    also removes the next layer's inputs from the pruned filters)."""
    after = m.get("compression_compacted")
    return f"   {after:.2f}× after compaction" if after and after > 1.02 * m["compression"] else ""


def summary(
    params: dict[str, str],
    metrics: dict[str, float],
    run_id: str,
    uri: str,
    *,
    warning: str | None = None,
    link: str | None = None,
) -> str:
    """One screen: what ran, what it reached, where it is recorded; ``warning`` (a collapse) gets its own line."""
    m = metrics
    lines = [
        "=" * 72,
        f" prunelab run  {params['method']} ({params['granularity']})  on  {params['dataset']} / {params['model']}"
        f"  seed {params['seed']}",
        "-" * 72,
        f" compression   requested {float(params['compression_target']):.2f}×   achieved {m['compression']:.2f}×"
        f"   (sparsity {m['sparsity']:.4f})" + _compacted(m),
        f" accuracy      dense {m['dense_test_acc']:.2f}%   pruned {m['test_acc']:.2f}%"
        f"   drop {m['acc_drop']:+.2f} pts",
    ]
    if warning:
        lines.append(f" WARNING       {warning}")
    lines += [
        f" params        {_fmt_int(m['params'])} total, {_fmt_int(m['params_nonzero'])} nonzero",
        f" MACs          {_fmt_int(m['macs'])} (dense {_fmt_int(m['dense_macs'])}, {m['macs_reduction']:.2f}× fewer)",
        f" bytes         stored {_fmt_int(m['bytes_stored'])} vs dense {_fmt_int(m['bytes_dense'])}"
        f"  ({m['storage_compression']:.2f}× smaller)",
    ]
    for device, label in (("cpu", "CPU "), ("gpu", "GPU "), ("onnx", "ONNX")):
        parts = [
            f"b{b} {m[f'latency_{device}_b{b}_ms']:.3f} ms ({m[f'speedup_{device}_b{b}']:.2f}× vs dense)"
            for b in (1, 64)
            if f"latency_{device}_b{b}_ms" in m and f"speedup_{device}_b{b}" in m
        ]
        if parts:
            lines.append(f" latency {label}  " + "   ".join(parts))
    if "onnx_max_abs_diff" in m:
        lines.append(f" ONNX          weights/model.onnx, logits within {m['onnx_max_abs_diff']:.1e} of PyTorch")
    if _onnx_slower_unaligned(params, m):
        lines.append(
            " hint          ONNX Runtime's fast CPU convolutions take channel counts in blocks of 8 (AVX2) or 16"
            " (AVX-512): pruning.round_to=8 (docs/own-model.md)"
        )
    lines += ["-" * 72, f" MLflow run {run_id}", f"   store {uri}", f"   browse: {link or 'make ui'}", "=" * 72]
    return "\n".join(lines)
