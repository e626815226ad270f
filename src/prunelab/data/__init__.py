"""Lightning datamodules: embedded (MNIST-5k, digits) and downloadable torchvision datasets.

``DATAMODULES`` maps each datamodule's ``name`` (also its Hydra config name under ``conf/data/``) to its class.
"""

from __future__ import annotations

from prunelab.data.base import BaseDataModule, DatasetNotFoundError
from prunelab.data.embedded import DigitsDataModule, EmbeddedDataModule, MNIST5kDataModule
from prunelab.data.vision import (
    CIFAR10DataModule,
    CIFAR100DataModule,
    FashionMNISTDataModule,
    MNISTDataModule,
    TorchvisionDataModule,
)

DATAMODULES: dict[str, type[BaseDataModule]] = {
    cls.name: cls
    for cls in (
        MNIST5kDataModule,
        DigitsDataModule,
        MNISTDataModule,
        FashionMNISTDataModule,
        CIFAR10DataModule,
        CIFAR100DataModule,
    )
}

__all__ = [
    "DATAMODULES",
    "BaseDataModule",
    "CIFAR100DataModule",
    "CIFAR10DataModule",
    "DatasetNotFoundError",
    "DigitsDataModule",
    "EmbeddedDataModule",
    "FashionMNISTDataModule",
    "MNIST5kDataModule",
    "MNISTDataModule",
    "TorchvisionDataModule",
]
