"""What prunelab sets up for the MLflow UI: the experiment's kind, description and saved view, method colours, links,
and each run's one-line result."""

import json

import mlflow
import pytest

from prunelab.collapse import Collapse
from prunelab.tracking.server import ui
from prunelab.tracking.server.store import ensure_experiment


def test_new_experiment_has_the_kind_the_description_and_the_saved_view(tmp_path):
    uri = f"sqlite:///{tmp_path}/m.db"
    exp_id = ensure_experiment(uri, "prunelab", (tmp_path / "a").as_uri())
    tags = mlflow.MlflowClient(uri).get_experiment(exp_id).tags
    assert tags["mlflow.experimentKind"] == "custom_model_development"
    assert "report/accuracy.html" in tags["mlflow.note.content"]
    view = json.loads(tags[f"mlflow.sharedViewState.{ui.VIEW_ID}"])
    assert view["name"] == ui.VIEW_NAME and isinstance(view["createdAt"], int)
    state = json.loads(view["state"])
    # the one-line result first, then accuracy and the collapse flag: in view without scrolling
    assert state["selectedColumns"][:3] == ["attributes.`Description`", "metrics.`test_acc`", "tags.`collapsed`"]
    assert state["columnOrder"] == state["selectedColumns"]
    axes = [(c["xaxis"]["key"], c["yaxis"]["key"]) for c in state["compareRunCharts"]]
    assert axes == [("compression", "test_acc"), ("macs_reduction", "test_acc"), ("speedup_cpu_b1", "test_acc")]
    assert {c["metricSectionId"] for c in state["compareRunCharts"]} == {state["compareRunSections"][0]["uuid"]}


def test_older_experiments_get_the_missing_tags_and_keep_their_own(tmp_path):
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/m.db")
    exp_id = client.create_experiment(
        "old", artifact_location=(tmp_path / "a").as_uri(), tags={"mlflow.note.content": "mine"}
    )
    ui.add_missing_tags(client, client.get_experiment(exp_id))
    tags = client.get_experiment(exp_id).tags
    assert tags["mlflow.note.content"] == "mine" and f"mlflow.sharedViewState.{ui.VIEW_ID}" in tags


def test_method_colours_are_fixed_and_distinct():
    known = ["magnitude", "admm", "slr", "increg", "spp", "autoprune", "eigendamage", "none"]
    assert len({ui.method_color(m) for m in known}) == len(known)
    assert ui.method_color("magnitude (filter)") == ui.method_color("magnitude")
    assert ui.method_color("newmethod") == ui.method_color("newmethod")


@pytest.mark.parametrize(
    "uri, hint",
    [
        (
            "sqlite:///x/mlflow.db",
            "make ui, then http://127.0.0.1:5000/#/experiments/3/runs/r1?workflowType=machine_learning",
        ),
        ("http://host:5000/", "http://host:5000/#/experiments/3/runs/r1?workflowType=machine_learning"),
    ],
)
def test_links_open_the_model_training_view(uri, hint):
    assert ui.browse_hint(uri, "3", "r1") == hint


METRICS = {
    "test_acc": 96.4213,
    "dense_test_acc": 97.23,
    "acc_drop": 0.8087,
    "compression": 8.0012,
    "macs_reduction": 3.1,
    "speedup_cpu_b1": 1.42,
}


def test_run_description_is_one_line_and_a_collapse_comes_first():
    assert ui.run_description(METRICS, Collapse()) == (
        "96.42 % test acc (−0.81 vs dense 97.23) at 8.00× · 3.10× fewer MACs · 1.42× faster (CPU b1)"
    )
    reason = "test accuracy 11.30% is near chance\n(10.0% for 10 classes)"
    line = ui.run_description({**METRICS, "test_acc": 11.3, "acc_drop": 85.93}, Collapse((reason,)))
    assert line.startswith("✗ COLLAPSED: 11.30 % test acc (−85.93 vs dense 97.23) at 8.00×")
    assert "\n" not in line and line.endswith("near chance (10.0% for 10 classes)")
    assert (
        ui.run_description({"test_acc": 97.5, "dense_test_acc": 97.2, "acc_drop": -0.3, "compression": float("nan")})
        == "97.50 % test acc (+0.30 vs dense 97.20)"
    )
    assert ui.run_description({}) == "no result"
