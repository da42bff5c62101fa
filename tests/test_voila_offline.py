"""`make voila` works with no network: the pages Voilà serves with the repo's template and the
Makefile's flags reference no http(s) URL on another host (no CDN stylesheet, MathJax or
Mermaid), for the notebook tree and for a rendered notebook with math and a widget."""

from __future__ import annotations

import re
import sys
import urllib.request
from pathlib import Path

import pytest
from helpers_server import SHARE, free_port, makefile_voila_flags, server

pytest.importorskip("voila")
nbformat = pytest.importorskip("nbformat")

BIN = Path(sys.executable).parent

# identifiers that look like URLs but are never fetched: XML namespaces and RDF names
_NOT_FETCHED = re.compile(r'\s(?:xmlns(?::\w+)?|rdf:about|rdf:resource)="[^"]*"')
_URL = re.compile(r"""https?://[^\s"'<>)`]+""")
_LOCAL = ("127.0.0.1", "localhost")


def external_urls(html: str) -> list[str]:
    """http(s) URLs in ``html`` on any host but this machine (namespace names excepted)."""
    urls = _URL.findall(_NOT_FETCHED.sub(" ", html))
    return sorted({u for u in urls if re.match(r"https?://([^/:]+)", u).group(1) not in _LOCAL})


def fetch(url: str) -> str:
    with urllib.request.urlopen(url, timeout=120) as r:  # noqa: S310 - 127.0.0.1 only
        assert r.status == 200, url
        return r.read().decode()


def test_the_scan_finds_a_cdn_link_and_skips_namespaces():
    html = ('<svg xmlns="http://www.w3.org/2000/svg"></svg><link href="http://127.0.0.1:8866/x">'
            '<link rel="stylesheet" href="https://cdn.jsdelivr.net/npm/a.css">'
            '<script>await import("https://cdnjs.cloudflare.com/m.mjs")</script>')
    assert external_urls(html) == ["https://cdn.jsdelivr.net/npm/a.css",
                                   "https://cdnjs.cloudflare.com/m.mjs"]


def test_make_voila_pages_reference_no_external_host(tmp_path):
    assert (SHARE / "voila" / "templates" / "workbench" / "conf.json").exists()
    nb = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_markdown_cell("# Offline\n\nInline math $e^{i\\pi} + 1 = 0$."),
        nbformat.v4.new_code_cell("import ipywidgets as w\nw.IntSlider(3, description='x')")])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                                 "language": "python"}
    (tmp_path / "nb").mkdir()
    nbformat.write(nb, tmp_path / "nb" / "offline.ipynb")
    port = free_port()
    cmd = [str(BIN / "voila"), ".", "--no-browser", f"--port={port}", "--Voila.ip=127.0.0.1",
           *makefile_voila_flags()]
    with server(cmd, tmp_path, port, env={"JUPYTER_PATH": str(SHARE)}):
        tree = fetch(f"http://127.0.0.1:{port}/")
        page = fetch(f"http://127.0.0.1:{port}/voila/render/offline.ipynb")
    assert "voila-tree-main" in tree  # the notebook tree (filled in by its script)
    assert "application/vnd.jupyter.widget-view+json" in page  # the notebook really ran
    assert external_urls(tree) == []
    assert external_urls(page) == []
