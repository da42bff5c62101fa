"""Router confidence: per-token routing entropy, gate values, logit margins, near-ties.

Llama 4's router gates each chosen expert with a sigmoid of its own logit, so there is no
routing distribution to take an entropy of. :func:`routing_entropy` therefore normalises
explicitly and says how: ``"sigmoid"`` (default) uses p_e = σ(z_e) / Σ_j σ(z_j); ``"softmax"``
uses p = softmax(z). The flip risk is the logit margin, not the entropy.

Per-token results are flat arrays over all tokens of all traces, in order (trace, batch row,
position); reshape with ``trace.input_ids.shape`` for a single trace.
"""

from __future__ import annotations

import math

import numpy as np

from ._common import (
    Traces,
    as_list,
    check_index,
    indices_per_trace,
    logits,
    need,
    real_tokens,
    sigmoid,
    softmax,
)
from ._common import entropy as _entropy

#: Default near-tie threshold on the top-1/top-2 router-logit margin, in logit units.
NEAR_TIE_EPS = 1e-2

NORMALISATIONS = ("sigmoid", "softmax")


def routing_probabilities(traces: Traces, layer: int, normalisation: str = "sigmoid"
                          ) -> np.ndarray:
    """Per-token routing distribution (N, E) made from router logits z.

    ``"sigmoid"``: p_e = σ(z_e) / Σ_j σ(z_j) (sigmoid-normalised, Llama 4's gate function);
    ``"softmax"``: p = softmax(z). Needs ``router_logits``.
    """
    if normalisation not in NORMALISATIONS:
        raise ValueError(f"normalisation must be one of {NORMALISATIONS}, got {normalisation!r}")
    z = logits(traces, layer, "routing_probabilities")
    if normalisation == "softmax":
        return softmax(z, axis=-1)
    s = sigmoid(z)
    return s / s.sum(axis=-1, keepdims=True)


def routing_entropy(traces: Traces, layer: int, normalisation: str = "sigmoid",
                    normalised: bool = False) -> np.ndarray:
    """Per-token routing entropy H_t = -Σ_e p_{t,e} log p_{t,e} (nats), (N,).

    p is the **sigmoid-normalised** router output by default (see
    :func:`routing_probabilities`; ``normalisation="softmax"`` for the softmax one). With
    ``normalised`` divided by log E (1 = indifferent router, 0 = certain). Needs
    ``router_logits``.
    """
    p = routing_probabilities(traces, layer, normalisation)
    h = _entropy(p, axis=-1)
    if normalised:
        E = p.shape[-1]
        h = h / math.log(E) if E > 1 else np.zeros_like(h)
    return h


def gate_values(traces: Traces, layer: int) -> np.ndarray:
    """Gate of every chosen expert, (N, k): ``topk_scores`` (σ of the chosen logit in Llama 4).

    When ``topk_scores`` was not captured but ``router_logits`` was, the gates are recomputed
    as σ(z) at ``topk_indices``.
    """
    out = []
    for t in as_list(traces):
        name = f"layers.{layer}.moe.topk_scores"
        if name in t:
            s = np.asarray(t[name], dtype=np.float64)
            out.append(real_tokens(t, s) if s.ndim == 3 else s.reshape(-1, 1))
            continue
        lname = f"layers.{layer}.moe.router_logits"
        if lname not in t:
            need(t, name, "gate_values")
        z = np.asarray(t[lname], dtype=np.float64)
        idx = indices_per_trace(t, layer, "gate_values")[0]
        g = sigmoid(np.take_along_axis(z, idx, axis=-1))
        out.append(real_tokens(t, g))
    return np.concatenate(out)


def gate_histogram(traces: Traces, layer: int, bins: int = 20, slot: int | None = 0
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Distribution of gate values on [0, 1]: (counts (bins,), edges (bins+1,)).

    ``slot`` picks one top-k slot (0 = first choice); None pools every slot.
    """
    g = gate_values(traces, layer)
    if slot is not None:
        slot = check_index(slot, "gate_histogram: slot", g.shape[-1])
    vals = g.ravel() if slot is None else g[:, slot]
    counts, edges = np.histogram(vals, bins=bins, range=(0.0, 1.0))
    return counts, edges


def logit_margin(traces: Traces, layer: int, rank: int = 1) -> np.ndarray:
    """Per-token router-logit margin m_t = z_(rank) - z_(rank+1) (sorted descending), (N,).

    rank=1 (default) is the top-1/top-2 margin, the distance to a change of first choice;
    rank=k is the margin of the whole top-k set. Needs ``router_logits``.
    """
    z = logits(traces, layer, "logit_margin")
    E = z.shape[-1]
    rank = check_index(rank, "logit_margin: rank")
    if not 1 <= rank < E:
        raise ValueError(f"logit_margin: rank must be in 1..{E - 1} for {E} experts, got {rank}")
    part = -np.partition(-z, (rank - 1, rank), axis=-1)
    return part[:, rank - 1] - part[:, rank]


def near_tie_fraction(traces: Traces, layer: int, eps: float = NEAR_TIE_EPS, rank: int = 1
                      ) -> float:
    """Fraction of tokens whose logit margin (:func:`logit_margin`) is below ``eps``:
    P(m_t < eps), the share of tokens whose routing a tiny numeric change could flip."""
    m = logit_margin(traces, layer, rank)
    return float(np.mean(m < eps)) if m.size else 0.0


def near_tie_mask(traces: Traces, layer: int, eps: float = NEAR_TIE_EPS, rank: int = 1
                  ) -> np.ndarray:
    """Boolean (N,) per token: logit margin below ``eps``."""
    return logit_margin(traces, layer, rank) < eps


def confidence_summary(traces: Traces, layer: int, eps: float = NEAR_TIE_EPS
                       ) -> dict[str, float]:
    """Mean/median of gate (first choice), margin and sigmoid-normalised entropy, and the
    near-tie fraction, for one layer. Needs ``router_logits`` (and ``topk_indices``)."""
    m = logit_margin(traces, layer)
    h = routing_entropy(traces, layer)
    g = gate_values(traces, layer)[:, 0]
    return {"gate_mean": float(g.mean()), "gate_median": float(np.median(g)),
            "margin_mean": float(m.mean()), "margin_median": float(np.median(m)),
            "entropy_sigmoid_mean": float(h.mean()),
            "near_tie_fraction": float(np.mean(m < eps)), "eps": float(eps)}
