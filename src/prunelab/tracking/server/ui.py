"""The MLflow UI as a person comparing pruning runs meets it: the experiment's view, a saved run-list view with the
columns and charts that compare methods, one colour per method, and ``make ui`` (``prunelab-ui``).

MLflow 3.17 chooses between its GenAI view and its "Model training" view per browser, not per experiment: the toggle
at the top of the sidebar, remembered in the browser's local storage, or ``workflowType=machine_learning`` in the
page's URL. The ``mlflow.experimentKind`` tag is read only when that toggle is switched off, so every link prunelab
prints carries the URL parameter, and the tag is set too for MLflow versions that read it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

# Fixed colour per method, in the report and in the UI (tag mlflow.runColor): Tableau 10 in the order methods appear.
_PALETTE = (
    "#1f77b4",
    "#d62728",
    "#2ca02c",
    "#9467bd",
    "#ff7f0e",
    "#8c564b",
    "#e377c2",
    "#17becf",
    "#bcbd22",
    "#7f7f7f",
)
_KNOWN = ("magnitude", "admm", "slr", "increg", "spp", "autoprune", "eigendamage", "none")
VIEW_ID = "prunelab-compare"
VIEW_NAME = "prunelab: accuracy vs cost"
UI_PARAMS = "workflowType=machine_learning"
DEFAULT_URL = "http://127.0.0.1:5000"
DESCRIPTION_TAG = "mlflow.note.content"  # a run's or an experiment's description in the MLflow UI
COLLAPSED_MARK = "✗ COLLAPSED"


def method_color(method: str) -> str:
    """Colour of a method (``"magnitude (filter)"`` has the colour of ``magnitude``)."""
    base = method.split(" (")[0]
    if base in _KNOWN:
        return _PALETTE[_KNOWN.index(base)]
    spare = _PALETTE[len(_KNOWN) :]
    return spare[int(hashlib.sha256(base.encode()).hexdigest(), 16) % len(spare)]


def _column(kind: str, key: str) -> str:
    return f"{kind}.`{key}`"


def _scatter(uuid: str, section: str, x: str) -> dict:
    return {
        "uuid": uuid,
        "type": "SCATTER",
        "runsCountToCompare": 100,
        "metricSectionId": section,
        "deleted": False,
        "isGenerated": False,
        "xaxis": {"key": x, "type": "METRIC"},
        "yaxis": {"key": "test_acc", "type": "METRIC"},
    }


def saved_view() -> dict:
    """The run-list state of the saved view ``VIEW_NAME`` (MLflow's own saved-view format)."""
    section = f"{VIEW_ID}-charts"
    # first, beside the run name: the one-line result (run_description; a collapsed run says so at its start)
    columns = [_column("attributes", "Description"), _column("metrics", "test_acc"), _column("tags", "collapsed")]
    columns += [
        _column("metrics", k) for k in ("acc_drop", "compression", "dense_test_acc", "macs_reduction", "speedup_cpu_b1")
    ]
    columns += [
        _column("params", k) for k in ("method", "granularity", "compression_target", "dataset", "model", "seed")
    ]
    columns += [_column("attributes", "Dataset"), _column("attributes", "Models")]
    return {
        # sorted by a metric, the run list shows the runs of every sweep flat instead of folded under their parent
        "searchFilter": "",
        "orderByKey": _column("metrics", "compression"),
        "orderByAsc": True,
        "startTime": "ALL",
        "lifecycleFilter": "Active",
        "modelVersionFilter": "All Runs",
        "datasetsFilter": [],
        "selectedColumns": columns,
        "columnOrder": columns,
        "runsHiddenMode": "SHOW_ALL",
        "useGroupedValuesInCharts": False,
        "isAccordionReordered": True,
        "compareRunCharts": [
            _scatter(f"{VIEW_ID}-{x}", section, x) for x in ("compression", "macs_reduction", "speedup_cpu_b1")
        ],
        "compareRunSections": [
            {
                "uuid": section,
                "name": "test_acc (%) vs compression, MACs reduction, speed-up",
                "display": True,
                "isReordered": False,
                "deleted": False,
                "isGenerated": False,
            }
        ],
    }


NOTE = """prunelab runs: one per (method, compression, dataset, model, seed). A sweep is a parent run `sweep-<id>`;
its artifact `report/accuracy.html` compares the methods (accuracy vs compression, MACs reduction, latency; mean ± std
over seeds; collapsed runs marked) and its description names the best method at each ratio. In the run list,
**Views → prunelab: accuracy vs cost** shows each run's one-line result first (collapsed runs start with
"✗ COLLAPSED"), the columns and the accuracy-vs-compression charts, one colour per method. `test_acc` is test
accuracy in percent."""
LATEST_REPORT = "Latest sweep report:"


def report_path(experiment_id: str, run_id: str) -> str:
    """The sweep report of parent run ``run_id`` in MLflow's artifact viewer, as a link within the UI."""
    return f"#/experiments/{experiment_id}/runs/{run_id}/artifacts/report/accuracy.html?{UI_PARAMS}"


def experiment_description(experiment_id: str, sweep_id: str, run_id: str, best: str = "") -> str:
    """The experiment's description once a sweep has a report: a link to that report and ``best`` (a line) first,
    where the folded description shows them, then :data:`NOTE`."""
    head = f"**{LATEST_REPORT}** [sweep {sweep_id}]({report_path(experiment_id, run_id)})"
    return f"{head}{' — ' + best if best else ''}\n\n{NOTE}"


def is_own_description(text: str | None) -> bool:
    """Whether an experiment's description is prunelab's (:data:`NOTE`, with or without a report link), not a
    person's own, which prunelab leaves alone."""
    return text is None or text == NOTE or (text.startswith(f"**{LATEST_REPORT}**") and text.endswith(NOTE))


def _num(metrics: dict, key: str, fmt: str) -> str | None:
    value = metrics.get(key)
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return format(value, fmt) if value == value else None  # NaN: not shown


def run_description(metrics: dict[str, float], verdict=None) -> str:
    """A run's result in one line, for its MLflow description (tag :data:`DESCRIPTION_TAG`), shown first in the
    saved run view: test accuracy and its drop from the dense model, the compression reached, MACs and CPU speed-up;
    a collapsed run (``verdict``: :class:`prunelab.collapse.Collapse`) starts with :data:`COLLAPSED_MARK`
    and ends with the reason.

    Example: ``96.42 % test acc (−0.81 vs dense 97.23) at 8.00× · 3.10× fewer MACs · 1.42× faster (CPU b1)``.
    """
    acc, dense, compression = (_num(metrics, k, ".2f") for k in ("test_acc", "dense_test_acc", "compression"))
    head = ""
    if acc is not None:
        head = f"{acc} % test acc"
        if dense is not None and _num(metrics, "acc_drop", "") is not None:
            head += f" ({-float(metrics['acc_drop']):+.2f} vs dense {dense})".replace("-", "−")
    if compression is not None:
        head = f"{head} at {compression}×" if head else f"{compression}× compression"
    parts = [head] if head else []
    macs, speedup = (_num(metrics, k, ".2f") for k in ("macs_reduction", "speedup_cpu_b1"))
    if macs is not None:
        parts.append(f"{macs}× fewer MACs")
    if speedup is not None:
        parts.append(f"{speedup}× faster (CPU b1)")
    line = " · ".join(parts) or "no result"
    if verdict is not None and verdict.collapsed:
        line = f"{COLLAPSED_MARK}: {line} — {'; '.join(verdict.reasons)}"
    return " ".join(line.split())[:1000]  # one line, whatever the reasons say


def experiment_tags() -> dict[str, str]:
    """Tags set on every experiment prunelab creates: its kind, its description, the saved view."""
    now = int(time.time() * 1000)
    view = {"name": VIEW_NAME, "createdAt": now, "updatedAt": now, "state": json.dumps(saved_view())}
    return {
        "mlflow.experimentKind": "custom_model_development",
        "mlflow.note.content": NOTE,
        f"mlflow.sharedViewState.{VIEW_ID}": json.dumps(view),
    }


def add_missing_tags(client, experiment) -> None:
    """Give an experiment created before these tags existed the ones it lacks (user-set values are kept)."""
    for key, value in experiment_tags().items():
        if key not in experiment.tags:
            client.set_experiment_tag(experiment.experiment_id, key, value)


def base_url(uri: str) -> str:
    """Where the UI of the store ``uri`` is: the server itself, or ``make ui``'s address for a local store."""
    return uri.rstrip("/") if uri.startswith(("http://", "https://")) else DEFAULT_URL


def view_url(base: str, experiment_id: str) -> str:
    return f"{base}/#/experiments/{experiment_id}/runs?{UI_PARAMS}&viewStateShareKey={VIEW_ID}"


def run_url(base: str, experiment_id: str, run_id: str) -> str:
    return f"{base}/#/experiments/{experiment_id}/runs/{run_id}?{UI_PARAMS}"


def browse_hint(uri: str, experiment_id: str, run_id: str) -> str:
    """Where to look at a run: its page on the server, or ``make ui`` first for a local store."""
    page = run_url(base_url(uri), experiment_id, run_id)
    return page if uri.startswith(("http://", "https://")) else f"make ui, then {page}"


def _tag_and_find(uri: str, experiment: str) -> str | None:
    """Add the UI tags to every experiment of the store; the id of ``experiment`` if it exists."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    for found in client.search_experiments():
        add_missing_tags(client, found)
    found = client.get_experiment_by_name(experiment)
    return found.experiment_id if found else None


def wait_until_answering(base: str, server: subprocess.Popen, timeout: float = 600.0, every: float = 0.25) -> bool:
    """Poll ``base``'s ``/health`` until the server answers (True), exits or ``timeout`` seconds pass (False)."""
    deadline = time.monotonic() + timeout
    while server.poll() is None and time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{base}/health", timeout=5):
                return True
        except OSError:
            time.sleep(every)
    return False


# One worker: the UI is for one person, and every worker costs a start-up of MLflow (several seconds of CPU).
# No job runner: MLflow's background jobs serve GenAI evaluation, which prunelab does not use.
def server_env() -> dict[str, str]:
    """This process's environment with MLflow's job runner off."""
    return {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


def server_command(uri: str, port: int) -> list[str]:
    """``mlflow server`` on ``uri`` at 127.0.0.1:``port``, one worker."""
    return [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--backend-store-uri",
        uri,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
    ]


def main(argv: list[str] | None = None) -> None:
    """``make ui``: start ``mlflow server``, add the UI tags to the store's experiments, and print the page to open
    once the server answers."""
    parser = argparse.ArgumentParser(prog="prunelab-ui", description=main.__doc__)
    parser.add_argument(
        "--backend-store-uri", default=None, help="default: $MLFLOW_TRACKING_URI, else outputs/mlflow.db"
    )
    parser.add_argument("--port", type=int, default=5000)
    parser.add_argument("--experiment", default="prunelab", help="experiment whose view is printed (default: prunelab)")
    args = parser.parse_args(argv)
    uri = (
        args.backend_store_uri
        or os.environ.get("MLFLOW_TRACKING_URI")
        or (f"sqlite:///{Path(os.environ.get('PRUNELAB_ROOT', '.')).resolve() / 'outputs' / 'mlflow.db'}")
    )
    base = f"http://127.0.0.1:{args.port}"
    # no address yet: a click on it before the server answers would get "connection refused"
    print(f"prunelab-ui: starting MLflow for {uri} on port {args.port} (one worker, no job runner) ...", flush=True)
    server = subprocess.Popen(server_command(uri, args.port), env=server_env())
    signal.signal(signal.SIGTERM, lambda *_: server.terminate())
    try:
        fresh = uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///") :]).exists()
        # tagged while the server starts; a new SQLite file is left to the server (concurrent first use races on
        # its schema migration) and has no experiment to tag anyway
        experiment_id = None if fresh else _tag_and_find(uri, args.experiment)
        page = view_url(base, experiment_id) if experiment_id else f"{base}/#/experiments?{UI_PARAMS}"
        if wait_until_answering(base, server):
            print(f"prunelab-ui: open {page}", flush=True)
        elif server.poll() is None:
            print(f"prunelab-ui: the server has not answered {base}/health yet; try {page}", flush=True)
        sys.exit(server.wait())
    except KeyboardInterrupt:  # Ctrl-C reached the server too; let it finish
        sys.exit(server.wait())
    finally:
        if server.poll() is None:  # an error here: do not leave the server behind
            server.terminate()
            server.wait()


if __name__ == "__main__":
    main()
