"""Network architectures (plain ``nn.Module``s).

Every model takes ``in_channels``, ``image_size`` (height = width) and ``num_classes`` keyword
arguments and returns logits of shape ``(N, num_classes)``. :data:`MODELS` maps the names used by
the Hydra configs in ``conf/model/`` to constructors. :func:`instantiate_model` builds any model config
(torchvision, timm, a user's ``nn.Module``) with the shape arguments its constructor takes.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from prunelab.models.factory import RepeatChannels, instantiate_model, timm_model, torchvision_model
from prunelab.models.lenet import LeNet5, LeNet5Classic, LeNet300
from prunelab.models.mlp import MLP
from prunelab.models.resnet import BasicBlock, ResNet, ResNet20, ResNet32, ResNet56
from prunelab.models.vgg import VGG, VGG16, VGG19

MODELS: dict[str, Callable[..., nn.Module]] = {
    "lenet300": LeNet300,
    "lenet5": LeNet5,
    "lenet5_classic": LeNet5Classic,
    "mlp_wide": MLP,
    "vgg16": VGG16,
    "vgg19": VGG19,
    "resnet20": ResNet20,
    "resnet32": ResNet32,
    "resnet56": ResNet56,
}


def build_model(name: str, **kwargs: object) -> nn.Module:
    """Instantiate the model registered as ``name`` in :data:`MODELS`."""
    if name not in MODELS:
        raise ValueError(f"Unknown model {name!r}; valid choices: {', '.join(MODELS)}")
    return MODELS[name](**kwargs)


__all__ = [
    "MODELS",
    "VGG",
    "VGG16",
    "VGG19",
    "BasicBlock",
    "LeNet5",
    "LeNet5Classic",
    "LeNet300",
    "MLP",
    "RepeatChannels",
    "ResNet",
    "ResNet20",
    "ResNet32",
    "ResNet56",
    "build_model",
    "instantiate_model",
    "timm_model",
    "torchvision_model",
]
