"""What quantisation does to routing: agreement by layer, margins of flipped tokens, lift.

Takes ``workbench.parity.FlipStats`` (``wb.compare(reference, quantised, ids).flip_stats``),
one per comparison, e.g. ``{"FP8 (weights)": ..., "FP8 (w8a8)": ...}`` against a bf16 model.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from matplotlib.figure import Figure

from ..parity import FlipStats
from .style import FONT_SIZES, REFERENCE, layer_colors, new_figure, styled


@styled
def routing_agreement(stats: Mapping[str, FlipStats], reference: str = "bf16") -> Figure:
    """Routing agreement by layer, ``reference`` vs each quantised model (one line each):
    top-1 agreement per MoE layer; the router margins (top-1 minus top-2 logit, in the
    reference model) of the tokens that flipped against those of all tokens, as shares of each
    group on a log axis (flips sit at near-ties, orders of magnitude below a typical margin);
    and, per layer i, how much more likely a token flipped at i is to flip at layer i + 1 than
    any token (lift; "n/a" where layer i has no flip).
    """
    if not stats:
        raise ValueError("routing_agreement: give at least one FlipStats, e.g. "
                         "{'FP8 (weights)': wb.compare(bf16, fp8, ids).flip_stats}")
    for label, s in stats.items():
        if not isinstance(s, FlipStats) or not s.layers:
            raise ValueError(f"routing_agreement: {label!r} is not a FlipStats with MoE layers "
                             "(compare models whose traces hold *.moe.* hooks)")
    fig = new_figure((13.0, 3.8))
    ax_a, ax_m, ax_l = fig.subplots(1, 3)
    colors = layer_colors(len(stats) + 1)[1:]
    width = 0.8 / len(stats)
    first = next(iter(stats.values()))
    everything = np.concatenate([np.asarray(m, float) for m in first.margins])
    flipped = {label: np.concatenate([np.asarray(m, float) for m in s.flip_margins])
               for label, s in stats.items()}
    bins = _log_bins(np.concatenate([everything, *flipped.values()]))
    ax_m.hist(np.clip(everything, bins[0], None), bins=bins, histtype="stepfilled",
              color=REFERENCE, alpha=0.3, weights=np.full(everything.size, 1 / everything.size),
              label=f"all tokens ({everything.size})")
    for k, ((label, s), col) in enumerate(zip(stats.items(), colors)):
        agree = 1.0 - np.asarray(s.flip_fraction)
        ax_a.plot(s.layers, agree * 100, "o-", color=col, label=label)
        f = flipped[label]
        if f.size:
            ax_m.hist(np.clip(f, bins[0], None), bins=bins, histtype="step", lw=1.5, color=col,
                      weights=np.full(f.size, 1 / f.size), label=f"{label}: flipped ({f.size})")
        lift = s.lift
        nxt = np.array([lift[r][r + 1] for r in range(len(s.layers) - 1)], float)
        x = np.arange(len(nxt)) + (k - (len(stats) - 1) / 2) * width
        ax_l.bar(x, np.nan_to_num(nxt), width=width, color=col, label=label)
        for xi in x[np.isnan(nxt)]:
            ax_l.text(xi, 0, "n/a", ha="center", va="bottom", color=col,
                      fontsize=FONT_SIZES["tick"])
    ax_a.set_xlabel("MoE layer")
    ax_a.set_ylabel(f"top-1 agreement with {reference} (%)")
    ax_a.set_xticks(first.layers)
    ax_a.set_title("routing agreement by layer", fontsize=FONT_SIZES["label"])
    ax_a.legend()
    ax_m.set_xscale("log")
    ax_m.set_xlabel(f"router margin in {reference} (top-1 − top-2 logit)")
    ax_m.set_ylabel("share of the group's tokens")
    ax_m.set_title("margins of flipped tokens", fontsize=FONT_SIZES["label"])
    ax_m.legend(fontsize=FONT_SIZES["tick"])
    ax_l.axhline(1.0, color=REFERENCE, ls=":", lw=0.8)
    ax_l.set_xticks(range(len(first.layers) - 1))
    ax_l.set_xticklabels([f"{a}→{b}" for a, b in zip(first.layers, first.layers[1:])])
    ax_l.set_xlabel("flip at layer i → flip at layer i+1")
    ax_l.set_ylabel("lift (P(flip | flipped before) / P(flip))")
    ax_l.set_title("do flips propagate?", fontsize=FONT_SIZES["label"])
    ax_l.legend()
    names = " vs ".join([reference, *stats])
    fig.suptitle(f"Routing agreement by layer, {names}")
    return fig


def _log_bins(values: np.ndarray, n: int = 40) -> np.ndarray:
    """Log-spaced bin edges over the positive ``values`` (margins; exact ties go in the first
    bin)."""
    pos = values[np.isfinite(values) & (values > 0)]
    lo = float(pos.min()) if pos.size else 1e-6
    hi = float(pos.max()) if pos.size else 1.0
    return np.geomspace(lo, max(hi, lo * 10), n + 1)
