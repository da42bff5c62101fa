"""Comparing routing: two different inputs (:func:`routing_diff`), and where in the sequence
and for which tokens the load goes (:func:`load_by_position`, :func:`load_by_frequency`).

Token alignment for two inputs uses difflib's longest matching blocks over the token ids:
tokens in a matching block are "the same token in the same context" and can be compared one
to one; the rest are the edit.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..trace import Trace
from ._common import Traces, as_list, indices, moe_layers, num_experts, row_ids, rows, token_ids
from .specialisation import js_divergence


@dataclass(frozen=True)
class RoutingDiff:
    """Result of :func:`routing_diff` (L layers, M aligned token pairs).

    ``pairs``: (M, 2) aligned positions (a, b); ``changed``: (L, M) top-1 expert differs;
    ``agreement``: (L,) share of aligned tokens with the same top-1 expert; ``load_a``,
    ``load_b``: (L, E) load fractions; ``js``: (L,) JS(load_a ‖ load_b) in bits; ``top1_a``,
    ``top1_b``: (L, T_a), (L, T_b) first choices; ``edited_a``, ``edited_b``: positions
    outside the alignment.
    """

    layers: list[int]
    pairs: np.ndarray
    changed: np.ndarray
    agreement: np.ndarray
    load_a: np.ndarray
    load_b: np.ndarray
    js: np.ndarray
    top1_a: np.ndarray
    top1_b: np.ndarray
    edited_a: np.ndarray
    edited_b: np.ndarray


def _row(trace: Trace, layer: int, batch: int) -> np.ndarray:
    """Batch row ``batch``'s chosen experts at ``layer`` over its real tokens, (T_b, k)."""
    return rows(trace, layer, "routing_diff")[batch]


def routing_diff(trace_a: Trace, trace_b: Trace, layers: Sequence[int] | None = None,
                 batch: int = 0) -> RoutingDiff:
    """How the routing of one input differs from another's (e.g. the same sentence with one
    word changed, or two prompts): per layer the JS divergence of the two loads and, over the
    aligned tokens (module doc), how many keep their top-1 expert."""
    if not isinstance(trace_a, Trace) or not isinstance(trace_b, Trace):
        raise TypeError("routing_diff takes two Traces")
    layers = moe_layers([trace_a, trace_b]) if layers is None else [int(i) for i in layers]
    if not layers:
        raise ValueError("routing_diff: the traces share no captured MoE layer; capture "
                         "'*.moe.*' in both")
    E = max(num_experts([trace_a], layers[0]), num_experts([trace_b], layers[0]))
    ida, idb = row_ids(trace_a)[batch], row_ids(trace_b)[batch]
    sm = difflib.SequenceMatcher(a=ida.tolist(), b=idb.tolist(), autojunk=False)
    pairs = np.array([(blk.a + j, blk.b + j) for blk in sm.get_matching_blocks()
                      for j in range(blk.size)], dtype=np.int64).reshape(-1, 2)
    ta = np.stack([_row(trace_a, i, batch)[:, 0] for i in layers]).astype(np.int64)
    tb = np.stack([_row(trace_b, i, batch)[:, 0] for i in layers]).astype(np.int64)
    changed = ta[:, pairs[:, 0]] != tb[:, pairs[:, 1]] if len(pairs) else \
        np.zeros((len(layers), 0), dtype=bool)
    la = np.stack([np.bincount(_row(trace_a, i, batch).ravel(), minlength=E)[:E]
                   for i in layers]).astype(np.float64)
    lb = np.stack([np.bincount(_row(trace_b, i, batch).ravel(), minlength=E)[:E]
                   for i in layers]).astype(np.float64)
    la /= la.sum(axis=1, keepdims=True)
    lb /= lb.sum(axis=1, keepdims=True)
    js = np.array([js_divergence(a, b) for a, b in zip(la, lb)])
    agreement = 1.0 - changed.mean(axis=1) if changed.shape[1] else np.full(len(layers), np.nan)
    edited_a = np.setdiff1d(np.arange(len(ida)), pairs[:, 0])
    edited_b = np.setdiff1d(np.arange(len(idb)), pairs[:, 1])
    return RoutingDiff(layers, pairs, changed, agreement, la, lb, js, ta, tb, edited_a,
                       edited_b)


def load_by_position(traces: Traces, layer: int, bins: int = 8) -> tuple[np.ndarray,
                                                                          np.ndarray]:
    """(edges (bins+1,), load (bins, E)): each expert's share of the assignments of the tokens
    whose position falls in each of ``bins`` equal-width position bins."""
    ts = as_list(traces)
    E = num_experts(ts, layer)
    seqs = rows(ts, layer, "load_by_position")
    T = max(a.shape[0] for a in seqs)
    edges = np.unique(np.linspace(0, T, bins + 1).round().astype(int))
    out = np.zeros((len(edges) - 1, E))
    for a in seqs:  # positions count from each sequence's first real token
        pos = np.broadcast_to(np.arange(a.shape[0])[:, None], a.shape)
        b = np.clip(np.searchsorted(edges, pos, side="right") - 1, 0, len(edges) - 2)
        np.add.at(out, (b.ravel(), a.ravel()), 1)
    return edges, out / np.maximum(out.sum(axis=1, keepdims=True), 1)


def load_by_frequency(traces: Traces, layer: int, bins: int = 5) -> tuple[np.ndarray,
                                                                           np.ndarray]:
    """(edges (bins+1,), load (bins, E)): expert shares for tokens grouped by how often their
    id occurs in these traces, in log-spaced frequency bins (rare ids first)."""
    ts = as_list(traces)
    E = num_experts(ts, layer)
    ids = np.concatenate([token_ids(t) for t in ts])
    idx = indices(ts, layer, "load_by_frequency")
    if idx.shape[0] != ids.size:
        raise ValueError(f"load_by_frequency: routing of layer {layer} does not cover every "
                         "input token; capture without a position slice")
    _, inv, cnt = np.unique(ids, return_inverse=True, return_counts=True)
    freq = cnt[inv]
    edges = np.unique(np.geomspace(1, freq.max() + 1, bins + 1).round().astype(int))
    b = np.clip(np.searchsorted(edges, freq, side="right") - 1, 0, len(edges) - 2)
    out = np.zeros((len(edges) - 1, E))
    np.add.at(out, (np.repeat(b, idx.shape[1]), idx.ravel()), 1)
    return edges, out / np.maximum(out.sum(axis=1, keepdims=True), 1)
