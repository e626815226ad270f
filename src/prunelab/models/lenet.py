"""LeNet family: LeNet-300-100, the Caffe LeNet-5 (20-50-500) and LeCun's classic 6-16-120-84.

Also holds the argument checks and weight initialisation shared by every model in this package.
"""

from __future__ import annotations

import numbers

import torch
from torch import nn


def check_int_arg(name: str, value: object, minimum: int = 1, hint: str = "") -> int:
    """Return ``value`` as an int, or raise a ValueError naming it if it is not an integer ≥ ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        suffix = f" ({hint})" if hint else ""
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}{suffix}")
    return int(value)


def check_io_args(
    in_channels: object, image_size: object, num_classes: object, min_image_size: int = 1, model: str = ""
) -> tuple[int, int, int]:
    """Validate the (in_channels, image_size, num_classes) triple every model takes."""
    return (
        check_int_arg("in_channels", in_channels),
        check_int_arg("image_size", image_size, min_image_size, f"smallest input {model} accepts".strip()),
        check_int_arg("num_classes", num_classes),
    )


def init_weights(model: nn.Module) -> None:
    """Kaiming-normal convs (fan_out, as torchvision), BN weight 1 / bias 0, PyTorch-default Linear."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def _conv_pool(size: int, padding: int, kernel: int = 5) -> int:
    """Spatial size after a stride-1 ``kernel``×``kernel`` conv then a 2×2/2 max-pool (floor)."""
    return (size + 2 * padding - kernel + 1) // 2


class LeNet300(nn.Module):
    """LeNet-300-100: a 3-layer MLP (``fc1 → 300 → fc2 → 100 → fc3``) with ReLU.

    Args:
        in_channels: Input channels.
        image_size: Input height = width.
        num_classes: Number of logits.
    """

    def __init__(self, in_channels: int = 1, image_size: int = 28, num_classes: int = 10) -> None:
        super().__init__()
        in_channels, image_size, num_classes = check_io_args(in_channels, image_size, num_classes, 1, "LeNet300")
        self.fc1 = nn.Linear(in_channels * image_size * image_size, 300)
        self.relu1 = nn.ReLU()
        self.fc2 = nn.Linear(300, 100)
        self.relu2 = nn.ReLU()
        self.fc3 = nn.Linear(100, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(x, 1)
        return self.fc3(self.relu2(self.fc2(self.relu1(self.fc1(x)))))


class LeNet5(nn.Module):
    """Caffe LeNet-5 (20-50-500) as used by Han et al., ADMM pruning and Zhang et al.

    ``conv1`` (5×5, 20) → max-pool 2 → ``conv2`` (5×5, 50) → max-pool 2 → ``fc1`` (500) → ReLU → ``fc2``.
    As in Caffe's ``lenet_train_test.prototxt`` there is no nonlinearity after the convs. On 1×28×28 it
    has 431,080 parameters.

    Padding: none for ``image_size >= 28`` (the paper architecture); for smaller inputs (e.g. 8×8
    digits) both convs use ``padding=2`` ("same"), so the map is only halved by the pools and any
    ``image_size >= 4`` still reaches ≥1×1. ``padding`` overrides this choice.

    Args:
        in_channels: Input channels.
        image_size: Input height = width.
        num_classes: Number of logits.
        padding: Padding of both convs; ``None`` picks it from ``image_size`` as above.
    """

    def __init__(
        self, in_channels: int = 1, image_size: int = 28, num_classes: int = 10, padding: int | None = None
    ) -> None:
        super().__init__()
        in_channels, image_size, num_classes = check_io_args(in_channels, image_size, num_classes, 1, "LeNet5")
        if padding is None:
            padding = 0 if image_size >= 28 else 2
        padding = check_int_arg("padding", padding, 0)
        out_size = _conv_pool(_conv_pool(image_size, padding), padding)
        if out_size < 1:
            raise ValueError(
                f"image_size={image_size} is too small for LeNet5 with padding={padding}: "
                "the feature map shrinks below 1×1 (needs image_size >= 4 with padding=2)"
            )
        self.padding = padding
        self.conv1 = nn.Conv2d(in_channels, 20, 5, padding=padding)
        self.pool1 = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(20, 50, 5, padding=padding)
        self.pool2 = nn.MaxPool2d(2, 2)
        self.fc1 = nn.Linear(50 * out_size * out_size, 500)
        self.relu = nn.ReLU()
        self.fc2 = nn.Linear(500, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool2(self.conv2(self.pool1(self.conv1(x))))
        return self.fc2(self.relu(self.fc1(torch.flatten(x, 1))))


class LeNet5Classic(nn.Module):
    """LeCun's LeNet-5 (6-16-120-84) with ReLU and max-pooling.

    ``conv1`` (5×5, 6) → pool → ``conv2`` (5×5, 16) → pool → ``fc1`` (120) → ``fc2`` (84) → ``fc3``.
    LeCun fed 32×32 images (MNIST padded by 2), so ``conv1`` uses ``padding=2`` when
    ``image_size < 32`` (1×28×28 → 16×5×5, 61,706 params) and none on 32×32 (the usual CIFAR LeNet).
    For ``image_size < 28`` ``conv2`` is padded by 2 as well so that inputs down to 4×4 still work.

    Args:
        in_channels: Input channels.
        image_size: Input height = width.
        num_classes: Number of logits.
    """

    def __init__(self, in_channels: int = 1, image_size: int = 28, num_classes: int = 10) -> None:
        super().__init__()
        in_channels, image_size, num_classes = check_io_args(in_channels, image_size, num_classes, 4, "LeNet5Classic")
        pad1 = 2 if image_size < 32 else 0
        pad2 = 2 if image_size < 28 else 0
        out_size = _conv_pool(_conv_pool(image_size, pad1), pad2)
        self.conv1 = nn.Conv2d(in_channels, 6, 5, padding=pad1)
        self.relu1 = nn.ReLU()
        self.pool1 = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(6, 16, 5, padding=pad2)
        self.relu2 = nn.ReLU()
        self.pool2 = nn.MaxPool2d(2, 2)
        self.fc1 = nn.Linear(16 * out_size * out_size, 120)
        self.relu3 = nn.ReLU()
        self.fc2 = nn.Linear(120, 84)
        self.relu4 = nn.ReLU()
        self.fc3 = nn.Linear(84, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool1(self.relu1(self.conv1(x)))
        x = self.pool2(self.relu2(self.conv2(x)))
        x = self.relu3(self.fc1(torch.flatten(x, 1)))
        return self.fc3(self.relu4(self.fc2(x)))
