"""A whole run on a network, data and trained weights we did not ship: data=imagefolder, data=custom,
model=torchvision, and dense.checkpoint from a state dict, a Lightning checkpoint and an MLflow model URI."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from PIL import Image
from torch.utils.data import DataLoader, TensorDataset

from conftest import runs_in
from prunelab.train import train


class RunData(pl.LightningDataModule):
    """A foreign datamodule with train/val/test dataloaders and none of prunelab's attributes: gray 12×12 images
    whose class is the quadrant holding a bright square."""

    def __init__(self, n: int = 96, batch_size: int = 16) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.images = 0.1 * torch.randn(n, 1, 12, 12, generator=generator)
        self.labels = torch.arange(n) % 4
        for i, y in enumerate(self.labels.tolist()):
            r, c = divmod(y, 2)
            self.images[i, 0, 6 * r : 6 * r + 6, 6 * c : 6 * c + 6] += 1.0
        self.batch_size = batch_size

    def _loader(self, shuffle: bool = False) -> DataLoader:
        return DataLoader(TensorDataset(self.images, self.labels), batch_size=self.batch_size, shuffle=shuffle)

    def train_dataloader(self):
        return self._loader(shuffle=True)

    def val_dataloader(self):
        return self._loader()

    def test_dataloader(self):
        return self._loader()


CUSTOM = ["data=custom", f"data._target_={__name__}.RunData", "model=lenet5", "pruning.compression=4"]


@pytest.mark.slow  # the real CLI on a user's datamodule, ~9 s
def test_a_run_on_a_foreign_datamodule_reads_its_shape_and_records_it(make_cfg, tmp_path, capsys):
    metrics = train(make_cfg(*CUSTOM, "measure.onnx=true"))
    assert metrics["compression"] == pytest.approx(4.0, rel=0.02)
    assert metrics["onnx_max_abs_diff"] < 1e-4  # ONNX Runtime gives the compacted model's logits
    (run,) = runs_in(tmp_path)
    assert run.data.params["dataset"] == "custom" and run.data.params["model"] == "lenet5"
    contexts = {t.value for d in run.inputs.dataset_inputs for t in d.tags if t.key == "mlflow.data.context"}
    assert contexts == {"train", "validation", "test"}
    assert "weights/model.onnx" in capsys.readouterr().out


@pytest.mark.slow
def test_imagefolder_and_a_torchvision_network(make_cfg, tmp_path):
    for split, count in (("train", 6), ("val", 2), ("test", 2)):
        for name, colour in (("red", (255, 0, 0)), ("blue", (0, 0, 255))):
            (tmp_path / "images" / split / name).mkdir(parents=True)
            for i in range(count):
                Image.new("RGB", (20, 20), colour).save(tmp_path / "images" / split / name / f"{i}.png")
    metrics = train(
        make_cfg(
            "data=imagefolder",
            f"data.root={tmp_path}/images",
            "data.image_size=16",
            "data.batch_size=4",
            "model=torchvision",
            "model.name=resnet18",
            "pruning.compression=4",
        )
    )
    assert metrics["compression"] == pytest.approx(4.0, rel=0.02)
    (run,) = runs_in(tmp_path)
    assert run.data.params["model"] == "torchvision-resnet18" and run.data.params["dataset"] == "imagefolder"


@pytest.fixture
def trained(make_cfg, tmp_path):
    """A finished run of CUSTOM with its model logged: (run, its last.ckpt)."""
    train(make_cfg(*CUSTOM, "logger.log_model=true"))
    (run,) = runs_in(tmp_path)
    return run, tmp_path / "run" / "checkpoints" / "last.ckpt"


def _from_checkpoint(make_cfg, tmp_path, source: str) -> tuple[dict, object]:
    metrics = train(make_cfg(*CUSTOM, f"dense.checkpoint={source}", "paths.run_dir=" + str(tmp_path / "again")))
    runs = [r for r in runs_in(tmp_path) if "dense_checkpoint" in r.data.tags]
    return metrics, max(runs, key=lambda r: r.info.start_time)


def test_dense_checkpoint_from_an_mlflow_model_is_the_dense_baseline(make_cfg, tmp_path, trained, capsys):
    first, _ = trained
    metrics, run = _from_checkpoint(make_cfg, tmp_path, f"runs:/{first.info.run_id}/model")
    # the logged (pruned) model, tested again on the same split: its accuracy is the new run's dense accuracy
    assert metrics["dense_test_acc"] == pytest.approx(first.data.metrics["test_acc"], abs=1e-6)
    assert f"dense {metrics['dense_test_acc']:.2f}%" in capsys.readouterr().out
    assert run.data.tags["dense_checkpoint"] == f"runs:/{first.info.run_id}/model"
    assert "dense_cache_hit" not in run.data.tags


@pytest.mark.slow
def test_dense_checkpoint_from_a_lightning_checkpoint_and_a_state_dict(make_cfg, tmp_path, trained):
    first, ckpt = trained
    state = {k.removeprefix("net."): v for k, v in torch.load(ckpt, weights_only=True)["state_dict"].items()}
    torch.save(state, tmp_path / "weights.pt")
    from_ckpt, _ = _from_checkpoint(make_cfg, tmp_path, str(ckpt))
    from_file, _ = _from_checkpoint(make_cfg, tmp_path, str(tmp_path / "weights.pt"))
    assert from_ckpt["dense_test_acc"] == from_file["dense_test_acc"]


def test_a_checkpoint_of_another_network_is_refused_before_the_store(make_cfg, tmp_path):
    torch.save({"fc.weight": torch.zeros(3, 3)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match=r"dense.checkpoint=.*other.pt"):
        train(make_cfg(*CUSTOM, f"dense.checkpoint={tmp_path}/other.pt"))
    assert runs_in(tmp_path) == []
