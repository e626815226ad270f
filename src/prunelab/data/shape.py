"""What a network needs to know about the data (channels, image size, classes), from any LightningDataModule.

prunelab's datamodules say it as attributes; a foreign one (``data=custom``) may not, and then it is read from the
data: channels and image size from the first batch of the train dataloader; classes from the datamodule's
``num_classes`` or ``classes``, else the train dataset's ``classes``, else the largest train label + 1 (the dataset's
``targets`` where it has them, otherwise every batch of the train dataloader).
"""

from __future__ import annotations

import logging
import numbers
from collections.abc import Mapping
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities.exceptions import MisconfigurationException

log = logging.getLogger(__name__)

_IMAGE_KEYS = ("image", "images", "x", "input", "inputs", "pixel_values")
_LABEL_KEYS = ("label", "labels", "y", "target", "targets")


def _positive(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value > 0


def _split(batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """``(images, labels)`` of a batch: a ``(x, y, ...)`` sequence or a mapping with image and label keys."""
    if isinstance(batch, Mapping):
        x = next((batch[k] for k in _IMAGE_KEYS if k in batch), None)
        y = next((batch[k] for k in _LABEL_KEYS if k in batch), None)
    elif isinstance(batch, (list, tuple)) and len(batch) >= 2:
        x, y = batch[0], batch[1]
    else:
        x = y = None
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or not isinstance(y, torch.Tensor):
        raise ValueError(
            f"the train dataloader's batches must be (images N×C×H×W, labels) or a mapping with keys "
            f"{'/'.join(_IMAGE_KEYS)} and {'/'.join(_LABEL_KEYS)}; got {type(batch).__name__}"
        )
    return x, y


def _first_batch(datamodule: pl.LightningDataModule) -> tuple[torch.Tensor, torch.Tensor]:
    return _split(next(iter(datamodule.train_dataloader())))


def _train_dataset(datamodule: pl.LightningDataModule) -> Any:
    dataset = getattr(datamodule, "train_set", None)
    return dataset if dataset is not None else getattr(datamodule.train_dataloader(), "dataset", None)


def _count_classes(datamodule: pl.LightningDataModule) -> int:
    for owner in (datamodule, _train_dataset(datamodule)):
        value = getattr(owner, "num_classes", None)
        if _positive(value):
            return int(value)
        classes = getattr(owner, "classes", None)
        if classes is not None and not callable(classes) and len(classes) > 0:
            return len(classes)
    targets = getattr(_train_dataset(datamodule), "targets", None)
    if targets is not None and len(targets) > 0:
        return int(torch.as_tensor(targets).max()) + 1
    log.info("data: counting classes over the train dataloader (the datamodule does not say num_classes)")
    return max(int(_split(batch)[1].max()) for batch in datamodule.train_dataloader()) + 1


def describe(datamodule: pl.LightningDataModule) -> dict[str, Any]:
    """``num_channels``, ``image_size`` and ``num_classes`` of the data ``datamodule`` gives.

    Attributes of these names are taken as they are; what is missing is read from the data (module docstring),
    after ``setup("fit")`` where the datamodule has no ``train_set`` yet. ``image_size`` is an int for square
    images and ``(H, W)`` otherwise.

    Raises:
        ValueError: batches that are not (images, labels), or labels that give no class count.
    """
    found = {key: getattr(datamodule, key, None) for key in ("num_channels", "image_size", "num_classes")}
    if all(_positive(v) for v in found.values()):
        return {k: int(v) for k, v in found.items()}
    if getattr(datamodule, "train_set", None) is None:
        datamodule.setup("fit")
    if not (_positive(found["num_channels"]) and _positive(found["image_size"])):
        x, _ = _first_batch(datamodule)
        height, width = int(x.shape[-2]), int(x.shape[-1])
        found["num_channels"] = int(x.shape[1])
        found["image_size"] = height if height == width else (height, width)
    if not _positive(found["num_classes"]):
        found["num_classes"] = _count_classes(datamodule)
        if found["num_classes"] < 2:
            raise ValueError(
                f"data: {type(datamodule).__name__} gives {found['num_classes']} class(es); "
                f"a classifier needs 2 or more (set num_classes on the datamodule)"
            )
    return found


def splits(datamodule: pl.LightningDataModule) -> dict[str, Any]:
    """The train, validation and test datasets (``train_set``... or the dataloaders' ``dataset``; None when the
    datamodule has no such dataloader)."""
    result = {}
    for split, attr in (("train", "train_set"), ("validation", "val_set"), ("test", "test_set")):
        dataset = getattr(datamodule, attr, None)
        if dataset is None:
            try:
                loader = getattr(datamodule, f"{'val' if split == 'validation' else split}_dataloader")()
            except (MisconfigurationException, NotImplementedError):
                loader = None
            dataset = getattr(loader, "dataset", None)
        result[split] = dataset
    return result


def adopt_shape(datamodule: pl.LightningDataModule) -> dict[str, Any]:
    """:func:`describe` ``datamodule`` and set what it did not say (``num_channels``, ``image_size``,
    ``num_classes``) as its attributes, where the rest of prunelab reads them; returns the description."""
    shape = describe(datamodule)
    for key, value in shape.items():
        if not _positive(getattr(datamodule, key, None)):
            setattr(datamodule, key, value)
    return shape
