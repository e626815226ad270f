"""Filter pruning removes whole channels: a pruned filter's bias and BatchNorm γ/β are zeroed and kept at zero, so
compaction takes the channel out of VGG/ResNet (padded convs after BN) without changing the outputs."""

import copy
from functools import partial

import pytest
import pytorch_lightning as pl
import torch
import torch_pruning as tp
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from callbacks import ZeroWatch, compacted_ratio, dead_rows
from prunelab.measure import compact, count_macs
from prunelab.models import LeNet300, build_model
from prunelab.models.classifier import Classifier
from prunelab.pruning import MagnitudePruning
from prunelab.pruning.masks import filter_dependents, prunable_layers

SIZE = 16  # CIFAR-shaped (3 channels), smaller maps to keep the fits short; both models accept any size
SGD = partial(torch.optim.SGD, lr=0.01, momentum=0.9, weight_decay=5e-4)


def _net(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    net = build_model(name, in_channels=3, image_size=SIZE)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.bias.uniform_(
                    0.1, 0.5
                )  # as in a trained net: shifts that ReLU passes on (not removable unless zeroed)
    return net


def _example() -> torch.Tensor:
    return torch.zeros(1, 3, SIZE, SIZE)


def _tp_batchnorms(net: nn.Module) -> dict[str, set[nn.Module]]:
    """Torch-Pruning's view: per Conv2d, the BatchNorms in its out-channel group whose dependency starts at it."""
    graph = tp.DependencyGraph().build_dependency(net, example_inputs=_example(), verbose=False)
    found = {}
    for name, conv in net.named_modules():
        if isinstance(conv, nn.Conv2d):
            group = graph.get_pruning_group(conv, tp.prune_conv_out_channels, idxs=[0])
            found[name] = {
                it.dep.target.module
                for it in group.items
                if isinstance(it.dep.target.module, nn.BatchNorm2d) and it.dep.source.module is conv
            }
    return found


def _fit(net: nn.Module, pruning: MagnitudePruning, epochs: int = 2) -> ZeroWatch:
    pl.seed_everything(0, workers=True)
    x, y = torch.randn(64, 3, SIZE, SIZE), torch.randint(0, 10, (64,))
    watch = ZeroWatch(pruning)
    trainer = pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        callbacks=[pruning, watch],
    )
    trainer.fit(Classifier(net, 10, optimizer=SGD), DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True))
    return watch


@pytest.mark.parametrize("name", ["vgg16", "resnet20"])
def test_dependents_are_the_batchnorm_each_layer_feeds(name):
    net = _net(name)
    layers = prunable_layers(net)
    deps = filter_dependents(net, layers)
    expected = _tp_batchnorms(net)
    for layer, found in deps.items():
        bns = {owner for owner, _ in found if isinstance(owner, nn.BatchNorm2d)}
        assert bns == expected.get(layer, set())
        assert [p for _, p in found] == ["bias"] * (layers[layer].bias is not None) + ["weight", "bias"] * len(bns)
    if name == "resnet20":  # the residual addition couples bn2 and the shortcut BN, but each is fed by one conv only
        assert {m for m, _ in deps["layer2.0.conv2"]} == {net.layer2[0].bn2}
        assert {m for m, _ in deps["layer2.0.shortcut.0"]} == {net.layer2[0].shortcut[1]}


# resnet20/global: filters of the residual stream (conv2, shortcut) are coupled across blocks, so a channel goes only
# when every producer pruned it; mostly the blocks' inner channels go (≈1.26× measured; ≈2× with scope=layer).
@pytest.mark.parametrize(
    ("name", "scope", "min_reduction"),
    [
        pytest.param("vgg16", "global", 1.2, marks=pytest.mark.slow),
        ("resnet20", "global", 1.15),
        ("resnet20", "layer", 1.5),
    ],
)
def test_filter_pruning_removes_channels_through_batchnorm(name, scope, min_reduction):
    net = _net(name)
    pruning = MagnitudePruning(compression=2, mode="one_shot", granularity="filter", scope=scope)
    pruning.example_input = _example()  # a plain DataLoader: no datamodule to take the input shape from
    watch = _fit(net, pruning)
    assert watch.steps >= 8 and watch.violations == 0
    assert abs(compacted_ratio(pruning, _example()) - 2) / 2 < 0.02  # counted over the prunable weights only
    bns = _tp_batchnorms(net)
    dead = 0
    for layer, module in pruning.masks.modules.items():
        rows = dead_rows(pruning, layer)
        dead += int(rows.sum())
        assert not module.weight[rows].any()
        assert module.bias is None or not module.bias[rows].any()
        for bn in bns.get(layer, ()):
            assert not bn.weight[rows].any() and not bn.bias[rows].any()
            assert bn.weight[~rows].all()  # live channels untouched
    assert dead > 0
    net.eval()
    result = compact(net, _example())  # raises unless the compacted logits match the masked ones
    assert result.max_abs_diff <= 1e-4 * 10
    assert count_macs(net, _example()) / count_macs(result.net, _example()) > min_reduction


def test_filter_masks_resume_bit_identical_with_dependents():
    net = _net("resnet20")
    dense = copy.deepcopy(net)
    first = MagnitudePruning(compression=4, mode="one_shot", granularity="filter")
    first.bind(net)
    first.example_input = _example()
    first.prune_to(first.final_sparsity)
    state = first.state_dict()
    assert set(state["masks"]) == set(first.masks.modules)  # dependents are derived, not stored

    resumed = MagnitudePruning(compression=4, mode="one_shot", granularity="filter")
    resumed.bind(dense)  # Lightning: setup binds, then the callback state is loaded
    resumed.load_state_dict(state)
    resumed.masks.apply()
    assert all(torch.equal(resumed.masks.masks[n], first.masks.masks[n]) for n in first.masks.masks)
    for name, module in dense.named_modules():
        if isinstance(module, nn.BatchNorm2d):
            ref = net.get_submodule(name)
            assert torch.equal(module.weight == 0, ref.weight == 0) and torch.equal(module.bias == 0, ref.bias == 0)
    assert sum(int((m.weight == 0).sum()) for m in dense.modules() if isinstance(m, nn.BatchNorm2d)) > 0


def test_linear_biases_of_pruned_filters_are_zeroed_but_not_the_classifier():
    torch.manual_seed(0)
    net = LeNet300(image_size=8)
    pruning = MagnitudePruning(compression=4, mode="one_shot", granularity="filter")
    pruning.bind(net)
    pruning.example_input = torch.zeros(1, 1, 8, 8)
    assert {n: [p for _, p in d] for n, d in pruning.masks.dependents.items()} == {"fc1": ["bias"], "fc2": ["bias"]}
    pruning.prune_to(pruning.final_sparsity)
    for name in ("fc1", "fc2"):
        rows = dead_rows(pruning, name)
        assert rows.any() and not net.get_submodule(name).bias[rows].any()
    assert net.fc3.bias.all()


@pytest.mark.parametrize("granularity", ["weight", "channel", "column", "2:4"])
def test_other_granularities_leave_biases_and_batchnorm_alone(granularity):
    net = _net("resnet20")
    kept = [p for m in net.modules() if isinstance(m, nn.BatchNorm2d) for p in (m.weight, m.bias)]
    before = [p.clone() for p in kept]
    pruning = MagnitudePruning(
        compression=2, mode="one_shot", granularity=granularity, exclude=["conv1"] if granularity == "2:4" else None
    )  # 3·3·3 inputs: not N:M
    pruning.bind(net)
    pruning.example_input = _example()
    assert pruning.masks.dependents == {}
    pruning.prune_to(pruning.final_sparsity)
    assert all(torch.equal(p, b) for p, b in zip(kept, before))
