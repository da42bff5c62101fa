"""Attention figures: one layer's pattern with chunk boundaries, and chunked vs global layers."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import matplotlib as mpl
import numpy as np
from matplotlib.axes import Axes
from matplotlib.colors import PowerNorm
from matplotlib.figure import Figure

from .. import analysis as an
from ..analysis._common import Traces, as_list
from ..numerics import chunk_boundaries
from ..trace import Trace
from ._util import head_pattern, layer_label, plain, token_labels
from .style import (
    ATTENTION,
    FONT_SIZES,
    MASKED,
    category_colors,
    figure_and_axes,
    new_figure,
    styled,
)

#: Colour of chunk-boundary lines on attention heatmaps.
BOUNDARY = "#1f77b4"

_TYPE_TEXT = {"global": "global NoPE", "chunked": "chunked RoPE", "global-rope": "global RoPE"}


def layer_type_text(trace: Trace, layer: int) -> str:
    """"chunked RoPE (chunk 8192)", "global NoPE" or "global RoPE" for a layer of the trace."""
    kind = an.layer_type(trace, layer)
    text = _TYPE_TEXT.get(kind, kind)
    if kind == "chunked":
        text += f" (chunk {trace.config.get('chunk')})"
    return text


@styled
def attention_pattern(trace: Trace, layer: int, head: int | None = None, batch: int = 0,
                      tokenizer: Any = None, tokens: Sequence[str] | None = None,
                      max_labels: int = 48, chunk: int | None = None,
                      ax: Axes | None = None) -> Figure:
    """One layer's attention pattern (query × key; mean over heads unless ``head``) with the
    attention chunk boundaries drawn as lines (gid ``"chunk-boundary"``) and the layer's type
    (chunked RoPE / global NoPE) in the title. Masked (zero) entries are grey. Token labels
    are shown when a tokenizer or tokens are given (every n-th token, with its position, past
    ``max_labels`` tokens); the title names the document (``meta["source"]``, ``"domain"``).
    ``chunk`` defaults to the config's chunk size on chunked layers and to none on global
    layers (pass one to draw reference lines there)."""
    p, Tq, Tk = head_pattern(trace, layer, head, batch, "attention_pattern")
    q0 = Tk - Tq
    if chunk is None:  # boundaries only where the layer's mask has them (chunked RoPE layers)
        chunk = trace.config.get("chunk") if an.layer_type(trace, layer) == "chunked" else None
    size = min(9.0, max(4.5, 0.12 * Tk + 3.0))
    fig, ax = figure_and_axes(ax, (size + 1.2, size))
    cmap = mpl.colormaps[ATTENTION].with_extremes(bad=MASKED)
    data = np.ma.masked_where(p <= 0, p)
    vmax = float(p.max()) if p.size and p.max() > 0 else 1.0
    im = ax.imshow(data, cmap=cmap, norm=PowerNorm(0.5, vmin=0.0, vmax=vmax),
                   extent=(-0.5, Tk - 0.5, Tk - 0.5, q0 - 0.5), aspect="equal")
    for b in chunk_boundaries(Tk, int(chunk) if chunk else None):
        ax.axvline(b - 0.5, color=BOUNDARY, lw=1.0, ls="--", gid="chunk-boundary")
        if b > q0:
            ax.axhline(b - 0.5, color=BOUNDARY, lw=1.0, ls="--", gid="chunk-boundary")
    if tokenizer is not None or tokens is not None:
        ids = np.asarray(trace.input_ids)
        ids = ids[batch] if ids.ndim == 2 else ids.ravel()
        labels = [plain(s) for s in token_labels(ids[:Tk], tokenizer, tokens)]
        step = max(1, int(np.ceil(Tk / max_labels)))
        xs = list(range(0, Tk, step))
        ax.set_xticks(xs, [f"{labels[i]}" if step == 1 else f"{i}:{labels[i]}" for i in xs],
                      rotation=90, fontsize=FONT_SIZES["annotation"], family="monospace")
        ys = [i for i in xs if i >= q0]
        ax.set_yticks(ys, [f"{labels[i]}" if step == 1 else f"{i}:{labels[i]}" for i in ys],
                      fontsize=FONT_SIZES["annotation"], family="monospace")
        ax.set_xlabel("key" if step == 1 else f"key (one token in {step} labelled)")
        ax.set_ylabel("query")
    else:
        ax.set_xlabel("key position")
        ax.set_ylabel("query position")
    try:
        kind = layer_type_text(trace, layer)
    except ValueError:
        kind = "layer type unknown"
    who = "mean of heads" if head is None else f"head {head}"
    doc = trace.meta.get("source") or trace.meta.get("domain")
    doc = f"\n{doc}" + (f" ({trace.meta['domain']})" if trace.meta.get("domain")
                         and trace.meta.get("source") else "") if doc else ""
    ax.set_title(f"Layer {layer} attention: {kind}, {who}{plain(doc)}")
    cb = fig.colorbar(im, ax=ax, pad=0.02, shrink=0.85)
    cb.set_label("attention probability (sqrt scale)")
    return fig


@styled
def attention_by_layer_type(traces: Traces, layers: Sequence[int] | None = None,
                            chunk: int | None = None) -> Figure:
    """Chunked (RoPE) vs global (NoPE) attention: per-layer mean entropy, mean distance and
    sink mass (bars coloured by layer type; type means as dashed lines), and the attention
    mass by query-key distance bucket for each type. With four or fewer layers the per-layer
    numbers are a table instead of bar panels (a bar chart of two bars says less than the
    numbers)."""
    ts = as_list(traces)
    rows = an.attention_summary(ts, layers, chunk)
    if not rows:
        raise ValueError("attention_by_layer_type: no attention pattern captured; re-run with "
                         "capture=['layers.{i}.attn.pattern']")
    types = an.by_layer_type(ts, layers, chunk)
    colors = category_colors(["chunked", "global", "global-rope"])
    if len(rows) <= 4:
        return _attention_table(rows, types, colors)
    fig = new_figure((13.0, 3.6))
    axes = fig.subplots(1, 4)
    x = np.arange(len(rows))
    for ax, (key, label) in zip(axes[:3], [("entropy", "entropy (nats)"),
                                           ("distance", "mean distance (tokens)"),
                                           ("sink", "mass on first token")]):
        vals = [r[key] for r in rows]
        ax.bar(x, vals, 0.6, color=[colors[r["type"]] for r in rows])
        for kind, t in types.items():
            if np.isfinite(t[key]):
                ax.axhline(t[key], color=colors[kind], ls="--", lw=0.9)
        ax.set_xticks(x, [layer_label(r["layer"]) for r in rows])
        ax.set_title(label, fontsize=FONT_SIZES["label"])
        ax.set_xlabel("layer")
    _distance_panel(axes[3], types, colors)
    fig.suptitle("Attention by layer type: chunked RoPE vs global NoPE")
    return fig


def _distance_panel(ax: Axes, types: dict[str, Any], colors: dict[str, Any]) -> None:
    for kind, t in types.items():
        e = np.asarray(t["edges"])
        ax.plot(range(len(t["distance_hist"])), t["distance_hist"], "o-", color=colors[kind],
                label=f"{_TYPE_TEXT.get(kind, kind)} ({', '.join(map(str, t['layers']))})")
        ax.set_xticks(range(len(e) - 1), [f"{lo}" for lo in e[:-1]], fontsize=FONT_SIZES["tick"])
    ax.set_xlabel("query − key distance ≥")
    ax.set_ylabel("attention mass")
    ax.set_title("attention mass by distance", fontsize=FONT_SIZES["label"])
    ax.legend(fontsize=FONT_SIZES["annotation"])


def _attention_table(rows: list[dict[str, Any]], types: dict[str, Any],
                     colors: dict[str, Any]) -> Figure:
    fig = new_figure((11.0, 3.4))
    ax_t, ax_d = fig.subplots(1, 2, width_ratios=[1.1, 1.0])
    ax_t.axis("off")
    cells = [[layer_label(r["layer"]), _TYPE_TEXT.get(r["type"], r["type"]),
              f"{r['entropy']:.2f}", f"{r['distance']:.1f}", f"{r['sink']:.2f}"] for r in rows]
    table = ax_t.table(cellText=cells, colLabels=["layer", "type", "entropy\n(nats)",
                                                  "mean distance\n(tokens)",
                                                  "first-token\nmass"],
                       colWidths=[0.12, 0.28, 0.18, 0.24, 0.18], loc="center",
                       cellLoc="center")
    table.auto_set_font_size(False)
    table.set_fontsize(FONT_SIZES["label"])
    table.scale(1.0, 1.6)
    for (r, c), cell in table.get_celld().items():
        cell.set_edgecolor("#dddddd")
        if r == 0:  # two-line headers need a taller row
            cell.set_text_props(weight="bold")
            cell.set_height(cell.get_height() * 1.9)
        elif c == 1:
            cell.set_facecolor((*colors[rows[r - 1]["type"]][:3], 0.25))
    ax_t.set_title("per layer (mean over heads and queries)", fontsize=FONT_SIZES["label"])
    _distance_panel(ax_d, types, colors)
    fig.suptitle("Attention by layer type: chunked RoPE vs global NoPE")
    return fig
