"""Tests for prunelab.models: parameter counts, input adaptation, validation, Torch-Pruning tracing."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch_pruning as tp
from torch import nn

from prunelab.models import MLP, MODELS, VGG, LeNet5, LeNet5Classic, ResNet, build_model
from prunelab.models.vgg import CFGS

CONF_DIR = Path(__file__).resolve().parents[1] / "conf" / "model"
SHAPES = [(1, 28, 10), (1, 8, 10), (3, 32, 100)]  # (in_channels, image_size, num_classes)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _resnet_cifar10_params(depth: int) -> int:
    """ResNet-(6n+2), option B, 3 input channels, 10 classes (3×3 convs bias-free, BN = 2 params/channel).

    stem 3·16·9 + 32                                   = 464
    stage 1: 2n × (16·16·9 + 32)                       = 4672·n
    stage 2: (16·32·9 + 64) + (2n-1)(32·32·9 + 64) + 1×1 proj (16·32 + 64)   = 18560·n − 4032
    stage 3: (32·64·9 + 128) + (2n-1)(64·64·9 + 128) + 1×1 proj (32·64 + 128) = 73984·n − 16256
    fc 64·10 + 10                                      = 650
    total                                              = 97216·n − 19174
    """
    n = (depth - 2) // 6
    return 97216 * n - 19174


def _vgg_cifar10_params(cfg: list[int | str]) -> int:
    """Σ (c_in·c_out·9 + 2·c_out) over bias-free 3×3 conv + BN layers, plus Linear(512·10 + 10)."""
    total, c_in = 0, 3
    for v in cfg:
        if v != "M":
            total += c_in * v * 9 + 2 * v
            c_in = v
    return total + 512 * 10 + 10


def test_param_counts_lenet() -> None:
    # 784·300+300 + 300·100+100 + 100·10+10
    assert n_params(MODELS["lenet300"]()) == 266_610
    # 20·1·25+20 + 50·20·25+50 + (50·4·4)·500+500 + 500·10+10
    assert n_params(MODELS["lenet5"]()) == 431_080
    # 1×28×28 with conv1 padding 2 (LeCun's 32×32): 6·25+6 + 16·6·25+16 + 400·120+120 + 120·84+84 + 84·10+10
    assert n_params(MODELS["lenet5_classic"]()) == 61_706


@pytest.mark.parametrize(
    ("name", "expected"),
    [("resnet20", 272_474), ("resnet32", 466_906), ("resnet56", 855_770), ("vgg16", 14_724_042), ("vgg19", 20_035_018)],
)
def test_param_counts_cifar(name: str, expected: int) -> None:
    if name.startswith("resnet"):
        formula = _resnet_cifar10_params(int(name.removeprefix("resnet")))
    else:
        formula = _vgg_cifar10_params(CFGS[int(name.removeprefix("vgg"))])
    assert formula == expected
    assert n_params(MODELS[name](in_channels=3, image_size=32, num_classes=10)) == expected


def test_mlp_wide_shapes() -> None:
    # 1×8×8 digits: (64·1024 + 1024) + (1024·1024 + 1024) + (1024·10 + 10)
    assert n_params(MODELS["mlp_wide"](image_size=8)) == 1_126_410
    model = MLP(in_channels=3, image_size=4, num_classes=7, hidden=(64, 128, 32))
    shapes = [(m.in_features, m.out_features) for m in model.modules() if isinstance(m, nn.Linear)]
    assert shapes == [(48, 64), (64, 128), (128, 32), (32, 7)]
    assert [name for name, _ in model.named_children()] == ["fc1", "fc2", "fc3", "fc4"]
    assert model(torch.randn(5, 3, 4, 4)).shape == (5, 7)
    with pytest.raises(ValueError, match=r"hidden\[1\].*0"):
        MLP(hidden=(64, 0))
    with pytest.raises(ValueError, match="hidden"):
        MLP(hidden=())


def test_resnet_option_a_equivalent_count() -> None:
    # The classic option-A ResNet-20 has 269,722 params; option B adds the two 1×1 projections + BN.
    assert _resnet_cifar10_params(20) - (16 * 32 + 64 + 32 * 64 + 128) == 269_722


@pytest.mark.parametrize(("in_channels", "image_size", "num_classes"), SHAPES)
@pytest.mark.parametrize("name", list(MODELS))
def test_forward_shapes(name: str, in_channels: int, image_size: int, num_classes: int) -> None:
    model = MODELS[name](in_channels=in_channels, image_size=image_size, num_classes=num_classes)
    model.train()  # BN in train mode with batch 2 exercises the same path as training
    out = model(torch.randn(2, in_channels, image_size, image_size))
    assert out.shape == (2, num_classes)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", ["vgg16", "resnet20"])
def test_deep_models_accept_1x1(name: str) -> None:
    model = MODELS[name](in_channels=1, image_size=1, num_classes=3).eval()
    assert model(torch.randn(2, 1, 1, 1)).shape == (2, 3)


def test_lenet5_padding_rule() -> None:
    assert LeNet5(image_size=28).conv1.padding == (0, 0)
    assert LeNet5(image_size=8).conv1.padding == (2, 2)
    assert LeNet5(image_size=8).fc1.in_features == 50 * 2 * 2
    assert LeNet5(image_size=16, padding=0).fc1.in_features == 50  # 16 → 12 → 6 → 2 → 1
    with pytest.raises(ValueError, match="image_size=8"):
        LeNet5(image_size=8, padding=0)  # 8 → 4 → 2 → (conv 5×5 of 2×2) < 1
    with pytest.raises(ValueError, match="image_size=3"):
        LeNet5(image_size=3)
    with pytest.raises(ValueError, match="image_size.*3"):
        LeNet5Classic(image_size=3)


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize(
    ("arg", "value"), [("image_size", 0), ("num_classes", 0), ("in_channels", 0), ("num_classes", -3)]
)
def test_bad_args(name: str, arg: str, value: int) -> None:
    kwargs = {"in_channels": 1, "image_size": 28, "num_classes": 10, arg: value}
    with pytest.raises(ValueError, match=rf"{arg}.*{value}"):
        MODELS[name](**kwargs)


def test_bad_depth_and_types() -> None:
    with pytest.raises(ValueError, match="17"):
        VGG(depth=17)
    with pytest.raises(ValueError, match="21"):
        ResNet(depth=21)
    with pytest.raises(ValueError, match="True"):
        LeNet5(num_classes=True)
    with pytest.raises(ValueError, match="28.0"):
        LeNet5(image_size=28.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="nope"):
        build_model("nope")


def test_init() -> None:
    model = ResNet(depth=20)
    bn = model.bn1
    assert torch.equal(bn.weight, torch.ones_like(bn.weight)) and torch.equal(bn.bias, torch.zeros_like(bn.bias))
    # Kaiming normal, fan_out: std = sqrt(2 / (16·3·3))
    std = model.layer1[0].conv1.weight.std().item()
    assert abs(std - (2 / (16 * 9)) ** 0.5) < 0.02


@pytest.mark.parametrize("name", list(MODELS))
def test_hydra_configs(name: str) -> None:
    hydra_utils = pytest.importorskip("hydra.utils")
    omegaconf = pytest.importorskip("omegaconf")
    cfg = omegaconf.OmegaConf.load(CONF_DIR / f"{name}.yaml")
    model = hydra_utils.instantiate(cfg, in_channels=3, image_size=32, num_classes=10)
    assert n_params(model) == n_params(MODELS[name](in_channels=3, image_size=32, num_classes=10))


@pytest.mark.parametrize("name", list(MODELS))
def test_dependency_graph_builds(name: str) -> None:
    model = MODELS[name](in_channels=3, image_size=32, num_classes=10).eval()
    dg = tp.DependencyGraph().build_dependency(model, example_inputs=torch.randn(1, 3, 32, 32))
    first = next(m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
    assert first in dg.module2node


def _prune_out(model: nn.Module, layer: nn.Module, example: torch.Tensor, idxs: list[int]) -> None:
    dg = tp.DependencyGraph().build_dependency(model, example_inputs=example)
    fn = tp.prune_conv_out_channels if isinstance(layer, nn.Conv2d) else tp.prune_linear_out_channels
    group = dg.get_pruning_group(layer, fn, idxs=idxs)
    assert dg.check_pruning_group(group)
    group.prune()


@pytest.mark.parametrize(("in_channels", "image_size"), [(1, 28), (3, 32), (1, 8)])
def test_structural_prune_lenet5(in_channels: int, image_size: int) -> None:
    model = LeNet5(in_channels=in_channels, image_size=image_size).eval()
    x = torch.randn(2, in_channels, image_size, image_size)
    spatial = model.fc1.in_features // 50
    _prune_out(model, model.conv1, x, [0, 1])
    assert (model.conv1.out_channels, model.conv2.in_channels) == (18, 18)
    # Pruning conv2 must also remove the matching flattened fc1 inputs (the flatten coupling).
    _prune_out(model, model.conv2, x, [0, 1, 2])
    assert model.conv2.out_channels == 47 and model.fc1.in_features == 47 * spatial
    assert model(x).shape == (2, 10)


def test_structural_prune_vgg16() -> None:
    model = VGG(16, in_channels=3, image_size=32, num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    before = n_params(model)
    conv = model.features[0]
    _prune_out(model, conv, x, [0, 1])
    assert conv.out_channels == 62 and model.features[1].num_features == 62 and model.features[3].in_channels == 62
    last = [m for m in model.features if isinstance(m, nn.Conv2d)][-1]
    _prune_out(model, last, x, [5])
    assert model.classifier.in_features == 511
    assert n_params(model) < before
    assert model(x).shape == (2, 10)


def test_structural_prune_resnet20() -> None:
    model = ResNet(20, in_channels=3, image_size=32, num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    _prune_out(model, model.conv1, x, [0, 1])
    # The stem is coupled through the stage-1 residual adds to every block's conv2 and to stage 2's inputs.
    assert model.conv1.out_channels == 14
    assert all(block.conv2.out_channels == 14 for block in model.layer1)
    assert model.layer2[0].conv1.in_channels == 14 and model.layer2[0].shortcut[0].in_channels == 14
    # A block-internal conv is independent of the residual path.
    _prune_out(model, model.layer3[1].conv1, x, [0, 1, 2, 3])
    assert model.layer3[1].conv2.in_channels == 60
    assert model(x).shape == (2, 10)
