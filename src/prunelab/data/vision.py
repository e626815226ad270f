"""Downloadable torchvision datasets: MNIST, Fashion-MNIST, CIFAR-10 and CIFAR-100."""

from __future__ import annotations

import os

from torch.utils.data import Dataset, Subset
from torchvision import datasets, transforms

from prunelab.data.base import BaseDataModule, DatasetNotFoundError, check_bool, split_indices


class TorchvisionDataModule(BaseDataModule):
    """Datamodule over a ``torchvision.datasets`` class whose files live under ``data_dir``.

    Validation is carved from the train split. When training augments, validation reads the same files
    through a second dataset object with the evaluation (non-augmenting) transform.

    Args:
        download: Download the files in :meth:`prepare_data` if they are missing. When False, missing
            files raise :class:`DatasetNotFoundError`.
        Others: see :class:`~prunelab.data.base.BaseDataModule`.
    """

    dataset_cls: type[datasets.VisionDataset]
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __init__(
        self,
        data_dir: str = "data",
        batch_size: int = 64,
        num_workers: int = 0,
        val_fraction: float = 0.1,
        split_seed: int = 0,
        download: bool = False,
    ) -> None:
        super().__init__(data_dir, batch_size, num_workers, val_fraction, split_seed)
        self.download = check_bool("download", download)

    @property
    def augmenting(self) -> bool:
        """Whether the train transform is random (then validation needs its own dataset object)."""
        return False

    def _expected_files(self) -> tuple[str, list[str]]:
        """Return (absolute folder, file names) that torchvision reads."""
        raise NotImplementedError

    def _train_transform(self) -> transforms.Compose:
        return self._eval_transform()

    def _eval_transform(self) -> transforms.Compose:
        return transforms.Compose([transforms.ToTensor(), transforms.Normalize(self.mean, self.std)])

    def _check_files(self) -> None:
        folder, names = self._expected_files()
        missing = [n for n in names if not os.path.isfile(os.path.join(folder, n))]
        if missing:
            raise DatasetNotFoundError(
                f"{self.name} dataset files not found in {folder} (missing: {', '.join(missing)}). "
                f"Re-run with the Hydra override `data.download=true` to download them there "
                f"(needs internet access), or copy the files into that folder."
            )

    def prepare_data(self) -> None:
        """Download the files if ``download`` is set, else check that they are present."""
        if self.download:
            # One constructor call fetches the whole archive (train and test); the test split loads fastest.
            self.dataset_cls(root=self.data_dir, train=False, download=True)
        self._check_files()

    def _make(self, train: bool, transform: transforms.Compose) -> Dataset:
        try:
            return self.dataset_cls(root=self.data_dir, train=train, transform=transform, download=False)
        except RuntimeError as err:  # torchvision's "Dataset not found or corrupted"
            folder, _ = self._expected_files()
            raise DatasetNotFoundError(
                f"{self.name} dataset files in {folder} could not be loaded ({err}). Delete them and re-run "
                f"with the Hydra override `data.download=true` to download them again."
            ) from err

    def _build_datasets(self) -> tuple[Dataset, Dataset, Dataset]:
        self._check_files()
        train_tf, eval_tf = self._train_transform(), self._eval_transform()
        train_full = self._make(True, train_tf)
        eval_full = self._make(True, eval_tf) if self.augmenting and self.val_fraction > 0 else train_full
        train_idx, val_idx = split_indices(len(train_full), self.val_fraction, self.split_seed)
        return (
            Subset(train_full, train_idx.tolist()),
            Subset(eval_full, val_idx.tolist()),
            self._make(False, eval_tf),
        )


class _MNISTLike(TorchvisionDataModule):
    """MNIST-format datasets: raw idx files under ``<data_dir>/<ClassName>/raw/``."""

    num_channels = 1
    image_size = 28
    num_classes = 10

    def _expected_files(self) -> tuple[str, list[str]]:
        folder = os.path.join(os.path.abspath(self.data_dir), self.dataset_cls.__name__, "raw")
        # torchvision keeps the resource names minus ".gz" after extracting.
        names = [os.path.splitext(os.path.basename(url))[0] for url, _ in self.dataset_cls.resources]
        return folder, names


class MNISTDataModule(_MNISTLike):
    """MNIST (60k train / 10k test, 1×28×28) read with ``torchvision.datasets.MNIST``."""

    name = "mnist"
    dataset_cls = datasets.MNIST
    mean, std = (0.1307,), (0.3081,)


class FashionMNISTDataModule(_MNISTLike):
    """Fashion-MNIST (60k train / 10k test, 1×28×28) read with ``torchvision.datasets.FashionMNIST``."""

    name = "fashion_mnist"
    dataset_cls = datasets.FashionMNIST
    mean, std = (0.2860,), (0.3530,)


class _CIFARLike(TorchvisionDataModule):
    """CIFAR datasets: pickled batches under ``<data_dir>/<base_folder>/``, with optional standard augmentation.

    Args:
        augment: Random 32×32 crop of the 4-pixel zero-padded image plus horizontal flip, on train only.
        Others: see :class:`TorchvisionDataModule`.
    """

    num_channels = 3
    image_size = 32

    def __init__(
        self,
        data_dir: str = "data",
        batch_size: int = 64,
        num_workers: int = 0,
        val_fraction: float = 0.1,
        split_seed: int = 0,
        download: bool = False,
        augment: bool = True,
    ) -> None:
        super().__init__(data_dir, batch_size, num_workers, val_fraction, split_seed, download)
        self.augment = check_bool("augment", augment)

    @property
    def augmenting(self) -> bool:
        return self.augment

    def _expected_files(self) -> tuple[str, list[str]]:
        cls = self.dataset_cls
        folder = os.path.join(os.path.abspath(self.data_dir), cls.base_folder)
        return folder, [name for name, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]]

    def _train_transform(self) -> transforms.Compose:
        if not self.augment:
            return self._eval_transform()
        return transforms.Compose(
            [
                transforms.RandomCrop(32, padding=4),
                transforms.RandomHorizontalFlip(),
                transforms.ToTensor(),
                transforms.Normalize(self.mean, self.std),
            ]
        )


class CIFAR10DataModule(_CIFARLike):
    """CIFAR-10 (50k train / 10k test, 3×32×32, 10 classes) read with ``torchvision.datasets.CIFAR10``."""

    name = "cifar10"
    num_classes = 10
    dataset_cls = datasets.CIFAR10
    mean, std = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


class CIFAR100DataModule(_CIFARLike):
    """CIFAR-100 (50k train / 10k test, 3×32×32, 100 fine classes) read with ``torchvision.datasets.CIFAR100``."""

    name = "cifar100"
    num_classes = 100
    dataset_cls = datasets.CIFAR100
    mean, std = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
