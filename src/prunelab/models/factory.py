"""Networks from anywhere (prunelab's, torchvision, timm, a user's ``nn.Module``), built from a Hydra node.

The run adapts to the network: :func:`instantiate_model` passes a shape argument only where the target's signature
names it, under the names of :data:`SHAPE_KWARGS`:

==================  ======================================================================
shape key           constructor parameter
==================  ======================================================================
``num_classes``     ``num_classes``
``num_channels``    ``in_channels`` (prunelab's models), ``in_chans`` (timm)
``image_size``      ``image_size`` (torchvision's ``VisionTransformer``), ``img_size`` (timm)
==================  ======================================================================

A target that takes ``**kwargs`` instead (``torchvision.models.resnet18``) is offered every name, and those its
constructor rejects are dropped. A value the model config sets itself is left as set.

A network whose first ``Conv2d`` wants more channels than one-channel (grayscale) data has is fed by
:class:`RepeatChannels` when ``model.adapt_channels=repeat`` (the default: repeating a gray channel is lossless and is
what an RGB network's own preprocessing does with gray images), or refused before training with ``refuse``; any other
channel mismatch is refused. Every built network then runs one forward of a zeros batch, so a shape that does not fit
fails at build time, naming the model and the input shape.
"""

from __future__ import annotations

import copy
import inspect
import logging
from typing import Any

import torch
from hydra.errors import InstantiationException
from hydra.utils import get_object, instantiate
from omegaconf import DictConfig, open_dict
from torch import nn

from prunelab.models.architecture import replace

log = logging.getLogger(__name__)

SHAPE_KWARGS: dict[str, tuple[str, ...]] = {
    "num_classes": ("num_classes",),
    "num_channels": ("in_channels", "in_chans"),
    "image_size": ("image_size", "img_size"),
}
ADAPT_CHANNELS = ("repeat", "refuse")
_NAMED = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)


class RepeatChannels(nn.Module):
    """Feeds a network that wants ``channels`` input channels from one-channel data, by repeating the channel.

    Args:
        net: the network; its parameter names gain the prefix ``net.``.
        channels: input channels ``net`` takes.
    """

    def __init__(self, net: nn.Module, channels: int) -> None:
        super().__init__()
        self.net = net
        self.channels = channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.expand(-1, self.channels, -1, -1))

    def extra_repr(self) -> str:
        return f"channels=1→{self.channels}"


def input_shape(shape: dict[str, Any]) -> tuple[int, int, int]:
    """``(C, H, W)`` of one example from a shape dict (``image_size``: an int for square images, or ``(H, W)``)."""
    size = shape["image_size"]
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    return int(shape.get("num_channels", shape.get("in_channels"))), int(height), int(width)


def _label(node: DictConfig) -> str:
    target = node.get("_target_")
    return f"{target} (name={node.name})" if "name" in node else str(target)


def _shape_kwargs(target: Any, node: DictConfig, shape: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The shape arguments ``target`` names in its signature, and those its ``**kwargs`` may take (every alias, for
    builders such as ``torchvision.models.resnet18`` that pass them on); none that the config sets itself."""
    try:
        params = inspect.signature(target).parameters
    except (TypeError, ValueError):  # a callable without a readable signature gets none
        return {}, {}
    named = {n for n, p in params.items() if p.kind in _NAMED}
    catch_all = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    values = {**shape, "num_channels": shape.get("num_channels", shape.get("in_channels"))}
    kwargs, offered = {}, {}
    for key, names in SHAPE_KWARGS.items():
        if values.get(key) is None or any(n in node for n in names):
            continue
        name = next((n for n in names if n in named), None)
        if name is not None:
            kwargs[name] = values[key]
        elif catch_all:
            offered.update(dict.fromkeys(names, values[key]))
    return kwargs, offered


def _rejected(exc: BaseException | None, offered: dict[str, Any]) -> str | None:
    """The offered argument a ``TypeError`` says the constructor does not take (None for any other error)."""
    if isinstance(exc, TypeError):
        return next((n for n in offered if f"unexpected keyword argument '{n}'" in str(exc)), None)
    return None


def _build(node: DictConfig, kwargs: dict[str, Any], offered: dict[str, Any]) -> Any:
    """``instantiate(node, **kwargs, **offered)``, dropping the offered arguments the constructor rejects."""
    offered = dict(offered)
    while True:
        try:
            return instantiate(node, **kwargs, **offered)
        except InstantiationException as exc:
            name = _rejected(exc.__cause__, offered)
            if name is not None:
                del offered[name]
                continue
            if isinstance(exc.__cause__, (ValueError, FileNotFoundError)):  # ours name the key and value already
                raise exc.__cause__ from None
            raise


def first_conv_channels(net: nn.Module) -> int | None:
    """Input channels of the first ``Conv2d`` of ``net`` in module order; None without one."""
    return next((m.in_channels for m in net.modules() if isinstance(m, nn.Conv2d)), None)


def check_forward(net: nn.Module, shape: dict[str, Any], label: str) -> None:
    """Run ``net`` (in eval mode, without gradients) on a zeros batch of the data's shape.

    Raises:
        ValueError: the forward fails or its output is not ``(batch, num_classes)`` logits; names model and shape.
    """
    example = input_shape(shape)
    param = next(net.parameters(), None)
    x = torch.zeros(
        2,
        *example,
        dtype=param.dtype if param is not None and param.is_floating_point() else None,
        device=param.device if param is not None else None,
    )
    mode = net.training
    net.eval()
    try:
        with torch.no_grad():
            out = net(x)
    except Exception as exc:  # noqa: BLE001 - any failure means the network does not take this input
        raise ValueError(
            f"model {label} does not take inputs of shape {example} (C, H, W, from the data): "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    finally:
        net.train(mode)
    want = (2, int(shape["num_classes"]))
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != want:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(
            f"model {label} on inputs of shape {example} returns {got}; logits of shape "
            f"(batch, num_classes={want[1]}) expected"
        )


def instantiate_model(node: DictConfig, shape: dict[str, Any]) -> nn.Module:
    """Build the network of the model config ``node`` for data of ``shape``, and check that it takes it.

    Args:
        node: the ``model`` config: ``_target_`` and its arguments, plus ``adapt_channels`` (``repeat`` or
            ``refuse``; default ``repeat``), which is not passed on.
        shape: ``num_channels`` (or ``in_channels``), ``image_size`` and ``num_classes`` of the data
            (:func:`prunelab.data.describe`).

    Returns:
        The network, inside :class:`RepeatChannels` where gray data feeds a multi-channel network.

    Raises:
        ValueError: bad ``adapt_channels``; channels that do not fit; a forward on the data's shape that fails.
    """
    node = copy.deepcopy(node)
    with open_dict(node):
        adapt = node.pop("adapt_channels", "repeat")
    if adapt not in ADAPT_CHANNELS:
        raise ValueError(f"model.adapt_channels={adapt!r} must be one of {', '.join(ADAPT_CHANNELS)}")
    label = _label(node)
    net = _build(node, *_shape_kwargs(get_object(node._target_), node, shape))
    if not isinstance(net, nn.Module):
        raise TypeError(f"model._target_={node._target_} built a {type(net).__name__}, not an nn.Module")
    channels = input_shape(shape)[0]
    wants = first_conv_channels(net)
    if wants is not None and wants != channels:
        if channels == 1 and adapt == "repeat":
            log.info("model %s takes %d input channels: repeating the data's gray channel", label, wants)
            net = RepeatChannels(net, wants)
        else:
            hint = " Set model.adapt_channels=repeat to repeat the gray channel." if channels == 1 else ""
            raise ValueError(f"model {label} takes {wants} input channels; the data has {channels}.{hint}")
    check_forward(net, shape, label)
    return net


def unwrap(net: nn.Module) -> nn.Module:
    """The network inside :class:`RepeatChannels` (``net`` itself otherwise)."""
    return net.net if isinstance(net, RepeatChannels) else net


def _call_without(fn, kwargs: dict[str, Any], optional: str):
    """``fn(**kwargs)``, again without ``kwargs[optional]`` when the model's constructor does not take it."""
    try:
        return fn(**kwargs)
    except TypeError as exc:
        if optional not in kwargs or f"'{optional}'" not in str(exc):
            raise
        kwargs = {k: v for k, v in kwargs.items() if k != optional}
        return fn(**kwargs)


def _replace_head(net: nn.Module, categories: int, num_classes: int) -> list[str]:
    """Replace the layers that output ``categories`` values by fresh ones that output ``num_classes``."""
    names = []
    for name, m in list(net.named_modules()):
        if isinstance(m, nn.Linear) and m.out_features == categories:
            new = nn.Linear(m.in_features, num_classes, bias=m.bias is not None)
        elif isinstance(m, nn.Conv2d) and m.out_channels == categories and m.groups == 1:
            new = nn.Conv2d(
                m.in_channels, num_classes, m.kernel_size, m.stride, m.padding, m.dilation, bias=m.bias is not None
            )
        else:
            continue
        replace(net, name, new.to(m.weight.device, m.weight.dtype))
        names.append(name)
    return names


def torchvision_model(
    name: str, weights: str | None = None, num_classes: int = 1000, image_size: int | None = None, **kwargs: Any
) -> nn.Module:
    """A ``torchvision.models`` classifier by name (``torchvision.models.get_model``).

    Args:
        name: e.g. ``resnet18``, ``mobilenet_v2``, ``vit_b_16``
            (``torchvision.models.list_models(module=torchvision.models)``).
        weights: None (random init), ``DEFAULT`` or a weights name of the model (e.g. ``IMAGENET1K_V1``), loaded by
            torchvision from ``$TORCH_HOME/hub/checkpoints`` (downloaded there when missing). With a class count other
            than the weights', the layers that output the weights' classes are replaced by fresh ones.
        num_classes: classes of the data.
        image_size: passed to models that take it (ViTs), and only without weights (the weights fix it).
        **kwargs: further arguments of the model's builder.
    """
    from torchvision import models

    if name not in models.list_models(module=models):
        raise ValueError(
            f"model.name={name!r} is not a torchvision classification model; see "
            f"torchvision.models.list_models(module=torchvision.models)"
        )
    try:
        chosen = models.get_model_weights(name).verify(weights) if weights is not None else None
    except (ValueError, KeyError):
        valid = ["DEFAULT", *(w.name for w in models.get_model_weights(name))]
        raise ValueError(
            f"model.weights={weights!r} is not a weights name of {name}; valid: {', '.join(valid)}"
        ) from None
    if chosen is None:
        extra = {"image_size": image_size} if image_size is not None else {}
        return _call_without(
            models.get_model, {"name": name, "num_classes": num_classes, **extra, **kwargs}, "image_size"
        )
    net = models.get_model(name, weights=chosen, **kwargs)
    categories = len(chosen.meta["categories"])
    if num_classes != categories:
        replaced = _replace_head(net, categories, num_classes)
        log.info(
            "torchvision %s with %s weights: %s replaced for %d classes", name, chosen, ", ".join(replaced), num_classes
        )
    return net


def timm_model(
    name: str,
    pretrained: bool = False,
    num_classes: int = 1000,
    in_chans: int = 3,
    img_size: int | None = None,
    **kwargs: Any,
) -> nn.Module:
    """A timm model by name (``timm.create_model``), with ``img_size`` only where the model takes it.

    Args:
        name: e.g. ``resnet18``, ``vit_tiny_patch16_224`` (``timm.list_models()``).
        pretrained: load timm's pretrained weights (its own cache; timm resets the classifier for other class
            counts and adapts the stem to ``in_chans``).
        num_classes: classes of the data.
        in_chans: input channels of the data.
        img_size: image size of the data, for the models that take it (ViTs).
        **kwargs: further arguments of the model.
    """
    import timm

    if not timm.is_model(name):
        raise ValueError(f"model.name={name!r} is not a timm model; see timm.list_models()")
    extra = {"img_size": img_size} if img_size is not None else {}
    return _call_without(
        timm.create_model,
        {
            "model_name": name,
            "pretrained": pretrained,
            "num_classes": num_classes,
            "in_chans": in_chans,
            **extra,
            **kwargs,
        },
        "img_size",
    )
