"""One look for every workbench figure: expert palette, font sizes, colour maps, figure helpers.

Expert ``e`` has the same colour in every figure (:func:`expert_color`): the ten dark tab20
shades, then the ten light ones, then tab20b and tab20c, then evenly spread hues for very wide
layers (Maverick's 128 experts). Figures are built on :class:`matplotlib.figure.Figure` (never
pyplot's global state), so they render headless and display in notebooks.
"""

from __future__ import annotations

import colorsys
import io
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from functools import wraps
from typing import Any, TypeVar

import matplotlib as mpl
import numpy as np
from matplotlib.axes import Axes
from matplotlib.colors import ListedColormap, to_rgb  # noqa: F401 (re-exported)
from matplotlib.figure import Figure

#: Font sizes (points) used by every figure.
FONT_SIZES: dict[str, float] = {"title": 11, "label": 9.5, "tick": 8, "annotation": 7,
                                "legend": 8, "token": 9}

#: rcParams applied inside :func:`use_style`.
RC: dict[str, Any] = {
    "font.size": FONT_SIZES["label"],
    "axes.titlesize": FONT_SIZES["title"],
    "axes.titleweight": "bold",
    "axes.labelsize": FONT_SIZES["label"],
    "xtick.labelsize": FONT_SIZES["tick"],
    "ytick.labelsize": FONT_SIZES["tick"],
    "legend.fontsize": FONT_SIZES["legend"],
    "legend.frameon": False,
    "figure.titlesize": FONT_SIZES["title"] + 1,
    "figure.titleweight": "bold",
    "figure.dpi": 100,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": False,
    "grid.alpha": 0.3,
    "image.interpolation": "nearest",
    "svg.fonttype": "none",
    "pdf.fonttype": 42,
}

#: Diverging map for ratios to uniform (centre = 1) and signed similarities (centre = 0).
DIVERGING = "RdBu_r"
#: Sequential map for probabilities, counts and attention.
SEQUENTIAL = "viridis"
#: Map for attention patterns (white = no attention).
ATTENTION = "magma_r"
#: Colour for failures, near-ties and other warnings.
WARN = "#d62728"
#: Colour for reference lines (uniform, chance, tolerance).
REFERENCE = "#444444"
#: Colour of masked cells (never-chosen experts, masked attention).
MASKED = "#eeeeee"

_TAB20 = [mpl.colormaps["tab20"](i) for i in range(20)]
_BASE = ([_TAB20[i] for i in range(0, 20, 2)] + [_TAB20[i] for i in range(1, 20, 2)]
         + [mpl.colormaps["tab20b"](i) for i in range(20)]
         + [mpl.colormaps["tab20c"](i) for i in range(20)])

F = TypeVar("F", bound=Callable[..., Any])


@contextmanager
def use_style(**overrides: Any) -> Iterator[None]:
    """Context manager applying the workbench rcParams (plus ``overrides``)."""
    with mpl.rc_context({**RC, **overrides}):
        yield


def styled(fn: F) -> F:
    """Decorator: run a plot function inside :func:`use_style`."""
    @wraps(fn)
    def inner(*args: Any, **kwargs: Any) -> Any:
        with use_style():
            return fn(*args, **kwargs)
    return inner  # type: ignore[return-value]


def expert_color(e: int) -> tuple[float, float, float, float]:
    """RGBA colour of expert ``e``, the same in every figure."""
    e = int(e)
    if e < 0:
        raise ValueError(f"expert id must be >= 0, got {e}")
    if e < len(_BASE):
        return tuple(float(c) for c in _BASE[e])  # type: ignore[return-value]
    h = (e * 0.618033988749895) % 1.0
    r, g, b = colorsys.hls_to_rgb(h, 0.5, 0.6)
    return (r, g, b, 1.0)


def expert_colors(n: int) -> list[tuple[float, float, float, float]]:
    """Colours of experts 0..n-1."""
    return [expert_color(e) for e in range(n)]


def expert_cmap(n: int) -> ListedColormap:
    """Listed colour map whose entry e is :func:`expert_color` (for images of expert ids)."""
    return ListedColormap(expert_colors(n), name=f"experts{n}")


def layer_colors(n: int) -> list[tuple[float, float, float, float]]:
    """n colours along viridis (one per layer, early = dark)."""
    cmap = mpl.colormaps["viridis"]
    return [cmap(x) for x in (np.linspace(0.05, 0.85, n) if n > 1 else [0.4])]


def category_colors(names: Sequence[str]) -> dict[str, tuple[float, float, float, float]]:
    """Distinct colours (Dark2, then tab10) for a few categories such as domains or layer
    types."""
    pool = [mpl.colormaps["Dark2"](i) for i in range(8)] + \
        [mpl.colormaps["tab10"](i) for i in range(10)]
    return {str(n): pool[i % len(pool)] for i, n in enumerate(names)}


def text_color_on(background: Any) -> str:
    """Black or white, whichever reads better on ``background``."""
    r, g, b = to_rgb(background)
    lum = 0.2126 * r + 0.7152 * g + 0.0722 * b
    return "black" if lum > 0.5 else "white"


class WorkbenchFigure(Figure):
    """A matplotlib Figure that also displays itself in Jupyter when pyplot's inline backend
    was never activated (it renders a PNG through ``_repr_png_``)."""

    def _repr_png_(self) -> bytes:
        buf = io.BytesIO()
        self.savefig(buf, format="png", dpi=100, facecolor="white")
        return buf.getvalue()


def new_figure(figsize: tuple[float, float] = (6.4, 4.0), layout: str | None = "constrained"
               ) -> Figure:
    """A standalone Figure (constrained layout by default; no pyplot state)."""
    return WorkbenchFigure(figsize=figsize, layout=layout)


def root_figure(ax: Axes) -> Figure:
    """The top-level Figure holding ``ax`` (also when ``ax`` sits in a SubFigure)."""
    fig = ax.figure
    while not isinstance(fig, Figure):
        fig = fig.figure
    return fig


def figure_and_axes(ax: Axes | None, figsize: tuple[float, float] = (6.4, 4.0)
                    ) -> tuple[Figure, Axes]:
    """``(ax.figure, ax)`` when an Axes is given, else a new Figure with one Axes."""
    if ax is not None:
        return root_figure(ax), ax
    fig = new_figure(figsize)
    return fig, fig.add_subplot()


def annotate_cells(ax: Axes, values: np.ndarray, fmt: str | Callable[[float], str] = "{:.2f}",
                   image: Any = None, max_cells: int = 400) -> None:
    """Write each cell's value on a heatmap (skipped above ``max_cells``); ``fmt`` is a format
    string or a function of the value; text colour follows the cell colour of ``image`` when
    given."""
    text = fmt if callable(fmt) else fmt.format
    mask = np.ma.getmaskarray(values)
    v = np.ma.getdata(values)
    if v.size > max_cells:
        return
    for (i, j), x in np.ndenumerate(v):
        if mask[i, j] or not np.isfinite(x):
            continue
        color = "black"
        if image is not None:
            color = text_color_on(image.cmap(image.norm(x)))
        ax.text(j, i, text(x), ha="center", va="center",
                fontsize=FONT_SIZES["annotation"], color=color)


def expert_ticks(ax: Axes, n: int, axis: str = "x", every: int | None = None) -> None:
    """Label an expert axis 0..n-1 (thinned for wide layers) with tick labels in expert
    colours."""
    step = every or (1 if n <= 32 else int(np.ceil(n / 32)))
    ticks = list(range(0, n, step))
    if axis == "x":
        ax.set_xticks(ticks, [str(t) for t in ticks])
        labels = ax.get_xticklabels()
    else:
        ax.set_yticks(ticks, [str(t) for t in ticks])
        labels = ax.get_yticklabels()
    for t, lab in zip(ticks, labels):
        c = expert_color(t)
        lab.set_color(tuple(0.75 * x for x in c[:3]))
        lab.set_fontweight("bold")
