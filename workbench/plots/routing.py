"""Routing figures: expert load and balance, tokens coloured by expert, router confidence,
temporal locality and cross-layer flow."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import matplotlib as mpl
import numpy as np
from matplotlib.axes import Axes
from matplotlib.colors import FuncNorm
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch, PathPatch, Rectangle
from matplotlib.path import Path as MPath
from matplotlib.ticker import MaxNLocator

from .. import analysis as an
from ..analysis._common import Traces, indices
from ..trace import Trace
from ._util import (
    OTHER,
    TOP_EXPERTS,
    capped,
    default_layer,
    layer_label,
    layer_legend,
    layer_ticks,
    layers_or_default,
    pick_layers,
    plain,
    token_labels,
    top_experts,
)
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


def _ratio_norm(ratio: np.ndarray, centre: float = 1.0, limit: float = 8.0) -> FuncNorm:
    """Log2 colour scale for ratios, symmetric around ``centre`` (1/m .. m times it, m the
    largest fold change seen, between 2 and ``limit``); zero and far-out values clip."""
    r = np.asarray(np.ma.filled(np.ma.masked_invalid(ratio), centre), dtype=np.float64) / centre
    pos = r[r > 0]
    m = float(np.max(np.maximum(pos, 1.0 / pos))) if pos.size else 2.0
    m = min(max(m, 2.0), limit)

    def fwd(x: np.ndarray) -> np.ndarray:
        return np.log2(np.maximum(np.asarray(x, dtype=np.float64) / centre, 1e-12))

    def inv(y: np.ndarray) -> np.ndarray:
        return centre * np.exp2(y)

    return FuncNorm((fwd, inv), vmin=centre / m, vmax=centre * m)


def ratio_colorbar(fig: Figure, im: Any, ax: Axes, label: str, centre: float = 1.0) -> Any:
    """A colour bar for :func:`_ratio_norm` images with ticks at powers of two of ``centre``."""
    cb = fig.colorbar(im, ax=ax, pad=0.02)
    lo, hi = im.norm.vmin / centre, im.norm.vmax / centre
    ks = [k for k in range(-6, 7) if lo * 0.999 <= 2.0 ** k <= hi * 1.001]
    cb.set_ticks([centre * 2.0 ** k for k in ks],
                 labels=[(f"{2 ** k:g}" if k >= 0 else f"1/{2 ** -k:g}")
                         + ("×" if centre != 1.0 else "") for k in ks])
    cb.set_label(label)
    return cb


# --------------------------------------------------------------------------- load and balance
@styled
def load_heatmap(traces: Traces, layers: Sequence[int] | None = None, ax: Axes | None = None,
                 annotate: bool | None = None) -> Figure:
    """Layer × expert load as a ratio to uniform, f_e·E, on a log2 diverging scale centred at
    1 (= 1/E; the same scale as :func:`~workbench.plots.domain_heatmap`).

    Cells are annotated with the ratio when the grid is small (``annotate=None``); the right
    axis gives each layer's CV (thinned for many layers). The image array is (n_layers, E).
    """
    layers = layers_or_default(traces, layers)
    load = an.load_matrix(traces, layers)
    n, E = load.shape
    ratio = load * E
    fig, ax = figure_and_axes(ax, capped(max(5.0, 0.42 * E + 3.0) if E <= 24 else 14.0,
                                         max(2.6, (0.42 if n <= 16 else 0.2) * n + 1.8)))
    im = ax.imshow(ratio, cmap=DIVERGING, norm=_ratio_norm(ratio), aspect="auto",
                   interpolation="nearest")
    if annotate or (annotate is None and n * E <= 300):
        annotate_cells(ax, ratio, "{:.1f}", im)
    layer_ticks(ax, layers, "y", max_ticks=32)
    expert_ticks(ax, E)
    ax.set_xlabel("expert")
    ax.set_ylabel("MoE layer")
    cv = np.atleast_1d(an.load_cv(load))
    sec = ax.secondary_yaxis("right")
    step = max(1, int(np.ceil(n / 32)))
    sec.set_yticks(range(0, n, step), [f"CV {c:.2f}" for c in cv[::step]])
    sec.tick_params(length=0)
    ratio_colorbar(fig, im, ax, "load ÷ uniform  (f·E, log scale; 1 = 1/E)")
    ax.set_title(f"Expert load by layer (uniform 1/E = {1 / E:.1%})")
    return fig


@styled
def imbalance_bars(traces: Traces, layers: Sequence[int] | None = None,
                   ax: Axes | None = None) -> Figure:
    """Per-layer balance in three panels sharing the layer axis, each with its own balanced
    reference: CV (balanced = 0), max/mean load (balanced = 1) and load entropy / log E
    (balanced = 1). Bars up to 16 layers, lines with markers above.

    With ``ax`` given, only the CV panel is drawn there.
    """
    layers = layers_or_default(traces, layers)
    load = an.load_matrix(traces, layers)
    stats = [an.load_stats(row) for row in load]
    metrics = [("cv", "CV", "#4c72b0", 0.0, "balanced = 0"),
               ("max_over_mean", "max / mean", "#dd8452", 1.0, "balanced = 1"),
               ("entropy_norm", "entropy / log E", "#55a868", 1.0, "balanced = 1")]
    n = len(layers)
    if ax is not None:
        fig = ax.figure
        axes = [ax]
    else:
        fig = new_figure(capped(max(4.5, (0.45 if n <= 16 else 0.2) * n + 2.5), 6.2))
        axes = list(fig.subplots(3, 1, sharex=True))
    x = np.arange(n)
    for a, (key, label, color, ref, reflabel) in zip(axes, metrics):
        vals = [s[key] for s in stats]
        if n <= 16:
            bars = a.bar(x, vals, 0.6, color=color, label=label)
            if n <= 12:  # inside the bars when labels on top would sit on the reference line
                inside = ref > 0 and any(0.85 * ref <= v <= ref for v in vals)
                a.bar_label(bars, fmt="%.2f", fontsize=FONT_SIZES["annotation"],
                            padding=-11 if inside else 1, color="white" if inside else None)
        else:
            a.plot(x, vals, "o-", color=color, ms=3, lw=1.2, label=label)
        a.axhline(ref, color=REFERENCE, ls="--", lw=0.9)
        a.text(1.0, ref, f" {reflabel}", transform=a.get_yaxis_transform(), va="center",
               ha="left", fontsize=FONT_SIZES["annotation"], color=REFERENCE)
        a.set_ylabel(label)
        top = max(max(vals), ref) if vals else 1.0
        a.set_ylim(0, top * 1.2 + 1e-9)
    layer_ticks(axes[-1], layers)
    axes[-1].set_xlabel("MoE layer")
    axes[0].set_title(f"Load imbalance per layer ({load.shape[1]} experts)")
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


def row_major(handles: list[Any], ncol: int) -> list[Any]:
    """Reorder legend handles so that a legend of ``ncol`` columns (filled column by column)
    reads in the given order along each row."""
    n = len(handles)
    if ncol <= 1 or n <= ncol:
        return handles
    rows = int(np.ceil(n / ncol))
    grid = [handles[r * ncol:(r + 1) * ncol] for r in range(rows)]
    return [grid[r][c] for c in range(ncol) for r in range(rows) if c < len(grid[r])]


#: Outline of near-tie tokens on expert-coloured backgrounds (black, dashed: never an expert
#: colour).
NEAR_TIE_EDGE = "black"


def generated_from(trace: Trace, prompt_len: int | None) -> int | None:
    """Index of the first generated token: ``prompt_len``, else ``trace.meta["prompt_len"]``."""
    if prompt_len is None:
        prompt_len = trace.meta.get("prompt_len")
    return None if prompt_len is None else int(prompt_len)


def expert_palette(experts: np.ndarray, max_experts: int = TOP_EXPERTS
                   ) -> tuple[list[int], dict[int, Any]]:
    """(experts in colour, colour of every expert seen): the ``max_experts`` most frequent
    keep :func:`expert_color`, the rest are :data:`OTHER` grey."""
    counts = np.bincount(np.asarray(experts, dtype=np.int64).ravel())
    keep = sorted(top_experts(counts, max_experts))
    colors = {e: (expert_color(e) if e in keep else OTHER)
              for e in np.flatnonzero(counts).tolist()}
    return keep, colors


@styled
def token_routing_text(trace: Trace, layer: int | None = None, tokenizer: Any = None,
                       tokens: Sequence[str] | None = None, batch: int = 0, width: int = 80,
                       max_tokens: int = 400, eps: float = an.NEAR_TIE_EPS,
                       ax: Axes | None = None, max_experts: int = TOP_EXPERTS,
                       prompt_len: int | None = None) -> Figure:
    """The input text with each token's background coloured by its top-1 expert at ``layer``.

    Token strings come from ``tokens``, else ``tokenizer.token_strings(ids)``, else ``#id``.
    Lines wrap at ``width`` characters and after newline tokens. The ``max_experts`` most
    frequent experts keep their colour; the rest are grey ("other"), so the legend (in expert
    order, read along rows) never exceeds ``max_experts`` + 3 entries. Tokens whose router
    margin is below ``eps`` (near-ties) get a dashed black outline when router logits were
    captured. Tokens from ``prompt_len`` on (default ``trace.meta["prompt_len"]``) were
    generated: they are underlined and set in italics. One text artist per token.
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
    gen0 = generated_from(trace, prompt_len)
    generated = np.arange(n) >= gen0 if gen0 is not None else np.zeros(n, dtype=bool)
    keep, colors = expert_palette(top1, max_experts)
    pos, lines = _layout_tokens(labels, width)
    fs = FONT_SIZES["token"]
    char_in, line_in = 0.6 * fs / 72.0, 1.75 * fs / 72.0
    counts = np.bincount(top1, minlength=int(top1.max()) + 1 if n else 1)
    others = [e for e in np.flatnonzero(counts).tolist() if e not in keep]
    n_entries = len(keep) + bool(others) + int(near.any()) + int(generated.any())
    w_in, h_text = width * char_in + 0.6, lines * line_in
    ncol = max(1, min(n_entries, int(w_in / 1.15)))
    legend_rows = int(np.ceil(n_entries / ncol))
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
    for (x, line, k), s, e, tie, new in zip(pos, labels, top1, near, generated):
        bg = colors[int(e)]
        ax.add_patch(Rectangle((x + 0.04, line + 0.08), k - 0.08, 0.84, facecolor=bg,
                               edgecolor=NEAR_TIE_EDGE if tie else "none",
                               lw=1.4 if tie else 0, ls="--"))
        if new:
            ax.plot([x + 0.04, x + k - 0.04], [line + 0.97, line + 0.97], color="black",
                    lw=1.6, gid="generated", solid_capstyle="butt")
        ax.text(x + k / 2, line + 0.5, s, ha="center", va="center", family="monospace",
                fontsize=fs, color=text_color_on(bg), parse_math=False,
                fontstyle="italic" if new else "normal")
    ax.set_xlim(0, width)
    ax.set_ylim(lines, 0)
    ax.axis("off")
    handles: list[Any] = [Patch(facecolor=expert_color(e), label=f"E{e} {counts[e] / n:.0%}")
                          for e in keep]
    if others:
        share = sum(counts[e] for e in others) / n
        handles.append(Patch(facecolor=OTHER, label=f"other ({len(others)} experts) {share:.0%}"))
    if near.any():
        handles.append(Patch(facecolor="white", edgecolor=NEAR_TIE_EDGE, ls="--",
                             label=f"near-tie <{eps:g}"))
    if generated.any():
        handles.append(Line2D([], [], color="black", lw=1.6,
                              label=f"generated ({int(generated.sum())})"))
    where = fig if own else ax
    where.legend(handles=row_major(handles, ncol), loc="lower center" if own else "upper center",
                 bbox_to_anchor=None if own else (0.5, 0.0), ncol=ncol,
                 fontsize=FONT_SIZES["legend"], frameon=False, handlelength=1.2,
                 columnspacing=1.0)
    more = f" (first {n} of {total})" if n < total else ""
    dom = f" ({trace.meta['domain']})" if trace.meta.get("domain") else ""
    ax.set_title(f"Layer {layer}{dom}: tokens coloured by top-1 expert{more}",
                 fontsize=FONT_SIZES["title"], loc="left")
    return fig


@styled
def token_routing_layers(trace: Trace, layers: Sequence[int] | None = None,
                         tokenizer: Any = None, tokens: Sequence[str] | None = None,
                         batch: int = 0, max_layers: int = 6, max_tokens: int = 64,
                         max_experts: int = TOP_EXPERTS, eps: float = an.NEAR_TIE_EPS,
                         prompt_len: int | None = None) -> Figure:
    """The same tokens stacked over several MoE layers: one row per layer, one cell per token,
    coloured by its top-1 expert there (the ``max_experts`` most frequent experts over the
    rows in colour, the rest grey). Token strings run along the bottom; generated tokens (from
    ``prompt_len``, default ``trace.meta["prompt_len"]``) are underlined in black and set off
    by a vertical line; near-ties have a dashed black outline. Default layers: up to
    ``max_layers`` evenly spaced MoE layers."""
    layers, note = pick_layers(trace, layers, max_layers)
    ids = np.asarray(trace.input_ids)
    ids = ids[batch] if ids.ndim == 2 else ids.ravel()
    n = min(len(ids), max_tokens)
    labels = token_labels(ids[:n], tokenizer, tokens)[:n]
    top = np.stack([np.asarray(trace.routing(i).indices)[batch, :n, 0] for i in layers]
                   ).astype(np.int64)
    near = np.zeros(top.shape, dtype=bool)
    for r, i in enumerate(layers):
        lg = trace.routing(i).logits
        if lg is not None:
            z = np.sort(np.asarray(lg, dtype=np.float64)[batch, :n], axis=-1)
            near[r] = (z[:, -1] - z[:, -2]) < eps
    keep, colors = expert_palette(top, max_experts)
    gen0 = generated_from(trace, prompt_len)
    L = len(layers)
    fig = new_figure(capped(max(5.0, 0.28 * n + 2.2), 0.42 * L + 1.9))
    ax = fig.add_subplot()
    for r in range(L):
        for t in range(n):
            e = int(top[r, t])
            bg = colors[e]
            ax.add_patch(Rectangle((t + 0.04, r + 0.06), 0.92, 0.88, facecolor=bg,
                                   edgecolor=NEAR_TIE_EDGE if near[r, t] else "none",
                                   ls="--", lw=1.2 if near[r, t] else 0))
            if n <= 48:
                ax.text(t + 0.5, r + 0.5, str(e), ha="center", va="center",
                        fontsize=FONT_SIZES["annotation"] - 1, color=text_color_on(bg))
    if gen0 is not None and gen0 < n:
        ax.axvline(gen0, color="black", lw=1.5, gid="generated")
        ax.plot([gen0, n], [L + 0.08, L + 0.08], color="black", lw=3,
                solid_capstyle="butt", clip_on=False, gid="generated")
    ax.set_xlim(0, n)
    ax.set_ylim(L, 0)
    ax.set_yticks(np.arange(L) + 0.5, [layer_label(i) for i in layers])
    ax.set_xticks(np.arange(n) + 0.5, [plain(s) for s in labels], rotation=90,
                  family="monospace", fontsize=FONT_SIZES["annotation"])
    if gen0 is not None:
        for t, lab in enumerate(ax.get_xticklabels()):
            if t >= gen0:
                lab.set_fontstyle("italic")
                lab.set_fontweight("bold")
    for side in ("top", "right", "left", "bottom"):
        ax.spines[side].set_visible(False)
    ax.tick_params(length=0)
    ax.set_ylabel("MoE layer")
    handles: list[Any] = [Patch(facecolor=expert_color(e), label=f"E{e}") for e in keep]
    if len(colors) > len(keep):
        handles.append(Patch(facecolor=OTHER, label=f"other ({len(colors) - len(keep)})"))
    if near.any():
        handles.append(Patch(facecolor="white", edgecolor=NEAR_TIE_EDGE, ls="--",
                             label="near-tie"))
    if gen0 is not None and gen0 < n:
        handles.append(Line2D([], [], color="black", lw=3, label="generated"))
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 1.0),
              fontsize=FONT_SIZES["annotation"])
    dom = f" ({trace.meta['domain']})" if trace.meta.get("domain") else ""
    more = f", first {n} of {len(ids)} tokens" if n < len(ids) else ""
    ax.set_title(f"Top-1 expert of each token across layers{dom}{note}{more}", loc="left")
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
    layer's near-tie fraction is in the legend. Needs ``router_logits``. Without ``layers``,
    at most eight evenly spaced MoE layers are drawn.
    """
    layers, note = pick_layers(traces, layers)
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
    ax.set_title(f"Router confidence: top-1 margin (flip risk below ε){note}")
    layer_legend(fig, ax, layers, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return fig


@styled
def gate_histogram(traces: Traces, layers: Sequence[int] | None = None,
                   eps: float = an.NEAR_TIE_EPS, bins: int = 25,
                   ax: Axes | None = None) -> Figure:
    """Distribution of the first-choice gate σ(z) per layer (x range fitted to the gates, in
    steps of 0.05), near-tie tokens marked in red.

    With one layer the histogram is stacked (other tokens / near-ties); with several, each layer
    is a step line and the near-tie tokens of all layers are a red filled histogram (label
    ``near-tie tokens``). Near-ties need ``router_logits``. Without ``layers``, at most
    eight evenly spaced MoE layers are drawn.
    """
    layers, note = pick_layers(traces, layers)
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
    ax.set_title(f"Router gate values{note}")
    layer_legend(fig, ax, layers, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return fig


# --------------------------------------------------------------------------- temporal locality
@styled
def same_expert_rate_plot(traces: Traces, layers: Sequence[int] | None = None,
                          ax: Axes | None = None) -> Figure:
    """Consecutive-token same-expert rate per layer against chance (1/E dashed line, and the
    chance given the observed load, Σ f², as black ticks); lift over 1/E above the bars."""
    layers = layers_or_default(traces, layers)
    rows = [an.same_expert_rate(traces, i) for i in layers]
    fig, ax = figure_and_axes(ax, capped(max(4.5, min(0.9, 10.0 / len(layers)) * len(layers)
                                             + 2.5), 3.6))
    x = np.arange(len(layers))
    bars = ax.bar(x, [r.top1 for r in rows], 0.6, color="#4c72b0",
                  label="observed: e(t) = e(t+1)")
    if len(layers) <= 16:
        ax.bar_label(bars, labels=[f"×{r.lift:.1f}" for r in rows],
                     fontsize=FONT_SIZES["annotation"], padding=1)
    ax.axhline(rows[0].chance_top1, color=REFERENCE, ls="--", lw=1.0,
               label=f"chance 1/E = {rows[0].chance_top1:.3f}")
    ax.scatter(x, [r.chance_top1_load for r in rows], marker="_", color="black",
               zorder=3, label="chance given load (Σ f²)", s=400 if len(layers) <= 16 else 40)
    if any(r.any != r.top1 for r in rows):
        ax.scatter(x, [r.any for r in rows], marker="o", color="#dd8452", zorder=3,
                   label="any top-k overlap")
    layer_ticks(ax, layers)
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
    fig, ax = figure_and_axes(ax, (min(10.0, max(4.8, 0.4 * E + 2.4)),
                                   min(9.0, max(4.0, 0.4 * M.shape[0] + 1.6))))
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
    ratio_colorbar(fig, im, ax, f"probability ÷ uniform 1/E ({1 / E:.3f}); log scale", 1.0 / E)
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
                min_share: float = 0.002, label_min: float = 0.025,
                max_experts: int = TOP_EXPERTS, max_layers: int = 8,
                max_bands: int = 40) -> Figure:
    """Sankey-style flow of tokens between top-1 experts of consecutive (drawn) MoE layers.

    Each column is a layer; each node an expert, its height the expert's share of tokens; each
    band the share of tokens going from expert i to expert j, coloured by the source expert.
    Large-model mode: per layer the ``max_experts`` busiest experts are nodes and the rest one
    grey "other" node at the bottom; without ``layers`` at most ``max_layers`` evenly spaced
    MoE layers are drawn (flows then join the drawn layers); between two columns only the
    ``max_bands`` largest transitions at or above ``min_share`` of the tokens are drawn.
    Nodes carry gid ``"node-L{l}-E{e}"`` (``"node-L{l}-other"``).
    """
    layers, note = pick_layers(traces, layers, max_layers)
    if len(layers) < 2:
        raise ValueError(f"expert_flow needs two or more MoE layers, got {layers}")
    E = an.num_experts(traces, layers[0])
    top = [np.bincount(indices(traces, i, "expert_flow")[:, 0], minlength=E) for i in layers]
    N = float(top[0].sum())
    # node order per layer: kept experts by id, then "other" (-1)
    kept = [sorted(top_experts(c, max_experts)) for c in top]
    groups = []  # per layer: expert id -> node key (expert or -1)
    for ks in kept:
        groups.append(np.array([e if e in ks else -1 for e in range(E)]))
    nodes = [ks + ([-1] if len(ks) < int((c > 0).sum()) else []) for ks, c in zip(kept, top)]
    n_max = max(len(ns) for ns in nodes)
    gap = 0.25 / max(n_max - 1, 1)
    node_w = 0.06
    spans: list[dict[int, tuple[float, float]]] = []
    for ns, c, g in zip(nodes, top, groups):
        scale = 1.0 - gap * (len(ns) - 1)
        y, col = 1.0, {}
        for key in ns:
            h = c[g == key].sum() / N * scale
            col[key] = (y - h, y)
            y -= h + gap
        spans.append(col)
    scales = [1.0 - gap * (len(ns) - 1) for ns in nodes]
    fig, ax = figure_and_axes(ax, capped(max(6.0, 1.9 * len(layers)),
                                         max(4.5, 0.26 * n_max + 3.0)))
    for a, (la, lb) in enumerate(zip(layers[:-1], layers[1:])):
        T = an.transition_counts(traces, la, lb)
        ga, gb = groups[a], groups[a + 1]
        na, nb = nodes[a], nodes[a + 1]
        # transition counts between nodes
        G = np.zeros((len(na), len(nb)))
        ia = {k: x for x, k in enumerate(na)}
        ib = {k: x for x, k in enumerate(nb)}
        for i in range(E):
            for j in np.flatnonzero(T[i]):
                G[ia[int(ga[i])], ib[int(gb[j])]] += T[i, j]
        sa, sb = scales[a], scales[a + 1]
        out_off = [spans[a][k][1] for k in na]
        in_off = [spans[a + 1][k][1] for k in nb]
        in_pos = np.zeros_like(G)
        for j in range(len(nb)):
            for i in range(len(na)):
                in_pos[i, j] = in_off[j]
                in_off[j] -= G[i, j] / N * sb
        order = np.argsort(-G, axis=None, kind="stable")
        shown = {int(o) for o in order[:max_bands] if G.flat[o] / N >= min_share}
        for i in range(len(na)):
            for j in range(len(nb)):
                if G[i, j] == 0:
                    continue
                y0 = (out_off[i], out_off[i] - G[i, j] / N * sa)
                out_off[i] = y0[1]
                if i * len(nb) + j not in shown:
                    continue
                y1 = (in_pos[i, j], in_pos[i, j] - G[i, j] / N * sb)
                src = na[i]
                ax.add_patch(PathPatch(_band(a + node_w / 2, a + 1 - node_w / 2, y0, y1),
                                       facecolor=OTHER if src < 0 else expert_color(src),
                                       alpha=0.45, lw=0))
    for a, (i, col) in enumerate(zip(layers, spans)):
        for key, (lo, hi) in col.items():
            if hi - lo <= 0:
                continue
            c = OTHER if key < 0 else expert_color(key)
            gid = f"node-L{i}-other" if key < 0 else f"node-L{i}-E{key}"
            ax.add_patch(Rectangle((a - node_w / 2, lo), node_w, hi - lo, facecolor=c,
                                   edgecolor="white", lw=0.5, gid=gid))
            if hi - lo >= label_min:
                ax.text(a + (node_w if key < 0 else 0), (lo + hi) / 2,
                        "other" if key < 0 else str(key),
                        ha="left" if key < 0 else "center", va="center",
                        fontsize=FONT_SIZES["annotation"],
                        color="black" if key < 0 else text_color_on(c))
    ax.set_xlim(-0.3, len(layers) - 0.7)
    ax.set_ylim(min(s[0] for col in spans for s in col.values()) - 0.02, 1.02)
    ax.set_xticks(range(len(layers)), [f"layer {i}" for i in layers])
    ax.set_yticks([])
    for side in ("left", "right", "top"):
        ax.spines[side].set_visible(False)
    busy = f"; top {max_experts} experts per layer, rest grey" if E > max_experts else ""
    ax.set_title(f"Expert flow across layers (top-1; height = share of tokens){note}{busy}",
                 fontsize=FONT_SIZES["title"] - (1 if note or busy else 0))
    return fig
