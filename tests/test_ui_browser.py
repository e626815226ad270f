"""The MLflow UI on a small real sweep, in headless Chromium: what a person comparing runs sees. And `make ui`: the
address it prints answers at once.

Needs Debian's chromium (CI installs it in .ci/run) and the playwright package; the Chromium tests are skipped where
either is missing.
"""

import os
import queue
import signal
import subprocess
import sys
import threading
import urllib.request

import mlflow
import pytest

from conftest import runs_in
from prunelab.collapse import Collapse
from prunelab.tracking.server import ui, ui_pages
from prunelab.tracking.sweeps.sweep import KIND_TAG

pytestmark = pytest.mark.slow
CHROMIUM = pytest.mark.skipif(ui_pages.missing() is not None, reason=str(ui_pages.missing()))

SWEEP = [
    sys.executable,
    "-m",
    "prunelab.train",
    "-m",
    "data=digits",
    "model=lenet300",
    "dense.epochs=1",
    "finetune.epochs=1",
    "logger.log_model=false",
    "measure.latency=false",
    "pruning=magnitude,admm",
    "pruning.compression=2,4",
]


def _record_a_collapse(uri: str, run) -> str:
    """Record ``run`` as collapsed the way a run records its collapse (the tags of :class:`Collapse` and the
    description of :func:`ui.run_description`); return that description. A 1-epoch sweep on the digits does not
    collapse by itself, and what is checked here is what the run list shows, not the check (tests/test_collapse.py)."""
    verdict = Collapse(("test accuracy 11.00% is near chance (10.0% for 10 classes; collapse below 19.0%)",))
    metrics = {**run.data.metrics, "test_acc": 11.0, "acc_drop": run.data.metrics["dense_test_acc"] - 11.0}
    description = ui.run_description(metrics, verdict)
    client = mlflow.MlflowClient(uri)
    for key, value in {**verdict.tags(), ui.DESCRIPTION_TAG: description}.items():
        client.set_tag(run.info.run_id, key, value)
    return description


@CHROMIUM
def test_run_list_compare_charts_and_report_in_chromium(tmp_path):
    proc = subprocess.run([*SWEEP, f"paths.root_dir={tmp_path}"], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = runs_in(tmp_path)
    (parent,) = [r for r in runs if r.data.tags.get(KIND_TAG) == "sweep"]
    children = sorted((r for r in runs if r.data.tags.get(KIND_TAG) != "sweep"), key=lambda r: r.info.run_name)
    assert len(children) == 4
    missing = [c.info.run_name for c in children if not c.data.tags.get(ui.DESCRIPTION_TAG)]
    assert not missing, f"no one-line result ({ui.DESCRIPTION_TAG}, ui.run_description) on {missing}"
    uri = f"sqlite:///{tmp_path}/outputs/mlflow.db"
    _record_a_collapse(uri, children[0])
    look_at_the_sweep(uri, parent, children, tmp_path)


def look_at_the_sweep(uri: str, parent, children: list, folder) -> None:
    """What a person sees of a sweep (``parent``, its ``children``, the first of them collapsed) in Chromium."""
    collapsed, experiment = children[0], parent.info.experiment_id
    with ui_pages.serve(uri) as base, ui_pages.chromium() as page:
        try:
            # the run list opens in the "Model training" view, in the saved view, every run of the sweep listed
            ui_pages.open_run_list(page, base, experiment)
            for child in children:
                page.get_by_text(child.info.run_name, exact=True).first.wait_for(timeout=30_000)
            assert page.get_by_role("columnheader", name="test_acc").count() >= 1
            # each run's one-line result, and a collapsed run's mark, in the window as it opens: no scrolling
            assert ui_pages.in_view(page, page.get_by_role("columnheader", name="Description"))
            cells = page.get_by_role("gridcell")
            for child in children[1:]:
                assert ui_pages.in_view(page, cells.filter(has_text=child.data.tags[ui.DESCRIPTION_TAG][:40]))
            mark = cells.filter(has_text=ui.COLLAPSED_MARK)
            assert mark.count() == 1 and ui_pages.in_view(page, mark)
            name = page.get_by_text(collapsed.info.run_name, exact=True).first.bounding_box()
            box = mark.first.bounding_box()
            assert abs((box["y"] + box["height"] / 2) - (name["y"] + name["height"] / 2)) < 8  # on the run's row
            # Compare's charts: accuracy against each cost, in the view's own section
            ui_pages.open_run_list(page, base, experiment, charts=True)
            page.get_by_text("test_acc (%) vs compression, MACs reduction, speed-up").wait_for(timeout=30_000)
            for x in ("compression", "macs_reduction"):
                assert page.get_by_text(f"{x} vs. test_acc").count() >= 1
            # the parent run's report, drawn inside MLflow's artifact viewer
            frame = ui_pages.open_report(page, base, experiment, parent.info.run_id)
            legend = ui_pages.legend_entries(frame)
            traces = ui_pages.traces(frame)
            # downloaded from the viewer, the page draws its figure by itself (opened from disk, no server)
            saved = ui_pages.download_report(page, folder)
            page.goto(saved.as_uri())
            assert ui_pages.figure_drawn(page) == len(traces)
        except Exception:
            page.screenshot(path=str(folder / "failure.png"))
            raise
    for method in ("admm", "magnitude"):
        assert [e for e in legend if e.split(" (")[0] == method] == [f"{method} (n=1)"]
        assert len([t for t in traces if t["group"] == method and t["legend"]]) == 1
    assert "dense baseline" in legend and "Pareto front" in legend
    assert len(legend) == len(set(legend))  # no repeated legend entries
    # the report is linked where the eye lands: the parent run's and the experiment's descriptions
    client = mlflow.MlflowClient(uri)
    link = ui.report_path(experiment, parent.info.run_id)
    assert link in client.get_run(parent.info.run_id).data.tags[ui.DESCRIPTION_TAG]
    assert link in client.get_experiment(experiment).tags[ui.DESCRIPTION_TAG]


def _lines(stream, into: queue.Queue) -> None:
    for line in stream:
        into.put(line)
    into.put(None)


def test_make_ui_prints_an_address_that_answers_at_once(tmp_path):
    port = ui_pages.free_port()
    command = [
        sys.executable,
        "-m",
        "prunelab.tracking.server.ui",
        "--backend-store-uri",
        f"sqlite:///{tmp_path}/mlflow.db",
        "--port",
        str(port),
    ]
    server = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True
    )
    printed: queue.Queue = queue.Queue()
    threading.Thread(target=_lines, args=(server.stdout, printed), daemon=True).start()
    try:
        seen = []
        while not seen or "open http" not in seen[-1]:
            line = printed.get(timeout=300)
            assert line is not None, f"prunelab-ui ended without an address: {seen}"
            seen.append(line)
        assert not any("http://" in line for line in seen[:-1]), seen  # no address before the server answers
        page = seen[-1].split("open ", 1)[1].strip()
        assert page.startswith(f"http://127.0.0.1:{port}/")
        with urllib.request.urlopen(page.split("#")[0], timeout=5) as answer:  # the first try, no retry
            assert answer.status == 200 and b"<html" in answer.read(2000).lower()
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)
