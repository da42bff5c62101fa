"""Long-context attention and routing, from hooks that never hold a T × T pattern.

Attention statistics come from ``layers.{i}.attn.summary`` (B, H, S, F), which the model computes
blockwise in float32, so they work at 32k tokens and beyond. The last axis is
:data:`workbench.numerics.SUMMARY_FEATURES`, per head and query position:

- ``entropy`` (nats), ``own_chunk`` (mass inside the query's attention chunk), ``sink`` (mass on
  position 0), ``distance`` (expected query - key distance, in positions), ``max`` (largest
  weight);
- the attention mass in 25 log-spaced query - key distance buckets, named by
  :func:`~workbench.numerics.distance_bucket_labels` ("d=0", "d=1", "d[2,4)", ...,
  "d>=8388608"), lower edges :func:`~workbench.numerics.distance_bucket_edges`; they sum to 1.

The S summary rows are at the positions the trace's ``meta["positions"]`` records (a run with
``positions=``), else the *last* S positions of the input (the whole sequence, or a window that
ends at the last token), as for windowed patterns in :mod:`.attention`. Routing statistics
use slot 0 of ``moe.topk_indices`` (each token's first choice), aligned the same way.

Tables are lists of dicts with scalar values (one row per layer, per head, per position bin),
the convention of :func:`.attention.attention_summary`; ``pandas.DataFrame(rows)`` turns one
into a data frame. Query positions are 0-based absolute positions; position bins are
half-open ``[lo, hi)`` (:func:`position_bins`). Jensen-Shannon divergences are in bits.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..hooks import HookError, parse
from ..interventions import disable_temperature
from ..numerics import SUMMARY_FEATURES, distance_bucket_labels, temperature_scales
from ..trace import Trace
from ._common import Traces, as_list, indices_per_trace, moe_layers, need, num_experts
from .attention import distance_edges, layer_type
from .specialisation import js_divergence

#: Readable names of the layer types of :func:`.attention.layer_type`.
LAYER_KINDS: dict[str, str] = {"chunked": "chunked RoPE", "global": "global NoPE",
                               "global-rope": "global RoPE"}

#: Index of each feature on the last axis of ``attn.summary``.
FEATURE_INDEX: dict[str, int] = {f: j for j, f in enumerate(SUMMARY_FEATURES)}

#: The distance-bucket features, in order of distance.
BUCKETS: tuple[str, ...] = distance_bucket_labels()

_FIRST_BUCKET = FEATURE_INDEX[BUCKETS[0]]
_SCALES = ("log", "linear")


# ----------------------------------------------------------------------------- helpers
def summary_hook(layer: int) -> str:
    """The hook name of ``layer``'s attention summary, ``layers.{layer}.attn.summary``."""
    return f"layers.{int(layer)}.attn.summary"


def layer_kind(trace: Trace, layer: int) -> str:
    """"chunked RoPE", "global NoPE" or "global RoPE" for a layer, from the trace's config
    summary (see :func:`.attention.layer_type`)."""
    kind = layer_type(trace, layer)
    return LAYER_KINDS.get(kind, kind)


def summary_layers(traces: Traces) -> list[int]:
    """Layers whose ``attn.summary`` was captured in every trace."""
    ts = as_list(traces)
    sets = [{h.layer for n in t if (h := _parsed(n)) is not None
             and (h.block, h.site) == ("attn", "summary")} for t in ts]
    return sorted(set.intersection(*sets))


def _parsed(name: str) -> Any:
    try:
        return parse(name)
    except HookError:
        return None


def _row_positions(trace: Trace, rows: int, what: str) -> np.ndarray:
    """Absolute positions of the ``rows`` captured sequence rows: those the trace's
    ``meta["positions"]`` names (``run(..., positions=...)``), else the input's last ``rows``."""
    T = int(trace.input_ids.shape[-1])
    kept = trace.meta.get("positions")
    if kept is not None and len(kept) == rows:
        return np.asarray(kept, np.int64)
    if rows > T:
        raise ValueError(f"{what}: {rows} captured positions but the input has only {T}")
    return np.arange(T - rows, T)


def _summaries(traces: Traces, layer: int, what: str) -> list[tuple[np.ndarray, np.ndarray]]:
    """[(summary (B, H, S, F) as captured, query positions (S,))] per trace."""
    out = []
    F = len(SUMMARY_FEATURES)
    for t in as_list(traces):
        a = need(t, summary_hook(layer), what)
        if a.ndim != 4 or a.shape[-1] != F:
            raise ValueError(f"{what}: {summary_hook(layer)} must be (B, H, S, {F}) (the "
                             f"features of workbench.numerics.SUMMARY_FEATURES), got {a.shape}")
        if a.dtype not in (np.float32, np.float64):
            a = a.astype(np.float32)
        out.append((a, _row_positions(t, a.shape[2], what)))
    return out


def _layers(traces: Traces, layers: Sequence[int] | None, what: str) -> list[int]:
    out = summary_layers(traces) if layers is None else [int(i) for i in layers]
    if not out:
        raise ValueError(f"{what}: no attention summary captured; re-run with "
                         "capture=['*.attn.summary'] (or 'layers.{i}.attn.summary')")
    return out


def _feature(feature: str, what: str) -> int:
    if feature not in FEATURE_INDEX:
        raise ValueError(f"{what}: unknown feature {feature!r}; choose one of "
                         f"{', '.join(SUMMARY_FEATURES[:5])} or a distance bucket "
                         f"({BUCKETS[0]!r} ... {BUCKETS[-1]!r})")
    return FEATURE_INDEX[feature]


def _kind_cols(trace: Trace, layer: int) -> dict[str, Any]:
    return {"type": layer_type(trace, layer), "kind": layer_kind(trace, layer)}


def position_bins(length: int, bins: int = 16, scale: str = "log", min_width: int = 1
                  ) -> np.ndarray:
    """Edges (n + 1,) int64 of query-position bins covering ``[0, length)``: bin j is
    ``edges[j] <= q < edges[j + 1]``.

    ``scale="log"``: ``[0, 1)`` and then about ``bins - 1`` geometrically growing bins from 1
    to ``length`` (position 0 alone; the early bins are narrow, and duplicates are merged, so
    there may be fewer than ``bins``); ``"linear"``: ``bins`` equal bins. ``min_width`` merges
    bins narrower than that many positions into the next one (the last into the previous).
    """
    length = int(length)
    if length < 1:
        raise ValueError(f"position_bins: length must be >= 1, got {length}")
    if int(bins) < 1:
        raise ValueError(f"position_bins: bins must be >= 1, got {bins}")
    if scale == "log":
        inner = np.round(np.geomspace(1, length, max(int(bins), 2))).astype(np.int64)
        e = np.unique(np.concatenate([[0], inner, [length]]))
    elif scale == "linear":
        e = np.unique(np.round(np.linspace(0, length, int(bins) + 1)).astype(np.int64))
    else:
        raise ValueError(f"position_bins: scale must be one of {_SCALES}, got {scale!r}")
    keep = [int(e[0])]
    for x in e[1:-1]:
        if x - keep[-1] >= min_width:
            keep.append(int(x))
    if length - keep[-1] < min_width and len(keep) > 1:
        keep.pop()
    keep.append(length)
    return np.asarray(keep, np.int64)


def _edges(length: int, bins: int | Sequence[int], scale: str, min_width: int,
           what: str) -> np.ndarray:
    if isinstance(bins, int | np.integer) and not isinstance(bins, bool):
        return position_bins(length, int(bins), scale, min_width)
    e = np.asarray(bins, dtype=np.int64).ravel()
    if e.size < 2 or np.any(np.diff(e) <= 0):
        raise ValueError(f"{what}: bins must be a number of bins or at least two strictly "
                         f"increasing position edges, got {bins!r}")
    return e


def _max_length(traces: Traces) -> int:
    return max(int(t.input_ids.shape[-1]) for t in as_list(traces))


# ----------------------------------------------------------------------------- distances
def summary_past(traces: Traces, layer: int, position: int = 0
                 ) -> tuple[np.ndarray, np.ndarray]:
    """The attention summaries of ``layer`` for every query at ``position`` or later, pooled
    over traces and batch rows: (values (N, H, F) as captured, query positions (N,)), N =
    number of qualifying (sequence, query) pairs. Use it to look only past a chunk boundary,
    past ``floor_scale``, or past the training context."""
    vals, poss = [], []
    H = None
    for a, q in _summaries(traces, layer, "summary_past"):
        keep = q >= position
        b = a[:, :, keep]  # (B, H, S', F)
        H = a.shape[1]
        vals.append(np.moveaxis(b, 1, 2).reshape(-1, a.shape[1], a.shape[3]))
        poss.append(np.broadcast_to(q[keep], (a.shape[0], int(keep.sum()))).ravel())
    return (np.concatenate(vals) if vals else np.zeros((0, H or 0, len(SUMMARY_FEATURES))),
            np.concatenate(poss))


def distance_profile(traces: Traces, layers: Sequence[int] | None = None,
                     per_head: bool = False, min_position: int = 0) -> list[dict[str, Any]]:
    """Where attention goes, by query - key distance, per layer (and head with ``per_head``).

    One row per layer (per layer and head): ``layer``, ``type`` ("chunked" / "global" /
    "global-rope"), ``kind`` ("chunked RoPE" / "global NoPE" / "global RoPE"), [``head``],
    ``queries`` (query positions pooled, over traces and batch rows), ``distance`` (mean
    expected distance, positions), ``sink`` (mean mass on position 0), and one column per
    distance bucket (:data:`BUCKETS`: "d=0", "d=1", "d[2,4)", ...) holding the mean attention
    mass in that bucket (mean over queries, batch rows and, unless ``per_head``, heads; the
    bucket columns of a row sum to 1). Only queries at ``min_position`` or later count
    (:func:`distance_profile_past`). Reads ``layers.{i}.attn.summary`` (default: every layer
    that has one)."""
    ts = as_list(traces)
    rows = []
    for i in _layers(ts, layers, "distance_profile"):
        v, _ = summary_past(ts, i, min_position)
        if v.shape[0] == 0:
            raise ValueError(f"distance_profile: no query at position >= {min_position} "
                             f"(the longest input has {_max_length(ts)} tokens)")
        mean = v.sum(axis=0, dtype=np.float64) / v.shape[0]  # (H, F)
        kinds = _kind_cols(ts[0], i)
        per = [(h, mean[h]) for h in range(mean.shape[0])] if per_head \
            else [(None, mean.mean(axis=0))]
        for h, m in per:
            row: dict[str, Any] = {"layer": i, **kinds}
            if h is not None:
                row["head"] = h
            row.update({"queries": int(v.shape[0]),
                        "distance": float(m[FEATURE_INDEX["distance"]]),
                        "sink": float(m[FEATURE_INDEX["sink"]])})
            row.update({b: float(m[_FIRST_BUCKET + j]) for j, b in enumerate(BUCKETS)})
            rows.append(row)
    return rows


def distance_profile_past(traces: Traces, position: int, layers: Sequence[int] | None = None,
                          per_head: bool = False) -> list[dict[str, Any]]:
    """:func:`distance_profile` over queries at ``position`` or later only (e.g. past the
    first chunk, or past ``floor_scale`` where the query temperature is above 1)."""
    return distance_profile(traces, layers, per_head, min_position=position)


# ----------------------------------------------------------------------------- by position
def summary_by_position(traces: Traces, feature: str = "entropy",
                        layers: Sequence[int] | None = None, bins: int | Sequence[int] = 16,
                        scale: str = "log", per_head: bool = False, min_width: int = 1
                        ) -> list[dict[str, Any]]:
    """One ``attn.summary`` feature averaged over query-position bins, per layer (and head).

    ``feature``: "entropy", "own_chunk", "sink", "distance", "max" or a distance bucket
    ("d[64,128)", ...). ``bins``: a number of bins (:func:`position_bins` over the longest
    input, with ``scale`` "log" or "linear" and ``min_width``) or explicit edges. One row per
    layer [and head] and non-empty bin: ``layer``, ``type``, ``kind``, [``head``], ``lo``,
    ``hi`` (the bin ``[lo, hi)``), ``position`` (mean query position in the bin),
    ``queries`` (query positions pooled over traces and batch rows) and ``feature`` (the mean
    over those queries and, unless ``per_head``, heads)."""
    ts = as_list(traces)
    j = _feature(feature, "summary_by_position")
    edges = _edges(_max_length(ts), bins, scale, min_width, "summary_by_position")
    nb = edges.size - 1
    rows = []
    for i in _layers(ts, layers, "summary_by_position"):
        tot = cnt = psum = None
        for a, q in _summaries(ts, i, "summary_by_position"):
            B, H = a.shape[:2]
            if tot is None:
                tot, cnt, psum = np.zeros((nb, H)), np.zeros(nb), np.zeros(nb)
            b = np.searchsorted(edges, q, side="right") - 1
            ok = (b >= 0) & (b < nb)
            x = a[:, :, ok, j].sum(axis=0, dtype=np.float64).T  # (S', H), summed over batch
            np.add.at(tot, b[ok], x)
            np.add.at(cnt, b[ok], B)
            np.add.at(psum, b[ok], B * q[ok].astype(np.float64))
        kinds = _kind_cols(ts[0], i)
        for k in np.flatnonzero(cnt > 0):
            m = tot[k] / cnt[k]
            base = {"layer": i, **kinds}
            per = [(h, m[h]) for h in range(m.size)] if per_head else [(None, m.mean())]
            for h, val in per:
                row = dict(base)
                if h is not None:
                    row["head"] = h
                row.update({"lo": int(edges[k]), "hi": int(edges[k + 1]),
                            "position": float(psum[k] / cnt[k]), "queries": int(cnt[k]),
                            feature: float(val)})
                rows.append(row)
    return rows


# ----------------------------------------------------------------------------- temperature
def temperature_effect(model: Any, input_ids: Any, layer: int | None = None,
                       bins: int | Sequence[int] = 16, scale: str = "log",
                       features: Sequence[str] = ("entropy", "distance", "max"),
                       trace: Trace | None = None) -> list[dict[str, Any]]:
    """What the query temperature of the global NoPE layers does, by query position.

    Runs ``model`` on ``input_ids`` twice, capturing only the temperature layers'
    ``attn.summary``: as it is ("on") and with ``wb.disable_temperature(layer)`` ("off").
    ``layer``: one layer that scales its queries by temperature (``config.uses_temperature``);
    None: every such layer (all disabled together in the "off" run). ``trace``: a trace of an
    earlier plain run (no interventions) on the same ``input_ids`` that captured those
    summaries over every position; it is used as the "on" run instead of running again.

    One row per layer and non-empty position bin (``bins``/``scale`` as in
    :func:`summary_by_position`): ``layer``, ``lo``, ``hi``, ``position`` (mean query
    position), ``queries``, ``temperature`` (mean query temperature over the bin's positions:
    ``1 + attn_scale * log1p(floor((q + 1) / floor_scale))``, exactly 1 below
    ``floor_scale - 1``), ``uniform_entropy`` (mean log(q + 1): the entropy of uniform
    attention over the visible keys of a global layer) and, for each feature f,
    ``f_on``, ``f_off`` and ``f_diff = f_on - f_off`` (means over heads, batch rows and the
    bin's queries). A temperature above 1 sharpens the softmax, so past ``floor_scale``
    expect ``entropy_diff < 0`` and ``max_diff > 0``."""
    cfg = model.config
    hot = [i for i in range(cfg.num_hidden_layers) if cfg.uses_temperature(i)]
    if not hot:
        raise ValueError("temperature_effect: no layer of this model scales its queries by "
                         "temperature (attn_temperature_tuning is off or every layer uses RoPE)")
    if layer is not None and int(layer) not in hot:
        raise ValueError(f"temperature_effect: layer {layer} has no query temperature "
                         f"(layers with one: {hot})")
    layers = hot if layer is None else [int(layer)]
    for f in features:
        _feature(f, "temperature_effect")
    ids = model.check_ids(input_ids)
    names = [summary_hook(i) for i in layers]
    if trace is None:
        on = model.run(ids, capture=names).trace
    else:
        missing = [n for n in names if n not in trace]
        if missing or trace.meta.get("interventions") or trace.input_ids.shape != ids.shape \
                or not np.array_equal(trace.input_ids, ids) \
                or any(trace[n].shape[2] != ids.shape[1] for n in names):
            raise ValueError(
                "temperature_effect: trace= must come from a plain run (no interventions) on "
                f"the same input_ids that captured {names} at every position"
                + (f"; it lacks {missing}" if missing else ""))
        on = trace
    off = model.run(ids, capture=names, interventions=[disable_temperature(layer)]).trace
    edges = _edges(ids.shape[1], bins, scale, 1, "temperature_effect")
    pos = np.arange(ids.shape[1])
    temp = temperature_scales(pos, cfg).astype(np.float64)
    uni = np.log1p(pos.astype(np.float64))
    rows = []
    for i in layers:
        keyed: dict[tuple[int, int], dict[str, Any]] = {}
        for f in features:
            for tag, t in (("on", on), ("off", off)):
                for r in summary_by_position(t, f, [i], edges):
                    row = keyed.setdefault((r["lo"], r["hi"]), {
                        "layer": i, "lo": r["lo"], "hi": r["hi"], "position": r["position"],
                        "queries": r["queries"],
                        "temperature": float(temp[r["lo"]:r["hi"]].mean()),
                        "uniform_entropy": float(uni[r["lo"]:r["hi"]].mean())})
                    row[f"{f}_{tag}"] = r[f]
        for key in sorted(keyed):
            row = keyed[key]
            for f in features:
                row[f"{f}_diff"] = row[f"{f}_on"] - row[f"{f}_off"]
            rows.append(row)
    return rows


# ----------------------------------------------------------------------------- routing
def _top1_per_trace(traces: Traces, layer: int, what: str
                    ) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """[(first-choice experts (B, S), token positions (S,), token ids (B, S))] per trace."""
    out = []
    for t, a in zip(as_list(traces), indices_per_trace(traces, layer, what)):
        pos = _row_positions(t, a.shape[1], what)
        ids = np.asarray(t.input_ids)
        ids = ids.reshape(1, -1) if ids.ndim == 1 else ids
        out.append((a[..., 0], pos, ids[:, pos]))
    return out


def _moe(traces: Traces, layers: Sequence[int] | None, what: str) -> list[int]:
    out = moe_layers(traces) if layers is None else [int(i) for i in layers]
    if not out:
        raise ValueError(f"{what}: no MoE routing captured; re-run with "
                         "capture=['*.moe.topk_indices'] (or 'layers.{i}.moe.topk_indices')")
    return out


def routing_by_position(traces: Traces, bins: int | Sequence[int] = 16, scale: str = "log",
                        layers: Sequence[int] | None = None, min_width: int = 32
                        ) -> list[dict[str, Any]]:
    """First-choice expert distribution by token position, per MoE layer, and how far it is
    from the layer's overall distribution.

    ``bins``: a number of bins (:func:`position_bins` over the longest input, ``scale`` "log"
    or "linear"; bins narrower than ``min_width`` positions are merged, since a bin of a few
    tokens gives a noisy distribution) or explicit edges. One row per layer and non-empty bin:
    ``layer``, ``lo``, ``hi``, ``position`` (mean position), ``tokens``, ``fractions``
    (ndarray (E,): share of the bin's tokens whose first choice is each expert), ``top_expert``,
    ``top_share``, ``js`` (Jensen-Shannon divergence in bits between the bin's distribution
    and the layer's distribution over all tokens) and ``js_noise`` = (E - 1) / (8 ln 2 ·
    tokens), the expected JS of a bin of that many tokens drawn from the overall distribution
    (small bins diverge by sampling alone; compare ``js`` with it). Reads
    ``layers.{i}.moe.topk_indices`` (default: every MoE layer captured). Pads are left out and
    a padded row's positions count from its first real token."""
    ts = as_list(traces)
    edges = _edges(_max_length(ts), bins, scale, min_width, "routing_by_position")
    nb = edges.size - 1
    rows = []
    for i in _moe(ts, layers, "routing_by_position"):
        E = num_experts(ts, i)
        counts = np.zeros((nb, E))
        psum = np.zeros(nb)
        for t, (top, pos, _) in zip(ts, _top1_per_trace(ts, i, "routing_by_position")):
            pos = np.broadcast_to(pos, top.shape)
            real = np.ones(top.shape, bool)
            if t.attention_mask is not None and t.attention_mask.shape[0] == top.shape[0]:
                # pads left out; positions count from each row's first real token
                real = t.attention_mask[:, pos[0]]
                pos = (np.cumsum(t.attention_mask, axis=1) - 1)[:, pos[0]]
            bb = np.searchsorted(edges, pos, side="right") - 1
            ok = (bb >= 0) & (bb < nb) & real
            np.add.at(counts, (bb[ok], top[ok]), 1)
            np.add.at(psum, bb[ok], pos[ok])
        overall = counts.sum(axis=0)
        for k in np.flatnonzero(counts.sum(axis=1) > 0):
            n = counts[k].sum()
            frac = counts[k] / n
            rows.append({"layer": i, "lo": int(edges[k]), "hi": int(edges[k + 1]),
                         "position": float(psum[k] / n), "tokens": int(n), "fractions": frac,
                         "top_expert": int(frac.argmax()), "top_share": float(frac.max()),
                         "js": js_divergence(counts[k], overall),
                         "js_noise": (E - 1) / (8 * math.log(2) * n)})
    return rows


def repeat_consistency(traces: Traces, input_ids: Any = None,
                       layers: Sequence[int] | None = None, edges: Sequence[int] | None = None,
                       seed: int = 0) -> list[dict[str, Any]]:
    """Does a token that occurs again get the same expert it got the first time?

    For every position p whose token id already occurred earlier in the same sequence (batch
    row), with first occurrence p0, the pair (p0, p) is *same* when the first-choice expert at p
    equals the one at p0. Pairs are grouped by the distance d = p - p0 in log buckets
    ``edges`` (default 1, 2, 4, 8, ...: bucket ``[lo, hi)``).

    One row per MoE layer and non-empty bucket: ``layer``, ``lo``, ``hi``, ``pairs``, ``same``
    (fraction of same pairs), ``control`` (the same-expert rate of random position pairs
    (t, t + d) at the same distances: one per repeat pair, t uniform, drawn with ``seed``; it
    separates "same token" from "nearby tokens route alike") and ``chance`` (Σ_e f_e², f = the
    layer's first-choice load: two independent tokens). ``input_ids``: the token ids, (B, T)
    or (T,) for one trace, or one array per trace; default each trace's ``input_ids``."""
    ts = as_list(traces)
    if input_ids is None:
        id_list = [None] * len(ts)
    elif len(ts) > 1 and isinstance(input_ids, list | tuple) and len(input_ids) == len(ts):
        id_list = list(input_ids)
    else:
        if len(ts) != 1:
            raise ValueError("repeat_consistency: with several traces pass one id array per "
                             "trace (or none, to use each trace's input_ids)")
        id_list = [input_ids]
    rng = np.random.default_rng(seed)
    lays = _moe(ts, layers, "repeat_consistency")
    # the repeat pairs (sequence, p0, p) and their controls, shared by every layer
    pairs: list[tuple[int, int, np.ndarray, np.ndarray, np.ndarray]] = []
    for ti, (t, given) in enumerate(zip(ts, id_list)):
        ids = np.asarray(t.input_ids if given is None else given)
        ids = ids.reshape(1, -1) if ids.ndim == 1 else ids
        own = np.asarray(t.input_ids)
        if ids.shape != (own.reshape(1, -1) if own.ndim == 1 else own).shape:
            raise ValueError(f"repeat_consistency: input_ids {ids.shape} do not match the "
                             f"trace's input {t.input_ids.shape}")
        for b, row in enumerate(ids):
            T = row.size
            _, first, inv = np.unique(row, return_index=True, return_inverse=True)
            p0 = first[inv.ravel()]
            p = np.arange(T)
            later = p0 < p
            if not later.any():
                continue
            d = p[later] - p0[later]
            start = np.floor(rng.random(d.size) * (T - d)).astype(np.int64)
            pairs.append((ti, b, np.stack([p0[later], p[later]]), d, start))
    if not pairs:
        raise ValueError("repeat_consistency: no token id occurs twice in any sequence")
    dmax = max(int(x[3].max()) for x in pairs)
    e = distance_edges(dmax) if edges is None else np.asarray(edges, np.int64)
    nb = e.size - 1
    rows = []
    for i in lays:
        per = _top1_per_trace(ts, i, "repeat_consistency")
        same, ctrl, cnt, cntc = np.zeros(nb), np.zeros(nb), np.zeros(nb), np.zeros(nb)
        E = num_experts(ts, i)
        load = np.zeros(E)
        for top, _, _ in per:
            load += np.bincount(top.ravel(), minlength=E)[:E]
        for ti, b, pp, d, start in pairs:
            top, pos, _ = per[ti]
            full = np.full(int(ts[ti].input_ids.shape[-1]), -1, np.int64)
            full[pos] = top[b]
            a0, a1 = full[pp[0]], full[pp[1]]
            c0, c1 = full[start], full[start + d]
            ok = (a0 >= 0) & (a1 >= 0)
            okc = ok & (c0 >= 0) & (c1 >= 0)
            k = np.searchsorted(e, d, side="right") - 1
            inb = (k >= 0) & (k < nb)
            np.add.at(cnt, k[ok & inb], 1)
            np.add.at(same, k[ok & inb], (a0 == a1)[ok & inb])
            np.add.at(cntc, k[okc & inb], 1)
            np.add.at(ctrl, k[okc & inb], (c0 == c1)[okc & inb])
        f = load / max(load.sum(), 1)
        chance = float(np.sum(f ** 2))
        for k in np.flatnonzero(cnt > 0):
            rows.append({"layer": i, "lo": int(e[k]), "hi": int(e[k + 1]), "pairs": int(cnt[k]),
                         "same": float(same[k] / cnt[k]),
                         "control": float(ctrl[k] / cntc[k]) if cntc[k] else float("nan"),
                         "chance": chance})
    return rows
