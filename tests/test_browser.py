"""Widgets in a real browser: Debian's chromium driven by python playwright against Voilà and
JupyterLab servers on 127.0.0.1. Every request to anything but the local server is aborted.

Needs /usr/bin/chromium (``make browser-deps`` installs it); skipped with that reason if it is
absent. Never downloads a browser.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse

import pytest

CHROMIUM = Path("/usr/bin/chromium")
ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage"]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not CHROMIUM.exists(),
                       reason="/usr/bin/chromium is not installed (run `make browser-deps`)"),
]

sync_api = pytest.importorskip("playwright.sync_api")
pytest.importorskip("voila")
pytest.importorskip("jupyterlab")
nbformat = pytest.importorskip("nbformat")

from workbench.widgets import BUNDLED_MODEL, MODEL_ENV  # noqa: E402

if not os.environ.get(MODEL_ENV) and not (BUNDLED_MODEL / "config.json").exists():
    pytest.skip(f"bundled model missing at {BUNDLED_MODEL}", allow_module_level=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, proc: subprocess.Popen, log: Path, timeout: float = 90) -> None:
    """Wait until the server accepts connections (without sending a request)."""
    end = time.time() + timeout
    while time.time() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.25)
    raise TimeoutError(f"port {port} never opened:\n{log.read_text()[-3000:]}")


@contextmanager
def server(cmd: list[str], tmp: Path, port: int) -> Iterator[subprocess.Popen]:
    """Start a Jupyter server in ``tmp/nb`` with private data/runtime/config dirs under
    ``tmp``; kill it (and its kernels) by PID after."""
    env = dict(os.environ, JUPYTER_DATA_DIR=str(tmp / "data"),
               JUPYTER_RUNTIME_DIR=str(tmp / "runtime"), JUPYTER_CONFIG_DIR=str(tmp / "config"),
               PYDEVD_DISABLE_FILE_VALIDATION="1")
    log = tmp / "server.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=tmp / "nb", env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        wait_for_port(port, proc, log)
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)  # the server and the kernels it started
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5)


@pytest.fixture
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=FLAGS, headless=True)
        try:
            yield b
        finally:
            b.close()


def local_page(browser, port: int):
    """A page that may only reach the local server."""
    page = browser.new_page(viewport={"width": 1400, "height": 1000})

    def route(r):
        host = urlparse(r.request.url).hostname
        if host in ("127.0.0.1", "localhost") or r.request.url.startswith(("data:", "blob:")):
            r.continue_()
        else:
            r.abort()

    page.route("**/*", route)
    return page


def set_slider(page, slider, value: int) -> None:
    """Type a value into an ipywidgets slider's readout box, the way a user would."""
    readout = slider.locator(".widget-readout")
    readout.click()
    page.keyboard.press("Control+A")
    page.keyboard.type(str(value))
    page.keyboard.press("Enter")


# the explorer's figures on show (its patch-grid image stays hidden without an image)
SHOWN = ("[...document.querySelectorAll('img.widget-image')]"
         ".filter(i => i.offsetParent !== null)")


def change_layer_and_wait(page, timeout_ms: int = 120_000) -> None:
    """Move the routing explorer's layer slider and wait for one of its figures on show to
    change (the token colours are buttons; the figures that follow the layer are the load
    bars and, with an image, the patch grid)."""
    img = page.locator("img.widget-image:visible").first
    img.wait_for(state="visible", timeout=timeout_ms)
    page.wait_for_function(f"() => {SHOWN}.length > 0 && "
                           f"{SHOWN}.every(i => i.src && i.naturalWidth > 0)",
                           timeout=timeout_ms)
    before = page.evaluate(f"() => {SHOWN}.map(i => i.src)")
    slider = page.locator(".widget-slider").first
    set_slider(page, slider, 2)
    page.wait_for_function(f"(old) => {SHOWN}.some((i, k) => i.src !== old[k])", arg=before,
                           timeout=timeout_ms)
    page.wait_for_function(f"() => {SHOWN}.every(i => i.naturalWidth > 0)",
                           timeout=timeout_ms)
    assert slider.locator(".widget-readout").inner_text().strip() == "2"
    assert page.locator(".workbench-error").count() == 0


@pytest.mark.parametrize("notebook", ["02_routing_explorer", "08_multimodal_routing"])
def test_voila_layer_slider_redraws_the_figure(tmp_path, browser, notebook):
    """The explorer's first figure (08: the image's patch grid) redraws with the slider."""
    (tmp_path / "nb").mkdir()
    shutil.copy(ROOT / "notebooks" / f"{notebook}.ipynb", tmp_path / "nb" / "routing.ipynb")
    port = free_port()
    cmd = [str(BIN / "voila"), "routing.ipynb", "--no-browser", f"--port={port}",
           "--Voila.ip=127.0.0.1"]
    with server(cmd, tmp_path, port):
        page = local_page(browser, port)
        page.goto(f"http://127.0.0.1:{port}/", timeout=300_000)
        change_layer_and_wait(page, timeout_ms=300_000)
        page.screenshot(path=tmp_path / "voila.png", full_page=True)


LAB_NOTEBOOK = """
%matplotlib inline
from workbench.widgets import RoutingExplorer

explorer = RoutingExplorer()
explorer
"""


def test_jupyterlab_renders_the_explorer(tmp_path, browser):
    """What `make lab` shows: the widget renders in JupyterLab and reacts to the slider."""
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(LAB_NOTEBOOK.strip())])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                                 "language": "python"}
    (tmp_path / "nb").mkdir()
    nbformat.write(nb, tmp_path / "nb" / "lab.ipynb")
    port = free_port()
    cmd = [str(BIN / "jupyter"), "lab", "--no-browser", f"--port={port}",
           "--ServerApp.token=", "--ServerApp.password=", "--ServerApp.ip=127.0.0.1",
           "--allow-root", f"--ServerApp.root_dir={tmp_path / 'nb'}",
           f"--LabApp.workspaces_dir={tmp_path / 'workspaces'}",
           f"--LabApp.user_settings_dir={tmp_path / 'settings'}",
           "--LabApp.news_url=", "--ServerApp.open_browser=False"]
    with server(cmd, tmp_path, port):
        page = local_page(browser, port)
        page.goto(f"http://127.0.0.1:{port}/lab/tree/lab.ipynb", timeout=120_000)
        page.locator(".jp-Notebook").first.wait_for(timeout=120_000)
        # the kernel must be fully up ("Idle" in the status bar) or Run All is dropped
        page.locator(".jp-StatusBar-TextItem", has_text="Idle").first.wait_for(timeout=120_000)
        news = page.locator(".jp-Notification-Toast-Close, .jp-toast-button", has_text="No")
        if news.count():
            news.first.click()
        prompt = page.locator(".jp-InputArea-prompt").first
        for _attempt in range(3):
            page.locator(".lm-MenuBar-itemLabel", has_text="Run").first.click()
            page.locator(".lm-Menu-itemLabel", has_text="Run All Cells").first.click()
            try:
                page.wait_for_function(
                    "(el) => el.textContent.includes('*') || /\\[\\d+\\]/.test(el.textContent)",
                    arg=prompt.element_handle(), timeout=15_000)
                break
            except sync_api.TimeoutError:
                page.keyboard.press("Escape")
        change_layer_and_wait(page)
        page.screenshot(path=tmp_path / "lab.png")
