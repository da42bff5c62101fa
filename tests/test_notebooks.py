"""The tutorial notebooks, executed top to bottom by a real Jupyter kernel (nbclient), with their
widgets driven by appended cells. An exception inside a widget callback does not fail a cell: it
lands in the saved widget state as an ``output_type: error`` output, so every run is scanned
for those (and a negative test proves the scan catches one)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
pytest.importorskip("ipywidgets")

from workbench.widgets import BUNDLED_MODEL, MODEL_ENV  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
NB_DIR = ROOT / "notebooks"
NOTEBOOKS = sorted(p.stem for p in NB_DIR.glob("*.ipynb"))
WIDGET_STATE = "application/vnd.jupyter.widget-state+json"

# Cells appended to a notebook to exercise its widgets the way a user would.
DRIVERS: dict[str, str] = {
    "02_routing_explorer": '''
before = [b.style.button_color for b in explorer.token_buttons]
explorer.layer_slider.value = 2
assert [b.style.button_color for b in explorer.token_buttons] != before
path = explorer.path_image.value
explorer.token_buttons[3].click()
assert explorer.state.position == 3 and explorer.path_image.value != path
explorer.prompt.value = "numeric"
explorer.text.value = "x = [1, 2, 3]\\nprint(sum(x))\\n"
explorer.run_button.click()
assert explorer.prompt.value == "(custom)"
assert not explorer.errors, explorer.errors
''',
    "05_attention_patterns": '''
explorer.layer_slider.value = 3
assert "NoPE" in explorer.layer_type.value
explorer.head_picker.value = 1
explorer.query_picker.value = explorer.query_picker.options[-8][1]
explorer.layer_slider.value = 0
assert "chunked" in explorer.layer_type.value
explorer.run_button.click()
assert not explorer.errors, explorer.errors
''',
    "08_multimodal_routing": '''
assert explorer.patch_image.layout.display is None  # the image pane shows
before = explorer.patch_image.value
explorer.layer_slider.value = 2
assert explorer.patch_image.value != before, "the patch grid must recolour with the layer"
patch = int(np.flatnonzero(explorer.state.trace["token_modality"][0] == 1)[3])
explorer.token_buttons[patch].click()
assert explorer.state.position == patch and explorer.state.tokens[patch] == "<|patch|>"
assert not explorer.errors, explorer.errors
''',
    "90_appendix_pytorch_vs_jax": '''
before = explorer.errors_image.value
explorer.dtype_toggle.value = "bfloat16"
assert explorer.errors_image.value != before
explorer.layer_slider.value = 1
explorer.dtype_toggle.value = "float32"
assert not explorer.errors, explorer.errors
''',
    "04_interventions": '''
explorer.layer_slider.value = 1
explorer.expert_toggles[2].value = True
explorer.mode.value = "force"
assert explorer.expert_toggles[2].value and explorer.state.banned == {(1, 2)}
explorer.expert_toggles[1].value = True
explorer.head_toggles[0].value = True
explorer.layer_slider.value = 2
assert len(explorer.active_box.children) == 4  # "active:" and three interventions
assert explorer.state.effect.delta_loss != 0
explorer.clear_button.click()
assert explorer.state.interventions() == []
assert not explorer.errors, explorer.errors
''',
    "03_research_plots": '''
assert len(figures) >= 14, sorted(figures)
assert all((FIG_DIR / f"{name}.pdf").exists() for name in figures)
''',
}


def error_outputs(nb: Any) -> list[str]:
    """Every ``output_type: error`` in the saved widget state and in the cell outputs."""
    found: list[str] = []

    def walk(x: Any, where: str) -> None:
        if isinstance(x, dict):
            if x.get("output_type") == "error":
                found.append(f"{where}: {x.get('ename')}: {x.get('evalue')}")
            for k, v in x.items():
                walk(v, f"{where}/{k}" if where.startswith("widget") else where)
        elif isinstance(x, list):
            for v in x:
                walk(v, where)

    state = nb.metadata.get("widgets", {}).get(WIDGET_STATE, {}).get("state", {})
    for model_id, model in state.items():
        walk(model, f"widget {model.get('model_name')} {model_id}")
    for i, cell in enumerate(nb.cells):
        walk(cell.get("outputs", []), f"cell {i}")
    return found


def execute(nb: Any, cwd: Path, timeout: int = 300) -> Any:
    """Run ``nb`` in a fresh python3 kernel with the widget state stored."""
    client = nbclient.NotebookClient(nb, timeout=timeout, kernel_name="python3",
                                     resources={"metadata": {"path": str(cwd)}},
                                     store_widget_state=True)
    client.execute()
    return nb


@pytest.fixture
def jupyter_env(tmp_path, monkeypatch):
    """Kernel runtime files and the notebooks' figure output in the test's folder."""
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "runtime"))
    monkeypatch.setenv("WORKBENCH_FIGURE_DIR", str(tmp_path / "figures"))
    monkeypatch.setenv("PYDEVD_DISABLE_FILE_VALIDATION", "1")
    if not os.environ.get(MODEL_ENV) and not (BUNDLED_MODEL / "config.json").exists():
        pytest.skip(f"bundled model missing at {BUNDLED_MODEL} (train it or set {MODEL_ENV})")
    return tmp_path


# --------------------------------------------------------------------------- stored form
def test_notebooks_are_generated_and_clean():
    """Every notebooks/NN_name.ipynb is what scripts/make_notebooks.py generates from its
    jupytext source NN_name.py (in sync, both ways): no outputs, no widget state."""
    pytest.importorskip("jupytext")
    assert NOTEBOOKS[:6] == ["01_quickstart", "02_routing_explorer", "03_research_plots",
                             "04_interventions", "05_attention_patterns", "06_real_llama4"]
    assert NOTEBOOKS[-1] == "90_appendix_pytorch_vs_jax"  # parity is the appendix
    assert sorted(p.stem for p in NB_DIR.glob("[0-9][0-9]_*.py")) == NOTEBOOKS
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "make_notebooks.py"), "--check"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    for name in NOTEBOOKS:
        raw = json.loads((NB_DIR / f"{name}.ipynb").read_text())
        assert "widgets" not in raw["metadata"]
        assert raw["metadata"]["kernelspec"]["name"] == "python3"
        for cell in raw["cells"]:
            if cell["cell_type"] == "code":
                assert cell["outputs"] == [] and cell["execution_count"] is None
        md = [c for c in raw["cells"] if c["cell_type"] == "markdown"]
        assert len(md) >= 4, f"{name}: too little narrative"


def test_sync_check_catches_an_edited_source(tmp_path):
    """--check fails on a .py edited without regenerating, and on an .ipynb with no source."""
    pytest.importorskip("jupytext")
    import shutil
    for f in ("01_quickstart.py", "01_quickstart.ipynb"):
        shutil.copy(NB_DIR / f, tmp_path / f)
    script = [sys.executable, str(ROOT / "scripts" / "make_notebooks.py"), "--dir", str(tmp_path)]
    assert subprocess.run([*script, "--check"], capture_output=True).returncode == 0
    src = tmp_path / "01_quickstart.py"
    src.write_text(src.read_text() + "\n# %%\nprint('a new cell')\n")
    r = subprocess.run([*script, "--check"], capture_output=True, text=True)
    assert r.returncode == 1 and "01_quickstart.ipynb" in r.stdout
    subprocess.run(script, check=True, capture_output=True)  # regenerate: in sync again
    nb = nbformat.read(tmp_path / "01_quickstart.ipynb", as_version=4)
    assert nb.cells[-1].source == "print('a new cell')"
    assert nb.cells[-1].id == f"01-{len(nb.cells) - 1:02d}"
    assert subprocess.run([*script, "--check"], capture_output=True).returncode == 0
    shutil.copy(NB_DIR / "02_routing_explorer.ipynb", tmp_path)
    r = subprocess.run([*script, "--check"], capture_output=True, text=True)
    assert r.returncode == 1 and "without a .py source" in r.stdout


# --------------------------------------------------------------------------- execution
@pytest.mark.slow
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs(name, jupyter_env):
    nb = nbformat.read(NB_DIR / f"{name}.ipynb", as_version=4)
    if name in DRIVERS:
        nb.cells.append(nbformat.v4.new_code_cell(DRIVERS[name].strip()))
    execute(nb, NB_DIR)
    assert error_outputs(nb) == []
    if name in DRIVERS and name != "03_research_plots":
        state = nb.metadata["widgets"][WIDGET_STATE]["state"]
        images = [m for m in state.values() if m["model_name"] == "ImageModel"]
        assert images, "the explorer's figures are missing from the widget state"


FAILING = '''
from workbench.widgets import RoutingExplorer

explorer = RoutingExplorer()


def broken():
    raise ZeroDivisionError("injected failure in a widget callback")


explorer.state.render_load = broken
explorer.layer_slider.value = 2
print("the cell itself completed")
'''


@pytest.mark.slow
def test_scan_catches_a_failing_callback(jupyter_env):
    """Negative test: an exception in a widget callback leaves the cell green, but the saved
    widget state holds it as an error output — which the scan reports."""
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(FAILING.strip())])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                                 "language": "python"}
    execute(nb, jupyter_env)
    assert "the cell itself completed" in nb.cells[0].outputs[-1]["text"]
    errors = error_outputs(nb)
    assert errors, "the scan missed the injected failure"
    assert all(e.startswith("widget OutputModel") for e in errors)
    assert any("ZeroDivisionError: injected failure" in e for e in errors)
    # the explorer's error box shows it too
    state = nb.metadata["widgets"][WIDGET_STATE]["state"]
    boxes = [m["state"].get("value", "") for m in state.values() if m["model_name"] == "HTMLModel"]
    assert any("workbench-error" in b and "injected failure" in b for b in boxes)
