"""Writing figures to disk."""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib as mpl
from matplotlib.figure import Figure

#: File suffixes :func:`save` understands, and the matplotlib format each one selects.
FORMATS = {".png": "png", ".pdf": "pdf", ".svg": "svg"}

#: rcParams every :func:`save` applies, inside or outside :func:`~workbench.plots.use_style`:
#: TrueType (Type 42) fonts embedded in PDF and PostScript, SVG text kept as ``<text>``.
PUBLICATION_RC = {"pdf.fonttype": 42, "ps.fonttype": 42, "svg.fonttype": "none"}


def save(fig: Figure, path: str | os.PathLike, dpi: int = 150) -> Path:
    """Write ``fig`` to ``path`` as PNG, PDF or SVG (chosen by the suffix); returns the path.

    PDFs embed TrueType (Type 42) fonts and SVGs keep text as text, whatever the caller's
    rcParams. Parent folders are created. Any other suffix raises ValueError before anything
    is written.
    """
    p = Path(path)
    fmt = FORMATS.get(p.suffix.lower())
    if fmt is None:
        raise ValueError(f"save: cannot tell the format of {str(p)!r} from its suffix "
                         f"{p.suffix!r}; use one of {', '.join(FORMATS)}")
    if not isinstance(fig, Figure):
        raise TypeError(f"save: expected a matplotlib Figure, got {type(fig).__name__}")
    p.parent.mkdir(parents=True, exist_ok=True)
    meta = {"Software": "workbench"} if fmt == "png" else \
        {"Creator": "workbench"} if fmt == "pdf" else None
    with mpl.rc_context(PUBLICATION_RC):
        fig.savefig(p, format=fmt, dpi=dpi, facecolor="white", metadata=meta)
    return p
