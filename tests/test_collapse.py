"""Collapse detection: accuracy near chance, a layer with no weight left, no path from input to output; a forced
collapse recorded as such (tag, WARNING line) while the run still finishes."""

import pytest
import torch

import prunelab.train as train_module
from conftest import runs_in
from prunelab import collapse
from prunelab.models import LeNet300

EXAMPLE = torch.zeros(1, 1, 8, 8)


def _net() -> LeNet300:
    torch.manual_seed(0)
    return LeNet300(in_channels=1, image_size=8, num_classes=10)


def _layers(net) -> list[str]:
    return [n for n, m in net.named_modules() if isinstance(m, torch.nn.Linear)]


def test_chance_limit_is_a_tenth_of_the_way_from_chance_to_perfect():
    assert collapse.chance_limit(10) == pytest.approx(19.0)
    assert collapse.chance_limit(100) == pytest.approx(10.9)
    assert collapse.chance_limit(2) == pytest.approx(55.0)


def test_healthy_network_above_the_limit_is_not_collapsed():
    net = _net()
    verdict = collapse.check(net, _layers(net), EXAMPLE, test_acc=19.5, num_classes=10)
    assert not verdict.collapsed and verdict.tags() == {"collapsed": "false"} and verdict.warning is None


def test_accuracy_near_chance_is_a_collapse():
    net = _net()
    verdict = collapse.check(net, _layers(net), EXAMPLE, test_acc=18.9, num_classes=10)
    assert verdict.collapsed and verdict.reasons == (
        "test accuracy 18.90% is near chance (10.0% for 10 classes; collapse below 19.0%)",
    )
    assert verdict.tags()["collapsed"] == "true" and "near chance" in verdict.tags()["collapse_reason"]


def test_a_layer_without_weights_cuts_every_path():
    net = _net()
    with torch.no_grad():
        net.fc2.weight.zero_()
    reasons = collapse.check(net, _layers(net), EXAMPLE, test_acc=90.0, num_classes=10).reasons
    assert reasons == (
        "no nonzero weight left in fc2",
        "the output does not depend on the input (no path from input to output)",
    )


def test_disconnected_weights_in_every_layer_are_no_path():
    net = _net()
    with torch.no_grad():  # fc1 keeps only hidden unit 0's input; fc2 reads only hidden unit 1: nothing connects
        for layer in (net.fc1, net.fc2):
            layer.weight.zero_()
        net.fc1.weight[0, 5] = 1.0
        net.fc2.weight[3, 1] = 1.0
    assert not collapse.depends_on_input(net, EXAMPLE)
    reasons = collapse.check(net, _layers(net), EXAMPLE, test_acc=90.0, num_classes=10).reasons
    assert reasons == ("the output does not depend on the input (no path from input to output)",)
    with torch.no_grad():
        net.fc2.weight[3, 0] = 1.0  # now unit 0 carries the input through
    assert collapse.depends_on_input(net, EXAMPLE)


def test_forced_collapse_is_tagged_and_warned_and_the_run_finishes(make_cfg, tmp_path, monkeypatch, capsys):
    fit = train_module._fit_pruning

    def fit_then_cut(cfg, parts, logger):  # a pruning that leaves fc2 without a weight
        acc = fit(cfg, parts, logger)
        with torch.no_grad():
            parts.pruning.masks.set("fc2", torch.zeros_like(parts.net.fc2.weight, dtype=torch.bool))
            parts.pruning.masks.apply()
        return acc

    monkeypatch.setattr(train_module, "_fit_pruning", fit_then_cut)
    metrics = train_module.train(make_cfg("pruning.compression=2"))
    (run,) = runs_in(tmp_path)
    assert run.info.status == "FINISHED" and metrics["test_acc"] == run.data.metrics["test_acc"]
    assert run.data.tags["collapsed"] == "true"
    assert "no nonzero weight left in fc2" in run.data.tags["collapse_reason"]
    assert "no path from input to output" in run.data.tags["collapse_reason"]
    out = capsys.readouterr().out
    assert " WARNING       collapsed: " in out and "fc2" in out.split("WARNING")[1].splitlines()[0]
