"""Expert load and balance: load fractions, CV, max/mean, entropy, aux losses, capacity drops.

Load counts every top-k assignment: with N tokens routed to k experts each, the load fraction of
expert e is f_e = c_e / (k·N), where c_e is the number of (token, slot) pairs that chose e, so
Σ_e f_e = 1. The summary statistics take a load vector (E,) or a stack of them (..., E) so the
same functions serve traces and training logs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike

from ..trace import LayerArray
from ._common import (
    Traces,
    as_list,
    entropy,
    indices,
    logits,
    logsumexp,
    moe_layers,
    num_experts,
    rows,
    softmax,
)


def _scalar_or_array(x: np.ndarray) -> float | np.ndarray:
    return float(x) if np.ndim(x) == 0 else x


def _load(load: ArrayLike) -> np.ndarray:
    f = np.asarray(load, dtype=np.float64)
    if f.ndim == 0 or f.shape[-1] == 0:
        raise ValueError(f"a load vector needs an expert axis, got shape {f.shape}")
    return f


def expert_counts(traces: Traces, layer: int) -> np.ndarray:
    """c_e: number of (token, slot) assignments to each expert at ``layer``, int64 (E,)."""
    idx = indices(traces, layer, "expert_counts")
    E = num_experts(traces, layer)
    if idx.size and (idx.min() < 0 or idx.max() >= E):
        bad = int(idx.max()) if idx.max() >= E else int(idx.min())
        raise ValueError(f"expert_counts: layers.{layer}.moe.topk_indices holds expert {bad}, "
                         f"but the trace's model has {E} experts (0..{E - 1})")
    return np.bincount(idx.ravel(), minlength=E).astype(np.int64)


def expert_load(traces: Traces, layer: int) -> np.ndarray:
    """Load fraction f_e = c_e / (k·N) of each expert at ``layer`` (all top-k slots), (E,)."""
    c = expert_counts(traces, layer).astype(np.float64)
    total = c.sum()
    if total == 0:
        raise ValueError(f"expert_load: layer {layer} routed no tokens (empty trace)")
    return c / total


def load_matrix(traces: Traces, layers: Sequence[int] | None = None) -> np.ndarray:
    """Layer × expert load fractions (L, E) for ``layers`` (default: every captured MoE layer,
    see :func:`moe_layers`), as a :class:`~workbench.trace.LayerArray`: ``m[3]`` is layer 3's
    row."""
    layers = moe_layers(traces) if layers is None else list(layers)
    if not layers:
        raise ValueError("load_matrix: no MoE routing captured; re-run with "
                         "capture=['*.moe.topk_indices'] (or '*.moe.*')")
    return LayerArray(np.stack([expert_load(traces, i) for i in layers]), layers)


def load_cv(load: ArrayLike) -> float | np.ndarray:
    """Coefficient of variation of the load, CV = std(f) / mean(f) (population std) over the
    last axis. 0 for uniform routing; sqrt(E-1) when one expert takes everything."""
    f = _load(load)
    return _scalar_or_array(np.std(f, axis=-1) / np.mean(f, axis=-1))


def max_over_mean(load: ArrayLike) -> float | np.ndarray:
    """max_e f_e / mean_e f_e over the last axis: 1 when balanced, E at total collapse."""
    f = _load(load)
    return _scalar_or_array(np.max(f, axis=-1) / np.mean(f, axis=-1))


def max_vio(load: ArrayLike) -> float | np.ndarray:
    """DeepSeek-V3's MaxVio = (max_e f_e - mean_e f_e) / mean_e f_e = max/mean - 1: 0 when
    balanced, E - 1 at total collapse."""
    return _scalar_or_array(np.asarray(max_over_mean(load)) - 1.0)


def load_entropy(load: ArrayLike, normalised: bool = False) -> float | np.ndarray:
    """Entropy of the load distribution H(f) = -Σ_e f_e log f_e (nats) over the last axis;
    with ``normalised`` divided by log E so it lies in [0, 1] (1 = uniform)."""
    f = _load(load)
    h = entropy(f, axis=-1)
    if normalised:
        E = f.shape[-1]
        h = h / math.log(E) if E > 1 else np.zeros_like(h)
    return _scalar_or_array(h)


def effective_experts(load: ArrayLike) -> float | np.ndarray:
    """Effective number of experts exp(H(f)) (perplexity of the load): E when uniform, 1 at
    total collapse."""
    return _scalar_or_array(np.exp(np.asarray(load_entropy(load))))


def load_stats(load: ArrayLike) -> dict[str, float]:
    """All balance statistics of one load vector (E,) as a dict: cv, max_over_mean, max_vio,
    entropy (nats), entropy_norm, effective_experts, top_expert, top_share."""
    f = _load(load)
    if f.ndim != 1:
        raise ValueError(f"load_stats takes one load vector (E,), got shape {f.shape}")
    return {"cv": float(load_cv(f)), "max_over_mean": float(max_over_mean(f)),
            "max_vio": float(max_vio(f)), "entropy": float(load_entropy(f)),
            "entropy_norm": float(load_entropy(f, normalised=True)),
            "effective_experts": float(effective_experts(f)),
            "top_expert": int(np.argmax(f)), "top_share": float(np.max(f) / f.sum())}


def switch_aux_loss(traces: Traces, layer: int, coef: float = 1.0) -> float:
    """Switch-Transformer load-balancing loss L_aux = coef · E · Σ_e f_e · P_e.

    f_e is the load fraction (all top-k assignments, :func:`expert_load`) and P_e the mean over
    tokens of softmax(router_logits)_e. Equals coef at perfectly uniform routing and
    coef · E at total collapse. Switch used coef = 1e-2. Needs ``router_logits`` and
    ``topk_indices``. (Llama 4 gates with a sigmoid; the softmax here is the Switch
    definition, used as a balance diagnostic.)
    """
    z = logits(traces, layer, "switch_aux_loss")
    f = expert_load(traces, layer)
    P = softmax(z, axis=-1).mean(axis=0)
    if P.shape != f.shape:
        raise ValueError(f"switch_aux_loss: router_logits have {P.shape[0]} experts but the "
                         f"routing indexes {f.shape[0]}")
    return float(coef * f.shape[0] * np.sum(f * P))


def router_z_loss(traces: Traces, layer: int, coef: float = 1.0) -> float:
    """ST-MoE router z-loss L_z = coef · mean_t (log Σ_e exp z_{t,e})² over all tokens
    (ST-MoE used coef = 1e-3). Needs ``router_logits``."""
    z = logits(traces, layer, "router_z_loss")
    return float(coef * np.mean(logsumexp(z, axis=-1) ** 2))


@dataclass(frozen=True)
class CapacityDrops:
    """Result of :func:`capacity_drops`.

    ``drop_rate``: dropped assignments / all assignments = Σ_e max(0, c_e - C) / (k·T) pooled
    over sequences; ``by_position``: the same fraction at each sequence position (NaN where no
    sequence is that long); ``per_expert``: fraction of each expert's assignments dropped;
    ``token_drop_rate``: fraction of tokens that lost every one of their k experts;
    ``capacity``: C of each sequence (one entry per sequence).
    """

    capacity_factor: float
    capacity: np.ndarray
    drop_rate: float
    token_drop_rate: float
    by_position: np.ndarray
    per_expert: np.ndarray


def capacity_drops(traces: Traces, layer: int, capacity_factor: float = 1.0) -> CapacityDrops:
    """Simulate Switch-style expert capacity on a dropless routing.

    Each sequence (batch row) is one group of T tokens with capacity C = ceil(cf · k · T / E)
    per expert (T: the row's real tokens; pads are left out and positions count from the row's
    first real token, as if the row ran alone). Assignments are admitted first-choice slots
    before second-choice ones (GShard priority) and, within a slot, in position order; an
    expert's assignments beyond C are dropped. Dropping towards the end of the sequence shows
    up in ``by_position``.
    """
    if capacity_factor <= 0:
        raise ValueError(f"capacity_factor must be positive, got {capacity_factor}")
    per = rows(traces, layer, "capacity_drops")
    E = num_experts(traces, layer)
    k = per[0].shape[-1]
    T_max = max(a.shape[0] for a in per)
    drop_pos = np.zeros(T_max)
    tot_pos = np.zeros(T_max)
    drop_e = np.zeros(E)
    tot_e = np.zeros(E)
    caps: list[int] = []
    tokens = dropped_tokens = 0
    for a in per:  # one sequence (T, k)
        T = a.shape[0]
        if T == 0:
            continue
        C = math.ceil(capacity_factor * k * T / E)
        caps.append(C)
        order = a.T.ravel()  # slot-major: all first choices, then second choices ...
        pos = np.tile(np.arange(T), k)
        srt = np.argsort(order, kind="stable")
        e_sorted = order[srt]
        starts = np.searchsorted(e_sorted, e_sorted, side="left")
        rank = np.empty_like(srt)
        rank[srt] = np.arange(len(srt)) - starts
        drop = rank >= C
        np.add.at(drop_pos, pos, drop)
        np.add.at(tot_pos, pos, 1)
        np.add.at(drop_e, order, drop)
        np.add.at(tot_e, order, 1)
        tokens += T
        dropped_tokens += int(np.sum(drop.reshape(k, T).all(axis=0)))
    if tot_pos.sum() == 0:
        raise ValueError(f"capacity_drops: layer {layer} routed no tokens (empty trace)")
    with np.errstate(invalid="ignore", divide="ignore"):
        by_pos = np.where(tot_pos > 0, drop_pos / np.maximum(tot_pos, 1), np.nan)
    per_e = np.divide(drop_e, tot_e, out=np.zeros(E), where=tot_e > 0)
    return CapacityDrops(float(capacity_factor), np.asarray(caps, dtype=np.int64),
                         float(drop_pos.sum() / tot_pos.sum()), dropped_tokens / tokens,
                         by_pos, per_e)


def drop_rate_curve(traces: Traces, layer: int, factors: Sequence[float] = (
        0.5, 0.75, 1.0, 1.25, 1.5, 2.0)) -> np.ndarray:
    """Simulated drop rate (see :func:`capacity_drops`) at each capacity factor, (len(factors),)."""
    as_list(traces)
    return np.array([capacity_drops(traces, layer, cf).drop_rate for cf in factors])
