"""Networks we did not write: shape arguments passed by signature (prunelab, torchvision, timm, a user's module),
gray data into RGB networks (repeated or refused), a forward check at build time, torchvision's pretrained weights
read from a local hub cache, and trained weights (state dict, Lightning checkpoint, MLflow model) as the dense
baseline."""

from __future__ import annotations

import functools
import os

import mlflow
import pytest
import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchvision import models

from prunelab.models import LeNet5
from prunelab.models.classifier import Classifier
from prunelab.models.factory import RepeatChannels, instantiate_model
from prunelab.pretrained import load_dense_checkpoint
from prunelab.tracking.runs import model_log

RGB32 = {"num_channels": 3, "image_size": 32, "num_classes": 10}
GRAY16 = {"num_channels": 1, "image_size": 16, "num_classes": 10}


class FixedNet(nn.Module):
    """A user's network that takes no shape argument: 3 channels in, 10 classes out, any image size."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, width, 3, padding=1)
        self.fc = nn.Linear(width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(x).mean((2, 3)))


class FlatNet(nn.Module):
    """A user's network for 3×16×16 inputs only."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3 * 16 * 16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1))


def node(**cfg) -> OmegaConf:
    return OmegaConf.create(cfg)


VIT = {
    "_target_": "torchvision.models.VisionTransformer",
    "patch_size": 8,
    "num_layers": 2,
    "num_heads": 2,
    "hidden_dim": 32,
    "mlp_dim": 64,
}


@pytest.mark.parametrize(
    "overrides, shape, check",
    [
        (["model=torchvision"], RGB32, lambda n: n.fc.out_features == 10),
        (["model=torchvision", "model.name=mobilenet_v2"], RGB32, lambda n: n.classifier[-1].out_features == 10),
        (["model=timm", "model.name=vit_tiny_patch16_224"], RGB32, lambda n: tuple(n.patch_embed.img_size) == (32, 32)),
        (["model=timm"], GRAY16, lambda n: n.conv1.in_channels == 1),  # timm takes in_chans: no wrapper
        (["model=lenet5"], GRAY16, lambda n: isinstance(n, LeNet5)),
    ],
)
def test_configs_build_with_the_shape_arguments_they_take(make_cfg, overrides, shape, check):
    net = instantiate_model(make_cfg(*overrides).model, shape)
    assert check(net)


def test_torchvision_builder_gets_num_classes_not_in_channels():
    """The builder takes **kwargs: the names ResNet rejects (in_channels, image_size...) are dropped."""
    net = instantiate_model(node(_target_="torchvision.models.resnet18"), {**RGB32, "num_classes": 7})
    assert isinstance(net, models.ResNet) and net.fc.out_features == 7


def test_torchvision_vision_transformer_class_gets_image_size():
    net = instantiate_model(node(**VIT), RGB32)
    assert net.image_size == 32 and net.heads.head.out_features == 10


def test_own_module_without_shape_arguments(make_cfg):
    net = instantiate_model(
        make_cfg("model=custom", f"model._target_={__name__}.FixedNet", "+model.width=4").model, RGB32
    )
    assert isinstance(net, FixedNet) and net.conv.out_channels == 4


def test_gray_data_repeated_into_an_rgb_network():
    net = instantiate_model(node(_target_=f"{__name__}.FixedNet"), GRAY16)
    assert isinstance(net, RepeatChannels) and net.channels == 3
    x = torch.randn(2, 1, 16, 16)
    torch.testing.assert_close(net(x), net.net(x.repeat(1, 3, 1, 1)))


def test_gray_data_refused_before_training():
    with pytest.raises(
        ValueError,
        match=r"FixedNet takes 3 input channels; the data has 1\. "
        r"Set model.adapt_channels=repeat",
    ):
        instantiate_model(node(_target_=f"{__name__}.FixedNet", adapt_channels="refuse"), GRAY16)
    with pytest.raises(ValueError, match="the data has 2"):  # only one gray channel is ever repeated
        instantiate_model(node(_target_=f"{__name__}.FixedNet"), {**GRAY16, "num_channels": 2})
    with pytest.raises(ValueError, match="model.adapt_channels='copy' must be one of repeat, refuse"):
        instantiate_model(node(_target_=f"{__name__}.FixedNet", adapt_channels="copy"), GRAY16)


def test_shape_that_does_not_fit_fails_at_build_naming_model_and_shape():
    with pytest.raises(ValueError, match=r"FlatNet does not take inputs of shape \(3, 32, 32\)"):
        instantiate_model(node(_target_=f"{__name__}.FlatNet"), RGB32)
    with pytest.raises(
        ValueError,
        match=r"FixedNet on inputs of shape \(3, 32, 32\) returns \(2, 10\); .*"
        r"num_classes=5",
    ):
        instantiate_model(node(_target_=f"{__name__}.FixedNet"), {**RGB32, "num_classes": 5})
    with pytest.raises(ValueError, match=r"VisionTransformer does not take inputs of shape \(3, 32, 32\)"):
        instantiate_model(node(**VIT, image_size=64), RGB32)  # the config's own value is kept


def test_unknown_names_are_refused():
    with pytest.raises(ValueError, match="model.name='resnet1' is not a torchvision"):
        instantiate_model(node(_target_="prunelab.models.factory.torchvision_model", name="resnet1"), RGB32)
    with pytest.raises(ValueError, match="model.name='resnet1' is not a timm model"):
        instantiate_model(node(_target_="prunelab.models.factory.timm_model", name="resnet1"), RGB32)
    with pytest.raises(ValueError, match="model.weights='NOPE' is not a weights name of resnet18; valid: DEFAULT"):
        instantiate_model(
            node(_target_="prunelab.models.factory.torchvision_model", name="resnet18", weights="NOPE"), RGB32
        )


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A torch hub cache holding resnet18's DEFAULT weights (written here from a seeded resnet18); downloads fail."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda *a, **k: pytest.fail(f"download of {a[0]}"))
    assert torch.hub.get_dir() == str(tmp_path / "torch" / "hub")
    torch.manual_seed(0)
    reference = models.resnet18()
    folder = tmp_path / "torch" / "hub" / "checkpoints"
    folder.mkdir(parents=True)
    torch.save(reference.state_dict(), folder / os.path.basename(models.ResNet18_Weights.DEFAULT.url))
    return reference.state_dict()


def test_torchvision_pretrained_weights_from_the_hub_cache(make_cfg, hub):
    net = instantiate_model(
        make_cfg("model=torchvision", "model.weights=IMAGENET1K_V1").model, {**RGB32, "num_classes": 1000}
    )
    assert all(torch.equal(v, hub[k]) for k, v in net.state_dict().items())
    net = instantiate_model(make_cfg("model=torchvision", "model.weights=DEFAULT").model, GRAY16)
    assert isinstance(net, RepeatChannels) and net.net.fc.out_features == 10  # head replaced for 10 classes
    kept = {k: v for k, v in net.net.state_dict().items() if not k.startswith("fc.")}
    assert kept and all(torch.equal(v, hub[k]) for k, v in kept.items())


# --- trained weights as the dense baseline ---


def _fresh(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return LeNet5(in_channels=1, image_size=16, num_classes=10)


def _same(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


def test_state_dict_files_load(tmp_path):
    trained = _fresh(1)
    plain, wrapped = tmp_path / "plain.pt", tmp_path / "wrapped.pth"
    torch.save(trained.state_dict(), plain)
    torch.save({"state_dict": {f"model.{k}": v for k, v in trained.state_dict().items()}, "epoch": 3}, wrapped)
    for source in (plain, wrapped):
        net = _fresh(2)
        state = load_dense_checkpoint(str(source), net)
        assert _same(net, trained) and state.keys() == net.state_dict().keys()


def test_bare_weights_load_into_the_gray_adapter_and_back(tmp_path):
    bare, adapted = FixedNet(), RepeatChannels(FixedNet(), 3)
    torch.save(adapted.state_dict(), tmp_path / "adapted.pt")  # keys net.conv.weight, ...
    other = FixedNet()
    load_dense_checkpoint(str(tmp_path / "adapted.pt"), other)
    assert _same(other, adapted.net)
    torch.save(bare.state_dict(), tmp_path / "bare.pt")
    load_dense_checkpoint(str(tmp_path / "bare.pt"), adapted)
    assert _same(adapted.net, bare)


def test_lightning_checkpoint_loads(tmp_path):
    data = DataLoader(TensorDataset(torch.randn(8, 1, 16, 16), torch.arange(8) % 10), batch_size=4)
    module = Classifier(_fresh(1), 10, optimizer=functools.partial(torch.optim.SGD, lr=0.1))
    trainer = pl.Trainer(
        max_steps=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, data)
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    net = _fresh(2)
    load_dense_checkpoint(str(tmp_path / "last.ckpt"), net)
    assert _same(net, module.net)


def test_mlflow_model_uri_loads(tmp_path):
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    exp = mlflow.create_experiment("pretrained", artifact_location=(tmp_path / "artifacts").as_uri())
    trained = _fresh(1)
    with mlflow.start_run(experiment_id=exp) as run:
        uri = model_log.log_model(trained, torch.zeros(1, 1, 16, 16))
    for source in (f"runs:/{run.info.run_id}/model", uri):
        net = _fresh(2)
        load_dense_checkpoint(source, net)
        assert _same(net, trained), source
    with pytest.raises(ValueError, match="dense.checkpoint=runs:/0123/model: no MLflow model"):
        load_dense_checkpoint("runs:/0123/model", _fresh(2))


def test_checkpoint_that_does_not_fit_names_the_key(tmp_path):
    path = tmp_path / "other.pt"
    torch.save(LeNet5(in_channels=1, image_size=16, num_classes=5).state_dict(), path)
    with pytest.raises(
        ValueError,
        match=rf"dense.checkpoint={path} does not fit the model \(LeNet5\): shape "
        r"mismatch fc2.weight: checkpoint \(5, 500\) vs model \(10, 500\)",
    ):
        load_dense_checkpoint(str(path), _fresh(0))
    torch.save(FixedNet().state_dict(), path)
    with pytest.raises(ValueError, match=r"missing keys conv1.weight, .*; unexpected keys conv.weight"):
        load_dense_checkpoint(str(path), _fresh(0))
    torch.save([1, 2], path)
    with pytest.raises(ValueError, match=rf"dense.checkpoint={path} holds a list without a state dict"):
        load_dense_checkpoint(str(path), _fresh(0))
    with pytest.raises(FileNotFoundError, match="dense.checkpoint=missing.pt: no such file"):
        load_dense_checkpoint("missing.pt", _fresh(0))
