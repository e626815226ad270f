"""CIFAR ResNets (He et al. 2016, §4.2): depth 6n+2, three stages of n BasicBlocks, widths 16/32/64."""

from __future__ import annotations

import torch
from torch import nn

from prunelab.models.lenet import check_int_arg, check_io_args, init_weights


class BasicBlock(nn.Module):
    """Two 3×3 conv-BN layers plus a shortcut; a 1×1 conv + BN projection when the shape changes."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR ResNet-(6n+2): 3×3 conv (16) → 3 stages × n BasicBlocks (16, 32, 64; stride 2 at the
    start of stages 2 and 3) → global average pool → ``Linear(64 → num_classes)``.

    Shortcuts use option B (1×1 conv + BN projection where the shape changes) rather than the
    paper's CIFAR option A (zero-padded strided identity): a projection is an ordinary prunable
    layer that Torch-Pruning's dependency graph handles cleanly, whereas option A's slicing/padding
    couples channels in a way structured pruning cannot follow. It costs 2,752 extra parameters
    (ResNet-20: 272,474 instead of 269,722 on CIFAR-10). Stride-2 3×3 convs with padding 1 map
    1×1 to 1×1, so any ``image_size >= 1`` works.

    Args:
        depth: 6n+2 with n ≥ 1, e.g. 20, 32, 44, 56, 110.
        in_channels: Input channels.
        image_size: Input height = width.
        num_classes: Number of logits.
    """

    def __init__(self, depth: int = 20, in_channels: int = 1, image_size: int = 28, num_classes: int = 10) -> None:
        super().__init__()
        depth = check_int_arg("depth", depth, 8)
        if (depth - 2) % 6 != 0:
            raise ValueError(f"ResNet depth must be 6n+2 (20, 32, 44, 56, 110, ...), got {depth!r}")
        in_channels, image_size, num_classes = check_io_args(in_channels, image_size, num_classes, 1, "ResNet")
        self.depth = depth
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU()
        self.layer1 = self._make_stage(16, 16, n, stride=1)
        self.layer2 = self._make_stage(16, 32, n, stride=2)
        self.layer3 = self._make_stage(32, 64, n, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)
        init_weights(self)

    @staticmethod
    def _make_stage(in_planes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers = [BasicBlock(in_planes, planes, stride)]
        layers += [BasicBlock(planes, planes) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def ResNet20(in_channels: int = 1, image_size: int = 28, num_classes: int = 10) -> ResNet:  # noqa: N802
    """ResNet-20 (n=3; 272,474 params on CIFAR-10)."""
    return ResNet(20, in_channels=in_channels, image_size=image_size, num_classes=num_classes)


def ResNet32(in_channels: int = 1, image_size: int = 28, num_classes: int = 10) -> ResNet:  # noqa: N802
    """ResNet-32 (n=5; 466,906 params on CIFAR-10)."""
    return ResNet(32, in_channels=in_channels, image_size=image_size, num_classes=num_classes)


def ResNet56(in_channels: int = 1, image_size: int = 28, num_classes: int = 10) -> ResNet:  # noqa: N802
    """ResNet-56 (n=9; 855,770 params on CIFAR-10)."""
    return ResNet(56, in_channels=in_channels, image_size=image_size, num_classes=num_classes)
