"""The MLflow UI on a small real sweep, in headless Chromium: what a person comparing runs sees.

Needs Debian's chromium (CI installs it in .ci/run) and the playwright package; skipped where either is missing.
"""

import subprocess
import sys

import pytest

from conftest import runs_in
from prunelab.tracking import ui_pages
from prunelab.tracking.sweep import KIND_TAG

pytestmark = [pytest.mark.slow, pytest.mark.skipif(ui_pages.missing() is not None, reason=str(ui_pages.missing()))]

SWEEP = [sys.executable, "-m", "prunelab.train", "-m", "data=digits", "model=lenet300", "dense.epochs=1",
         "finetune.epochs=1", "logger.log_model=false", "measure.latency=false", "pruning=magnitude,admm",
         "pruning.compression=2,4"]


def test_run_list_compare_charts_and_report_in_chromium(tmp_path):
    proc = subprocess.run([*SWEEP, f"paths.root_dir={tmp_path}"], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = runs_in(tmp_path)
    (parent,) = [r for r in runs if r.data.tags.get(KIND_TAG) == "sweep"]
    children = [r for r in runs if r.data.tags.get(KIND_TAG) != "sweep"]
    assert len(children) == 4
    experiment = parent.info.experiment_id

    with ui_pages.serve(f"sqlite:///{tmp_path}/outputs/mlflow.db") as base, ui_pages.chromium() as page:
        try:
            # the run list opens in the "Model training" view, in the saved view, every run of the sweep listed
            ui_pages.open_run_list(page, base, experiment)
            for child in children:
                page.get_by_text(child.info.run_name, exact=True).first.wait_for(timeout=30_000)
            assert page.get_by_role("columnheader", name="test_acc").count() >= 1
            # Compare's charts: accuracy against each cost, in the view's own section
            ui_pages.open_run_list(page, base, experiment, charts=True)
            page.get_by_text("test_acc (%) vs compression, MACs reduction, speed-up").wait_for(timeout=30_000)
            for x in ("compression", "macs_reduction"):
                assert page.get_by_text(f"{x} vs. test_acc").count() >= 1
            # the parent run's report, drawn inside MLflow's artifact viewer
            frame = ui_pages.open_report(page, base, experiment, parent.info.run_id)
        except Exception:
            page.screenshot(path=str(tmp_path / "failure.png"))
            raise
        legend = ui_pages.legend_entries(frame)
        traces = ui_pages.traces(frame)
    for method in ("admm", "magnitude"):
        assert [e for e in legend if e.split(" (")[0] == method] == [f"{method} (n=1)"]
        assert len([t for t in traces if t["group"] == method and t["legend"]]) == 1
    assert "dense baseline" in legend and "Pareto front" in legend
    assert len(legend) == len(set(legend))  # no repeated legend entries
