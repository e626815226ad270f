"""Architecture changes as data: layers replaced by a three-stage bottleneck, described and rebuilt.

EigenDamage (Wang et al. 2019, arXiv 1905.05934) replaces a Conv2d/Linear by ``rotate_in`` (a 1×1 conv or Linear into
the kept input eigen-directions) → ``core`` (the layer's own kernel between the kept directions) → ``rotate_out`` (a
1×1 conv or Linear back to the original outputs). The outer widths do not change, so the replaced layer fits wherever
the original did, residual additions included.

:func:`describe` turns a network's replacements into plain JSON-able data (which layer became which bottleneck, with
the geometry of each stage); :func:`rebuild` applies such a description to a network built from its config, so that a
checkpoint or a saved state dict loads into it. The Lightning checkpoint carries the description under
:data:`CHECKPOINT_KEY`; the MLflow run carries it as ``weights/architecture.json`` (:func:`log_description`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

FORMAT = 1
CHECKPOINT_KEY = "prunelab_architecture"
STAGES = ("rotate_in", "core", "rotate_out")


def layer_spec(layer: nn.Module) -> dict[str, Any]:
    """Geometry of a Conv2d or Linear as plain data (no weights)."""
    if isinstance(layer, nn.Linear):
        return {"type": "linear", "in": layer.in_features, "out": layer.out_features, "bias": layer.bias is not None}
    if isinstance(layer, nn.Conv2d):
        return {
            "type": "conv2d",
            "in": layer.in_channels,
            "out": layer.out_channels,
            "kernel": list(layer.kernel_size),
            "stride": list(layer.stride),
            "padding": list(layer.padding),
            "dilation": list(layer.dilation),
            "bias": layer.bias is not None,
        }
    raise TypeError(f"no spec for a {type(layer).__name__}: only Conv2d and Linear layers")


def make_layer(spec: dict[str, Any], device=None, dtype=None) -> nn.Module:
    """An uninitialised-looking (PyTorch-default) Conv2d/Linear with the geometry of ``spec``."""
    if spec["type"] == "linear":
        return nn.Linear(spec["in"], spec["out"], bias=spec["bias"], device=device, dtype=dtype)
    if spec["type"] == "conv2d":
        return nn.Conv2d(
            spec["in"],
            spec["out"],
            tuple(spec["kernel"]),
            stride=tuple(spec["stride"]),
            padding=tuple(spec["padding"]),
            dilation=tuple(spec["dilation"]),
            bias=spec["bias"],
            device=device,
            dtype=dtype,
        )
    raise ValueError(f"unknown layer type {spec['type']!r} in an architecture description")


class BottleneckLayer(nn.Module):
    """``rotate_out(core(rotate_in(x)))``: a Conv2d/Linear replaced by three layers of the same kind.

    Args:
        stages: the specs (:func:`layer_spec`) of ``rotate_in``, ``core`` and ``rotate_out``.
        device, dtype: where the new parameters live.
    """

    def __init__(self, stages: list[dict[str, Any]], device=None, dtype=None) -> None:
        super().__init__()
        if len(stages) != 3 or stages[0]["out"] != stages[1]["in"] or stages[1]["out"] != stages[2]["in"]:
            raise ValueError(f"a bottleneck needs three chained stages, got {stages}")
        self.rotate_in, self.core, self.rotate_out = (make_layer(s, device, dtype) for s in stages)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rotate_out(self.core(self.rotate_in(x)))

    def stages(self) -> list[dict[str, Any]]:
        return [layer_spec(getattr(self, s)) for s in STAGES]

    @property
    def widths(self) -> tuple[int, int]:
        """(kept input directions, kept output directions)."""
        return self.stages()[1]["in"], self.stages()[1]["out"]


def outer_shape(layer: nn.Module) -> tuple[str, int, int]:
    """(kind, inputs, outputs) seen from outside: what a replacement must keep."""
    if isinstance(layer, BottleneckLayer):
        first, last = layer.stages()[0], layer.stages()[2]
        return first["type"], first["in"], last["out"]
    spec = layer_spec(layer)
    return spec["type"], spec["in"], spec["out"]


def replace(net: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` where the submodule ``name`` of ``net`` is (same attribute, same place in the module order)."""
    parent, _, attr = name.rpartition(".")
    setattr(net.get_submodule(parent) if parent else net, attr, module)


def describe(net: nn.Module) -> dict[str, Any]:
    """Which layers of ``net`` are bottlenecks, with their stages' geometry (plain data, JSON-able)."""
    replaced = {name: {"stages": m.stages()} for name, m in net.named_modules() if isinstance(m, BottleneckLayer)}
    return {"format": FORMAT, "bottlenecks": replaced}


def rebuild(net: nn.Module, description: dict[str, Any]) -> nn.Module:
    """Replace the layers of ``net`` named in ``description`` by bottlenecks of the described widths (in place; the
    weights are placeholders until a state dict is loaded). Returns ``net``.

    Raises:
        ValueError: unknown format, a name that is not a Conv2d/Linear/bottleneck of ``net``, or a bottleneck whose
            outer shape does not match the layer it replaces.
    """
    if description.get("format") != FORMAT:
        raise ValueError(f"architecture description format {description.get('format')!r}; this version reads {FORMAT}")
    modules = dict(net.named_modules())
    for name, entry in description["bottlenecks"].items():
        old = modules.get(name)
        if not isinstance(old, (nn.Conv2d, nn.Linear, BottleneckLayer)):
            raise ValueError(
                f"architecture description names {name!r}, which is not a Conv2d, Linear or bottleneck "
                f"of this {type(net).__name__}"
            )
        param = next(old.parameters())
        new = BottleneckLayer(entry["stages"], device=param.device, dtype=param.dtype)
        if outer_shape(new) != outer_shape(old):
            raise ValueError(
                f"bottleneck for {name!r} is {outer_shape(new)} (kind, in, out); the layer it replaces "
                f"is {outer_shape(old)}: the description belongs to another model"
            )
        replace(net, name, new)
    return net


def log_description(net: nn.Module, artifact_file: str = "weights/architecture.json") -> None:
    """Log :func:`describe` of ``net`` to the active MLflow run, next to the model's weights."""
    import mlflow

    mlflow.log_dict(describe(net), artifact_file)
