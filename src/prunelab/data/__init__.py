"""Lightning datamodules: embedded (MNIST-5k, digits), downloadable torchvision datasets, your own image folders.

``DATAMODULES`` maps each fixed-shape datamodule's ``name`` (also its Hydra config name under ``conf/data/``) to its
class. :func:`describe` gives channels, image size and classes of any datamodule, a foreign one included.
"""

from __future__ import annotations

from prunelab.data.base import BaseDataModule, DatasetNotFoundError
from prunelab.data.embedded import DigitsDataModule, EmbeddedDataModule, MNIST5kDataModule
from prunelab.data.imagefolder import ImageFolderDataModule
from prunelab.data.shape import describe
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
    "ImageFolderDataModule",
    "MNIST5kDataModule",
    "MNISTDataModule",
    "TorchvisionDataModule",
    "describe",
]
