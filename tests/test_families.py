"""Networks we did not write (torchvision ResNet-18, MobileNetV2, a small Vision Transformer) × every method at 4×,
each in a plain Lightning script on 32×32 inputs: the fit reaches the ratio, the compacted network gives the masked
one's logits and ONNX Runtime gives them too; or the method refuses before training, naming the layer it cannot
handle. The table "methods × model families" of docs/own-model.md is this test's outcome."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
import torchvision
from hydra.utils import instantiate
from torch.utils.data import DataLoader, TensorDataset

from conftest import method_config
from prunelab.measure import measure
from prunelab.models.classifier import Classifier
from prunelab.models.factory import torchvision_model
from prunelab.pruning import METHODS

pytestmark = pytest.mark.slow

EXAMPLE = torch.zeros(1, 3, 32, 32)
# (family, method) → what the refusal names; every other pair must prune
REFUSED = {
    ("mobilenet_v2", "eigendamage"): r"groups=",
    ("mobilenet_v2", "obd"): r"grouped \(depthwise\) Conv2d",
    ("vit", "eigendamage"): r"out_proj of an nn.MultiheadAttention",
    ("vit", "obd"): r"out_proj of an nn.MultiheadAttention",
    ("vit", "increg"): r"nn.MultiheadAttention",
    ("vit", "spp"): r"nn.MultiheadAttention",
}


def network(family: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if family == "vit":
        return torchvision.models.VisionTransformer(
            image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64, num_classes=10
        )
    return torchvision_model(family, num_classes=10)


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("family", ["resnet18", "mobilenet_v2", "vit"])
def test_method_on_a_library_network(family, method, tmp_path):
    net, dense = network(family), network(family)
    pruning = instantiate(method_config(method), compression=4)
    if (family, method) in REFUSED:
        with pytest.raises(ValueError, match=REFUSED[family, method]):
            pruning.validate(net, EXAMPLE)
        return
    pruning.validate(net, EXAMPLE)
    pruning.example_input = EXAMPLE
    generator = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(32, 3, 32, 32, generator=generator), torch.arange(32) % 10)
    trainer = pl.Trainer(
        max_epochs=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[pruning],
    )
    trainer.fit(
        Classifier(net, 10, optimizer=lambda params: torch.optim.Adam(params, 1e-3)),
        train_dataloaders=DataLoader(data, batch_size=16),
    )
    metrics, _, _ = measure(net, dense, pruning.layer_names, EXAMPLE, tmp_path, pruning.counts_compacted, onnx=True)
    assert metrics["compression"] == pytest.approx(4.0, rel=0.02)
    assert metrics["compaction_max_abs_diff"] <= 1e-4 and metrics["onnx_max_abs_diff"] <= 1e-4
    assert (tmp_path / "model.onnx").exists()
