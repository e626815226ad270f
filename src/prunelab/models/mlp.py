"""A wide multilayer perceptron: the shipped model whose layers the GPU's 2:4 sparse kernels accept."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from prunelab.models.lenet import check_int_arg, check_io_args, init_weights


class MLP(nn.Module):
    """``fc1 → ReLU → … → fcN`` with hidden widths ``hidden``.

    The default widths (1024, 1024) are multiples of 64, so with ``pruning.granularity='"2:4"'`` every hidden layer
    (and ``fc1`` when the flattened input is a multiple of 16, e.g. 8×8 digits or 28×28 MNIST) runs on the
    semi-structured sparse kernels that ``measure/semi_structured.py`` times; the 10-way head is too narrow for them.

    Args:
        in_channels: Input channels.
        image_size: Input height = width.
        num_classes: Number of logits.
        hidden: Widths of the hidden layers.
    """

    def __init__(
        self, in_channels: int = 1, image_size: int = 28, num_classes: int = 10, hidden: Sequence[int] = (1024, 1024)
    ) -> None:
        super().__init__()
        in_channels, image_size, num_classes = check_io_args(in_channels, image_size, num_classes, 1, "MLP")
        if isinstance(hidden, (str, bytes)) or not isinstance(hidden, Sequence) or not hidden:
            raise ValueError(f"hidden must be a non-empty list of widths, got {hidden!r}")
        widths = [in_channels * image_size * image_size]
        widths += [check_int_arg(f"hidden[{i}]", w) for i, w in enumerate(hidden)] + [num_classes]
        self.depth = len(widths) - 1
        for i in range(self.depth):
            setattr(self, f"fc{i + 1}", nn.Linear(widths[i], widths[i + 1]))
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(x, 1)
        for i in range(1, self.depth):
            x = F.relu(getattr(self, f"fc{i}")(x))
        return getattr(self, f"fc{self.depth}")(x)
