"""CIFAR-style VGG with BatchNorm and a single linear classifier."""

from __future__ import annotations

import torch
from torch import nn

from prunelab.models.lenet import check_int_arg, check_io_args, init_weights

# Conv widths per stage; "M" is a 2×2 max-pool. As in the common CIFAR VGG (e.g. kuangliu/pytorch-cifar).
CFGS: dict[int, list[int | str]] = {
    11: [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    13: [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    16: [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    19: [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M"],
}


class VGG(nn.Module):
    """VGG-{11,13,16,19} for small images: 3×3 conv (no bias) + BN + ReLU blocks, 5 max-pools,
    global average pool, ``Linear(512 → num_classes)``.

    The pools use ``ceil_mode=True``: identical to floor on even sizes, but a 1×1 map stays 1×1, so
    any ``image_size >= 1`` works (28 → 14 → 7 → 4 → 2 → 1, 8 → 4 → 2 → 1 → 1 → 1) with the same
    layers and state-dict keys for every input size. On 32×32 the map is already 1×1 before the
    ``AdaptiveAvgPool2d(1)``, i.e. the classic CIFAR VGG. Conv biases are dropped because the
    following BN's shift makes them redundant.

    Args:
        depth: 11, 13, 16 or 19.
        in_channels: Input channels.
        image_size: Input height = width.
        num_classes: Number of logits.
    """

    def __init__(self, depth: int = 16, in_channels: int = 1, image_size: int = 28, num_classes: int = 10) -> None:
        super().__init__()
        depth = check_int_arg("depth", depth)
        if depth not in CFGS:
            raise ValueError(f"VGG depth must be one of {sorted(CFGS)}, got {depth!r}")
        in_channels, image_size, num_classes = check_io_args(in_channels, image_size, num_classes, 1, "VGG")
        self.depth = depth
        layers: list[nn.Module] = []
        channels = in_channels
        for v in CFGS[depth]:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2, ceil_mode=True))
            else:
                # Not in-place: hooks that record BN outputs must not see them overwritten.
                layers += [nn.Conv2d(channels, v, 3, padding=1, bias=False), nn.BatchNorm2d(v), nn.ReLU()]
                channels = v
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(channels, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


def VGG16(in_channels: int = 1, image_size: int = 28, num_classes: int = 10) -> VGG:  # noqa: N802
    """VGG-16 with BN (14,724,042 params on CIFAR-10)."""
    return VGG(16, in_channels=in_channels, image_size=image_size, num_classes=num_classes)


def VGG19(in_channels: int = 1, image_size: int = 28, num_classes: int = 10) -> VGG:  # noqa: N802
    """VGG-19 with BN (20,035,018 params on CIFAR-10)."""
    return VGG(19, in_channels=in_channels, image_size=image_size, num_classes=num_classes)
