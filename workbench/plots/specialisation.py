"""Specialisation figures: domain and token-category × expert, specialisation by layer, the
top tokens of each expert, router-row similarity and the shared-vs-routed split."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib as mpl
import numpy as np
from matplotlib.axes import Axes
from matplotlib.colors import TwoSlopeNorm
from matplotlib.figure import Figure

from .. import analysis as an
from ..analysis._common import Traces, check_index
from ..analysis.specialisation import DomainTraces
from ._util import default_layer, layer_label, layers_or_default, plain, token_labels
from .routing import _ratio_norm
from .style import (
    DIVERGING,
    FONT_SIZES,
    MASKED,
    REFERENCE,
    annotate_cells,
    category_colors,
    expert_color,
    expert_ticks,
    figure_and_axes,
    layer_colors,
    styled,
)


def _ratio_heatmap(ax: Axes, ratio: np.ndarray, row_labels: list[str]) -> Any:
    im = ax.imshow(ratio, cmap=DIVERGING, norm=_ratio_norm(ratio), aspect="auto")
    if ratio.size <= 300:
        annotate_cells(ax, ratio, "{:.1f}", im)
    ax.set_yticks(range(len(row_labels)), row_labels)
    expert_ticks(ax, ratio.shape[1])
    ax.set_xlabel("expert")
    return im


@styled
def domain_heatmap(traces: DomainTraces | an.DomainSpecialisation, layer: int | None = None,
                   ax: Axes | None = None) -> Figure:
    """Domain × expert load as a ratio to uniform (f^D_e·E, centred at 1), each row labelled
    with its JS divergence from the pooled load and its token count.

    Takes {domain: traces}, traces tagged ``meta["domain"]``, or a DomainSpecialisation.
    """
    if isinstance(traces, an.DomainSpecialisation):
        ds = traces
    else:
        groups = an.group_by_domain(traces)
        pooled = [t for ts in groups.values() for t in ts]
        ds = an.domain_specialisation(groups, default_layer(pooled, layer))
    D, E = ds.ratio.shape
    fig, ax = figure_and_axes(ax, (min(14.0, max(5.5, 0.42 * E + 4.0)), max(2.6, 0.45 * D + 1.8)))
    labels = [f"{d}  (JS {j:.3f}, n={n})" for d, j, n in zip(ds.domains, ds.js, ds.tokens)]
    im = _ratio_heatmap(ax, ds.ratio, labels)
    cb = fig.colorbar(im, ax=ax, pad=0.02)
    cb.set_label("load ÷ uniform (1 = 1/E)")
    ax.set_title(f"Layer {ds.layer}: expert load by domain (JS in bits vs all domains)")
    return fig


@styled
def category_heatmap(traces: Traces | an.CategorySpecialisation, layer: int | None = None,
                     categories: Any = None, ax: Axes | None = None) -> Figure:
    """Token-category × expert P(e | category) as a ratio to uniform, with NMI(E; C) in the
    title. ``categories``: one label per token (e.g. ``tok.categories(ids)``), or pass a
    CategorySpecialisation."""
    if isinstance(traces, an.CategorySpecialisation):
        cs = traces
    else:
        if categories is None:
            raise ValueError("category_heatmap needs categories=... (one label per token, "
                             "e.g. tokenizer.categories(trace.input_ids.ravel()))")
        cs = an.category_specialisation(traces, default_layer(traces, layer), categories)
    C, E = cs.ratio.shape
    fig, ax = figure_and_axes(ax, (min(14.0, max(5.5, 0.42 * E + 3.5)), max(2.6, 0.42 * C + 1.8)))
    labels = [f"{c} (n={int(n)})" for c, n in zip(cs.categories, cs.counts.sum(axis=1))]
    im = _ratio_heatmap(ax, cs.ratio, labels)
    cb = fig.colorbar(im, ax=ax, pad=0.02)
    cb.set_label("P(e | category) · E")
    ax.set_title(f"Layer {cs.layer}: experts by token category (NMI {cs.nmi:.3f})")
    return fig


@styled
def specialisation_by_layer(traces: DomainTraces, layers: Sequence[int] | None = None,
                            categories: Any = None, min_count: int = 2,
                            ax: Axes | None = None) -> Figure:
    """Per layer: mean domain JS divergence (bits; needs two or more domains), token-category
    NMI (when ``categories`` are given) and vocabulary specialisation (tokens seen at least
    ``min_count`` times). All three lie in [0, 1]."""
    try:
        groups = an.group_by_domain(traces)
    except ValueError:
        groups = {"all": list(traces.values()) if isinstance(traces, Mapping)  # type: ignore
                  else list(traces)}
    pooled = [t for ts in groups.values() for t in ts]
    layers = layers_or_default(pooled, layers)
    fig, ax = figure_and_axes(ax, (max(4.5, 0.8 * len(layers) + 3.0), 3.6))
    x = np.arange(len(layers))
    if len(groups) > 1:
        js = an.domain_js_by_layer(groups, layers).mean(axis=1)
        ax.plot(x, js, "o-", label="domain JS (mean over domains)", color="#4c72b0")
    if categories is not None:
        nmi = [an.category_specialisation(pooled, i, categories).nmi for i in layers]
        ax.plot(x, nmi, "s-", label="token-category NMI", color="#dd8452")
    vs = [an.vocabulary_specialisation(pooled, i, min_count=min_count).score for i in layers]
    ax.plot(x, vs, "^-", label=f"vocabulary specialisation (ids seen ≥{min_count}×)",
            color="#55a868")
    E = an.num_experts(pooled, layers[0])
    ax.axhline(1.0 / E, color=REFERENCE, ls=":", lw=0.9, label="1/E")
    ax.set_xticks(x, [layer_label(i) for i in layers])
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("MoE layer")
    ax.set_title("Specialisation by layer")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return fig


@styled
def top_tokens_table(traces: Traces, layer: int | None = None, tokenizer: Any = None,
                     n: int = 6, by: str = "count", experts: Sequence[int] | None = None,
                     min_count: int = 1, ax: Axes | None = None) -> Figure:
    """A table figure: one row per expert with its load and its top ``n`` input tokens, each as
    ``token ×count share%`` (share = fraction of that token's occurrences routed here).

    ``by="share"`` ranks tokens by share among ids seen ``min_count``+ times. Token strings
    come from ``tokenizer.token_strings`` (else ``#id``).
    """
    layer = default_layer(traces, layer)
    top = an.top_tokens_per_expert(traces, layer, n=n, by=by, min_count=min_count)
    load = an.expert_load(traces, layer)
    experts = list(range(len(top))) if experts is None else [
        check_index(e, "top_tokens_table: expert", len(top)) for e in experts]
    ids = sorted({t for e in experts for t, _, _ in top[e]})
    names = dict(zip(ids, token_labels(ids, tokenizer))) if ids else {}
    rows = []
    for e in experts:
        cells = [f"‘{plain(names[t])}’ ×{c} {s:.0%}" for t, c, s in top[e]]
        rows.append([f"E{e}", f"{load[e]:.1%}", "    ".join(cells) or "(no tokens)"])
    fig, ax = figure_and_axes(ax, (11.0, 0.27 * (len(rows) + 1) + 0.5))
    ax.axis("off")
    head = "top tokens: token ×count share (of that token's occurrences routed here)"
    table = ax.table(cellText=rows, colLabels=["expert", "load", head],
                     colWidths=[0.07, 0.07, 0.86], cellLoc="left", colLoc="left",
                     bbox=(0.0, 0.0, 1.0, 1.0))
    table.auto_set_font_size(False)
    table.set_fontsize(FONT_SIZES["annotation"] + 0.5)
    for (r, c), cell in table.get_celld().items():
        cell.PAD = 0.01 if c == 2 else 0.08
        cell.set_edgecolor("#dddddd")
        if r == 0:
            cell.set_text_props(weight="bold")
            cell.set_facecolor("#f4f4f4")
        elif c == 0:
            col = expert_color(experts[r - 1])
            cell.set_facecolor(col)
            cell.set_text_props(weight="bold",
                                color="black" if sum(col[:3]) > 1.5 else "white")
    ax.set_title(f"Layer {layer}: top input tokens per expert", loc="left")
    return fig


@styled
def router_similarity(weight: Any = None, *, similarity: Any = None, layer: int | None = None,
                      ax: Axes | None = None, annotate: bool | None = None) -> Figure:
    """Cosine similarity of router rows, cos(W_r[i], W_r[j]), as an E × E heatmap (diverging,
    centred at 0; the trivial diagonal is grey). Pass the router ``weight`` (E, D), e.g.
    ``wb.Checkpoint.open(path)[f"layers.{i}.feed_forward.router.weight"]``, or a precomputed
    ``similarity`` (E, E)."""
    if (weight is None) == (similarity is None):
        raise ValueError("router_similarity: pass exactly one of weight= or similarity=")
    S = an.router_cosine_similarity(weight) if similarity is None else \
        np.asarray(similarity, dtype=np.float64)
    E = S.shape[0]
    off = S[~np.eye(E, dtype=bool)]
    lim = max(0.05, float(np.abs(off).max()) if off.size else 1.0)
    data = np.ma.masked_where(np.eye(E, dtype=bool), S)
    fig, ax = figure_and_axes(ax, (min(12.0, max(4.8, 0.42 * E + 2.2)),
                                   min(11.0, max(4.0, 0.42 * E + 1.4))))
    cmap = mpl.colormaps[DIVERGING].with_extremes(bad=MASKED)
    im = ax.imshow(data, cmap=cmap, norm=TwoSlopeNorm(0.0, -lim, lim))
    if annotate or (annotate is None and E <= 16):
        annotate_cells(ax, data, "{:.2f}", im)
    expert_ticks(ax, E, "x")
    expert_ticks(ax, E, "y")
    cb = fig.colorbar(im, ax=ax, pad=0.02)
    cb.set_label("cosine similarity")
    best = an.most_similar_experts(S, 1)
    where = f"layer {layer}: " if layer is not None else ""
    sub = f"\nmost similar: E{best[0][0]}–E{best[0][1]} ({best[0][2]:.2f})" if best else ""
    ax.set_title(f"Router-row similarity, {where}{E} experts{sub}",
                 fontsize=FONT_SIZES["title"] - 1)
    return fig


@styled
def routed_share_plot(traces: Traces, layers: Sequence[int] | None = None,
                      ax: Axes | None = None) -> Figure:
    """Per-token norm share of the routed expert, ‖routed‖ / (‖routed‖ + ‖shared‖), as a box
    per layer (0.5 = equal norms). Needs ``routed_out`` and ``shared_out``."""
    layers = layers_or_default(traces, layers)
    data = []
    for i in layers:
        s = an.routed_share(traces, i)
        data.append(s[np.isfinite(s)])
    fig, ax = figure_and_axes(ax, (max(4.5, 0.8 * len(layers) + 2.5), 3.6))
    bp = ax.boxplot(data, positions=np.arange(len(layers)), widths=0.55, patch_artist=True,
                    showfliers=False)
    for patch, c in zip(bp["boxes"], layer_colors(len(layers))):
        patch.set_facecolor(c)
        patch.set_alpha(0.7)
    ax.axhline(0.5, color=REFERENCE, ls="--", lw=0.9, label="equal norms")
    ax.set_xticks(range(len(layers)), [layer_label(i) for i in layers])
    ax.set_ylim(0, 1)
    ax.set_xlabel("MoE layer")
    ax.set_ylabel("routed share of MoE output norm")
    ax.set_title("Shared vs routed expert")
    ax.legend(loc="lower right")
    return fig


@styled
def domain_divergence_plot(traces: DomainTraces, layers: Sequence[int] | None = None,
                           ax: Axes | None = None) -> Figure:
    """JS(f^D ‖ f^all) in bits per layer, one line per domain."""
    groups = an.group_by_domain(traces)
    pooled = [t for ts in groups.values() for t in ts]
    layers = layers_or_default(pooled, layers)
    js = an.domain_js_by_layer(groups, layers)
    fig, ax = figure_and_axes(ax, (max(4.5, 0.8 * len(layers) + 3.0), 3.6))
    colors = category_colors(list(groups))
    for d, dom in enumerate(groups):
        ax.plot(range(len(layers)), js[:, d], "o-", color=colors[dom], label=dom)
    ax.set_xticks(range(len(layers)), [layer_label(i) for i in layers])
    ax.set_xlabel("MoE layer")
    ax.set_ylabel("JS divergence (bits)")
    ax.set_title("Domain specialisation by layer")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return fig

