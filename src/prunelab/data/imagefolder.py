"""Your own images in class folders, read with ``torchvision.datasets.ImageFolder``."""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from torch.utils.data import Dataset, Subset
from torchvision import datasets, transforms

from prunelab.data.base import BaseDataModule, DatasetNotFoundError, check_bool, check_fraction, check_int

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SPLITS = ("train", "val", "test")


class _Folder(datasets.ImageFolder):
    """ImageFolder whose class list is given (the train folder's), so every split numbers classes alike."""

    def __init__(self, root: str, classes: list[str], transform, allow_empty: bool) -> None:
        self._classes = classes
        super().__init__(root, transform=transform, allow_empty=allow_empty)

    def find_classes(self, directory):
        extra = sorted({e.name for e in os.scandir(directory) if e.is_dir()} - set(self._classes))
        if extra:
            raise ValueError(f"data.root: {directory} has class folders that train does not: {', '.join(extra)}")
        return self._classes, {c: i for i, c in enumerate(self._classes)}


def stratified_split(targets: Sequence[int], fractions: Sequence[float], seed: int) -> list[list[int]]:
    """Split sample indices class by class: ``fractions`` of each class go to the later parts, the rest to the first.

    Args:
        targets: class index of each sample.
        fractions: fraction of each class for parts 1, 2, ... (part 0 keeps the rest).
        seed: seed of the split (its own generator: the run seed does not change it).

    Returns:
        Sorted sample indices of part 0, 1, 2, ...
    """
    generator = torch.Generator().manual_seed(seed)
    labels = torch.as_tensor(list(targets))
    parts: list[list[int]] = [[] for _ in range(len(fractions) + 1)]
    for label in labels.unique().tolist():
        members = (labels == label).nonzero().flatten()
        members = members[torch.randperm(len(members), generator=generator)].tolist()
        start = 0
        for i, fraction in enumerate(fractions, start=1):
            count = min(round(len(members) * fraction), len(members) - start - 1)  # one stays in part 0
            parts[i] += members[start : start + max(count, 0)]
            start += max(count, 0)
        parts[0] += members[start:]
    return [sorted(p) for p in parts]


class ImageFolderDataModule(BaseDataModule):
    """Images in class folders under ``root``: ``root/train/<class>/*.png`` (with optional ``val/`` and ``test/``
    beside it), or ``root/<class>/*.png`` alone.

    Splits missing from the folders are carved from the train images, class by class, with ``split_seed``:
    ``test_fraction`` of them for test, then ``val_fraction`` of them for validation. Evaluation resizes the shorter
    side to ``resize`` and center-crops ``image_size`` (``resize=256``, ``image_size=224`` is ImageNet's recipe);
    ``augment`` trains on random resized crops and horizontal flips instead. Normalisation uses ``mean`` and ``std``
    (ImageNet's by default, as pretrained torchvision and timm networks expect).

    Args:
        root: the folder of images.
        image_size: side of the square images the network sees.
        resize: shorter side before the center crop; None: ``image_size``.
        channels: 3 (RGB) or 1 (grayscale).
        mean: per-channel mean subtracted, one value per channel.
        std: per-channel std divided by, one value per channel.
        test_fraction: fraction of the train images held out for test when there is no ``test/`` folder.
        augment: random resized crop and flip on the train split.
        Others: see :class:`~prunelab.data.base.BaseDataModule`.
    """

    name = "imagefolder"

    def __init__(
        self,
        root: str,
        batch_size: int = 64,
        num_workers: int = 0,
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        split_seed: int = 0,
        image_size: int = 224,
        resize: int | None = None,
        channels: int = 3,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        augment: bool = False,
    ) -> None:
        super().__init__(root, batch_size, num_workers, val_fraction, split_seed)
        self.root = self.data_dir
        self.test_fraction = check_fraction("test_fraction", test_fraction)
        if self.val_fraction + self.test_fraction >= 1:
            raise ValueError(f"val_fraction + test_fraction = {self.val_fraction + self.test_fraction:g} must be < 1")
        self.image_size = check_int("image_size", image_size, 1)
        self.resize = self.image_size if resize is None else check_int("resize", resize, self.image_size)
        if channels not in (1, 3):
            raise ValueError(f"channels={channels!r} must be 1 or 3")
        self.num_channels = channels
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        if len(self.mean) != channels or len(self.std) != channels or min(self.std) <= 0:
            raise ValueError(
                f"mean={list(self.mean)} and std={list(self.std)} need {channels} values each "
                f"(channels={channels}), std > 0"
            )
        self.augment = check_bool("augment", augment)
        self._classes: list[str] | None = None

    def _folder(self, split: str) -> str | None:
        path = os.path.join(self.root, split)
        return path if os.path.isdir(path) else None

    @property
    def classes(self) -> list[str]:
        """Class names (the train folder's class folders, sorted); their order gives the labels."""
        if self._classes is None:
            if not os.path.isdir(self.root):
                raise DatasetNotFoundError(f"data.root={self.root}: no such folder")
            train = self._folder("train") or self.root
            self._classes = sorted(e.name for e in os.scandir(train) if e.is_dir())
            if not self._classes:
                raise DatasetNotFoundError(f"data.root={self.root}: no class folders in {train}")
        return self._classes

    @property
    def num_classes(self) -> int:  # type: ignore[override]
        return len(self.classes)

    def prepare_data(self) -> None:
        """Check that the folder and its class folders exist."""
        _ = self.classes

    def _transform(self, train: bool) -> transforms.Compose:
        gray = [transforms.Grayscale(1)] if self.num_channels == 1 else []
        if train and self.augment:
            crop = [transforms.RandomResizedCrop(self.image_size), transforms.RandomHorizontalFlip()]
        else:
            crop = [transforms.Resize(self.resize), transforms.CenterCrop(self.image_size)]
        return transforms.Compose([*gray, *crop, transforms.ToTensor(), transforms.Normalize(self.mean, self.std)])

    def _read(self, folder: str, train: bool, allow_empty: bool = False) -> _Folder:
        return _Folder(folder, self.classes, self._transform(train), allow_empty)

    def _build_datasets(self) -> tuple[Dataset, Dataset, Dataset]:
        train_dir = self._folder("train") or self.root
        val_dir, test_dir = self._folder("val"), self._folder("test")
        if train_dir == self.root:
            val_dir = test_dir = None  # one folder of class folders: every split is carved from it
        train_full = self._read(train_dir, train=True)
        eval_full = self._read(train_dir, train=False) if self.augment else train_full
        fractions = [0.0 if test_dir else self.test_fraction, 0.0 if val_dir else self.val_fraction]
        train_idx, test_idx, val_idx = stratified_split(train_full.targets, fractions, self.split_seed)
        self.train_indices, self.val_indices, self.test_indices = train_idx, val_idx, test_idx
        val = self._read(val_dir, False, allow_empty=True) if val_dir else Subset(eval_full, val_idx)
        test = self._read(test_dir, False, allow_empty=True) if test_dir else Subset(eval_full, test_idx)
        return Subset(train_full, train_idx), val, test
