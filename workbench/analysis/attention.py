"""Attention statistics from captured patterns ``layers.{i}.attn.pattern`` (B, H, Tq, Tk).

Per head, averaged over every query of every sequence (all traces pooled):
- entropy H_q = -Σ_k a_qk log a_qk (nats);
- mean attention distance Σ_k a_qk (q - k) (in tokens);
- sink mass a_q0 (attention on the first token), over queries q ≥ 1 (query 0 can only see
  itself);
- cross-chunk mass Σ_{k < c(q)} a_qk for queries q ≥ chunk, where c(q) = chunk · ⌊q/chunk⌋ is
  the start of the query's chunk: the attention that crosses a chunk boundary. It is 0 by
  construction on chunked (RoPE) layers and shows how much global (NoPE) layers reach back.

When Tq < Tk (a decode step or a query slice) the queries are taken to be the last Tq
positions. Layer types come from the trace's config summary: a layer in ``nope_layers`` is
``"global"`` (NoPE), other layers are ``"chunked"`` when ``chunk`` is set, else
``"global-rope"``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ..hooks import HookError, parse
from ..trace import Trace
from ._common import Traces, as_list, need


def pattern_layers(traces: Traces) -> list[int]:
    """Layers whose attention pattern was captured in every trace."""
    ts = as_list(traces)
    sets = [{layer for n in t if (layer := _pattern_layer(n)) is not None} for t in ts]
    return sorted(set.intersection(*sets))


def _pattern_layer(name: str) -> int | None:
    """The layer of a ``layers.{i}.attn.pattern`` name; None for any other name."""
    try:
        h = parse(name)
    except HookError:
        return None
    return h.layer if (h.block, h.site) == ("attn", "pattern") else None


def _patterns(traces: Traces, layer: int, what: str) -> list[tuple[np.ndarray, np.ndarray]]:
    """[(pattern float32/64 (B, H, Tq, Tk), query positions (Tq,))] per trace."""
    out = []
    for t in as_list(traces):
        a = need(t, f"layers.{layer}.attn.pattern", what)
        if a.dtype not in (np.float32, np.float64):  # bf16 / fp16 captures
            a = a.astype(np.float32)
        if a.ndim != 4:
            raise ValueError(f"{what}: attention pattern must be (B, H, Tq, Tk), got {a.shape}")
        tq, tk = a.shape[-2:]
        if tq > tk:
            raise ValueError(f"{what}: pattern has more queries ({tq}) than keys ({tk})")
        out.append((a, np.arange(tk - tq, tk)))
    return out


def _per_query(traces: Traces, layer: int, what: str, fn: Any, min_q: int = 0) -> np.ndarray:
    """Mean over queries (q ≥ min_q) of fn(pattern, q_pos, k_pos) -> (B, H, Tq): (H,)."""
    tot, cnt = None, 0
    for a, qpos in _patterns(traces, layer, what):
        kpos = np.arange(a.shape[-1])
        vals = fn(a, qpos, kpos)
        keep = qpos >= min_q
        v = vals[:, :, keep]
        s = v.sum(axis=(0, 2), dtype=np.float64)
        tot = s if tot is None else tot + s
        cnt += v.shape[0] * v.shape[2]
    if cnt == 0:
        raise ValueError(f"{what}: no query qualifies (sequence too short)")
    return tot / cnt


def attention_entropy(traces: Traces, layer: int) -> np.ndarray:
    """Per-head mean entropy of the attention rows, mean_q -Σ_k a_qk log a_qk (nats), (H,)."""
    def f(a: np.ndarray, q: np.ndarray, k: np.ndarray) -> np.ndarray:
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(a > 0, -a * np.log(np.where(a > 0, a, 1.0)), 0.0).sum(axis=-1)
    return _per_query(traces, layer, "attention_entropy", f)


def mean_attention_distance(traces: Traces, layer: int) -> np.ndarray:
    """Per-head mean attention distance mean_q Σ_k a_qk (q - k), in tokens, (H,)."""
    def f(a: np.ndarray, q: np.ndarray, k: np.ndarray) -> np.ndarray:
        return (a * (q[:, None] - k[None, :])).sum(axis=-1)
    return _per_query(traces, layer, "mean_attention_distance", f)


def sink_mass(traces: Traces, layer: int, sink: int = 0) -> np.ndarray:
    """Per-head mean attention on key position ``sink`` (default the first token), over
    queries q > sink, (H,)."""
    def f(a: np.ndarray, q: np.ndarray, k: np.ndarray) -> np.ndarray:
        return a[..., sink]
    return _per_query(traces, layer, "sink_mass", f, min_q=sink + 1)


def _chunk(traces: Traces, chunk: int | None, what: str) -> int:
    if chunk is None:
        found = {t.config.get("chunk") for t in as_list(traces)}
        found.discard(None)
        if len(found) != 1:
            raise ValueError(f"{what}: pass chunk=...; the traces' config gives "
                             f"{sorted(found) or 'no attention chunk size'}")
        chunk = int(found.pop())
    if chunk < 1:
        raise ValueError(f"{what}: chunk must be positive, got {chunk}")
    return int(chunk)


def cross_chunk_mass(traces: Traces, layer: int, chunk: int | None = None) -> np.ndarray:
    """Per-head mean attention mass on keys before the query's chunk, Σ_{k < c(q)} a_qk, over
    queries q ≥ chunk, (H,). ``chunk`` defaults to the config's attention chunk size; the
    sequence must be longer than it."""
    c = _chunk(traces, chunk, "cross_chunk_mass")

    def f(a: np.ndarray, q: np.ndarray, k: np.ndarray) -> np.ndarray:
        start = (q // c) * c
        return (a * (k[None, :] < start[:, None])).sum(axis=-1)
    try:
        return _per_query(traces, layer, "cross_chunk_mass", f, min_q=c)
    except ValueError:
        raise ValueError(f"cross_chunk_mass: no query lies past the first chunk boundary "
                         f"(chunk={c}); use sequences longer than {c} tokens or pass a "
                         "smaller chunk=") from None


def distance_by_chunk_offset(traces: Traces, layer: int, chunk: int | None = None
                             ) -> np.ndarray:
    """Mean attention distance (over heads and queries) as a function of the query's offset
    within its chunk, q mod chunk: (min(chunk, T),). On chunked layers it is bounded by the
    offset and resets at every boundary; on global layers it keeps growing."""
    c = _chunk(traces, chunk, "distance_by_chunk_offset")
    tot = np.zeros(c)
    cnt = np.zeros(c)
    for a, qpos in _patterns(traces, layer, "distance_by_chunk_offset"):
        kpos = np.arange(a.shape[-1])
        dist = (a * (qpos[:, None] - kpos[None, :])).sum(axis=-1).mean(axis=(0, 1))
        np.add.at(tot, qpos % c, dist)
        np.add.at(cnt, qpos % c, 1)
    n = int(np.max(np.flatnonzero(cnt > 0))) + 1 if cnt.any() else 0
    return tot[:n] / np.maximum(cnt[:n], 1)


def distance_edges(max_distance: int) -> np.ndarray:
    """Default distance bucket edges 0, 1, 2, 4, 8, … past ``max_distance`` (bucket i covers
    edges[i] ≤ q - k < edges[i+1])."""
    edges = [0, 1]
    while edges[-1] <= max_distance:
        edges.append(edges[-1] * 2)
    return np.asarray(edges, dtype=np.int64)


def distance_histogram(traces: Traces, layer: int, edges: Sequence[int] | None = None
                       ) -> tuple[np.ndarray, np.ndarray]:
    """Attention mass by query-key distance: (hist (H, n_buckets), edges). Row h is the mean
    over queries of the mass head h puts in each distance bucket, so each row sums to 1."""
    pats = _patterns(traces, layer, "distance_histogram")
    if edges is None:
        edges = distance_edges(max(p.shape[-1] for p, _ in pats) - 1)
    e = np.asarray(edges, dtype=np.int64)
    nb = e.size - 1
    tot = np.zeros((pats[0][0].shape[1], nb))
    cnt = 0
    for a, qpos in pats:
        d = qpos[:, None] - np.arange(a.shape[-1])[None, :]
        bucket = np.searchsorted(e, d, side="right") - 1
        valid = (d >= e[0]) & (d < e[-1])
        summed = a.sum(axis=0)  # (H, Tq, Tk), summed over batch
        for b in range(nb):
            m = valid & (bucket == b)
            tot[:, b] += (summed * m).sum(axis=(-1, -2))
        cnt += a.shape[0] * a.shape[2]
    return tot / cnt, e


def layer_type(trace: Trace, layer: int) -> str:
    """"global" (NoPE), "chunked" (RoPE with a chunk size) or "global-rope" (RoPE, no chunk),
    from the trace's config summary (``nope_layers``, ``chunk``)."""
    cfg = trace.config
    if "nope_layers" not in cfg:
        raise ValueError("layer_type: the trace's meta['config'] has no 'nope_layers'")
    if layer in cfg["nope_layers"]:
        return "global"
    return "chunked" if cfg.get("chunk") else "global-rope"


def attention_summary(traces: Traces, layers: Sequence[int] | None = None,
                      chunk: int | None = None) -> list[dict[str, Any]]:
    """One row per layer with a captured pattern: layer, type, heads, entropy, distance, sink
    (head means), cross_chunk (NaN when no query lies past the first chunk boundary)."""
    ts = as_list(traces)
    layers = pattern_layers(ts) if layers is None else list(layers)
    rows = []
    for i in layers:
        ent = attention_entropy(ts, i)
        try:
            cross = float(cross_chunk_mass(ts, i, chunk).mean())
        except ValueError:
            cross = float("nan")
        try:
            sink = float(sink_mass(ts, i).mean())
        except ValueError:
            sink = float("nan")
        rows.append({"layer": i, "type": layer_type(ts[0], i), "heads": int(ent.size),
                     "entropy": float(ent.mean()),
                     "distance": float(mean_attention_distance(ts, i).mean()),
                     "sink": sink, "cross_chunk": cross})
    return rows


def by_layer_type(traces: Traces, layers: Sequence[int] | None = None,
                  chunk: int | None = None, edges: Sequence[int] | None = None
                  ) -> dict[str, dict[str, Any]]:
    """Chunked-RoPE vs global-NoPE comparison: {type: {layers, entropy, distance, sink,
    cross_chunk, distance_hist (n_buckets,), edges}} with metrics averaged over the type's
    layers and heads; distance_hist is the pooled mass per distance bucket (sums to 1)."""
    ts = as_list(traces)
    rows = attention_summary(ts, layers, chunk)
    if not rows:
        raise ValueError("by_layer_type: no attention pattern captured; re-run with "
                         "capture=['*.attn.pattern'] (or 'layers.{i}.attn.pattern')")
    if edges is None:
        edges = distance_edges(max(t.input_ids.shape[-1] for t in ts) - 1)
    out: dict[str, dict[str, Any]] = {}
    for kind in sorted({r["type"] for r in rows}):
        rs = [r for r in rows if r["type"] == kind]
        hists = [distance_histogram(ts, r["layer"], edges)[0].mean(axis=0) for r in rs]
        out[kind] = {"layers": [r["layer"] for r in rs],
                     **{m: float(np.nanmean([r[m] for r in rs])) if not all(
                         np.isnan(r[m]) for r in rs) else float("nan")
                        for m in ("entropy", "distance", "sink", "cross_chunk")},
                     "distance_hist": np.mean(hists, axis=0), "edges": np.asarray(edges)}
    return out
