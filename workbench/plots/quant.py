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
    reference model) of the tokens that flipped against those of all tokens; and, per layer i,
    how much more likely a token flipped at i is to flip at layer i + 1 than any token (lift).
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
    for k, ((label, s), col) in enumerate(zip(stats.items(), colors)):
        agree = 1.0 - np.asarray(s.flip_fraction)
        ax_a.plot(s.layers, agree * 100, "o-", color=col, label=label)
        flipped = np.concatenate([np.asarray(m, float) for m in s.flip_margins])
        if flipped.size:
            ax_m.hist(flipped, bins=30, histtype="step", lw=1.5, color=col, density=True,
                      label=f"{label}: flipped ({flipped.size})")
        lift = s.lift
        nxt = [lift[r][r + 1] for r in range(len(s.layers) - 1)]
        x = np.arange(len(nxt)) + (k - (len(stats) - 1) / 2) * width
        ax_l.bar(x, np.nan_to_num(nxt), width=width, color=col, label=label)
    first = next(iter(stats.values()))
    everything = np.concatenate([np.asarray(m, float) for m in first.margins])
    ax_m.hist(everything, bins=30, histtype="stepfilled", color=REFERENCE, alpha=0.3,
              density=True, label="all tokens")
    ax_a.set_xlabel("MoE layer")
    ax_a.set_ylabel(f"top-1 agreement with {reference} (%)")
    ax_a.set_xticks(first.layers)
    ax_a.set_title("routing agreement by layer", fontsize=FONT_SIZES["label"])
    ax_a.legend()
    ax_m.set_xlabel(f"router margin in {reference} (top-1 − top-2 logit)")
    ax_m.set_ylabel("density")
    ax_m.set_title("margins of flipped tokens", fontsize=FONT_SIZES["label"])
    ax_m.legend(fontsize=FONT_SIZES["tick"])
    ax_l.axhline(1.0, color=REFERENCE, ls=":", lw=0.8)
    ax_l.set_xticks(range(len(first.layers) - 1))
    ax_l.set_xticklabels([f"{a}→{b}" for a, b in zip(first.layers, first.layers[1:])])
    ax_l.set_xlabel("flip at layer i → flip at layer i+1")
    ax_l.set_ylabel("lift (P(flip | flipped before) / P(flip))")
    ax_l.set_title("do flips propagate?", fontsize=FONT_SIZES["label"])
    names = " vs ".join([reference, *stats])
    fig.suptitle(f"Routing agreement by layer, {names}")
    return fig
