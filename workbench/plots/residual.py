"""Figures for comparisons and the residual stream: routing diff of two inputs, load by
position and token frequency, activation patching, the logit lens and top-expert knockout."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import matplotlib as mpl
import numpy as np
from matplotlib.colors import TwoSlopeNorm
from matplotlib.figure import Figure

from .. import analysis as an
from ..analysis._common import Traces
from ..trace import Trace
from ._util import capped, default_layer, layer_label, layer_ticks, plain, token_labels
from .style import (
    FONT_SIZES,
    REFERENCE,
    SEQUENTIAL,
    WARN,
    new_figure,
    styled,
    text_color_on,
)


@styled
def routing_diff_plot(diff: an.RoutingDiff | tuple[Trace, Trace], tokenizer: Any = None,
                      labels: tuple[str, str] = ("A", "B"), max_tokens: int = 64) -> Figure:
    """Routing of two inputs compared (:func:`workbench.analysis.routing_diff`): left, per
    layer the share of aligned tokens that keep their top-1 expert and the JS divergence of
    the two loads; right, layer × aligned token, cells where the top-1 expert changed in red,
    with input A's tokens along the bottom (tokens outside the alignment are the edit and are
    listed in the title). Pass a RoutingDiff or (trace_a, trace_b); ``tokenizer`` names the
    tokens (input A's ids)."""
    ids_a = None
    if isinstance(diff, tuple):
        ta, tb = diff
        ids_a = np.asarray(ta.input_ids).reshape(-1)
        ids_b = np.asarray(tb.input_ids).reshape(-1)
        diff = an.routing_diff(ta, tb)
    d = diff
    L = len(d.layers)
    M = min(len(d.pairs), max_tokens)
    fig = new_figure(capped(max(8.0, 0.22 * M + 5.0), max(3.2, 0.2 * L + 2.2)))
    ax_l, ax_r = fig.subplots(1, 2, width_ratios=[1.0, max(2.0, M / 12)])
    y = np.arange(L)
    ax_l.barh(y, d.agreement, color="#4c72b0", label="share of aligned tokens with the same "
              "top-1")
    ax_l.plot(d.js, y, "o", color=WARN, ms=4, label="JS(load A ‖ load B) in bits")
    ax_l.set_yticks(y, [layer_label(i) for i in d.layers] if L <= 32 else None)
    layer_ticks(ax_l, d.layers, "y", 24)
    ax_l.set_ylim(L - 0.5, -0.5)
    ax_l.set_xlim(0, 1)
    # no x label: the legend below the axis names both quantities
    ax_l.legend(loc="upper left", bbox_to_anchor=(0.0, -0.17), fontsize=FONT_SIZES["annotation"])
    cmap = mpl.colors.ListedColormap(["#e8eef7", WARN])
    ax_r.imshow(d.changed[:, :M].astype(float), cmap=cmap, vmin=0, vmax=1, aspect="auto",
                interpolation="nearest")
    if ids_a is not None:
        names = [plain(s) for s in token_labels(ids_a[d.pairs[:M, 0]], tokenizer)]
        ax_r.set_xticks(range(M), names, rotation=90, family="monospace",
                        fontsize=FONT_SIZES["annotation"])
    else:
        ax_r.set_xlabel("aligned token")
    ax_r.set_yticks([])
    edit = ""
    if ids_a is not None:
        ea = token_labels(ids_a[d.edited_a], tokenizer) if d.edited_a.size else []
        eb = token_labels(ids_b[d.edited_b], tokenizer) if d.edited_b.size else []
        edit = f"\nedit: {labels[0]} {' '.join(ea)[:40]!r} → {labels[1]} {' '.join(eb)[:40]!r}"
    ax_r.set_title(f"top-1 expert changed (red), {len(d.pairs)} aligned tokens"
                   + (f", first {M}" if M < len(d.pairs) else "") + plain(edit),
                   fontsize=FONT_SIZES["label"], loc="left")
    fig.suptitle(f"Routing diff: {labels[0]} vs {labels[1]} (mean agreement "
                 f"{np.nanmean(d.agreement):.0%})")
    return fig


@styled
def load_by_position_frequency(traces: Traces, layer: int | None = None, bins: int = 8,
                               max_experts: int = 12) -> Figure:
    """Two heatmaps of one layer's expert shares (ratio to uniform, log2 scale): by position
    in the sequence (equal-width bins) and by how often the token id occurs (log bins, rare
    first). With many experts, the ``max_experts`` busiest are shown."""
    from .routing import _ratio_norm, ratio_colorbar
    layer = default_layer(traces, layer)
    pe, pl = an.load_by_position(traces, layer, bins)
    fe, fl = an.load_by_frequency(traces, layer, max(2, bins // 2 + 1))
    E = pl.shape[1]
    overall = an.expert_load(traces, layer)
    shown = list(range(E)) if E <= max_experts else sorted(
        np.argsort(-overall, kind="stable")[:max_experts].tolist())
    fig = new_figure(capped(0.4 * len(shown) + 4.5, 2.2 + 0.3 * (pl.shape[0] + fl.shape[0])))
    ax_p, ax_f = fig.subplots(2, 1, height_ratios=[pl.shape[0], fl.shape[0]])
    both = np.concatenate([pl[:, shown], fl[:, shown]]) * E
    norm = _ratio_norm(both)
    for ax, m, rows, what in ((ax_p, pl, [f"{a}–{b - 1}" for a, b in zip(pe[:-1], pe[1:])],
                               "position"),
                              (ax_f, fl, [f"{a}×" if b - 1 == a else f"{a}–{b - 1}×"
                                        for a, b in zip(fe[:-1], fe[1:])],
                               "token frequency")):
        im = ax.imshow(m[:, shown] * E, cmap="RdBu_r", norm=norm, aspect="auto",
                       interpolation="nearest")
        ax.set_yticks(range(len(rows)), rows)
        ax.set_ylabel(what)
        ax.set_xticks(range(len(shown)), [str(e) for e in shown],
                      fontsize=FONT_SIZES["tick"])
    ax_f.set_xlabel("expert" + (f" ({len(shown)} busiest of {E})" if len(shown) < E else ""))
    ratio_colorbar(fig, im, [ax_p, ax_f], "share ÷ uniform (log scale)")
    fig.suptitle(f"Layer {layer}: expert load by position and by token frequency")
    return fig


@styled
def patching_heatmap(result: an.ActivationPatching, tokenizer: Any = None) -> Figure:
    """Layer × position activation patching (:func:`workbench.analysis.activation_patching`):
    the share of the clean-vs-corrupt logit difference restored by patching the clean
    residual stream into the corrupted run at (layer, position), diverging around 0; the
    changed tokens are marked on the position axis."""
    r = result
    L, P = r.recovery.shape
    fig = new_figure(capped(max(5.5, 0.4 * P + 3.0), max(3.2, 0.28 * L + 2.0)))
    ax = fig.add_subplot()
    lim = max(1.0, float(np.nanmax(np.abs(r.recovery))) if r.recovery.size else 1.0)
    im = ax.imshow(r.recovery, cmap="RdBu_r", norm=TwoSlopeNorm(0.0, -lim, lim),
                   aspect="auto", interpolation="nearest")
    clean = token_labels(r.clean_ids, tokenizer)
    bad = token_labels(r.corrupt_ids, tokenizer)
    names = [plain(clean[p] if clean[p] == bad[p] else f"{bad[p]}→{clean[p]}")
             for p in r.positions]
    ax.set_xticks(range(P), names, rotation=90, family="monospace",
                  fontsize=FONT_SIZES["annotation"])
    for lab, p in zip(ax.get_xticklabels(), r.positions):
        if r.clean_ids[p] != r.corrupt_ids[p]:
            lab.set_color(WARN)
            lab.set_fontweight("bold")
    ax.set_yticks(range(L), [layer_label(i) for i in r.layers] if L <= 32 else None)
    if L > 32:
        layer_ticks(ax, r.layers, "y")
    ax.set_ylabel("patched layer (resid_pre)")
    ans = token_labels([r.clean_answer, r.corrupt_answer], tokenizer)
    cb = fig.colorbar(im, ax=ax, pad=0.02)
    cb.set_label("logit difference restored (1 = clean)")
    ax.set_title(f"Activation patching: clean → corrupt (red tokens changed)\nmetric "
                 f"z[{plain(ans[0])!r}] − z[{plain(ans[1])!r}] at the last position: clean "
                 f"{r.clean_diff:.2f}, corrupt {r.corrupt_diff:.2f}",
                 fontsize=FONT_SIZES["title"] - 1)
    return fig


@styled
def logit_lens_plot(lens: an.LogitLens, tokenizer: Any = None,
                    tokens: Sequence[str] | None = None, max_tokens: int = 40,
                    input_ids: Any = None) -> Figure:
    """The logit lens (:func:`workbench.analysis.logit_lens`): layer × position, coloured by
    the lens probability of the model's final next-token prediction, each cell labelled with
    the lens's own top token; the final predictions head the columns and the inputs run
    along the bottom (``input_ids`` or ``tokens``)."""
    L, T = lens.p_final.shape
    n = min(T, max_tokens)
    fig = new_figure(capped(max(6.0, 0.62 * n + 2.5), max(3.5, 0.3 * L + 2.4)))
    ax = fig.add_subplot()
    im = ax.imshow(lens.p_final[:, :n], cmap=SEQUENTIAL, vmin=0, vmax=1, aspect="auto",
                   interpolation="nearest")
    if L * n <= 900:
        words = token_labels(lens.top_ids[:, :n, 0].ravel(), tokenizer)
        for (r, c), w in zip(np.ndindex(L, n), words):
            ax.text(c, r, plain(w)[:6], ha="center", va="center", family="monospace",
                    fontsize=FONT_SIZES["annotation"] - 1,
                    color=text_color_on(im.cmap(im.norm(lens.p_final[r, c]))))
    if input_ids is not None or tokens is not None:
        ids = np.asarray(input_ids).reshape(-1)[:n] if input_ids is not None else \
            np.zeros(n, np.int64)
        ax.set_xticks(range(n), [plain(s) for s in token_labels(ids, tokenizer, tokens)[:n]],
                      rotation=90, family="monospace", fontsize=FONT_SIZES["annotation"])
    else:
        ax.set_xlabel("position")
    top = ax.secondary_xaxis("top")
    top.set_xticks(range(n), [plain(s) for s in token_labels(lens.final_ids[:n], tokenizer)],
                   rotation=90, family="monospace", fontsize=FONT_SIZES["annotation"])
    top.set_xlabel("model's prediction")
    ax.set_yticks(range(L), [layer_label(i) for i in lens.layers] if L <= 32 else None)
    if L > 32:
        layer_ticks(ax, lens.layers, "y")
    ax.set_ylabel("layer (resid_post)")
    cb = fig.colorbar(im, ax=ax, pad=0.02)
    cb.set_label("lens p(model's prediction)")
    ax.set_title("Logit lens: each cell shows the lens's top token", fontsize=FONT_SIZES["label"])
    return fig


@styled
def knockout_plot(result: an.Knockout) -> Figure:
    """Next-token loss against the fraction of experts disabled (DeepSeek-MoE style): the
    busiest experts first (solid) against random experts (dashed, ± one std shaded); the
    undisturbed loss dotted."""
    r = result
    fig = new_figure((6.0, 3.8))
    ax = fig.add_subplot()
    ax.plot(r.fractions, r.top_loss, "o-", color=WARN, label="busiest experts banned")
    ax.plot(r.fractions, r.random_loss, "s--", color="#4c72b0", label="random experts banned")
    ax.fill_between(r.fractions, r.random_loss - r.random_std, r.random_loss + r.random_std,
                    color="#4c72b0", alpha=0.15, lw=0)
    ax.axhline(r.base_loss, color=REFERENCE, ls=":", lw=0.9, label="no expert banned")
    ax.set_xlabel("fraction of routed experts disabled (per layer)")
    ax.set_ylabel("next-token loss (nats)")
    ax.set_xticks(r.fractions, [f"{f:.0%}\n({c})" for f, c in zip(r.fractions, r.counts)])
    where = f"{len(r.layers)} MoE layers" if len(r.layers) > 3 else \
        "layers " + ", ".join(map(str, r.layers))
    ax.set_title(f"Loss as the top experts are disabled ({where})")
    ax.legend(loc="upper left")
    return fig


