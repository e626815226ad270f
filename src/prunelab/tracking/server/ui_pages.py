"""Drive the MLflow UI in headless Chromium, as a person would look at it: for the browser test and for the README's
screenshots (``bench/screenshots.py``). Needs Debian's ``chromium`` and the ``playwright`` package (no browser
download: Playwright drives the system Chromium)."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from prunelab.tracking.server.ui import UI_PARAMS, VIEW_NAME, server_command, server_env, view_url

CHROMIUM = os.environ.get("PRUNELAB_CHROMIUM", "/usr/bin/chromium")
# No background traffic (the machine may have no network) and no first-run or sandbox set-up.
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def missing() -> str | None:
    """Why the browser pages cannot be driven here, or ``None`` when they can."""
    if not Path(CHROMIUM).exists():
        return f"no Chromium at {CHROMIUM} (Debian: apt-get install chromium)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright package is not installed"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve(uri: str, port: int | None = None, timeout: float = 180.0) -> Iterator[str]:
    """Run ``mlflow server`` on ``uri`` as ``make ui`` does (one worker, no job runner); yield its base URL."""
    port = port or free_port()
    env, command = server_env(), server_command(uri, port)
    with tempfile.TemporaryFile() as output:
        server = subprocess.Popen(command, env=env, stdout=output, stderr=subprocess.STDOUT, start_new_session=True)
        base = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    with urllib.request.urlopen(f"{base}/health", timeout=5):
                        break
                except OSError:
                    if server.poll() is not None or time.monotonic() > deadline:
                        output.seek(0)
                        raise RuntimeError(f"mlflow server did not start:\n{output.read().decode()[-3000:]}") from None
                    time.sleep(0.5)
            yield base
        finally:
            os.killpg(server.pid, 15)  # the server and its uvicorn worker
            server.wait(timeout=30)


@contextlib.contextmanager
def chromium(width: int = 1440, height: int = 900) -> Iterator:
    """A Playwright page in headless Chromium with a fresh profile."""
    from playwright.sync_api import sync_playwright

    profile = tempfile.mkdtemp(prefix="prunelab-chromium-")
    try:
        with sync_playwright() as playwright:
            context = playwright.chromium.launch_persistent_context(
                profile,
                executable_path=CHROMIUM,
                args=CHROMIUM_FLAGS,
                headless=True,
                viewport={"width": width, "height": height},
            )
            try:
                yield context.pages[0] if context.pages else context.new_page()
            finally:
                context.close()
    finally:
        shutil.rmtree(profile, ignore_errors=True)


def _settle(page, timeout: float = 15_000) -> None:
    """Close MLflow's assistant panel once it is drawn (it opens by default and hides a third of the page; a person
    closes it once and the browser remembers)."""
    close = page.get_by_role("button", name="Close", exact=True)
    try:
        close.first.wait_for(timeout=timeout)
    except Exception:  # noqa: BLE001 - no assistant panel in this MLflow: nothing to close
        return
    close.first.click()


def open_run_list(page, base: str, experiment_id: str, charts: bool = False):
    """The run list in prunelab's saved view (``charts``: its chart view, Compare's scatter plots)."""
    url = view_url(base, experiment_id) + ("&compareRunsMode=CHART" if charts else "")
    page.goto(url)
    page.get_by_text(VIEW_NAME, exact=True).first.wait_for(timeout=90_000)
    _settle(page)
    return page


def open_report(page, base: str, experiment_id: str, parent_run_id: str, timeout: float = 90_000):
    """The sweep report in MLflow's artifact viewer; return the viewer's frame once the figure is drawn."""
    page.goto(f"{base}/#/experiments/{experiment_id}/runs/{parent_run_id}/artifacts/report/accuracy.html?{UI_PARAMS}")
    page.wait_for_selector("iframe", timeout=timeout)
    _settle(page)
    deadline = time.monotonic() + timeout / 1000
    while time.monotonic() < deadline:
        for frame in page.frames:
            if frame.url.startswith("blob:") and frame.evaluate(
                "() => !!(document.getElementById('figure') || {}).data"
            ):
                return frame
        time.sleep(0.25)
    raise TimeoutError("the report's figure was not drawn in MLflow's artifact viewer")


def legend_entries(frame) -> list[str]:
    """The legend's entries as drawn (SVG text), in order."""
    return frame.evaluate("() => Array.from(document.querySelectorAll('.legend .legendtext'), e => e.textContent)")


def traces(frame) -> list[dict]:
    """The drawn figure's traces: name, legend group and whether it has a legend entry."""
    return frame.evaluate(
        "() => document.getElementById('figure').data.map("
        "t => ({name: t.name, group: t.legendgroup, legend: t.showlegend !== false}))"
    )


def download_report(page, folder: Path) -> Path:
    """Press the download button of the artifact shown in MLflow's artifact viewer (:func:`open_report` first), as a
    person saving the report would; return the saved file."""
    button = page.locator("button[data-component-id*='artifactview']").filter(has=page.locator("svg")).last
    with page.expect_download(timeout=60_000) as download:
        button.click()
    path = Path(folder) / download.value.suggested_filename
    download.value.save_as(path)
    return path


def figure_drawn(page, timeout: float = 60_000) -> int:
    """Wait until the report's plotly figure is drawn on ``page`` (a page or a frame); return its number of traces."""
    page.wait_for_function(
        "() => { const f = document.getElementById('figure');"
        " return f && f.data && f.data.length && f.querySelector('.main-svg .scatterlayer'); }",
        timeout=timeout,
    )
    return page.evaluate("() => document.getElementById('figure').data.length")


def in_view(page, locator) -> bool:
    """Whether the first element of ``locator`` starts inside the window, as drawn (no scrolling needed to see it)."""
    box = locator.first.bounding_box()
    size = page.viewport_size
    return box is not None and 0 <= box["x"] < size["width"] - 40 and 0 <= box["y"] < size["height"] - 20
