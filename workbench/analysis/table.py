"""Per-layer routing summary table (used by the CLI demo)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ._common import Traces, as_list, moe_layers
from .confidence import NEAR_TIE_EPS, near_tie_fraction
from .load import expert_load, load_stats

COLUMNS: tuple[tuple[str, str, str], ...] = (
    # key, header, format
    ("layer", "layer", "{:>5d}"),
    ("tokens", "tokens", "{:>7d}"),
    ("load_cv", "load CV", "{:>8.3f}"),
    ("max_over_mean", "max/mean", "{:>8.2f}"),
    ("entropy", "entropy", "{:>7.3f}"),
    ("effective_experts", "eff.exp", "{:>7.2f}"),
    ("top_expert", "top", "{:>4d}"),
    ("top_share", "share", "{:>6.3f}"),
    ("near_tie", "near-tie", "{:>8.3f}"),
)


def routing_table(trace: Traces, layers: Sequence[int] | None = None,
                  eps: float = NEAR_TIE_EPS) -> list[dict[str, Any]]:
    """One row per MoE layer (default: every captured one) with keys: layer, tokens, load_cv
    (std/mean of load), max_over_mean, entropy (load entropy / log E, 1 = uniform),
    effective_experts (exp of the load entropy in nats), top_expert and top_share (most loaded
    expert and its load fraction), near_tie (fraction of tokens with top-1/top-2 router-logit
    margin < eps; None when router_logits were not captured). Load counts all top-k slots."""
    ts = as_list(trace)
    layers = moe_layers(ts) if layers is None else list(layers)
    if not layers:
        raise ValueError("routing_table: no MoE routing captured; re-run with "
                         "capture=['*.moe.*'] (or '*.moe.topk_indices')")
    rows = []
    for i in layers:
        f = expert_load(ts, i)
        st = load_stats(f)
        have_logits = all(f"layers.{i}.moe.router_logits" in t for t in ts)
        tokens = sum(int(t[f"layers.{i}.moe.topk_indices"].shape[0]
                         * t[f"layers.{i}.moe.topk_indices"].shape[1]) for t in ts)
        rows.append({"layer": i, "tokens": tokens, "load_cv": st["cv"],
                     "max_over_mean": st["max_over_mean"], "entropy": st["entropy_norm"],
                     "effective_experts": st["effective_experts"],
                     "top_expert": st["top_expert"], "top_share": st["top_share"],
                     "near_tie": near_tie_fraction(ts, i, eps) if have_logits else None})
    return rows


def format_routing_table(rows: Sequence[dict[str, Any]]) -> str:
    """Fixed-width text of :func:`routing_table` rows: a header line, a rule, one line per row
    (``-`` where a value is None or missing)."""
    widths = []
    for _, head, fmt in COLUMNS:
        sample = fmt.format(0) if "d}" in fmt else fmt.format(0.0)
        widths.append(max(len(head), len(sample)))
    header = "  ".join(h.rjust(w) for (_, h, _), w in zip(COLUMNS, widths))
    lines = [header, "-" * len(header)]
    for r in rows:
        cells = []
        for (key, _, fmt), w in zip(COLUMNS, widths):
            v = r.get(key)
            if v is None:
                cells.append("-".rjust(w))
            else:
                cells.append(fmt.format(int(v) if "d}" in fmt else float(v)).rjust(w))
        lines.append("  ".join(cells))
    return "\n".join(lines)
