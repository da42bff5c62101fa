"""Figures at Scout and Maverick scale: every plot function on synthetic traces (no weights),
with the size and legend bounds the large-model mode promises."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from workbench import analysis as an
from workbench import plots as P

#: Largest figure the large-model mode may produce, in inches (at 100 dpi: 1,600 × 1,400 px).
MAX_INCHES = (16.0, 14.0)
#: Most entries any legend may hold.
MAX_LEGEND = 20


def categories(traces: list[Any]) -> list[str]:
    """A token category per token (from the id), as a tokenizer would give."""
    names = ["word", "punct", "digit", "space", "special"]
    ids = np.concatenate([t.input_ids.ravel() for t in traces])
    return [names[min(int(np.log2(i + 1)) // 3, 4)] for i in ids]


def ablation(traces: list[Any]) -> an.ExpertAblation:
    """An ExpertAblation result with the traces' shape (random effects; no model run)."""
    rng = np.random.default_rng(0)
    E = an.num_experts(traces)
    layer = an.moe_layers(traces)[0]
    doms = sorted({t.meta["domain"] for t in traces})
    D = len(doms)
    dl = rng.gamma(1.0, 0.02, size=(D, E))
    null = dl.copy()
    return an.ExpertAblation(layer, "ban", doms, list(range(E)), np.full(D, 3.0),
                             np.full(D, 0.3), dl, rng.uniform(0, 0.2, (D, E)),
                             -dl / 10, rng.dirichlet(np.ones(E), D), np.arange(E), null,
                             null.mean(1), null.std(1), (dl - null.mean(1)[:, None])
                             / null.std(1)[:, None])


def figure_makers(traces: list[Any]) -> dict[str, Callable[[], Figure]]:
    """Every trace-driven plot function, called the way a researcher would."""
    cats = categories(traces)
    moe = an.moe_layers(traces)
    E = an.num_experts(traces)
    rng = np.random.default_rng(1)
    W = rng.normal(size=(E, 64))
    attn = [int(n.split(".")[1]) for n in traces[0] if n.endswith("attn.pattern")]
    stab = {f"step {s}": [{"layer": i, "top1_agreement": 0.5 + s / 400, "jaccard": 0.5,
                           "saturation": 0.5} for i in moe] for s in (50, 100, 150)}
    return {
        "load_heatmap": lambda: P.load_heatmap(traces),
        "imbalance_bars": lambda: P.imbalance_bars(traces),
        "token_routing_text": lambda: P.token_routing_text(traces[0]),
        "margin_histogram": lambda: P.margin_histogram(traces),
        "gate_histogram": lambda: P.gate_histogram(traces),
        "same_expert_rate_plot": lambda: P.same_expert_rate_plot(traces),
        "run_length_plot": lambda: P.run_length_plot(traces),
        "transition_heatmap": lambda: P.transition_heatmap(traces),
        "expert_flow": lambda: P.expert_flow(traces),
        "domain_heatmap": lambda: P.domain_heatmap(traces, n_boot=20, n_shuffle=20),
        "category_heatmap": lambda: P.category_heatmap(traces, categories=cats, n_boot=20,
                                                    n_shuffle=20),
        "specialisation_by_layer": lambda: P.specialisation_by_layer(
            traces, categories=cats, n_boot=20, n_shuffle=20),
        "domain_divergence_plot": lambda: P.domain_divergence_plot(traces),
        "top_tokens_table": lambda: P.top_tokens_table(traces),
        "router_similarity": lambda: P.router_similarity(W),
        "routed_share_plot": lambda: P.routed_share_plot(traces),
        "attention_pattern": lambda: P.attention_pattern(traces[0], attn[0]),
        "attention_by_layer_type": lambda: P.attention_by_layer_type(traces),
        "ablation_bars": lambda: P.ablation_bars(ablation(traces)),
        "routing_stability_plot": lambda: P.routing_stability_plot(stab, experts=E),
        "capacity_plot": lambda: P.capacity_plot(traces),
        "domain_share_bars": lambda: P.domain_share_bars(traces, n_boot=20),
        "token_routing_layers": lambda: P.token_routing_layers(traces[0]),
        "expert_weight_similarity": lambda: P.expert_weight_similarity(
            rng.normal(size=(E, 8, 6))),
        "plot_routing_by_position": lambda: P.plot_routing_by_position(traces),
        "plot_repeat_consistency": lambda: P.plot_repeat_consistency(traces),
    }


def legend_sizes(fig: Figure) -> list[int]:
    """Entries of every legend in the figure (axes and figure legends)."""
    legs = [ax.get_legend() for ax in fig.axes] + list(fig.legends)
    return [len(leg.get_texts()) for leg in legs if leg is not None]
