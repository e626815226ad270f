"""Shared pieces of every prunelab datamodule: argument checks, split carving and dataloaders."""

from __future__ import annotations

import numbers
import os
from typing import Any

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset, Sampler


class DatasetNotFoundError(FileNotFoundError):
    """Raised when a downloadable dataset's files are missing (or unreadable) and download is off."""


def check_int(name: str, value: object, minimum: int) -> int:
    """Return ``value`` as an int, or raise a ValueError naming it if it is not an integer >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def check_fraction(name: str, value: object) -> float:
    """Return ``value`` as a float, or raise a ValueError naming it if it is not a number in [0, 1)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be a number in [0, 1), got {value!r}")
    return float(value)


def check_bool(name: str, value: object) -> bool:
    """Return ``value`` if it is a bool, else raise a ValueError naming it (catches ``download: "no"``)."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false, got {value!r}")
    return value


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Randomly split ``range(n)`` into (train, val) index tensors, reproducibly.

    Uses a private generator seeded by ``seed`` so the split never depends on the global (run) seed.
    Both returned index tensors are sorted.

    Args:
        n: Number of samples to split.
        val_fraction: Fraction of samples that go to validation, in [0, 1).
        seed: Seed of the split.

    Returns:
        ``(train_indices, val_indices)`` as int64 tensors.
    """
    n_val = min(max(n - 1, 0), round(n * val_fraction))
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[n_val:].sort().values, perm[:n_val].sort().values


class EpochShuffleSampler(Sampler[int]):
    """Random order drawn from (seed, epoch) alone.

    Lightning calls :meth:`set_epoch` at every epoch start, so epoch ``e`` sees the same order whether training ran
    through it or resumed at it from a checkpoint: resumed runs are bit-identical to uninterrupted ones.
    The seed defaults to ``torch.initial_seed()``, i.e. the run seed set by ``seed_everything``.
    """

    def __init__(self, size: int, seed: int | None = None) -> None:
        self.size = size
        self.seed = torch.initial_seed() if seed is None else seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        generator = torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch) % 2**63)
        return iter(torch.randperm(self.size, generator=generator).tolist())

    def __len__(self) -> int:
        return self.size


class BaseDataModule(pl.LightningDataModule):
    """Base of all prunelab datamodules.

    Subclasses set the class attributes and implement :meth:`_build_datasets`; this class handles
    argument validation, one-time setup and the three dataloaders.

    Args:
        data_dir: Root folder of the dataset files (unused by embedded datasets).
        batch_size: Samples per batch.
        num_workers: DataLoader worker processes (0 = load in the main process).
        val_fraction: Fraction of the train split held out for validation, in [0, 1).
        split_seed: Seed of the fixed train/val(/test) split, independent of the run seed.
    """

    name: str = ""
    num_channels: int = 0
    image_size: int = 0
    num_classes: int = 0

    def __init__(
        self,
        data_dir: str = "data",
        batch_size: int = 64,
        num_workers: int = 0,
        val_fraction: float = 0.1,
        split_seed: int = 0,
    ) -> None:
        super().__init__()
        if not isinstance(data_dir, (str, os.PathLike)) or not os.fspath(data_dir):
            raise ValueError(f"data_dir must be a non-empty path, got {data_dir!r}")
        self.data_dir = os.fspath(data_dir)
        self.batch_size = check_int("batch_size", batch_size, 1)
        self.num_workers = check_int("num_workers", num_workers, 0)
        self.val_fraction = check_fraction("val_fraction", val_fraction)
        self.split_seed = check_int("split_seed", split_seed, 0)
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None

    def _build_datasets(self) -> tuple[Dataset, Dataset, Dataset]:
        """Return the (train, val, test) datasets; called once by :meth:`setup`."""
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        """Build the train/val/test datasets (all of them, once, whatever the stage)."""
        if self.train_set is None:
            self.train_set, self.val_set, self.test_set = self._build_datasets()

    def _loader(self, dataset: Dataset | None, shuffle: bool) -> DataLoader:
        assert dataset is not None, "setup() must run before building a dataloader"
        workers: dict[str, Any] = {}
        if self.num_workers > 0:
            workers = {"num_workers": self.num_workers, "persistent_workers": True}
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=EpochShuffleSampler(len(dataset)) if shuffle else None,
            drop_last=False,
            pin_memory=torch.cuda.is_available(),
            **workers,
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled loader over the train split (last partial batch kept)."""
        self.setup()
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        """Loader over the validation split, in order."""
        self.setup()
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        """Loader over the test split, in order."""
        self.setup()
        return self._loader(self.test_set, shuffle=False)
