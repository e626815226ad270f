"""Data we did not ship: image folders (split folders or one folder split by seed) and any LightningDataModule,
with channels, image size and classes read by ``prunelab.data.describe``; a foreign datamodule and a torchvision
network train together without a shape error."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from PIL import Image
from torch.utils.data import DataLoader, Dataset, TensorDataset

from prunelab.data import DatasetNotFoundError, DigitsDataModule, ImageFolderDataModule, describe
from prunelab.data.imagefolder import IMAGENET_MEAN, IMAGENET_STD
from prunelab.data.shape import splits
from prunelab.models.classifier import Classifier
from prunelab.models.factory import RepeatChannels, instantiate_model

CLASSES = ("ant", "bee", "cat")
COLOURS = {"ant": (255, 0, 0), "bee": (0, 255, 0), "cat": (0, 0, 255)}


def write_images(folder, per_class: int, classes=CLASSES, size=(12, 10)) -> None:
    """``per_class`` PNGs of one flat colour per class (``size`` = width, height) under ``folder/<class>/``."""
    for name in classes:
        (folder / name).mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", size, COLOURS[name]).save(folder / name / f"{i}.png")


def labels(dataset) -> list[int]:
    return [int(y) for _, y in dataset]


def test_split_folders(tmp_path):
    write_images(tmp_path / "train", 4)
    write_images(tmp_path / "val", 2)
    write_images(tmp_path / "test", 1, classes=("ant", "cat"))  # a class missing from test keeps its label
    data = ImageFolderDataModule(str(tmp_path), batch_size=5, image_size=8)
    data.prepare_data()
    assert data.classes == list(CLASSES) and describe(data) == {"num_channels": 3, "image_size": 8, "num_classes": 3}
    data.setup()
    assert [len(s) for s in (data.train_set, data.val_set, data.test_set)] == [12, 6, 2]
    assert labels(data.test_set) == [0, 2] and sorted(labels(data.val_set)) == [0, 0, 1, 1, 2, 2]
    x, y = next(iter(data.train_dataloader()))
    assert x.shape == (5, 3, 8, 8)
    x, y = next(iter(data.test_dataloader()))  # flat colours: normalised with ImageNet's mean and std
    want = (torch.tensor([1.0, 0.0, 0.0]) - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    torch.testing.assert_close(x[0, :, 4, 4], want)


def test_one_folder_split_by_seed_class_by_class(tmp_path):
    write_images(tmp_path, 10)
    split = {}
    for seed in (0, 0, 1):
        data = ImageFolderDataModule(str(tmp_path), image_size=8, val_fraction=0.2, test_fraction=0.3, split_seed=seed)
        data.setup()
        parts = (data.train_indices, data.val_indices, data.test_indices)
        assert [len(p) for p in parts] == [15, 6, 9]
        assert sorted(sum(parts, [])) == list(range(30))  # disjoint, every image once
        assert sorted(labels(data.test_set)) == [0] * 3 + [1] * 3 + [2] * 3
        assert split.setdefault(seed, parts) == parts  # the same seed, the same split
    assert split[0] != split[1]


def test_train_folder_alone_carves_val_and_test(tmp_path):
    write_images(tmp_path / "train", 10)
    data = ImageFolderDataModule(str(tmp_path), image_size=8, val_fraction=0.1, test_fraction=0.2, augment=True)
    data.setup()
    assert [len(s) for s in (data.train_set, data.val_set, data.test_set)] == [21, 3, 6]
    assert next(iter(data.train_dataloader()))[0].shape[1:] == (3, 8, 8)


def test_gray_resized_and_cropped(tmp_path):
    write_images(tmp_path, 3, size=(20, 12))
    data = ImageFolderDataModule(
        str(tmp_path), image_size=6, resize=8, channels=1, mean=[0.5], std=[0.25], val_fraction=0.0, test_fraction=0.0
    )
    data.setup()
    x, _ = next(iter(data.train_dataloader()))
    assert x.shape == (9, 1, 6, 6) and describe(data)["num_channels"] == 1


def test_bad_folders_and_options_are_named(tmp_path):
    with pytest.raises(DatasetNotFoundError, match=f"data.root={tmp_path}/nowhere: no such folder"):
        ImageFolderDataModule(str(tmp_path / "nowhere")).prepare_data()
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetNotFoundError, match="no class folders"):
        ImageFolderDataModule(str(tmp_path / "empty")).prepare_data()
    write_images(tmp_path / "train", 2, classes=("ant",))
    write_images(tmp_path / "val", 1, classes=("ant", "bee"))
    with pytest.raises(ValueError, match="has class folders that train does not: bee"):
        ImageFolderDataModule(str(tmp_path)).setup()
    with pytest.raises(ValueError, match=r"mean=\[0.485, 0.456, 0.406\] and std=.* need 1 values each"):
        ImageFolderDataModule(str(tmp_path), channels=1)
    with pytest.raises(ValueError, match="val_fraction \\+ test_fraction = 1 must be < 1"):
        ImageFolderDataModule(str(tmp_path), val_fraction=0.5, test_fraction=0.5)


def test_imagefolder_config(make_cfg, tmp_path):
    write_images(tmp_path / "images", 4)
    cfg = make_cfg("data=imagefolder", f"data.root={tmp_path}/images", "data.image_size=16")
    data = instantiate(cfg.data)
    data.prepare_data()
    assert describe(data) == {"num_channels": 3, "image_size": 16, "num_classes": 3}


# --- any LightningDataModule ---


class ToyData(pl.LightningDataModule):
    """A foreign datamodule: ``images`` (N×C×H×W) and ``targets``; ``batch`` picks tuple or dict batches."""

    def __init__(
        self,
        channels: int = 1,
        height: int = 16,
        width: int = 16,
        n_classes: int = 4,
        n: int = 16,
        batch: str = "tuple",
        **attributes,
    ) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.images = torch.randn(n, channels, height, width, generator=generator)
        self.targets = torch.arange(n) % n_classes
        self.batch = batch
        for key, value in attributes.items():
            setattr(self, key, value)
        self.setups = 0

    def setup(self, stage=None):
        self.setups += 1

    def train_dataloader(self):
        if self.batch == "dict":
            rows = [{"image": x, "label": y} for x, y in zip(self.images, self.targets, strict=True)]
            return DataLoader(rows, batch_size=4)
        return DataLoader(TensorDataset(self.images, self.targets), batch_size=4)

    def val_dataloader(self):
        return DataLoader(TensorDataset(self.images, self.targets), batch_size=4)


class Targets(Dataset):
    """A dataset that says its labels (``targets``), as torchvision's do."""

    def __init__(self, n: int) -> None:
        self.targets = [i % 7 for i in range(n)]

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i):
        return torch.zeros(3, 5, 5), self.targets[i]


def test_describe_reads_what_a_foreign_datamodule_does_not_say():
    data = ToyData(channels=3, height=10, width=12, n_classes=4)
    assert describe(data) == {"num_channels": 3, "image_size": (10, 12), "num_classes": 4}  # max label + 1
    assert data.setups == 1
    assert describe(ToyData(batch="dict", num_classes=9))["num_classes"] == 9
    assert describe(ToyData(n_classes=2, classes=["a", "b", "c"]))["num_classes"] == 3
    with_targets = ToyData()
    with_targets.train_set = Targets(10)
    assert describe(with_targets) == {"num_channels": 1, "image_size": 16, "num_classes": 7}
    found = splits(data)  # what MLflow's dataset inputs can read from a foreign datamodule
    assert len(found["train"]) == len(found["validation"]) == 16 and found["test"] is None
    shipped = DigitsDataModule()
    assert describe(shipped) == {"num_channels": 1, "image_size": 8, "num_classes": 10}
    assert shipped.train_set is None  # attributes are enough: nothing loaded


def test_describe_refuses_batches_it_cannot_read():
    class Flat(ToyData):
        def train_dataloader(self):
            return DataLoader(TensorDataset(self.images.flatten(1), self.targets), batch_size=4)

    with pytest.raises(ValueError, match=r"batches must be \(images N×C×H×W, labels\)"):
        describe(Flat())
    with pytest.raises(ValueError, match="gives 1 class"):
        describe(ToyData(n_classes=1))


def test_custom_config_trains_a_torchvision_network_on_gray_data(make_cfg, tmp_path):
    cfg = make_cfg("data=custom", f"data._target_={__name__}.ToyData", "+data.n_classes=3", "model=torchvision")
    data = instantiate(cfg.data)
    shape = describe(data)
    net = instantiate_model(cfg.model, shape)
    assert isinstance(net, RepeatChannels) and net.net.fc.out_features == 3
    module = Classifier(net, shape["num_classes"], optimizer=functools.partial(torch.optim.SGD, lr=0.01))
    trainer = pl.Trainer(
        fast_dev_run=2, logger=False, enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path
    )
    trainer.fit(module, datamodule=data)
    assert np.isfinite(float(trainer.callback_metrics["train/loss"]))
