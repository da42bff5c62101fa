"""Routing dynamics: along the sequence (temporal locality) and across layers (expert paths).

Everything here that says "top1" uses slot 0 of ``topk_indices`` (each token's first-choice
expert); :func:`same_expert_rate` also reports the any-overlap rate of the whole top-k sets.
Consecutive pairs (t, t+1) are taken within one sequence (batch row), never across rows or
traces; in a padded row they are pairs of consecutive real tokens (pads are left out, so a
padded row counts as the row alone would). Entropies are in nats.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ._common import (
    Traces,
    as_list,
    entropy,
    indices,
    moe_layers,
    nmi_from_joint,
    num_experts,
    rows,
    token_ids,
)


def _top1(traces: Traces, layer: int, what: str) -> np.ndarray:
    return indices(traces, layer, what)[:, 0]


@dataclass(frozen=True)
class SameExpertRate:
    """Result of :func:`same_expert_rate`.

    ``top1``: R₁ = mean_t 1[e₁(t) = e₁(t+1)]; ``chance_top1`` = 1/E (uniform random routing);
    ``chance_top1_load`` = Σ_e (f¹_e)² (random routing with the observed first-choice load f¹);
    ``any``: R_any = mean_t 1[S_t ∩ S_{t+1} ≠ ∅]; ``chance_any`` = 1 - C(E-k, k) / C(E, k);
    ``pairs``: number of consecutive pairs.
    """

    layer: int
    top1: float
    chance_top1: float
    chance_top1_load: float
    any: float
    chance_any: float
    pairs: int

    @property
    def lift(self) -> float:
        """R₁ / (1/E): how many times more often than uniform chance the expert repeats."""
        return self.top1 / self.chance_top1


def same_expert_rate(traces: Traces, layer: int) -> SameExpertRate:
    """Consecutive-token same-expert rate against chance (the temporal-locality measure of
    the Mixtral paper's routing analysis); the fields are described on :class:`SameExpertRate`."""
    per = rows(traces, layer, "same_expert_rate")
    E = num_experts(traces, layer)
    k = per[0].shape[-1]
    same1, anyov, n = 0, 0, 0
    for a in per:  # one sequence (T_b, k)
        if a.shape[0] < 2:
            continue
        x, y = a[:-1], a[1:]
        same1 += int(np.sum(x[..., 0] == y[..., 0]))
        anyov += int(np.sum((x[..., :, None] == y[..., None, :]).any(axis=(-1, -2))))
        n += x.shape[0]
    if n == 0:
        raise ValueError("same_expert_rate: no sequence has two or more tokens")
    top = _top1(traces, layer, "same_expert_rate")
    f1 = np.bincount(top, minlength=E) / top.size
    chance_any = 1.0 - math.comb(E - k, k) / math.comb(E, k) if k <= E else 1.0
    return SameExpertRate(layer, same1 / n, 1.0 / E, float(np.sum(f1 ** 2)), anyov / n,
                          chance_any, n)


def run_lengths(traces: Traces, layer: int) -> np.ndarray:
    """Lengths of maximal runs of consecutive tokens with the same top1 expert, within each
    sequence, int64 (n_runs,). Σ lengths = number of tokens."""
    out = []
    for a in rows(traces, layer, "run_lengths"):
        row = a[:, 0]
        if row.size == 0:
            continue
        change = np.flatnonzero(np.diff(row) != 0) + 1
        bounds = np.concatenate([[0], change, [row.size]])
        out.append(np.diff(bounds))
    return np.concatenate(out).astype(np.int64) if out else np.zeros(0, dtype=np.int64)


def run_length_histogram(traces: Traces, layer: int) -> np.ndarray:
    """counts[L] = number of top1 runs of length L (counts[0] = 0), int64."""
    return np.bincount(run_lengths(traces, layer)).astype(np.int64)


def transition_counts(traces: Traces, layer_from: int, layer_to: int) -> np.ndarray:
    """N_ij = number of tokens with top1 expert i at ``layer_from`` and j at ``layer_to``,
    int64 (E_from, E_to)."""
    a = _top1(traces, layer_from, "transition_matrix")
    b = _top1(traces, layer_to, "transition_matrix")
    if a.shape != b.shape:
        raise ValueError(f"transition_matrix: layers {layer_from} and {layer_to} cover "
                         f"different numbers of tokens ({a.size} vs {b.size})")
    Ea = max(num_experts(traces, layer_from), int(a.max()) + 1 if a.size else 1)
    Eb = max(num_experts(traces, layer_to), int(b.max()) + 1 if b.size else 1)
    M = np.zeros((Ea, Eb), dtype=np.int64)
    np.add.at(M, (a, b), 1)
    return M


def transition_matrix(traces: Traces, layer_from: int, layer_to: int) -> np.ndarray:
    """M_ij = P(e_to = j | e_from = i) of top1 experts, (E, E); rows of experts never chosen
    at ``layer_from`` are all zero."""
    N = transition_counts(traces, layer_from, layer_to).astype(np.float64)
    rows = N.sum(axis=1, keepdims=True)
    return np.divide(N, rows, out=np.zeros_like(N), where=rows > 0)


def conditional_entropy(traces: Traces, layer_from: int, layer_to: int) -> float:
    """H(e_to | e_from) = Σ_i P(e_from = i) · H(M_i·) in nats, of top1 experts (0 when the
    later choice is determined by the earlier one; log E when independent and uniform)."""
    N = transition_counts(traces, layer_from, layer_to).astype(np.float64)
    p = N.sum(axis=1) / N.sum()
    return float(np.sum(p * entropy(N, axis=1)))


def next_layer_predictability(traces: Traces, layer_from: int, layer_to: int) -> float:
    """Accuracy of predicting the top1 expert at ``layer_to`` by the most frequent successor
    of the expert at ``layer_from``: Σ_i max_j N_ij / N (in-sample; 1/E-ish when independent
    and uniform, 1 when determined)."""
    N = transition_counts(traces, layer_from, layer_to)
    return float(N.max(axis=1).sum() / N.sum())


def layer_nmi(traces: Traces, layer_a: int, layer_b: int) -> float:
    """NMI between the top1 experts of two layers, I / sqrt(H_a · H_b)."""
    return nmi_from_joint(transition_counts(traces, layer_a, layer_b))


def _paths(traces: Traces, layers: Sequence[int] | None, what: str
           ) -> tuple[list[int], np.ndarray]:
    layers = moe_layers(traces) if layers is None else list(layers)
    if not layers:
        raise ValueError(f"{what}: no MoE routing captured; re-run with "
                         "capture=['*.moe.topk_indices'] (or '*.moe.*')")
    cols = [_top1(traces, i, what) for i in layers]
    if len({c.size for c in cols}) > 1:
        raise ValueError(f"{what}: layers cover different numbers of tokens")
    return layers, np.stack(cols, axis=1)


def expert_paths(traces: Traces, layers: Sequence[int] | None = None, top: int = 10
                 ) -> list[tuple[tuple[int, ...], int, float]]:
    """The ``top`` most frequent top1 expert paths (e_ℓ1, e_ℓ2, …) over ``layers`` (default:
    every captured MoE layer) as (path, count, fraction of tokens), most frequent first."""
    _, P = _paths(traces, layers, "expert_paths")
    c = Counter(map(tuple, P.tolist()))
    total = P.shape[0]
    ranked = sorted(c.items(), key=lambda kv: (-kv[1], kv[0]))[:top]
    return [(tuple(int(x) for x in p), int(n), n / total) for p, n in ranked]


def path_tokens(trace: Traces, path: Sequence[int], layers: Sequence[int] | None = None
                ) -> np.ndarray:
    """Input token ids of the tokens whose top1 experts over ``layers`` (default: every captured
    MoE layer) follow ``path`` exactly, in order (trace, batch row, position), (n,)."""
    ts = as_list(trace)
    layers, P = _paths(ts, layers, "path_tokens")
    if len(path) != len(layers):
        raise ValueError(f"path_tokens: path has {len(path)} experts for {len(layers)} layers")
    ids = np.concatenate([token_ids(t) for t in ts])
    if ids.size != P.shape[0]:
        raise ValueError("path_tokens: routing does not cover every input token; capture "
                         "without a position slice")
    return ids[(P == np.asarray(path)[None, :]).all(axis=1)]


def path_entropy(traces: Traces, layers: Sequence[int] | None = None) -> float:
    """Entropy (nats) of the distribution of top1 expert paths over ``layers``."""
    _, P = _paths(traces, layers, "path_entropy")
    _, counts = np.unique(P, axis=0, return_counts=True)
    return float(entropy(counts.astype(np.float64)))


def cross_layer_table(traces: Traces, layers: Sequence[int] | None = None
                      ) -> list[dict[str, float | int]]:
    """One row per consecutive pair of ``layers`` (default: captured MoE layers):
    layer_from, layer_to, conditional_entropy (nats), predictability, nmi."""
    layers = moe_layers(traces) if layers is None else list(layers)
    as_list(traces)
    rows: list[dict[str, float | int]] = []
    for a, b in zip(layers[:-1], layers[1:]):
        rows.append({"layer_from": a, "layer_to": b,
                     "conditional_entropy": conditional_entropy(traces, a, b),
                     "predictability": next_layer_predictability(traces, a, b),
                     "nmi": layer_nmi(traces, a, b)})
    return rows
