"""Specialisation figures: domain and token-category × expert, specialisation by layer, the
top tokens of each expert, router-row similarity and the shared-vs-routed split."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib as mpl
import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from .. import analysis as an
from ..analysis._common import Traces, check_index
from ..analysis.specialisation import DomainTraces
from ._util import (
    capped,
    default_layer,
    layer_ticks,
    layers_or_default,
    pick_layers,
    plain,
    token_labels,
    top_experts,
)
from .routing import _ratio_norm, ratio_colorbar
from .style import (
    DIVERGING,
    FONT_SIZES,
    MASKED,
    REFERENCE,
    SEQUENTIAL,
    annotate_cells,
    category_colors,
    expert_color,
    expert_ticks,
    figure_and_axes,
    layer_colors,
    new_figure,
    styled,
)


def _ratio_heatmap(ax: Axes, ratio: np.ndarray, row_labels: list[str],
                   reliable: np.ndarray | None = None) -> Any:
    """Ratio-to-uniform heatmap on the shared log2 scale; the scale's range comes from the
    ``reliable`` rows only (rows with few tokens cannot saturate it)."""
    ref = ratio if reliable is None or not np.any(reliable) else ratio[np.asarray(reliable)]
    im = ax.imshow(ratio, cmap=DIVERGING, norm=_ratio_norm(ref), aspect="auto",
                   interpolation="nearest")
    if ratio.size <= 300:
        annotate_cells(ax, ratio, "{:.1f}", im)
    ax.set_yticks(range(len(row_labels)), row_labels)
    if reliable is not None:
        for lab, ok in zip(ax.get_yticklabels(), reliable):
            if not ok:
                lab.set_color("#888888")
                lab.set_fontstyle("italic")
    expert_ticks(ax, ratio.shape[1])
    ax.set_xlabel("expert")
    return im


@styled
def domain_heatmap(traces: DomainTraces | an.DomainSpecialisation, layer: int | None = None,
                   ax: Axes | None = None, n_boot: int = 100, n_shuffle: int = 100) -> Figure:
    """Domain × expert load as a ratio to uniform (f^D_e·E) on the shared log2 scale centred
    at 1, each row labelled with its JS divergence from the pooled load and its token count;
    the title gives the mean JS with its bootstrap interval over documents and the
    domain-shuffle baseline (from traces; not from a DomainSpecialisation).

    Takes {domain: traces}, traces tagged ``meta["domain"]``, or a DomainSpecialisation.
    """
    est = None
    if isinstance(traces, an.DomainSpecialisation):
        ds = traces
    else:
        groups = an.group_by_domain(traces)
        pooled = [t for ts in groups.values() for t in ts]
        ds = an.domain_specialisation(groups, default_layer(pooled, layer))
        if len(groups) > 1:
            est = an.domain_js_estimate(groups, ds.layer, n_boot, n_shuffle)
    D, E = ds.ratio.shape
    fig, ax = figure_and_axes(ax, capped(max(5.5, 0.42 * E + 4.0) if E <= 24 else 14.0,
                                         max(2.6, 0.45 * D + 2.0)))
    labels = [f"{d}  (JS {j:.3f}, n={n})" for d, j, n in zip(ds.domains, ds.js, ds.tokens)]
    im = _ratio_heatmap(ax, ds.ratio, labels)
    ratio_colorbar(fig, im, ax, "load ÷ uniform (log scale; 1 = 1/E)")
    sub = f"\nmean JS {est.text()} (domain labels shuffled), {est.n_docs} docs" if est else ""
    ax.set_title(f"Layer {ds.layer}: expert load by domain (JS in bits vs all domains){sub}",
                 fontsize=FONT_SIZES["title"] - (1 if est else 0))
    return fig


@styled
def category_heatmap(traces: Traces | an.CategorySpecialisation, layer: int | None = None,
                     categories: Any = None, ax: Axes | None = None, min_tokens: int = 30,
                     n_boot: int = 100, n_shuffle: int = 100) -> Figure:
    """Token-category × expert P(e | category) as a ratio to uniform on the shared log2 scale,
    with NMI(E; C), its bootstrap interval and the shuffled-label baseline in the title.
    Categories with fewer than ``min_tokens`` tokens are greyed and do not set the colour
    range. ``categories``: one label per token (e.g. ``tok.categories(ids)``), or pass a
    CategorySpecialisation (no interval then)."""
    est = None
    if isinstance(traces, an.CategorySpecialisation):
        cs = traces
    else:
        if categories is None:
            raise ValueError("category_heatmap needs categories=... (one label per token, "
                             "e.g. tokenizer.categories(trace.input_ids.ravel()))")
        cs = an.category_specialisation(traces, default_layer(traces, layer), categories)
        est = an.category_nmi_estimate(traces, cs.layer, categories, n_boot, n_shuffle)
    C, E = cs.ratio.shape
    n = cs.counts.sum(axis=1)
    fig, ax = figure_and_axes(ax, capped(max(5.5, 0.42 * E + 3.5) if E <= 24 else 14.0,
                                         max(2.6, 0.42 * C + 2.0)))
    labels = [f"{c} (n={int(k)}{', few' if k < min_tokens else ''})"
              for c, k in zip(cs.categories, n)]
    im = _ratio_heatmap(ax, cs.ratio, labels, n >= min_tokens)
    ratio_colorbar(fig, im, ax, "P(e | category) · E (log scale)")
    nmi = est.text() + " (labels shuffled)" if est else f"{cs.nmi:.3f}"
    ax.set_title(f"Layer {cs.layer}: experts by token category\nNMI {nmi}",
                 fontsize=FONT_SIZES["title"] - 1)
    return fig


_METRIC_STYLE = {"domain_js": ("o", "#4c72b0", "domain JS (bits, mean over domains)"),
                 "category_nmi": ("s", "#dd8452", "token-category NMI"),
                 "vocabulary": ("^", "#55a868", "vocabulary specialisation")}


@styled
def specialisation_by_layer(traces: DomainTraces, layers: Sequence[int] | None = None,
                            categories: Any = None, min_count: int = 2,
                            ax: Axes | None = None, n_boot: int = 100, n_shuffle: int = 100,
                            estimates: Mapping[str, Mapping[int, an.Estimate]] | None = None
                            ) -> Figure:
    """Per layer: mean domain JS divergence (bits; needs two or more domains), token-category
    NMI (when ``categories`` are given) and vocabulary specialisation (token ids seen at least
    ``min_count`` times), each with its 95% bootstrap interval over documents (error bars) and
    its shuffled-label baseline (dashed line of the same colour, its 95% range shaded): a
    value is specialisation only where it clears its own baseline. Without ``layers``, at
    most 16 evenly spaced MoE layers. ``estimates``: precomputed
    :func:`~workbench.analysis.specialisation_estimates`."""
    try:
        groups = an.group_by_domain(traces)
    except ValueError:
        groups = {"all": list(traces.values()) if isinstance(traces, Mapping)  # type: ignore
                  else list(traces)}
    pooled = [t for ts in groups.values() for t in ts]
    layers, note = pick_layers(pooled, layers, 16)
    est = estimates if estimates is not None else an.specialisation_estimates(
        groups, layers, categories, min_count, n_boot, n_shuffle)
    fig, ax = figure_and_axes(ax, capped(max(5.0, 0.45 * len(layers) + 3.5), 3.9))
    x = np.arange(len(layers))
    n_tok = n_docs = 0
    for key, per in est.items():
        marker, color, label = _METRIC_STYLE[key]
        rows = [per[i] for i in layers]
        v = np.array([r.value for r in rows])
        err = np.array([[r.value - r.ci_low for r in rows], [r.ci_high - r.value for r in rows]])
        ax.errorbar(x, v, yerr=np.maximum(err, 0), fmt=marker + "-", color=color, ms=4,
                    capsize=2, lw=1.2, label=label)
        ax.plot(x, [r.baseline for r in rows], "--", color=color, lw=0.9)
        ax.fill_between(x, [r.baseline_low for r in rows], [r.baseline_high for r in rows],
                        color=color, alpha=0.12, lw=0)
        n_tok, n_docs = rows[0].n_tokens, rows[0].n_docs
    handles = ax.get_legend_handles_labels()[0] + [
        Line2D([], [], color=REFERENCE, ls="--", lw=0.9, label="shuffled-label baseline "
               "(95% shaded)")]
    layer_ticks(ax, layers)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("MoE layer")
    ax.set_ylabel("score (error bars: 95% bootstrap CI)")
    ax.set_title(f"Specialisation by layer{note}\n{n_tok} tokens, {n_docs} documents",
                 fontsize=FONT_SIZES["title"] - 1)
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return fig


@styled
def top_tokens_table(traces: Traces, layer: int | None = None, tokenizer: Any = None,
                     n: int = 6, by: str = "count", experts: Sequence[int] | None = None,
                     min_count: int = 1, ax: Axes | None = None,
                     max_experts: int = 16) -> Figure:
    """A table figure: one row per expert with its load and its top ``n`` input tokens, each as
    ``token ×count share%`` (share = fraction of that token's occurrences routed here).

    ``by="share"`` ranks tokens by share among ids seen ``min_count``+ times. Token strings
    come from ``tokenizer.token_strings`` (else ``#id``). Without ``experts``, the
    ``max_experts`` busiest experts are listed (all of them in expert order when there are
    no more).
    """
    layer = default_layer(traces, layer)
    top = an.top_tokens_per_expert(traces, layer, n=n, by=by, min_count=min_count)
    load = an.expert_load(traces, layer)
    if experts is None:
        experts = list(range(len(top))) if len(top) <= max_experts else \
            top_experts(np.asarray(load), max_experts)
    else:
        experts = [check_index(e, "top_tokens_table: expert", len(top)) for e in experts]
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
    busiest = f" ({len(experts)} busiest of {len(top)} experts)" if len(experts) < len(top) \
        else ""
    ax.set_title(f"Layer {layer}: top input tokens per expert{busiest}", loc="left")
    return fig


@styled
def router_similarity(weight: Any = None, *, similarity: Any = None, layer: int | None = None,
                      ax: Axes | None = None, annotate: bool | None = None,
                      what: str = "Router-row", dim: int | None = None) -> Figure:
    """Cosine similarity of router rows, cos(W_r[i], W_r[j]), as an E × E heatmap. The colour
    range is fitted to the off-diagonal values (sequential map; the trivial diagonal is grey)
    and the colour bar marks the mean and the ±2/√D band of random D-dimensional vectors.
    Pass the router ``weight`` (E, D), e.g.
    ``wb.Checkpoint.open(path)[f"layers.{i}.feed_forward.router.weight"]``, or a precomputed
    ``similarity`` (E, E) with the vectors' length ``dim`` for the random band. ``what`` names
    the rows in the title (e.g. "Expert weight"). Cell values and the title get as many
    decimals as the spread of the values needs."""
    if (weight is None) == (similarity is None):
        raise ValueError("router_similarity: pass exactly one of weight= or similarity=")
    D = dim
    if similarity is None:
        W = np.asarray(weight)
        S = an.router_cosine_similarity(W.reshape(W.shape[0], -1))
        D = int(np.prod(W.shape[1:]))
    else:
        S = np.asarray(similarity, dtype=np.float64)
    E = S.shape[0]
    off = S[~np.eye(E, dtype=bool)]
    lo, hi = (float(off.min()), float(off.max())) if off.size else (-1.0, 1.0)
    if hi - lo < 1e-6:
        lo, hi = lo - 0.05, hi + 0.05
    data = np.ma.masked_where(np.eye(E, dtype=bool), S)
    fig, ax = figure_and_axes(ax, (min(10.0, max(4.8, 0.42 * E + 2.2)),
                                   min(9.0, max(4.0, 0.42 * E + 1.6))))
    cmap = mpl.colormaps[SEQUENTIAL].with_extremes(bad=MASKED)
    im = ax.imshow(data, cmap=cmap, vmin=lo, vmax=hi, interpolation="nearest")
    span = max(abs(lo), abs(hi), 1e-12)
    dec = int(min(4, max(2, 1 - np.floor(np.log10(span)))))

    def num(x: float) -> str:  # never "-0.000"
        t = f"{x:.{dec}f}"
        return t[1:] if t.startswith("-") and float(t) == 0 else t
    if annotate or (annotate is None and E <= 16):
        annotate_cells(ax, data, num, im)
    expert_ticks(ax, E, "x")
    expert_ticks(ax, E, "y")
    cb = fig.colorbar(im, ax=ax, pad=0.02)
    cb.set_label("cosine similarity (range fitted to the data)")
    mean = float(off.mean()) if off.size else 0.0
    cb.ax.axhline(mean, color="black", lw=1.2)
    rand = ""
    if D:
        band = 2.0 / np.sqrt(D)
        rand = f"\nrandom vectors: 0 ± {num(band)}"
        for y in (-band, band):
            if lo <= y <= hi:
                cb.ax.axhline(y, color="white", ls="--", lw=1.0)
    best = an.most_similar_experts(S, 1)
    where = f"layer {layer}: " if layer is not None else ""
    sub = f"\nmost similar: E{best[0][0]}–E{best[0][1]} ({num(best[0][2])}); mean " \
        f"{num(mean)}{rand}" if best else ""
    ax.set_title(f"{what} similarity, {where}{E} experts{sub}",
                 fontsize=FONT_SIZES["title"] - 1)
    return fig


@styled
def expert_weight_similarity(weights: Any, layer: int | None = None, ax: Axes | None = None,
                             annotate: bool | None = None) -> Figure:
    """Cosine similarity of the experts' own weights (each expert's matrices flattened), E × E,
    drawn like :func:`router_similarity`. ``weights``: (E, ...) per-expert weights, e.g.
    ``ckpt[f"layers.{i}.feed_forward.experts.down_proj"]``, or a list of such arrays (they
    are concatenated per expert, e.g. gate_up_proj and down_proj)."""
    ws = weights if isinstance(weights, list | tuple) else [weights]
    dim = sum(int(np.prod(np.shape(w)[1:])) for w in ws)
    S = an.expert_weight_similarity(weights)
    return router_similarity(similarity=S, layer=layer, ax=ax, annotate=annotate,
                             what="Expert weight", dim=dim)


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
    fig, ax = figure_and_axes(ax, capped(max(4.5, min(0.8, 10.0 / len(layers)) * len(layers)
                                         + 3.5), 3.6))
    bp = ax.boxplot(data, positions=np.arange(len(layers)), widths=0.55, patch_artist=True,
                    showfliers=False)
    for patch, c in zip(bp["boxes"], layer_colors(len(layers))):
        patch.set_facecolor(c)
        patch.set_alpha(0.7)
    ax.axhline(0.5, color=REFERENCE, ls="--", lw=0.9, label="equal norms")
    layer_ticks(ax, layers)
    ax.set_ylim(0, 1)
    ax.set_xlabel("MoE layer")
    ax.set_ylabel("routed share of MoE output norm")
    ax.set_title("Shared vs routed expert")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return fig


@styled
def domain_divergence_plot(traces: DomainTraces, layers: Sequence[int] | None = None,
                           ax: Axes | None = None) -> Figure:
    """JS(f^D ‖ f^all) in bits per layer, one line per domain, with the mean JS that
    shuffled domain labels give (dashed grey, 95% range shaded): the divergence finite samples
    show with no domain effect at all."""
    groups = an.group_by_domain(traces)
    pooled = [t for ts in groups.values() for t in ts]
    layers = layers_or_default(pooled, layers)
    js = an.domain_js_by_layer(groups, layers)
    fig, ax = figure_and_axes(ax, capped(max(4.5, min(0.8, 10.0 / len(layers)) * len(layers)
                                         + 4.0), 3.6))
    colors = category_colors(list(groups))
    for d, dom in enumerate(groups):
        ax.plot(range(len(layers)), js[:, d], "o-", color=colors[dom], label=dom, ms=3)
    if len(groups) > 1:
        base = [an.domain_js_estimate(groups, i, n_boot=1, n_shuffle=50) for i in layers]
        x = range(len(layers))
        ax.plot(x, [b.baseline for b in base], "--", color=REFERENCE, lw=1.0,
                label="shuffled domains")
        ax.fill_between(x, [b.baseline_low for b in base], [b.baseline_high for b in base],
                        color=REFERENCE, alpha=0.12, lw=0)
    layer_ticks(ax, layers)
    ax.set_xlabel("MoE layer")
    ax.set_ylabel("JS divergence (bits)")
    ax.set_title("Domain specialisation by layer")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return fig



@styled
def domain_share_bars(traces: DomainTraces, layers: Sequence[int] | None = None,
                      max_experts: int = 16, n_boot: int = 100, seed: int = 0) -> Figure:
    """Mixtral-style grouped bars: each expert's share of a domain's assignments, one panel
    per layer (default the first, middle and last MoE layer), one bar per domain, with 95%
    bootstrap intervals over documents and the uniform share 1/E dashed. With more than
    ``max_experts`` experts, the experts whose share varies most between domains are shown and
    the rest pooled in an "other" group (its share divided by its number of experts, so it
    stays comparable with 1/E)."""
    groups = an.group_by_domain(traces)
    pooled = [t for ts in groups.values() for t in ts]
    all_layers = layers_or_default(pooled, None)
    if layers is None:
        layers = sorted({all_layers[0], all_layers[len(all_layers) // 2], all_layers[-1]})
    layers = [int(i) for i in layers]
    E = an.num_experts(pooled, layers[0])
    doms = list(groups)
    colors = category_colors(doms)
    rng = np.random.default_rng(seed)
    fig = new_figure(capped(max(6.0, 0.3 * min(E, max_experts + 1) * max(len(doms), 2) + 3.0),
                            2.4 * len(layers) + 0.9))
    axes = np.atleast_1d(fig.subplots(len(layers), 1, sharey=False))
    for ax, i in zip(axes, layers):
        per_doc = {d: [np.bincount(a[b].ravel(), minlength=E)[:E]
                       for a in _indices_per_doc(ts, i) for b in range(a.shape[0])]
                   for d, ts in groups.items()}
        share = {d: np.sum(v, axis=0) / max(np.sum(v), 1) for d, v in per_doc.items()}
        if E > max_experts:
            spread_e = np.ptp(np.stack(list(share.values())), axis=0)
            shown = sorted(top_experts(spread_e + 1e-12, max_experts))
        else:
            shown = list(range(E))
        rest = [e for e in range(E) if e not in shown]
        x = np.arange(len(shown) + bool(rest))
        w = 0.8 / len(doms)
        for k, d in enumerate(doms):
            docs = np.stack(per_doc[d]).astype(np.float64)
            vals = _group_share(docs.sum(axis=0), shown, rest)
            boots = np.stack([_group_share(docs[rng.integers(0, len(docs), len(docs))].sum(0),
                                           shown, rest) for _ in range(n_boot)])
            lo, hi = np.quantile(boots, [0.025, 0.975], axis=0)
            err = np.stack([np.maximum(vals - lo, 0), np.maximum(hi - vals, 0)])
            ax.bar(x + (k - (len(doms) - 1) / 2) * w, vals, w, color=colors[d],
                   label=f"{d} ({int(docs.sum())} assignments, {len(docs)} docs)",
                   yerr=err, error_kw={"lw": 0.7, "capsize": 1.5})
        ax.axhline(1.0 / E, color=REFERENCE, ls="--", lw=0.9)
        ax.set_xticks(x, [f"E{e}" for e in shown] + ([f"other ({len(rest)})"] if rest else []),
                      rotation=90 if len(x) > 12 else 0, fontsize=FONT_SIZES["tick"])
        for lab, e in zip(ax.get_xticklabels(), shown):
            lab.set_color(tuple(0.75 * c for c in expert_color(e)[:3]))
        ax.set_ylabel("share")
        ax.set_title(f"layer {i}", fontsize=FONT_SIZES["label"], loc="left")
    axes[0].legend(loc="upper left", bbox_to_anchor=(1.0, 1.0),
                   fontsize=FONT_SIZES["annotation"])
    axes[0].plot([], [], "--", color=REFERENCE, label="uniform 1/E")
    which = f"; {max_experts} experts varying most across domains" if E > max_experts else ""
    fig.suptitle(f"Expert share by domain (error bars: 95% bootstrap over documents; dashed = "
                 f"1/E){which}", fontsize=FONT_SIZES["label"] + 1)
    return fig


def _indices_per_doc(ts: Sequence[Any], layer: int) -> list[np.ndarray]:
    from ..analysis._common import indices_per_trace
    return indices_per_trace(ts, layer, "domain_share_bars")


def _group_share(counts: np.ndarray, shown: list[int], rest: list[int]) -> np.ndarray:
    total = max(float(counts.sum()), 1.0)
    out = [counts[e] / total for e in shown]
    if rest:
        out.append(counts[rest].sum() / total / len(rest))
    return np.asarray(out, dtype=np.float64)
