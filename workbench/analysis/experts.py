"""Expert-level views: router-row similarity and the shared-vs-routed output split.

Router weights come from the checkpoint as numpy, e.g.
``wb.Checkpoint.open(path)[f"layers.{i}.feed_forward.router.weight"]`` with shape (E, D).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.typing import ArrayLike

from ._common import Traces, as_list, need, real_tokens


def router_cosine_similarity(weight: ArrayLike) -> np.ndarray:
    """cos(W_r[i], W_r[j]) for every pair of router rows: (E, E), diagonal 1 (0 for a zero row).

    ``weight``: the router weight (E, D) of one layer (rows = experts).
    """
    W = np.asarray(weight, dtype=np.float64)
    if W.ndim != 2:
        raise ValueError(f"router weight must be (experts, hidden), got shape {W.shape}")
    n = np.linalg.norm(W, axis=1, keepdims=True)
    U = np.divide(W, n, out=np.zeros_like(W), where=n > 0)
    return np.clip(U @ U.T, -1.0, 1.0)


def expert_weight_similarity(weights: ArrayLike | Sequence[ArrayLike]) -> np.ndarray:
    """Cosine similarity of whole experts, (E, E): each expert's weights flattened into one
    vector (several arrays of shape (E, ...), e.g. gate_up_proj and down_proj, are
    concatenated per expert first)."""
    arrs = [np.asarray(w) for w in weights] if isinstance(weights, list | tuple) \
        else [np.asarray(weights)]
    E = {a.shape[0] for a in arrs if a.ndim >= 2}
    if len(E) != 1 or any(a.ndim < 2 for a in arrs):
        raise ValueError("expert_weight_similarity: expected arrays of shape (experts, ...) "
                         f"with the same number of experts, got {[a.shape for a in arrs]}")
    flat = np.concatenate([a.reshape(a.shape[0], -1).astype(np.float64) for a in arrs], axis=1)
    return router_cosine_similarity(flat)


def most_similar_experts(similarity: ArrayLike, n: int = 5
                         ) -> list[tuple[int, int, float]]:
    """The ``n`` most similar distinct expert pairs (i < j, cos) of a similarity matrix,
    highest first."""
    S = np.asarray(similarity, dtype=np.float64)
    if S.ndim != 2 or S.shape[0] != S.shape[1]:
        raise ValueError(f"similarity must be square, got shape {S.shape}")
    i, j = np.triu_indices(S.shape[0], k=1)
    order = np.argsort(-S[i, j], kind="stable")[:n]
    return [(int(i[o]), int(j[o]), float(S[i[o], j[o]])) for o in order]


def shared_routed_ratio(traces: Traces, layer: int, eps: float = 1e-12) -> np.ndarray:
    """Per-token ρ_t = ‖routed_out_t‖₂ / ‖shared_out_t‖₂, (N,) over all real tokens of all
    traces (order: trace, batch row, position; pads left out). Needs ``routed_out`` and
    ``shared_out``; a shared norm below ``eps`` gives inf (or NaN when both are zero)."""
    out = []
    for t in as_list(traces):
        r = need(t, f"layers.{layer}.moe.routed_out", "shared_routed_ratio").astype(np.float64)
        s = need(t, f"layers.{layer}.moe.shared_out", "shared_routed_ratio").astype(np.float64)
        if r.shape != s.shape:
            raise ValueError(f"shared_routed_ratio: routed_out {r.shape} and shared_out "
                             f"{s.shape} differ in shape")
        r, s = (real_tokens(t, x) if x.ndim == 3 else x.reshape(-1, x.shape[-1])
                for x in (r, s))
        nr = np.linalg.norm(r, axis=-1)
        ns = np.linalg.norm(s, axis=-1)
        with np.errstate(divide="ignore", invalid="ignore"):
            out.append(np.where(ns > eps, nr / np.where(ns > eps, ns, 1.0),
                                np.where(nr > 0, np.inf, np.nan)))
    return np.concatenate(out)


def routed_share(traces: Traces, layer: int) -> np.ndarray:
    """Per-token norm share of the routed expert, ‖routed‖ / (‖routed‖ + ‖shared‖), in [0, 1]
    (0.5 = equal norms; NaN when both are zero), (N,)."""
    rho = shared_routed_ratio(traces, layer)
    with np.errstate(invalid="ignore"):
        return np.where(np.isinf(rho), 1.0, rho / (1.0 + rho))
