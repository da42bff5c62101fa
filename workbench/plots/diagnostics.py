"""Diagnostic figures: backend parity, causal expert ablation, routing over training, routing
stability between runs and simulated capacity drops."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from .. import analysis as an
from ..analysis._common import Traces
from ._util import capped, layer_label, layer_legend, pick_layers
from .style import (
    FONT_SIZES,
    REFERENCE,
    WARN,
    category_colors,
    expert_ticks,
    figure_and_axes,
    layer_colors,
    new_figure,
    styled,
)

_MARKERS = "osD^v<>pP*Xh"


# --------------------------------------------------------------------------- parity
@styled
def parity_errors(report: Any, tol: float | None = None, ax: Axes | None = None,
                  floor: float | None = None) -> Figure:
    """Relative error max|Δ| / max|ref| of every hook, one point per hook: x = layer (hooks
    outside layers at the ends), marker and colour by hook kind, failing hooks outlined red,
    the tolerance as a dashed line, log y. Exact matches (error 0) are drawn on a dotted line
    at ``floor`` (default: 1/30 of the smallest non-zero error or tolerance).

    ``report``: a ParityReport (its ``tol``, labels and flips are used) or its ``records()``.
    """
    records = list(report.records()) if hasattr(report, "records") else list(report)
    if not records:
        raise ValueError("parity_errors: the report has no hooks")
    tol = getattr(report, "tol", None) if tol is None else tol
    nonzero = [float(r["rel"]) for r in records if float(r["rel"]) > 0]
    if floor is None:
        floor = min(nonzero + ([tol] if tol else []) or [1.0]) / 30.0
    layers = sorted({r["layer"] for r in records if r["layer"] is not None})
    last = (layers[-1] + 1) if layers else 0

    def xpos(r: Mapping[str, Any]) -> float:
        if r["layer"] is not None:
            return float(r["layer"])
        return -1.0 if r["name"] in ("embed",) else float(last)

    kinds = sorted({r["kind"] for r in records})
    colors = category_colors(kinds)
    width = 0.8
    n = len(layers) + 2
    fig, ax = figure_and_axes(ax, capped(max(6.5, min(0.9, 10.0 / n) * n + 4.0), 4.2))
    for k, kind in enumerate(kinds):
        rs = [r for r in records if r["kind"] == kind]
        off = (k - (len(kinds) - 1) / 2) * width / max(len(kinds), 1)
        x = [xpos(r) + off for r in rs]
        y = [max(float(r["rel"]), floor) for r in rs]
        ax.scatter(x, y, s=[46 if not r["ok"] else 26 for r in rs],
                   marker=_MARKERS[k % len(_MARKERS)], color=colors[kind],
                   edgecolors=[WARN if not r["ok"] else "none" for r in rs],
                   linewidths=1.4, label=kind, zorder=3)
    if tol is not None:
        ax.axhline(tol, color=WARN, ls="--", lw=1.0, label=f"tolerance {tol:g}")
    if len(nonzero) < len(records):
        ax.axhline(floor, color=REFERENCE, ls=":", lw=0.8, label="exact (error 0)")
    step = max(1, int(np.ceil(len(layers) / 24)))  # about 24 layer labels at most
    ticks = ([-1.0] if any(r["name"] == "embed" for r in records) else []) + \
        [float(i) for i in layers[::step]] + \
        ([float(last)] if any(r["layer"] is None and r["name"] != "embed" for r in records)
         else [])
    names = {-1.0: "embed", float(last): "final"}
    ax.set_xticks(ticks, [names.get(t) or layer_label(int(t)) for t in ticks],
                  rotation=90 if len(ticks) > 14 else 0)
    ax.set_yscale("log")
    ax.set_xlabel("layer")
    ax.set_ylabel("relative error  max|Δ| / max|ref|")
    title = "Parity per hook"
    if hasattr(report, "label_a"):
        title += f": {report.label_a} vs {report.label_b}"
    flips = getattr(report, "flips", None)
    if flips is not None:
        near = sum(bool(f.near_tie) for f in flips)
        title += f"\nrouting flips: {len(flips)} ({near} at near-ties)"
    ax.set_title(title, fontsize=FONT_SIZES["title"] - 1)
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=FONT_SIZES["annotation"],
              ncol=1 if len(kinds) <= 14 else 2)
    return fig


# --------------------------------------------------------------------------- causal
@styled
def ablation_bars(result: an.ExpertAblation, metric: str = "delta_loss",
                  ax: Axes | None = None, max_bars: int = 32) -> Figure:
    """Effect of removing each expert, per domain (grouped bars coloured by domain), against
    the random-expert null (dashed line per domain; ± one std shaded for one domain). Experts
    whose z-score exceeds 2 get a star. ``metric``: ``delta_loss`` (nats), ``flip_rate`` or
    ``delta_accuracy``. One bar per (domain, expert); with more than ``max_bars`` experts a
    domain × expert heatmap instead (diverging, centred at the random-expert null for
    ``delta_loss``, at 0 otherwise; z > 2 starred)."""
    if metric not in ("delta_loss", "flip_rate", "delta_accuracy"):
        raise ValueError(f"metric must be delta_loss, flip_rate or delta_accuracy, got {metric!r}")
    vals = np.asarray(getattr(result, metric), dtype=np.float64)  # (D, X)
    D, X = vals.shape
    if X > max_bars:
        return _ablation_heatmap(result, metric, vals, ax)
    colors = category_colors(result.domains)
    fig, ax = figure_and_axes(ax, (min(12.0, max(6.0, 0.2 * X * D + 3.5)), 3.9))
    x = np.arange(X)
    w = 0.8 / D
    for d, dom in enumerate(result.domains):
        pos = x + (d - (D - 1) / 2) * w
        ax.bar(pos, vals[d], w, color=colors[dom], label=dom)
        if metric == "delta_loss":
            m, s = float(result.null_mean[d]), float(result.null_std[d])
            ax.axhline(m, color=colors[dom], ls="--", lw=0.9)
            if D == 1:
                ax.axhspan(m - s, m + s, color=colors[dom], alpha=0.1, lw=0)
            for p, v, z in zip(pos, vals[d], result.z[d]):
                if np.isfinite(z) and z > 2:
                    ax.text(p, v, "*", ha="center", va="bottom", fontsize=FONT_SIZES["label"])
    ax.axhline(0, color="black", lw=0.6)
    ax.set_xticks(x, [str(e) for e in result.experts])
    if list(result.experts) == list(range(X)):
        expert_ticks(ax, X)
    ax.set_xlabel("expert removed")
    ylabel = {"delta_loss": "Δ next-token loss (nats)", "flip_rate": "prediction flip rate",
              "delta_accuracy": "Δ next-token accuracy"}[metric]
    ax.set_ylabel(ylabel)
    how = "banned (tokens re-route)" if result.mode == "ban" else "zeroed (routing kept)"
    ax.set_title(f"Layer {result.layer}: experts {how}"
                 + ("; dashed = random-expert null, * = z > 2" if metric == "delta_loss" else ""),
                 fontsize=FONT_SIZES["title"] - 1)
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return fig


def _ablation_heatmap(result: an.ExpertAblation, metric: str, vals: np.ndarray,
                      ax: Axes | None) -> Figure:
    from matplotlib.colors import TwoSlopeNorm
    D, X = vals.shape
    fig, ax = figure_and_axes(ax, (14.0, max(2.6, 0.45 * D + 2.0)))
    centre = result.null_mean[:, None] if metric == "delta_loss" else np.zeros((D, 1))
    rel = vals - centre
    lim = max(float(np.nanmax(np.abs(rel))), 1e-9)
    im = ax.imshow(rel, cmap="RdBu_r", norm=TwoSlopeNorm(0.0, -lim, lim), aspect="auto",
                   interpolation="nearest")
    if metric == "delta_loss":
        for d, x in zip(*np.nonzero(np.nan_to_num(result.z, nan=0.0) > 2)):
            ax.text(x, d, "*", ha="center", va="center", fontsize=FONT_SIZES["annotation"])
    ax.set_yticks(range(D), result.domains)
    if list(result.experts) == list(range(X)):
        expert_ticks(ax, X)
    ax.set_xlabel("expert removed")
    cb = fig.colorbar(im, ax=ax, pad=0.02)
    cb.set_label({"delta_loss": "Δ loss − random-expert null (nats)",
                  "flip_rate": "prediction flip rate",
                  "delta_accuracy": "Δ next-token accuracy"}[metric])
    how = "banned" if result.mode == "ban" else "zeroed"
    ax.set_title(f"Layer {result.layer}: {X} experts {how}, one at a time"
                 + ("; * = z > 2" if metric == "delta_loss" else ""),
                 fontsize=FONT_SIZES["title"] - 1)
    return fig


# --------------------------------------------------------------------------- training
def moving_average(y: np.ndarray, window: int) -> np.ndarray:
    """Centred moving average over ``window`` points, ignoring NaNs (NaN where the window holds
    no value); ``window <= 1`` returns ``y``."""
    y = np.asarray(y, dtype=np.float64)
    if window <= 1 or y.size == 0:
        return y
    ok = np.isfinite(y)
    k = np.ones(int(window))
    num = np.convolve(np.where(ok, y, 0.0), k, mode="same")
    den = np.convolve(ok.astype(np.float64), k, mode="same")
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.maximum(den, 1), np.nan)


@styled
def training_curves_plot(curves: an.TrainingCurves | str | os.PathLike | Mapping[str, Any],
                         layers: Sequence[int] | None = None, smooth: int | None = None
                         ) -> Figure:
    """Routing over training: loss and validation loss, per-layer load CV, and per-layer router
    entropy (normalised load entropy when the log has no router entropy) against step.
    ``curves``: TrainingCurves, or a training log (path or dict). Per-step curves are drawn
    as a centred moving average over ``smooth`` steps (default: 1/50 of the run; the raw
    training loss stays visible, faint)."""
    c = curves if isinstance(curves, an.TrainingCurves) else an.training_curves(curves)
    sel = [b for b, i in enumerate(c.layers) if layers is None or i in layers]
    w = max(1, c.steps.size // 50) if smooth is None else int(smooth)
    fig = new_figure((13.0, 3.7))
    ax_loss, ax_cv, ax_ent = fig.subplots(1, 3)
    if w > 1:
        ax_loss.plot(c.steps, c.loss, color="#4c72b0", lw=0.6, alpha=0.3)
    ax_loss.plot(c.steps, moving_average(c.loss, w), color="#4c72b0", lw=1.2,
                 label="train" + (f" ({w}-step mean)" if w > 1 else ""))
    ok = np.isfinite(c.val_loss)
    if ok.any():
        ax_loss.plot(c.steps[ok], c.val_loss[ok], "o-", color="#dd8452", ms=3, label="val")
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("loss (nats)")
    ax_loss.set_title("loss", fontsize=FONT_SIZES["label"])
    ax_loss.legend()
    colors = layer_colors(len(sel))
    use_router = np.isfinite(c.router_entropy[:, sel]).any() if sel else False
    ent = c.router_entropy if use_router else c.entropy_norm
    for col, b in zip(colors, sel):
        lab = layer_label(c.layers[b])
        ax_cv.plot(c.steps, moving_average(c.cv[:, b], w), color=col, lw=1.2, label=lab)
        ax_ent.plot(c.steps, moving_average(ent[:, b], w), color=col, lw=1.2, label=lab)
    ax_cv.axhline(0, color=REFERENCE, ls=":", lw=0.8)
    ax_cv.set_xlabel("step")
    ax_cv.set_ylabel("load CV (0 = balanced)")
    ax_cv.set_title("load imbalance", fontsize=FONT_SIZES["label"])
    ax_ent.set_xlabel("step")
    if use_router:
        E = c.load.shape[-1]
        ax_ent.axhline(np.log(E), color=REFERENCE, ls=":", lw=0.8, label="log E")
        ax_ent.set_ylabel("mean routing entropy (nats)")
        ax_ent.set_title("router entropy (sigmoid-normalised)", fontsize=FONT_SIZES["label"])
    else:
        ax_ent.set_ylabel("load entropy / log E")
        ax_ent.set_title("load entropy", fontsize=FONT_SIZES["label"])
    ax_ent.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.suptitle("Routing over training")
    return fig


# --------------------------------------------------------------------------- stability
@styled
def routing_stability_plot(results: Mapping[str, Iterable[Mapping[str, Any]]],
                           metric: str = "top1_agreement", experts: int | None = None,
                           ax: Axes | None = None) -> Figure:
    """Routing agreement per layer between runs, one line per comparison.

    ``results``: {label: analysis.routing_stability(...) rows}, e.g. {"step 50": rows}.
    ``metric``: top1_agreement, jaccard or saturation. ``experts`` draws the 1/E chance line.
    """
    fig, ax = figure_and_axes(ax, (6.0, 3.6))
    labels = list(results)
    colors = layer_colors(len(labels))
    all_layers: set[int] = set()
    for lab, col in zip(labels, colors):
        rows = list(results[lab])
        ls = [int(r["layer"]) for r in rows]
        all_layers |= set(ls)
        ax.plot(ls, [r[metric] for r in rows], "o-", color=col, label=lab)
    if experts:
        ax.axhline(1.0 / experts, color=REFERENCE, ls=":", lw=0.9, label="chance 1/E")
    ax.set_xticks(sorted(all_layers), [layer_label(i) for i in sorted(all_layers)])
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("MoE layer")
    ax.set_ylabel(metric.replace("top1", "top-1").replace("_", " "))
    ax.set_title("Routing stability")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return fig


@styled
def capacity_plot(traces: Traces, layers: Sequence[int] | None = None,
                  factors: Sequence[float] = (0.5, 0.75, 1.0, 1.25, 1.5, 2.0),
                  ax: Axes | None = None) -> Figure:
    """Simulated Switch-style drop rate against capacity factor, one line per layer (without
    ``layers``, at most eight evenly spaced MoE layers)."""
    layers, note = pick_layers(traces, layers)
    fig, ax = figure_and_axes(ax, (5.5, 3.6))
    for i, col in zip(layers, layer_colors(len(layers))):
        ax.plot(factors, an.drop_rate_curve(traces, i, factors), "o-", color=col,
                label=layer_label(i))
    ax.axvline(1.0, color=REFERENCE, ls=":", lw=0.9)
    ax.set_xlabel("capacity factor")
    ax.set_ylabel("dropped assignments")
    ax.set_title(f"Simulated capacity drops{note}")
    layer_legend(fig, ax, layers, [Line2D([], [], color=REFERENCE, ls=":", label="cf = 1")],
                 loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return fig
