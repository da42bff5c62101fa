"""Generate the tutorial notebooks (notebooks/*.ipynb) from their jupytext sources.

Every ``notebooks/NN_name.py`` (jupytext percent format: ``# %%`` code cells, ``# %% [markdown]``
text cells; linted by ruff like the rest of the code) becomes ``notebooks/NN_name.ipynb``,
stored without outputs or widget state and with stable cell ids, so a re-run reproduces it byte
for byte. Edit the .py files, never the .ipynb.

    python scripts/make_notebooks.py            # (re)write every notebooks/*.ipynb
    python scripts/make_notebooks.py --check    # exit 1 if an .ipynb is not what its .py gives
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jupytext
import nbformat

NB_DIR = Path(__file__).resolve().parent.parent / "notebooks"
KERNELSPEC = {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"}


def sources(directory: Path = NB_DIR) -> list[Path]:
    """The notebook sources: every ``NN_name.py`` in ``directory``, in order."""
    return sorted(p for p in directory.glob("*.py") if p.stem[:2].isdigit())


def build(source: Path) -> nbformat.NotebookNode:
    """The notebook of one jupytext source: no outputs, cell ids ``NN-ii``, a python3
    kernelspec and no jupytext metadata (the pairing is by file name)."""
    nb = jupytext.read(source, fmt="py:percent")
    for i, cell in enumerate(nb.cells):
        cell.id = f"{source.stem[:2]}-{i:02d}"
        cell.metadata = {}
        if cell.cell_type == "code":
            cell.outputs = []
            cell.execution_count = None
    nb.metadata = {"kernelspec": dict(KERNELSPEC), "language_info": {"name": "python"}}
    nb.nbformat, nb.nbformat_minor = 4, 5
    nbformat.validate(nb)
    return nb


def text(nb: nbformat.NotebookNode) -> str:
    return nbformat.writes(nb) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true",
                   help="verify that every .ipynb matches its .py source; write nothing")
    p.add_argument("--dir", type=Path, default=NB_DIR, help="notebook directory")
    a = p.parse_args(argv)
    srcs = sources(a.dir)
    if not srcs:
        print(f"no notebook sources (NN_name.py) in {a.dir}")
        return 1
    stale = []
    for src in srcs:
        path = src.with_suffix(".ipynb")
        want = text(build(src))
        if a.check:
            if not path.exists() or path.read_text() != want:
                stale.append(path.name)
        else:
            path.write_text(want)
            print("wrote", path)
    orphans = sorted(p.name for p in a.dir.glob("*.ipynb")
                     if p.with_suffix(".py") not in srcs)
    if orphans:
        print("notebooks without a .py source (remove them or add the source):",
              ", ".join(orphans))
    if stale:
        print("out of date (run python scripts/make_notebooks.py):", ", ".join(stale))
    return 1 if stale or orphans else 0


if __name__ == "__main__":
    sys.exit(main())
