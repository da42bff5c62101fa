"""Routing figures: expert load and balance, tokens coloured by expert, router confidence,
temporal locality and cross-layer flow."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import matplotlib as mpl
import numpy as np
from matplotlib.axes import Axes
from matplotlib.colors import TwoSlopeNorm
from matplotlib.figure import Figure
from matplotlib.patches import Patch, PathPatch, Rectangle
from matplotlib.path import Path as MPath
from matplotlib.ticker import MaxNLocator

from .. import analysis as an
from ..analysis._common import Traces, indices
from ..trace import Trace
from ._util import default_layer, layer_label, layers_or_default, token_labels
from .style import (
    DIVERGING,
    FONT_SIZES,
    MASKED,
    REFERENCE,
    WARN,
    annotate_cells,
    expert_color,
    expert_ticks,
    figure_and_axes,
    layer_colors,
    new_figure,
    styled,
    text_color_on,
)


def _ratio_norm(ratio: np.ndarray, centre: float = 1.0) -> TwoSlopeNorm:
    vmax = max(2.0 * centre, float(np.nanmax(ratio)) if ratio.size else 2.0 * centre)
    return TwoSlopeNorm(vmin=0.0, vcenter=centre, vmax=vmax)


# --------------------------------------------------------------------------- load and balance
@styled
def load_heatmap(traces: Traces, layers: Sequence[int] | None = None, ax: Axes | None = None,
                 annotate: bool | None = None) -> Figure:
    """Layer × expert load as a ratio to uniform, f_e·E (diverging colours centred at 1 = 1/E).

    Cells are annotated with the ratio when the grid is small (``annotate=None``); the right
    axis gives each layer's CV. The image array is (n_layers, E).
    """
    layers = layers_or_default(traces, layers)
    load = an.load_matrix(traces, layers)
    n, E = load.shape
    ratio = load * E
    fig, ax = figure_and_axes(ax, (min(14.0, max(5.0, 0.42 * E + 3.0)),
                                   max(2.6, 0.42 * n + 1.8)))
    im = ax.imshow(ratio, cmap=DIVERGING, norm=_ratio_norm(ratio), aspect="auto")
    if annotate or (annotate is None and n * E <= 300):
        annotate_cells(ax, ratio, "{:.1f}", im)
    ax.set_yticks(range(n), [layer_label(i) for i in layers])
    expert_ticks(ax, E)
    ax.set_xlabel("expert")
    ax.set_ylabel("MoE layer")
    cv = np.atleast_1d(an.load_cv(load))
    sec = ax.secondary_yaxis("right")
    sec.set_yticks(range(n), [f"CV {c:.2f}" for c in cv])
    sec.tick_params(length=0)
    cb = fig.colorbar(im, ax=ax, pad=0.02)
    cb.set_label("load ÷ uniform  (f·E; 1 = 1/E)")
    ax.set_title(f"Expert load by layer (uniform 1/E = {1 / E:.1%})")
    return fig


@styled
def imbalance_bars(traces: Traces, layers: Sequence[int] | None = None,
                   ax: Axes | None = None) -> Figure:
    """Per-layer balance: CV, max/mean and normalised load entropy as grouped bars.

    Balanced routing has CV 0, max/mean 1 and entropy 1 (dashed reference line at 1).
    """
    layers = layers_or_default(traces, layers)
    load = an.load_matrix(traces, layers)
    stats = [an.load_stats(row) for row in load]
    metrics = [("cv", "CV", "#4c72b0"), ("max_over_mean", "max / mean", "#dd8452"),
               ("entropy_norm", "entropy / log E", "#55a868")]
    fig, ax = figure_and_axes(ax, (max(4.5, 1.1 * len(layers) + 2.5), 3.6))
    x = np.arange(len(layers))
    w = 0.8 / len(metrics)
    for m, (key, label, color) in enumerate(metrics):
        vals = [s[key] for s in stats]
        bars = ax.bar(x + (m - 1) * w, vals, w, label=label, color=color)
        if len(layers) <= 12:
            ax.bar_label(bars, fmt="%.2f", fontsize=FONT_SIZES["annotation"], padding=1)
    ax.axhline(1.0, color=REFERENCE, ls="--", lw=0.9, label="balanced (max/mean = entropy = 1)")
    ax.set_xticks(x, [layer_label(i) for i in layers])
    ax.set_xlabel("MoE layer")
    ax.set_ylabel("value")
    ax.set_title(f"Load imbalance per layer ({load.shape[1]} experts)")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return fig


# --------------------------------------------------------------------------- tokens by expert
def _layout_tokens(labels: Sequence[str], width: int) -> tuple[list[tuple[int, int, int]], int]:
    """(x, line, n_chars) per token for a monospace layout of ``width`` characters per line;
    tokens ending in a newline mark ('↵') end their line."""
    out, x, line = [], 0, 0
    for s in labels:
        n = max(len(s), 1)
        if x > 0 and x + n > width:
            x, line = 0, line + 1
        out.append((x, line, n))
        x += n
        if s.endswith("↵"):
            x, line = 0, line + 1
    lines = (out[-1][1] + 1) if out else 1
    return out, lines


@styled
def token_routing_text(trace: Trace, layer: int | None = None, tokenizer: Any = None,
                       tokens: Sequence[str] | None = None, batch: int = 0, width: int = 80,
                       max_tokens: int = 400, eps: float = an.NEAR_TIE_EPS,
                       ax: Axes | None = None) -> Figure:
    """The input text with each token's background coloured by its top-1 expert at ``layer``.

    Token strings come from ``tokens``, else ``tokenizer.token_strings(ids)``, else ``#id``.
    Lines wrap at ``width`` characters and after newline tokens. Tokens whose router margin is
    below ``eps`` (near-ties) get a dashed red outline when router logits were captured. One
    text artist per token; the legend gives each expert's share of these tokens.
    """
    layer = default_layer(trace, layer)
    ids = np.asarray(trace.input_ids)
    ids = ids[batch] if ids.ndim == 2 else ids.ravel()
    r = trace.routing(layer)
    top1 = np.asarray(r.indices)[batch, :, 0].astype(np.int64)
    total = len(ids)
    n = min(total, max_tokens)
    ids, top1 = ids[:n], top1[:n]
    labels = token_labels(ids, tokenizer, tokens)[:n]
    near = np.zeros(n, dtype=bool)
    if r.logits is not None:
        z = np.sort(np.asarray(r.logits, dtype=np.float64)[batch, :n], axis=-1)
        near = (z[:, -1] - z[:, -2]) < eps
    pos, lines = _layout_tokens(labels, width)
    fs = FONT_SIZES["token"]
    char_in, line_in = 0.6 * fs / 72.0, 1.75 * fs / 72.0
    present = sorted(set(top1.tolist()))
    w_in, h_text = width * char_in + 0.6, lines * line_in
    ncol = max(1, min(len(present) + int(near.any()), int(w_in / 1.15)))
    legend_rows = int(np.ceil((len(present) + int(near.any())) / ncol))
    own = ax is None
    if ax is None:
        h_in = h_text + 0.45 + 0.22 * legend_rows + 0.15
        fig = new_figure((w_in, h_in), layout=None)
        ax = fig.add_axes((0.3 / w_in, (0.22 * legend_rows + 0.15) / h_in,
                           width * char_in / w_in, h_text / h_in))
    else:
        fig, ax = figure_and_axes(ax)
        bbox = ax.get_position()
        avail_pt = bbox.width * fig.get_figwidth() * 72.0
        fs = min(fs, avail_pt / (0.6 * width))
    for (x, line, k), s, e, tie in zip(pos, labels, top1, near):
        bg = expert_color(int(e))
        ax.add_patch(Rectangle((x + 0.04, line + 0.08), k - 0.08, 0.84, facecolor=bg,
                               edgecolor=WARN if tie else "none", lw=1.3 if tie else 0,
                               ls="--"))
        ax.text(x + k / 2, line + 0.5, s, ha="center", va="center", family="monospace",
                fontsize=fs, color=text_color_on(bg), parse_math=False)
    ax.set_xlim(0, width)
    ax.set_ylim(lines, 0)
    ax.axis("off")
    counts = np.bincount(top1, minlength=max(present) + 1 if present else 1)
    handles = [Patch(facecolor=expert_color(e), label=f"E{e} {counts[e] / n:.0%}")
               for e in present]
    if near.any():
        handles.append(Patch(facecolor="white", edgecolor=WARN, ls="--",
                             label=f"near-tie <{eps:g}"))
    where = fig if own else ax
    where.legend(handles=handles, loc="lower center" if own else "upper center",
                 bbox_to_anchor=None if own else (0.5, 0.0), ncol=ncol,
                 fontsize=FONT_SIZES["legend"], frameon=False, handlelength=1.2,
                 columnspacing=1.0)
    more = f" (first {n} of {total})" if n < total else ""
    dom = f" ({trace.meta['domain']})" if trace.meta.get("domain") else ""
    ax.set_title(f"Layer {layer}{dom}: tokens coloured by top-1 expert{more}",
                 fontsize=FONT_SIZES["title"], loc="left")
    return fig


# --------------------------------------------------------------------------- confidence
def _margin_bins(ms: list[np.ndarray], eps: float, bins: int) -> np.ndarray:
    pos = np.concatenate([m[m > 0] for m in ms]) if ms else np.zeros(0)
    lo = min(eps / 10.0, float(pos.min()) if pos.size else eps / 10.0)
    hi = max(eps * 10.0, float(np.concatenate(ms).max()) * 1.05 if ms else eps * 10)
    return np.geomspace(lo, hi, bins + 1)


@styled
def margin_histogram(traces: Traces, layers: Sequence[int] | None = None,
                     eps: float = an.NEAR_TIE_EPS, bins: int = 40,
                     ax: Axes | None = None) -> Figure:
    """Distribution of the top-1/top-2 router-logit margin (log x axis), near-ties marked.

    The region below ``eps`` is shaded red with a dashed line at ``eps`` (artists with gid
    ``"near-tie"`` / ``"near-tie-eps"``); with one layer, the bars below ``eps`` are red. Each
    layer's near-tie fraction is in the legend. Needs ``router_logits``.
    """
    layers = layers_or_default(traces, layers)
    ms = [an.logit_margin(traces, i) for i in layers]
    edges = _margin_bins(ms, eps, bins)
    fig, ax = figure_and_axes(ax, (7.2, 3.8))
    ax.axvspan(edges[0], eps, color=WARN, alpha=0.12, lw=0, gid="near-tie")
    ax.axvline(eps, color=WARN, ls="--", lw=1.0, gid="near-tie-eps",
               label=f"near-tie: margin < {eps:g}")
    colors = layer_colors(len(layers))
    for i, m, c in zip(layers, ms, colors):
        frac = float(np.mean(m < eps))
        label = f"{layer_label(i)}: {frac:.1%} near-tie"
        vals = np.clip(m, edges[0], edges[-1])
        if len(layers) == 1:
            _, _, patches = ax.hist(vals, edges, color=c, alpha=0.85, label=label)
            for p, left in zip(patches, edges[:-1]):
                if left < eps:
                    p.set_facecolor(WARN)
        else:
            ax.hist(vals, edges, histtype="step", color=c, lw=1.4, label=label)
    ax.set_xscale("log")
    ax.set_xlabel("router logit margin  z(1) − z(2)")
    ax.set_ylabel("tokens")
    ax.set_title("Router confidence: top-1 margin (flip risk below ε)")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return fig


@styled
def gate_histogram(traces: Traces, layers: Sequence[int] | None = None,
                   eps: float = an.NEAR_TIE_EPS, bins: int = 25,
                   ax: Axes | None = None) -> Figure:
    """Distribution of the first-choice gate σ(z) per layer (x range fitted to the gates, in
    steps of 0.05), near-tie tokens marked in red.

    With one layer the histogram is stacked (other tokens / near-ties); with several, each layer
    is a step line and the near-tie tokens of all layers are a red filled histogram (label
    ``near-tie tokens``). Near-ties need ``router_logits``.
    """
    layers = layers_or_default(traces, layers)
    fig, ax = figure_and_axes(ax, (7.2, 3.8))
    gates = {i: an.gate_values(traces, i)[:, 0] for i in layers}
    allg = np.concatenate(list(gates.values()))
    lo = max(0.0, np.floor(allg.min() * 20) / 20) if allg.size else 0.0
    hi = min(1.0, np.ceil(allg.max() * 20) / 20) if allg.size else 1.0
    edges = np.linspace(lo, max(hi, lo + 0.05), bins + 1)
    colors = layer_colors(len(layers))
    tie_gates = []
    for i, c in zip(layers, colors):
        g = gates[i]
        try:
            tie = an.near_tie_mask(traces, i, eps)
        except ValueError:
            tie = np.zeros(g.shape, dtype=bool)
        if len(layers) == 1:
            ax.hist([g[~tie], g[tie]], edges, stacked=True, color=[c, WARN],
                    label=[f"{layer_label(i)} gates", f"near-tie tokens ({tie.mean():.1%})"])
        else:
            ax.hist(g, edges, histtype="step", color=c, lw=1.4, label=layer_label(i))
            tie_gates.append(g[tie])
    if len(layers) > 1:
        pooled = np.concatenate(tie_gates) if tie_gates else np.zeros(0)
        ax.hist(pooled, edges, color=WARN, alpha=0.6,
                label=f"near-ties (margin < {eps:g}): {pooled.size}")
    ax.set_xlim(edges[0], edges[-1])
    ax.set_xlabel("first-choice gate σ(z)")
    ax.set_ylabel("tokens")
    ax.set_title("Router gate values")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return fig


# --------------------------------------------------------------------------- temporal locality
@styled
def same_expert_rate_plot(traces: Traces, layers: Sequence[int] | None = None,
                          ax: Axes | None = None) -> Figure:
    """Consecutive-token same-expert rate per layer against chance (1/E dashed line, and the
    chance given the observed load, Σ f², as black ticks); lift over 1/E above the bars."""
    layers = layers_or_default(traces, layers)
    rows = [an.same_expert_rate(traces, i) for i in layers]
    fig, ax = figure_and_axes(ax, (max(4.5, 0.9 * len(layers) + 2.5), 3.6))
    x = np.arange(len(layers))
    bars = ax.bar(x, [r.top1 for r in rows], 0.6, color="#4c72b0",
                  label="observed: e(t) = e(t+1)")
    ax.bar_label(bars, labels=[f"×{r.lift:.1f}" for r in rows],
                 fontsize=FONT_SIZES["annotation"], padding=1)
    ax.axhline(rows[0].chance_top1, color=REFERENCE, ls="--", lw=1.0,
               label=f"chance 1/E = {rows[0].chance_top1:.3f}")
    ax.scatter(x, [r.chance_top1_load for r in rows], marker="_", s=400, color="black",
               zorder=3, label="chance given load (Σ f²)")
    if any(r.any != r.top1 for r in rows):
        ax.scatter(x, [r.any for r in rows], marker="o", color="#dd8452", zorder=3,
                   label="any top-k overlap")
    ax.set_xticks(x, [layer_label(i) for i in layers])
    ax.set_ylim(0, max(1e-3, max(max(r.top1, r.any, r.chance_top1_load) for r in rows)) * 1.2)
    ax.set_xlabel("MoE layer")
    ax.set_ylabel("rate")
    ax.set_title("Consecutive tokens on the same expert")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return fig


@styled
def run_length_plot(traces: Traces, layer: int | None = None, ax: Axes | None = None,
                    max_length: int = 20) -> Figure:
    """Fraction of top-1 expert runs of each length, against the geometric distribution of
    random routing with the observed load (repeat probability Σ f²)."""
    layer = default_layer(traces, layer)
    hist = an.run_length_histogram(traces, layer).astype(np.float64)
    rate = an.same_expert_rate(traces, layer)
    total = hist.sum()
    L = np.arange(1, min(max(len(hist), 2), max_length + 1))
    obs = hist[1:len(L) + 1] / total if total else np.zeros(len(L))
    q = rate.chance_top1_load
    geo = (1 - q) * q ** (L - 1)
    fig, ax = figure_and_axes(ax, (5.5, 3.6))
    ax.bar(L, obs, 0.7, color="#4c72b0", label="observed runs")
    ax.plot(L, geo, "o--", color=REFERENCE, ms=3, lw=1.0, label=f"chance (repeat p = {q:.3f})")
    ax.set_yscale("log")
    if (obs > 0).any():
        ax.set_ylim(bottom=float(obs[obs > 0].min()) / 5)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("run length (tokens on the same top-1 expert)")
    ax.set_ylabel("fraction of runs")
    ax.set_title(f"Layer {layer}: expert run lengths")
    ax.legend()
    return fig


# --------------------------------------------------------------------------- across layers
@styled
def transition_heatmap(traces: Traces, layer_from: int | None = None,
                       layer_to: int | None = None, ax: Axes | None = None,
                       annotate: bool | None = None) -> Figure:
    """P(top-1 expert at ``layer_to`` | top-1 expert at ``layer_from``), colours centred at the
    independent-uniform value 1/E; rows of never-chosen experts are grey. Defaults: the first two
    captured MoE layers."""
    layers = layers_or_default(traces, None)
    if layer_from is None:
        layer_from = layers[0]
    if layer_to is None:
        later = [i for i in layers if i > layer_from]
        if not later:
            raise ValueError("transition_heatmap needs two MoE layers; captured: "
                             f"{layers}")
        layer_to = later[0]
    M = an.transition_matrix(traces, layer_from, layer_to)
    counts = an.transition_counts(traces, layer_from, layer_to)
    E = M.shape[1]
    data = np.ma.masked_where(np.repeat(counts.sum(axis=1, keepdims=True) == 0, E, axis=1), M)
    fig, ax = figure_and_axes(ax, (min(12.0, max(4.8, 0.4 * E + 2.4)),
                                   min(11.0, max(4.0, 0.4 * M.shape[0] + 1.6))))
    cmap = mpl.colormaps[DIVERGING].with_extremes(bad=MASKED)
    im = ax.imshow(data, cmap=cmap, norm=_ratio_norm(M, 1.0 / E), aspect="auto")
    if annotate or (annotate is None and M.size <= 256):
        annotate_cells(ax, data, "{:.2f}", im)
    expert_ticks(ax, E, "x")
    expert_ticks(ax, M.shape[0], "y")
    ax.set_xlabel(f"expert at layer {layer_to}")
    ax.set_ylabel(f"expert at layer {layer_from}")
    h = an.conditional_entropy(traces, layer_from, layer_to)
    acc = an.next_layer_predictability(traces, layer_from, layer_to)
    nmi = an.layer_nmi(traces, layer_from, layer_to)
    ax.set_title(f"P(expert at L{layer_to} | expert at L{layer_from})\n"
                 f"H(next|prev) = {h:.2f} nats, predictability {acc:.0%}, NMI {nmi:.2f}",
                 fontsize=FONT_SIZES["title"] - 1)
    cb = fig.colorbar(im, ax=ax, pad=0.02)
    cb.set_label(f"probability (uniform 1/E = {1 / E:.3f})")
    return fig


def _band(x0: float, x1: float, y0: tuple[float, float], y1: tuple[float, float]) -> MPath:
    """A Sankey band from source interval y0 at x0 to target interval y1 at x1 (cubic edges)."""
    xm = (x0 + x1) / 2
    verts = [(x0, y0[0]), (xm, y0[0]), (xm, y1[0]), (x1, y1[0]),
             (x1, y1[1]), (xm, y1[1]), (xm, y0[1]), (x0, y0[1]), (x0, y0[0])]
    codes = [MPath.MOVETO, MPath.CURVE4, MPath.CURVE4, MPath.CURVE4, MPath.LINETO,
             MPath.CURVE4, MPath.CURVE4, MPath.CURVE4, MPath.CLOSEPOLY]
    return MPath(verts, codes)


@styled
def expert_flow(traces: Traces, layers: Sequence[int] | None = None, ax: Axes | None = None,
                min_share: float = 0.002, label_min: float = 0.025) -> Figure:
    """Sankey-style flow of tokens between top-1 experts of consecutive MoE layers.

    Each column is a layer; each node an expert, its height the expert's share of tokens; each
    band the share of tokens going from expert i to expert j, coloured by the source expert.
    Bands below ``min_share`` of the tokens are left out. Nodes carry gid ``"node-L{l}-E{e}"``.
    """
    layers = layers_or_default(traces, layers)
    if len(layers) < 2:
        raise ValueError(f"expert_flow needs two or more MoE layers, got {layers}")
    E = an.num_experts(traces, layers[0])
    top = [np.bincount(indices(traces, i, "expert_flow")[:, 0], minlength=E) for i in layers]
    N = float(top[0].sum())
    gap = 0.25 / max(E - 1, 1)
    scale = 1.0 - gap * (E - 1)
    node_w = 0.06
    # node spans (bottom, top) per layer and expert, laid out top to bottom in expert order
    spans: list[list[tuple[float, float]]] = []
    for c in top:
        y, col = 1.0, []
        for e in range(E):
            h = c[e] / N * scale
            col.append((y - h, y))
            y -= h + gap
        spans.append(col)
    fig, ax = figure_and_axes(ax, (max(6.0, 2.2 * len(layers)), max(4.5, 0.22 * E + 3.0)))
    for a, (la, lb) in enumerate(zip(layers[:-1], layers[1:])):
        T = an.transition_counts(traces, la, lb)
        out_off = [spans[a][i][1] for i in range(E)]
        in_off = [spans[a + 1][j][1] for j in range(E)]
        # targets: incoming bands stacked in source order
        in_pos: dict[tuple[int, int], float] = {}
        for j in range(E):
            for i in range(E):
                in_pos[(i, j)] = in_off[j]
                in_off[j] -= T[i, j] / N * scale
        for i in range(E):
            for j in range(E):
                h = T[i, j] / N * scale
                if T[i, j] == 0:
                    continue
                y0 = (out_off[i], out_off[i] - h)
                out_off[i] -= h
                if T[i, j] / N < min_share:
                    continue
                y1 = (in_pos[(i, j)], in_pos[(i, j)] - h)
                ax.add_patch(PathPatch(_band(a + node_w / 2, a + 1 - node_w / 2, y0, y1),
                                       facecolor=expert_color(i), alpha=0.45, lw=0))
    for a, (i, col) in enumerate(zip(layers, spans)):
        for e, (lo, hi) in enumerate(col):
            if hi - lo <= 0:
                continue
            c = expert_color(e)
            ax.add_patch(Rectangle((a - node_w / 2, lo), node_w, hi - lo, facecolor=c,
                                   edgecolor="white", lw=0.5, gid=f"node-L{i}-E{e}"))
            if hi - lo >= label_min:
                ax.text(a, (lo + hi) / 2, str(e), ha="center", va="center",
                        fontsize=FONT_SIZES["annotation"], color=text_color_on(c))
    ax.set_xlim(-0.3, len(layers) - 0.7)
    ax.set_ylim(min(s[0] for col in spans for s in col) - 0.02, 1.02)
    ax.set_xticks(range(len(layers)), [f"layer {i}" for i in layers])
    ax.set_yticks([])
    for side in ("left", "right", "top"):
        ax.spines[side].set_visible(False)
    ax.set_title("Expert flow across layers (top-1; height = share of tokens)")
    return fig
