"""Long-context figures: attention by distance and by position from ``attn.summary``, the query
temperature's effect, a windowed attention pattern, routing by position and for repeated tokens.

Position axes are symmetric-log (linear below 1, so position 0 is shown); distance axes are
the log-spaced buckets of ``attn.summary``. Layer types are coloured as in
:func:`~workbench.plots.attention.attention_by_layer_type`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib as mpl
import numpy as np
from matplotlib.axes import Axes
from matplotlib.colors import PowerNorm
from matplotlib.figure import Figure

from .. import analysis as an
from ..analysis._common import Traces, as_list
from ..analysis.longcontext import BUCKETS
from ..numerics import distance_bucket_edges
from ..trace import Trace
from ._util import capped, head_pattern, layer_label, spread
from .style import (
    ATTENTION,
    FONT_SIZES,
    MASKED,
    REFERENCE,
    SEQUENTIAL,
    category_colors,
    expert_ticks,
    figure_and_axes,
    layer_colors,
    new_figure,
    styled,
)

_FEATURE_TEXT = {
    "entropy": "attention entropy (nats)",
    "own_chunk": "mass in the query's own chunk",
    "sink": "mass on position 0 (sink)",
    "distance": "mean query − key distance (positions)",
    "max": "largest attention weight",
}
_LINESTYLES = ("-", "--", "-.", ":")


def _kind_colors() -> dict[str, Any]:
    return category_colors(["chunked", "global", "global-rope"])


def short_number(n: float) -> str:
    """1, 512, 1k, 32k, 1M: a compact label for a position or a distance."""
    n = int(n)
    for div, suffix in ((1 << 20, "M"), (1 << 10, "k")):
        if n >= div and n % div == 0:
            return f"{n // div}{suffix}"
    return str(n)


def _position_axis(ax: Axes, scale: str = "log", what: str = "query position") -> None:
    if scale == "log":
        ax.set_xscale("symlog", linthresh=1.0, linscale=0.4)
    ax.set_xlim(left=0)
    ax.set_xlabel(what + (" (log scale)" if scale == "log" else ""))


def _vline(ax: Axes, x: float, text: str, gid: str) -> None:
    """A dashed reference line at x with its label at the top (stacked below earlier ones)."""
    n = sum(1 for t in ax.texts if t.get_gid() == "reference-label")
    ax.axvline(x, color=REFERENCE, lw=0.9, ls="--", gid=gid)
    ax.annotate(text, (x, 1.0), xycoords=("data", "axes fraction"), xytext=(3, -3 - 10 * n),
                gid="reference-label",
                textcoords="offset points", va="top", fontsize=FONT_SIZES["annotation"],
                color=REFERENCE)


def _layer_styles(kinds: Mapping[int, str]) -> dict[int, dict[str, Any]]:
    """Colour by layer type, line style cycling within a type."""
    colors = _kind_colors()
    seen: dict[str, int] = {}
    out = {}
    for i, kind in kinds.items():
        n = seen.get(kind, 0)
        seen[kind] = n + 1
        out[i] = {"color": colors.get(kind, REFERENCE), "ls": _LINESTYLES[n % len(_LINESTYLES)]}
    return out


# --------------------------------------------------------------------------- distance
@styled
def plot_distance_profile(traces: Traces, layers: Sequence[int] | None = None,
                          min_position: int = 0, log: bool = False,
                          ax: Axes | None = None) -> Figure:
    """Attention mass by query − key distance bucket, one line per layer (mean over heads and
    queries, from ``attn.summary``; :func:`workbench.analysis.distance_profile`). Lines are
    coloured by layer type (chunked RoPE / global NoPE); a dashed line marks the chunk size,
    past which chunked layers cannot look. ``min_position``: only queries at that position or
    later; ``log``: logarithmic mass axis (zero masses are then not drawn)."""
    ts = as_list(traces)
    rows = an.distance_profile(ts, layers, min_position=min_position)
    T = max(int(t.input_ids.shape[-1]) for t in ts)
    edges = distance_bucket_edges()
    nb = int(np.searchsorted(edges, max(T - 1, 0), side="right"))  # buckets that can hold mass
    fig, ax = figure_and_axes(ax, (max(6.0, 0.42 * nb + 2.5), 4.0))
    styles = _layer_styles({r["layer"]: r["type"] for r in rows})
    x = np.arange(nb)
    for r in rows:
        y = np.array([r[b] for b in BUCKETS[:nb]])
        ax.plot(x, y, marker="o", ms=3.5, lw=1.5, **styles[r["layer"]],
                label=f"{layer_label(r['layer'])} · {r['kind']}", gid=f"layer-{r['layer']}")
    ax.set_xticks(x, ["0"] + [short_number(e) for e in edges[1:nb]],
                  fontsize=FONT_SIZES["tick"])
    chunk = ts[0].config.get("chunk")
    if chunk and any(r["type"] == "chunked" for r in rows) and 1 < chunk < T:
        _vline(ax, math.log2(chunk) + 0.5, f"chunk {short_number(chunk)}", "chunk-size")
    if log:
        ax.set_yscale("log")
    ax.set_xlabel("query − key distance ≥ (log buckets)")
    ax.set_ylabel("attention mass (mean of heads, queries)")
    past = f", queries ≥ {short_number(min_position)}" if min_position else ""
    ax.set_title(f"How far back each layer looks ({short_number(T)} tokens{past})")
    ax.legend(loc="best")
    return fig


# --------------------------------------------------------------------------- by position
@styled
def plot_summary_by_position(traces: Traces, feature: str = "entropy",
                             layers: Sequence[int] | None = None,
                             bins: int | Sequence[int] = 24, scale: str = "log",
                             floor_scale: int | None = None, ax: Axes | None = None) -> Figure:
    """One ``attn.summary`` feature (entropy, distance, sink, own_chunk, max or a distance
    bucket) against query position, one line per layer (mean over heads and the queries of
    each position bin; :func:`workbench.analysis.summary_by_position`). For entropy, a dotted
    line gives log(q + 1), uniform attention over everything a global layer can see. Dashed
    lines mark the first chunk boundary and, when given, ``floor_scale`` (where the query
    temperature of the NoPE layers starts to exceed 1)."""
    ts = as_list(traces)
    rows = an.summary_by_position(ts, feature, layers, bins, scale)
    fig, ax = figure_and_axes(ax, (6.8, 4.0))
    by: dict[int, list[dict[str, Any]]] = {}
    for r in rows:
        by.setdefault(r["layer"], []).append(r)
    styles = _layer_styles({i: rs[0]["type"] for i, rs in by.items()})
    for i, rs in by.items():
        ax.plot([r["position"] for r in rs], [r[feature] for r in rs], marker="o", ms=3,
                lw=1.5, **styles[i], label=f"{layer_label(i)} · {rs[0]['kind']}",
                gid=f"layer-{i}")
    if feature == "entropy" and rows:
        p = np.unique([r["position"] for r in rows])
        ax.plot(p, np.log1p(p), color=REFERENCE, ls=":", lw=1.0, gid="uniform",
                label="uniform over all previous, log(q+1)")
    T = max(int(t.input_ids.shape[-1]) for t in ts)
    chunk = ts[0].config.get("chunk")
    if chunk and chunk < T:
        _vline(ax, chunk, f"chunk {short_number(chunk)}", "chunk-size")
    if floor_scale and floor_scale < T:
        _vline(ax, floor_scale - 1, "floor_scale", "floor-scale")
    _position_axis(ax, scale)
    ax.set_ylabel(_FEATURE_TEXT.get(feature, f"mass in {feature}"))
    ax.set_title(f"{_FEATURE_TEXT.get(feature, feature).split(' (')[0].capitalize()} "
                 "by query position")
    ax.legend()
    return fig


# --------------------------------------------------------------------------- temperature
@styled
def plot_temperature_effect(effect: Sequence[Mapping[str, Any]],
                            floor_scale: int | None = None) -> Figure:
    """The query temperature's effect from :func:`workbench.analysis.temperature_effect`
    rows: for each feature (entropy, largest weight, mean distance) its value by query position
    with the temperature on (solid) and off (dashed), and the temperature itself in the last
    panel. A dashed grey line marks ``floor_scale`` when given (below it the temperature is
    exactly 1 and the two runs agree)."""
    rows = list(effect)
    if not rows:
        raise ValueError("plot_temperature_effect: no rows; pass the result of "
                         "analysis.temperature_effect(model, input_ids)")
    order = ("entropy", "max", "distance")
    feats = [f for f in order if f"{f}_on" in rows[0]] + sorted(
        k[:-3] for k in rows[0] if k.endswith("_on") and k[:-3] not in order)
    layers = sorted({r["layer"] for r in rows})
    colors = dict(zip(layers, layer_colors(len(layers)) if len(layers) > 1
                      else [_kind_colors()["global"]]))
    fig = new_figure((3.6 * (len(feats) + 1) + 0.6, 3.6))
    axes = fig.subplots(1, len(feats) + 1)
    for ax, f in zip(axes, feats):
        for i in layers:
            rs = [r for r in rows if r["layer"] == i]
            x = [r["position"] for r in rs]
            ax.plot(x, [r[f"{f}_on"] for r in rs], "-o", ms=3, color=colors[i],
                    label=f"{layer_label(i)} temperature on", gid=f"on-{i}")
            ax.plot(x, [r[f"{f}_off"] for r in rs], "--s", ms=3, color=colors[i], alpha=0.75,
                    label=f"{layer_label(i)} off (disable_temperature)", gid=f"off-{i}")
        if f == "entropy":
            rs = [r for r in rows if r["layer"] == layers[0]]
            ax.plot([r["position"] for r in rs], [r["uniform_entropy"] for r in rs],
                    color=REFERENCE, ls=":", lw=1.0, label="uniform, log(q+1)", gid="uniform")
        ax.set_ylabel(_FEATURE_TEXT.get(f, f))
        ax.set_title(_FEATURE_TEXT.get(f, f).split(" (")[0], fontsize=FONT_SIZES["label"])
    ax = axes[-1]
    rs = [r for r in rows if r["layer"] == layers[0]]
    ax.plot([r["position"] for r in rs], [r["temperature"] for r in rs], "-o", ms=3,
            color=REFERENCE, gid="temperature")
    ax.set_ylabel("query temperature (× q)")
    ax.set_title("temperature", fontsize=FONT_SIZES["label"])
    for a in axes:
        _position_axis(a)
        if floor_scale:
            _vline(a, floor_scale - 1, "floor_scale", "floor-scale")
    axes[0].legend(fontsize=FONT_SIZES["annotation"])
    fig.suptitle("Query temperature of the global NoPE "
                 f"layer{'s' if len(layers) > 1 else ''} "
                 f"{', '.join(layer_label(i) for i in layers)}: on vs off")
    return fig


# --------------------------------------------------------------------------- windowed pattern
@styled
def plot_attention_window(trace: Trace, layer: int, head: int | None = None, batch: int = 0,
                          max_columns: int = 1024) -> Figure:
    """A windowed attention pattern (a few query rows × every key, as captured with
    ``run(..., capture="layers.{i}.attn.pattern", positions=slice(-64, None))``): top, the
    rows as an image with keys pooled into at most ``max_columns`` bins (each cell is the mass
    in its key bin); bottom, the mass per key bin averaged over the window's queries, on a log
    scale. Mean of heads unless ``head``."""
    p, Tq, Tk = head_pattern(trace, layer, head, batch, "plot_attention_window",
                             ", positions=slice(-64, None)")
    width = max(1, math.ceil(Tk / max_columns))
    nbin = math.ceil(Tk / width)
    pooled = np.pad(p, ((0, 0), (0, nbin * width - Tk))).reshape(Tq, nbin, width).sum(-1)
    fig = new_figure((10.0, 5.2))
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=(1.3, 1.0))
    cmap = mpl.colormaps[ATTENTION].with_extremes(bad=MASKED)
    vmax = float(pooled.max()) if pooled.max() > 0 else 1.0
    im = top.imshow(np.ma.masked_where(pooled <= 0, pooled), cmap=cmap, aspect="auto",
                    norm=PowerNorm(0.5, vmin=0.0, vmax=vmax), interpolation="nearest",
                    extent=(-0.5, Tk - 0.5, Tk - 0.5, Tk - Tq - 0.5))
    top.set_ylabel("query position")
    cb = fig.colorbar(im, ax=top, pad=0.01)
    cb.set_label("mass per key bin (sqrt)" if width > 1 else "attention (sqrt)")
    mean = pooled.mean(axis=0)
    centres = np.arange(nbin) * width + (width - 1) / 2
    bottom.plot(centres, np.where(mean > 0, mean, np.nan), lw=1.0, color=_kind_colors()[
        "global"], gid="mean-mass")
    bottom.set_yscale("log")
    bottom.set_xlabel("key position" + (f" (bins of {width} keys)" if width > 1 else ""))
    bottom.set_ylabel("mean mass per key bin")
    bottom.set_xlim(-0.5, Tk - 0.5)
    try:
        kind = an.layer_kind(trace, layer)
    except ValueError:
        kind = "layer type unknown"
    who = "mean of heads" if head is None else f"head {head}"
    fig.suptitle(f"Layer {layer} ({kind}), {who}: last {Tq} queries × all "
                 f"{short_number(Tk)} keys")
    return fig


# --------------------------------------------------------------------------- routing
@styled
def plot_routing_by_position(traces: Traces, bins: int | Sequence[int] = 12,
                             scale: str = "log", layers: Sequence[int] | None = None,
                             min_width: int = 32) -> Figure:
    """First-choice expert shares by position bin, one heatmap per MoE layer (experts × bins),
    and each bin's Jensen-Shannon divergence (bits) from the layer's overall distribution
    (:func:`workbench.analysis.routing_by_position`), with the divergence that sampling
    alone gives a bin of that many tokens (dotted). JS near that floor: routing does not
    depend on where in the context a token sits. Without ``layers``, at most four evenly
    spaced MoE layers are drawn."""
    if layers is None:
        layers = spread(an.moe_layers(traces), 4)
    rows = an.routing_by_position(traces, bins, scale, layers, min_width)
    lays = sorted({r["layer"] for r in rows})
    n = len(lays)
    fig = new_figure(capped(2.6 * n + 4.6, 3.8))
    axes = fig.subplots(1, n + 1, width_ratios=[1.0] * n + [1.5])
    colors = layer_colors(n)
    im = None
    for ax, i in zip(axes, lays):
        rs = [r for r in rows if r["layer"] == i]
        m = np.stack([r["fractions"] for r in rs], axis=1)  # (E, bins)
        im = ax.imshow(m, cmap=SEQUENTIAL, aspect="auto", vmin=0.0,
                       vmax=max(float(m.max()), 1e-9), interpolation="nearest")
        expert_ticks(ax, m.shape[0], axis="y")
        step = max(1, math.ceil(len(rs) / 6))
        ticks = list(range(0, len(rs), step))
        ax.set_xticks(ticks, [short_number(rs[j]["lo"]) for j in ticks], rotation=45,
                      fontsize=FONT_SIZES["annotation"])
        ax.set_xlabel("position bin start")
        ax.set_title(layer_label(i), fontsize=FONT_SIZES["label"])
    axes[0].set_ylabel("first-choice expert")
    if im is not None:
        fig.colorbar(im, ax=list(axes[:n]), pad=0.01, shrink=0.9).set_label("share of tokens")
    ax = axes[-1]
    for c, i in zip(colors, lays):
        rs = [r for r in rows if r["layer"] == i]
        ax.plot([r["position"] for r in rs], [r["js"] for r in rs], "-o", ms=3, color=c,
                label=layer_label(i), gid=f"js-{i}")
    rs = [r for r in rows if r["layer"] == lays[0]]
    ax.plot([r["position"] for r in rs], [r["js_noise"] for r in rs], ":", color=REFERENCE,
            lw=1.0, label="sampling noise alone", gid="noise-floor")
    _position_axis(ax, scale, "token position")
    ax.set_xlim(left=0.7 * min(r["position"] for r in rows) if scale == "log" else 0)
    ax.set_ylabel("JS to the layer's overall (bits)")
    ax.set_title("divergence by position", fontsize=FONT_SIZES["label"])
    ax.legend()
    fig.suptitle("Routing by position: first-choice expert shares")
    return fig


@styled
def plot_repeat_consistency(traces: Traces, input_ids: Any = None,
                            layers: Sequence[int] | None = None,
                            ax: Axes | None = None) -> Figure:
    """How often a repeated token gets the expert of its first occurrence, by the distance
    between the two occurrences (solid), against random position pairs at the same distances
    (dashed) and two independent tokens under the layer's load (dotted),
    from :func:`workbench.analysis.repeat_consistency`; one colour per MoE layer. Each tick
    gives the number of pairs in its bucket (few pairs: a noisy rate). Without ``layers``,
    at most six evenly spaced MoE layers are drawn."""
    if layers is None:
        layers = spread(an.moe_layers(traces), 6)
    rows = an.repeat_consistency(traces, input_ids, layers)
    lays = sorted({r["layer"] for r in rows})
    fig, ax = figure_and_axes(ax, (7.0, 4.0))
    for c, i in zip(layer_colors(len(lays)), lays):
        rs = [r for r in rows if r["layer"] == i]
        x = [math.log2(max(r["lo"], 1)) for r in rs]
        ax.plot(x, [r["same"] for r in rs], "-o", ms=3.5, color=c,
                label=f"{layer_label(i)} same token", gid=f"same-{i}")
        ax.plot(x, [r["control"] for r in rs], "--", lw=1.0, color=c, gid=f"control-{i}")
        ax.axhline(rs[0]["chance"], color=c, ls=":", lw=0.8, gid=f"chance-{i}")
    pairs: dict[int, int] = {}
    for r in rows:
        if r["layer"] == lays[0]:
            pairs[r["lo"]] = r["pairs"]
    xs = sorted({r["lo"] for r in rows})
    ax.set_xticks([math.log2(max(v, 1)) for v in xs],
                  [f"{short_number(v)}\n({pairs.get(v, 0)})" for v in xs])
    ax.plot([], [], "--", color=REFERENCE, lw=1.0, label="random pairs, same distance")
    ax.plot([], [], ":", color=REFERENCE, lw=0.8, label="chance (Σ load²)")
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("distance to the first occurrence ≥ (positions; pairs in brackets)")
    ax.set_ylabel("same first-choice expert")
    ax.set_title("Repeated tokens: same expert as the first occurrence?")
    ax.legend(fontsize=FONT_SIZES["annotation"], ncol=2)
    return fig
