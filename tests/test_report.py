"""The sweep report as a comparison page: one colour per method in every panel, one legend entry per method, dense
baseline, log-2 ratio axes, latency as medians with their IQR (not joined), collapsed and failed cells marked and off
the Pareto front, the best method per ratio, a self-contained HTML page, descriptions that link it from the parent run
and the experiment, and `prunelab-report` on the latest sweep into a folder of its own."""

import json

import mlflow
import numpy as np
import pandas as pd
import pytest

from prunelab.tracking.server import ui
from prunelab.tracking.server.ui import method_color
from prunelab.tracking.sweeps import report, report_figure
from prunelab.tracking.sweeps.sweep import KIND_TAG


def _run(exp, sweep, method, ratio, seed, acc, collapsed=False, latency=None, dense=97.0):
    with mlflow.start_run(experiment_id=exp, tags={"sweep_id": sweep, "collapsed": str(collapsed).lower()}):
        mlflow.log_params(
            {
                "dataset": "mnist5k",
                "model": "lenet5",
                "method": method,
                "granularity": "weight",
                "compression_target": ratio,
                "seed": seed,
            }
        )
        mlflow.log_metrics(
            {
                "test_acc": acc,
                "dense_test_acc": dense + seed,
                "compression": ratio,
                "macs_reduction": ratio / 2,
                "latency_cpu_b1_ms": latency or 1.0 / ratio,
                "latency_cpu_b1_iqr_ms": 0.1 * (latency or 1.0 / ratio),
            }
        )


@pytest.fixture
def store(tmp_path):
    uri = f"sqlite:///{tmp_path}/m.db"
    mlflow.set_tracking_uri(uri)
    exp = mlflow.create_experiment("prunelab", artifact_location=(tmp_path / "a").as_uri())
    for seed in (0, 1):
        _run(exp, "s1", "magnitude", 4, seed, 96.0 + 0.4 * seed)
        _run(exp, "s1", "magnitude", 16, seed, 95.0, latency=0.5)
        _run(exp, "s1", "admm", 4, seed, 96.5)
        _run(exp, "s1", "admm", 16, seed, 11.0 if seed else 96.0, collapsed=bool(seed), latency=0.2)
    return uri, exp


def _panels(uri):
    runs = report.load_runs(uri, "prunelab", "s1")
    return report_figure.panels(report.summarize(runs), report.dense_baselines(runs), report.pareto)


def test_collapsed_cells_are_marked_and_off_the_pareto_front(store):
    uri, _ = store
    table = report.summarize(report.load_runs(uri, "prunelab", "s1")).set_index(["method", "compression_target"])
    assert table.loc[("admm", 16), "status"] == "collapsed" and table.loc[("admm", 16), "collapsed"] == 1
    assert table.loc[("admm", 16), "test_acc"] == pytest.approx(53.5)  # still a result: in the mean
    assert "collapsed (1 of 2 collapsed)" in report.to_markdown(table.reset_index())
    compression = next(p for p in _panels(uri) if p.axis.startswith("compression"))
    # without the collapse flag admm@16 (the highest compression) would be on the front
    assert sorted(compression.front[0].tolist()) == [4.0, 16.0]
    assert 53.5 not in compression.front[1].tolist()


def test_one_colour_per_method_one_legend_entry_dense_line_and_ratio_ticks(store):
    uri, _ = store
    panels = _panels(uri)
    assert len(panels) == 3  # compression, MACs reduction, latency for one dataset/model
    fig = report_figure.to_plotly(panels, "t")
    for method in ("admm", "magnitude"):
        lines = [t for t in fig.data if t.legendgroup == method]
        assert len(lines) == 3 and {t.line.color for t in lines} == {method_color(method)}
        assert [t.showlegend for t in lines].count(True) == 1 and lines[0].name == f"{method} (n=2)"
    dense = [t for t in fig.data if t.legendgroup == report_figure.DENSE]
    assert len(dense) == 3 and all(list(t.y) == [97.5, 97.5] for t in dense)  # mean over seeds 97, 98
    assert fig.layout.xaxis.ticktext == ("4×", "8×", "16×") and fig.layout.xaxis.type == "log"
    latency = [t for t in fig.data if t.legendgroup == "magnitude" and t.xaxis == "x3"][0]
    assert latency.mode == "markers"  # medians of noisy timings are not joined into a trend
    assert list(latency.x) == [0.25, 0.5] and list(latency.error_x.array) == pytest.approx([0.0125, 0.025])
    compression = [t for t in fig.data if t.legendgroup == "magnitude" and t.xaxis == "x"][0]
    assert compression.mode == "lines+markers" and compression.error_x.array is None


def test_log2_ticks_stay_few_on_wide_ranges():
    assert report_figure.log2_ticks(3, 20) == [2, 4, 8, 16, 32]
    assert len(report_figure.log2_ticks(1, 600)) <= 8


def test_html_carries_plotly_so_a_downloaded_page_draws_its_figure(store, tmp_path):
    uri, _ = store
    result = report.build(uri, "prunelab", "s1", out_dir=tmp_path / "r")
    page = (tmp_path / "r" / "accuracy.html").read_text()
    assert len(page) > 1_000_000 and "<script src=" not in page and "plotly.min" not in page  # nothing beside it
    assert 'id="figure"' in page and "Plotly.newPlot" in page
    assert "collapsed" in page and "Best method at each requested ratio" in page and "<table" in page
    assert json.loads((tmp_path / "r" / "table.json").read_text())["columns"][:4] == report.CELL
    assert {f.name for f in result.files} >= {"accuracy.png", "accuracy.html", "table.md"}


def test_best_method_per_ratio_leaves_collapsed_cells_out(store):
    uri, _ = store
    best = report.best_per_ratio(report.summarize(report.load_runs(uri, "prunelab", "s1")))
    at = best.set_index("compression_target")
    assert at.loc[4, "best"] == "admm" and at.loc[4, "runner_up"] == "magnitude"
    assert at.loc[4, "margin"] == pytest.approx(0.3) and at.loc[4, "clear"]  # 0.3 > std 0.28 of magnitude's seeds
    assert at.loc[16, "best"] == "magnitude" and pd.isna(at.loc[16, "runner_up"])  # admm@16 has a collapsed run
    shown = report.display_best(best)
    assert shown.iloc[0].tolist() == ["mnist5k / lenet5", "4×", "admm", "96.50 ± 0.00", "magnitude", "+0.30"]


def test_parent_run_and_experiment_descriptions_link_the_report(store, tmp_path):
    uri, exp = store
    client = mlflow.MlflowClient()
    client.set_experiment_tag(exp, "mlflow.note.content", ui.NOTE)
    parent = client.create_run(exp, tags={"sweep_id": "s1", KIND_TAG: "sweep"}).info.run_id
    report.build(uri, "prunelab", "s1", parent_run_id=parent, out_dir=tmp_path / "r")
    link = f"#/experiments/{exp}/runs/{parent}/artifacts/report/accuracy.html?workflowType=machine_learning"
    described = client.get_run(parent).data.tags["mlflow.note.content"]
    assert f"]({link})" in described and "| mnist5k / lenet5 | 4× | admm | 96.50 ± 0.00 | magnitude |" in described
    assert described.startswith("Best method per ratio — mnist5k/lenet5: 4× admm · 16× magnitude\n")
    note = client.get_experiment(exp).tags["mlflow.note.content"]
    assert note.startswith(f"**Latest sweep report:** [sweep s1]({link}) — best per ratio: mnist5k/lenet5: 4× admm")
    assert note.endswith(ui.NOTE)
    report.build(uri, "prunelab", "s1", parent_run_id=parent, out_dir=tmp_path / "r")  # rebuilt: replaced, not added
    assert client.get_experiment(exp).tags["mlflow.note.content"] == note
    client.set_experiment_tag(exp, "mlflow.note.content", "my own notes")  # a person's description is kept
    report.build(uri, "prunelab", "s1", parent_run_id=parent, out_dir=tmp_path / "r")
    assert client.get_experiment(exp).tags["mlflow.note.content"] == "my own notes"


def test_report_cli_takes_the_latest_sweep_into_its_own_folder(store, tmp_path, monkeypatch, capsys):
    uri, exp = store
    for sweep in ("s1", "s2"):
        mlflow.MlflowClient().create_run(exp, tags={"sweep_id": sweep, KIND_TAG: "sweep"})
    _run(exp, "s2", "magnitude", 8, 0, 90.0)
    monkeypatch.chdir(tmp_path)
    report.main(["--tracking-uri", uri])
    assert "| 8 | 90.00 |" in capsys.readouterr().out
    report.main(["--tracking-uri", uri, "--sweep-id", "s1"])
    assert (tmp_path / "outputs" / "reports" / "s2" / "accuracy.html").exists()
    assert (tmp_path / "outputs" / "reports" / "s1" / "accuracy.html").exists()
    report.main(["--tracking-uri", uri, "--sweep-id", "s1"])  # again: the logged table is replaced, not extended
    parent = mlflow.search_runs([exp], "tags.sweep_id = 's1' and tags.`prunelab.kind` = 'sweep'", output_format="list")
    files = {a.path for a in mlflow.MlflowClient().list_artifacts(parent[0].info.run_id, "report")}
    assert "report/accuracy.html" in files
    table = mlflow.MlflowClient().load_table(exp, "report/table.json", run_ids=[parent[0].info.run_id])
    assert len(table) == 4  # 2 methods × 2 ratios
    with pytest.raises(SystemExit, match="no sweep_id='nope'"):
        report.main(["--tracking-uri", uri, "--sweep-id", "nope"])


def test_a_sweep_without_runs_still_gets_its_files(tmp_path):
    uri = f"sqlite:///{tmp_path}/m.db"
    mlflow.set_tracking_uri(uri)
    mlflow.create_experiment("prunelab", artifact_location=(tmp_path / "a").as_uri())
    result = report.build(uri, "prunelab", "none-yet", out_dir=tmp_path / "r")
    assert result.table.empty and (tmp_path / "r" / "accuracy.png").stat().st_size > 0


def test_pareto_ignores_nan():
    assert report.pareto(np.array([1.0, np.nan]), np.array([90.0, 99.0])).tolist() == [True, False]
