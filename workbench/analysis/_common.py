"""Shared helpers: trace lists, hook look-ups with clear errors, entropies.

Conventions used by every analysis module:
- ``traces`` is one :class:`~workbench.trace.Trace` or a sequence of them; tokens of all traces
  (every batch row, every position) are concatenated in order (trace, batch row, position).
- Entropies are in nats unless a function says otherwise; Jensen-Shannon divergence is in bits.
- Padding is ignored: tokens a trace's ``attention_mask`` marks as pad are left out of the
  concatenated token arrays (``indices``, ``logits``), of token-aligned labels and ids, and of
  the per-sequence views (``row_tokens``): a padded row's real tokens, in order, are the
  sequence an analysis of consecutive tokens or positions sees, as if the row ran alone.
- Load counts every top-k assignment; "top1" functions use slot 0 of ``topk_indices`` (the first
  choice).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from ..hooks import HookError, absolute, parse
from ..trace import Trace

Traces = Trace | Sequence[Trace]


def as_list(traces: Traces) -> list[Trace]:
    """One trace or a sequence of traces as a non-empty list."""
    if isinstance(traces, Trace):
        return [traces]
    out = list(traces)
    if not out:
        raise ValueError("no traces given: pass a Trace or a non-empty list of Traces")
    for t in out:
        if not isinstance(t, Trace):
            raise TypeError(f"expected workbench Trace objects, got {type(t).__name__}")
    return out


def need(trace: Trace, name: str, what: str) -> np.ndarray:
    """``trace[name]``, or a ValueError that names the hook and how to capture it."""
    if name in trace:
        return np.asarray(trace[name])
    group = _block_glob(name)
    captured = list(trace.keys())
    shown = ", ".join(captured[:8]) + (" ..." if len(captured) > 8 else "")
    raise ValueError(
        f"{what} needs the hook {name!r}, which this trace did not capture; re-run with "
        f"capture=[{name!r}] (or {group!r}). Captured: {shown or 'nothing'}")


def moe_layers(traces: Traces) -> list[int]:
    """MoE layers whose routing (``topk_indices``) was captured in every trace."""
    ts = as_list(traces)
    common = set(ts[0].moe_layers)
    for t in ts[1:]:
        common &= set(t.moe_layers)
    return sorted(common)


def _block_glob(name: str) -> str:
    """``layers.{i}.{block}.*`` for a hook inside a layer block; the name itself otherwise."""
    try:
        h = parse(name)
    except HookError:
        return name
    return absolute(h.layer, f"{h.block}.*") if h.block is not None else name


def _routing_name(layer: int, leaf: str) -> str:
    """The hook name of one MoE routing leaf of ``layer``."""
    return absolute(layer, f"moe.{leaf}")


def indices_per_trace(traces: Traces, layer: int, what: str) -> list[np.ndarray]:
    """Each trace's ``topk_indices`` of ``layer`` as int64 (B, T, k)."""
    out = []
    for t in as_list(traces):
        a = need(t, _routing_name(layer, "topk_indices"), what)
        if a.ndim == 2:
            a = a[..., None]
        out.append(a.astype(np.int64))
    ks = {a.shape[-1] for a in out}
    if len(ks) > 1:
        raise ValueError(f"{what}: traces route to different numbers of experts per token "
                         f"(top-k {sorted(ks)}) at layer {layer}")
    return out


def real_tokens(trace: Trace, a: np.ndarray) -> np.ndarray:
    """A (B, T, ...) hook value of ``trace`` as (N, ...) over its real tokens: every token
    without padding, the ``attention_mask``'s ones with it."""
    if trace.attention_mask is not None:
        m = trace.token_mask()
        if m.shape == a.shape[:2]:
            return a[m]
    return a.reshape(-1, *a.shape[2:])


def row_tokens(trace: Trace, a: np.ndarray) -> list[np.ndarray]:
    """A (B, T, ...) hook value of ``trace`` as one (T_b, ...) array per batch row: the row's
    real tokens in order (all T without padding)."""
    if trace.attention_mask is not None:
        m = trace.token_mask()
        if m.shape == a.shape[:2]:
            return [a[b][m[b]] for b in range(a.shape[0])]
    return list(a)


def rows(traces: Traces, layer: int, what: str) -> list[np.ndarray]:
    """Every sequence's chosen experts at ``layer``: one int64 (T_b, k) array per batch row of
    every trace (order: trace, batch row), pads left out."""
    ts = as_list(traces)
    return [r for t, a in zip(ts, indices_per_trace(ts, layer, what)) for r in row_tokens(t, a)]


def token_ids(trace: Trace) -> np.ndarray:
    """The trace's input ids of its real tokens, flattened (batch row, position): aligned with
    :func:`indices` when the routing covers every position."""
    ids = np.asarray(trace.input_ids)
    if trace.attention_mask is not None and ids.ndim == 2:
        return ids[trace.attention_mask]
    return ids.reshape(-1)


def row_ids(trace: Trace) -> list[np.ndarray]:
    """The trace's input ids of each batch row's real tokens, one array per row."""
    ids = np.asarray(trace.input_ids)
    ids = ids.reshape(1, -1) if ids.ndim == 1 else ids
    if trace.attention_mask is not None:
        return [r[m] for r, m in zip(ids, trace.attention_mask)]
    return list(ids)


def indices(traces: Traces, layer: int, what: str) -> np.ndarray:
    """All real tokens' chosen experts at ``layer``, concatenated: int64 (N, k)."""
    ts = as_list(traces)
    per = indices_per_trace(ts, layer, what)
    return np.concatenate([real_tokens(t, a) for t, a in zip(ts, per)])


def logits_per_trace(traces: Traces, layer: int, what: str) -> list[np.ndarray]:
    """Each trace's ``router_logits`` of ``layer`` as float64 (B, T, E)."""
    return [need(t, _routing_name(layer, "router_logits"), what).astype(np.float64)
            for t in as_list(traces)]


def logits(traces: Traces, layer: int, what: str) -> np.ndarray:
    """All real tokens' router logits at ``layer``, concatenated: float64 (N, E)."""
    ts = as_list(traces)
    per = logits_per_trace(ts, layer, what)
    es = {a.shape[-1] for a in per}
    if len(es) > 1:
        raise ValueError(f"{what}: traces have different numbers of experts {sorted(es)}")
    return np.concatenate([real_tokens(t, a) for t, a in zip(ts, per)])


def num_experts(traces: Traces, layer: int | None = None) -> int:
    """E: from the trace config summary, else the router-logit width, else max index + 1."""
    ts = as_list(traces)
    found = {int(t.config["experts"]) for t in ts if t.config.get("experts")}
    if not found and layer is not None:
        name = _routing_name(layer, "router_logits")
        found = {int(t[name].shape[-1]) for t in ts if name in t}
        if not found:
            idx = indices(ts, layer, "num_experts")
            found = {int(idx.max()) + 1 if idx.size else 1}
    if not found:
        raise ValueError("cannot tell the number of experts: the traces carry no "
                         "meta['config']['experts']; pass a layer whose routing was captured")
    if len(found) > 1:
        raise ValueError(f"traces disagree on the number of experts: {sorted(found)}")
    return found.pop()


def check_index(i: object, what: str, n: int | None = None) -> int:
    """``i`` as an int (a Python or numpy integer; never a truncated float or a bool), in
    ``0..n-1`` when ``n`` is given; ValueError naming ``what`` otherwise."""
    if isinstance(i, bool | np.bool_) or not isinstance(i, int | np.integer):
        raise ValueError(f"{what} must be an int, got {type(i).__name__} {i!r}")
    i = int(i)
    if n is not None and not 0 <= i < n:
        raise ValueError(f"{what} {i} out of range: the model has {n} experts (0..{n - 1})"
                         if "expert" in what else f"{what} {i} out of range 0..{n - 1}")
    return i


def sigmoid(x: np.ndarray) -> np.ndarray:
    """Numerically stable logistic function (float64)."""
    x = np.asarray(x, dtype=np.float64)
    out = np.empty_like(x)
    pos = x >= 0
    out[pos] = 1.0 / (1.0 + np.exp(-x[pos]))
    ex = np.exp(x[~pos])
    out[~pos] = ex / (1.0 + ex)
    return out


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """Softmax along ``axis`` (float64); -inf entries get probability 0."""
    x = np.asarray(x, dtype=np.float64)
    m = np.max(x, axis=axis, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    e = np.exp(x - m)
    return e / np.sum(e, axis=axis, keepdims=True)


def logsumexp(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """log Σ exp(x) along ``axis`` (float64)."""
    x = np.asarray(x, dtype=np.float64)
    m = np.max(x, axis=axis, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    return np.log(np.sum(np.exp(x - m), axis=axis)) + np.squeeze(m, axis=axis)


def entropy(p: np.ndarray, axis: int = -1) -> np.ndarray:
    """Shannon entropy -Σ p log p in nats along ``axis``, with 0 log 0 = 0 (p need not be
    normalised: it is divided by its sum first; an all-zero row has entropy 0)."""
    p = np.asarray(p, dtype=np.float64)
    s = np.sum(p, axis=axis, keepdims=True)
    q = np.divide(p, s, out=np.zeros_like(p), where=s > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(q > 0, -q * np.log(np.where(q > 0, q, 1.0)), 0.0)
    return np.sum(terms, axis=axis)


def mutual_information(joint: np.ndarray) -> tuple[float, float, float]:
    """(I(X;Y), H(X), H(Y)) in nats from a 2-D table of joint counts or probabilities."""
    j = np.asarray(joint, dtype=np.float64)
    total = j.sum()
    if total <= 0:
        return 0.0, 0.0, 0.0
    p = j / total
    hx = float(entropy(p.sum(axis=1)))
    hy = float(entropy(p.sum(axis=0)))
    hxy = float(entropy(p.ravel()))
    return max(hx + hy - hxy, 0.0), hx, hy


def nmi_from_joint(joint: np.ndarray) -> float:
    """Normalised mutual information I(X;Y)/sqrt(H(X)·H(Y)); 0 when either entropy is 0."""
    i, hx, hy = mutual_information(joint)
    if hx <= 0 or hy <= 0:
        return 0.0
    return float(min(i / math.sqrt(hx * hy), 1.0))


def flat_labels(labels: object, n: int, what: str, traces: list[Trace] | None = None
                ) -> np.ndarray:
    """Token-aligned labels as a flat array of length ``n``.

    Accepts one array/list (any shape, flattened in C order) or, when ``traces`` has several
    traces, a list with one array per trace (each flattened, then concatenated).
    """
    if traces is not None and len(traces) > 1 and isinstance(labels, list | tuple) \
            and len(labels) == len(traces) and all(
                np.size(x) == t.input_ids.size for x, t in zip(labels, traces)) \
            and sum(np.size(x) for x in labels) == n:
        arr = np.concatenate([np.asarray(x, dtype=object).ravel() for x in labels])
    else:
        arr = np.asarray(labels, dtype=object).ravel()
    if traces is not None and arr.size != n and any(t.attention_mask is not None
                                                    for t in traces):
        keep = np.concatenate([t.token_mask().ravel() for t in traces])
        if keep.size == arr.size and int(keep.sum()) == n:  # labels for pads too: drop them
            arr = arr[keep]
    if arr.size != n:
        raise ValueError(f"{what}: got {arr.size} labels for {n} tokens; pass one label per "
                         "token, aligned with trace.input_ids (flattened over batch and "
                         "position, traces concatenated)")
    return arr
