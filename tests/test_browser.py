"""Widgets in a real browser: Debian's chromium driven by python playwright against Voilà and
JupyterLab servers on 127.0.0.1. Every request to anything but the local server is aborted.

Needs /usr/bin/chromium (``make browser-deps`` installs it); skipped with that reason if it is
absent. Never downloads a browser.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from urllib.parse import urlparse

import pytest
from helpers_server import SHARE, free_port, makefile_voila_flags, server

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


@pytest.fixture
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=FLAGS, headless=True)
        try:
            yield b
        finally:
            b.close()


def local_page(browser, port: int, blocked: list[str] | None = None):
    """A page that may only reach the local server; the URLs it tried to fetch elsewhere are
    appended to ``blocked``."""
    page = browser.new_page(viewport={"width": 1400, "height": 1000})

    def route(r):
        host = urlparse(r.request.url).hostname
        if host in ("127.0.0.1", "localhost") or r.request.url.startswith(("data:", "blob:")):
            r.continue_()
        else:
            if blocked is not None:
                blocked.append(r.request.url)
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


# the explorer's figures that are shown (the image pane for pictures stays hidden on text)
SHOWN_IMAGES = ("() => [...document.querySelectorAll('img.widget-image')]"
                ".filter(i => i.offsetParent !== null)")


def change_layer_and_wait(page, timeout_ms: int = 120_000) -> None:
    """Move the routing explorer's layer slider and wait for one of its figures to change."""
    page.locator("img.widget-image:visible").first.wait_for(state="visible", timeout=timeout_ms)
    page.wait_for_function(f"() => {{ const s = ({SHOWN_IMAGES})(); return s.length > 0 && "
                           "s.every(i => i.src && i.naturalWidth > 0); }", timeout=timeout_ms)
    before = page.evaluate(f"() => ({SHOWN_IMAGES})().map(i => i.src).join(' ')")
    slider = page.locator(".widget-slider").first
    set_slider(page, slider, 2)
    page.wait_for_function(f"(old) => ({SHOWN_IMAGES})().map(i => i.src).join(' ') !== old",
                           arg=before, timeout=timeout_ms)
    page.wait_for_function(f"() => ({SHOWN_IMAGES})().every(i => i.naturalWidth > 0)",
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
           "--Voila.ip=127.0.0.1", *makefile_voila_flags()]  # as `make voila` runs it
    blocked: list[str] = []
    with server(cmd, tmp_path, port, env={"JUPYTER_PATH": str(SHARE)}):
        page = local_page(browser, port, blocked)
        page.goto(f"http://127.0.0.1:{port}/", timeout=300_000)
        change_layer_and_wait(page, timeout_ms=300_000)
        page.screenshot(path=tmp_path / "voila.png", full_page=True)
    assert blocked == [], f"the Voila page tried to fetch from other hosts: {blocked}"


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
