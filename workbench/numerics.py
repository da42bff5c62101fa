"""Numerics shared by both backends, computed once in numpy: RoPE tables, query temperatures,
attention masks. Keeping them here means torch and jax see bit-identical tables."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .config import ModelConfig


def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
    """Inverse frequencies (head_dim/2,) float32, with llama3 scaling when configured.

    Mirrors HF ``_compute_llama3_parameters`` operation for operation in float32.
    """
    d = cfg.head_dim
    inv = (1.0 / (np.float32(cfg.rope_theta) ** (np.arange(0, d, 2, dtype=np.float32)
                                                   / np.float32(d)))).astype(np.float32)
    if cfg.rope_type != "llama3":
        return inv
    rs = cfg.rope_scaling
    factor = rs["factor"]
    low, high = rs["low_freq_factor"], rs["high_freq_factor"]
    old = rs["original_max_position_embeddings"]
    low_wavelen = old / low
    high_wavelen = old / high
    wavelen = (2 * math.pi / inv).astype(np.float32)
    out = np.where(wavelen > low_wavelen, inv / np.float32(factor), inv).astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        smooth = ((old / wavelen - low) / (high - low)) if high != low else \
            np.zeros_like(wavelen)
        smoothed = (1 - smooth) * out / factor + smooth * out
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, smoothed, out).astype(np.float32)


def rope_cos_sin(positions: np.ndarray, inv_freq: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin of ``pos * inv_freq`` in float32: shapes (*positions.shape, head_dim/2)."""
    ang = positions.astype(np.float32)[..., None] * inv_freq.astype(np.float32)
    return np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)


def temperature_scales(positions: np.ndarray, cfg: ModelConfig) -> np.ndarray:
    """Query temperature per absolute 0-based position, float32 (applied on NoPE layers).

    ``1 + attn_scale * log1p(floor((p + 1) / floor_scale))``; exactly 1 below floor_scale - 1.
    """
    p = positions.astype(np.float32)
    return (np.log1p(np.floor((p + np.float32(1.0)) / np.float32(cfg.floor_scale)))
            * np.float32(cfg.attn_scale) + np.float32(1.0)).astype(np.float32)


def attention_mask(q_pos: np.ndarray, k_pos: np.ndarray, chunk: int | None) -> np.ndarray:
    """Boolean (Tq, Tk) mask: causal, and within the same chunk when ``chunk`` is set.

    Chunks are aligned to absolute positions: query q sees key k iff k <= q and, with a chunk,
    k // chunk == q // chunk.
    """
    q = np.asarray(q_pos)[:, None]
    k = np.asarray(k_pos)[None, :]
    m = k <= q
    if chunk is not None:
        m &= (k // chunk) == (q // chunk)
    return m


def chunk_keep(start: Any, n: int, chunk: int, shift: Any = None) -> Any:
    """First position a chunked layer's KV cache must keep after queries start..start+n-1:
    the start of the last query's chunk, or with ``shift`` (per-row left padding of a padded
    batch, whose chunks start at its first real token) the earliest such start of any row.
    Works on Python ints, numpy and jax arrays alike (traced positions included)."""
    last = start + n - 1
    if shift is None:
        return (last // chunk) * chunk
    return (((last - shift) // chunk) * chunk + shift).min()


def chunk_boundaries(seq_len: int, chunk: int | None) -> list[int]:
    """Positions where a new attention chunk starts (excluding 0)."""
    if chunk is None:
        return []
    return list(range(chunk, seq_len, chunk))


# ----------------------------------------------------------------------------- attention summary
DISTANCE_BUCKETS = 25
"""Log-spaced key-distance buckets of ``attn.summary``: d = 0, [1, 2), [2, 4), ...,
[2^22, 2^23), [2^23, inf), where d = query position - key position."""


def distance_bucket_edges() -> np.ndarray:
    """Lower edges (DISTANCE_BUCKETS,) int64 of the distance buckets: 0, 1, 2, 4, ..., 2^23."""
    return np.array([0] + [1 << j for j in range(DISTANCE_BUCKETS - 1)], np.int64)


def distance_bucket_labels() -> tuple[str, ...]:
    """Names of the distance buckets: "d=0", "d=1", "d[2,4)", ..., "d>=8388608"."""
    e = distance_bucket_edges()
    return ("d=0", "d=1", *(f"d[{int(e[j])},{int(e[j + 1])})" for j in range(2, len(e) - 1)),
            f"d>={int(e[-1])}")


SUMMARY_FEATURES: tuple[str, ...] = ("entropy", "own_chunk", "sink", "distance", "max",
                                     *distance_bucket_labels())
"""The last axis of ``layers.{i}.attn.summary`` (B, H, S, F), per query position and head:

* ``entropy``: -sum p log p of the attention distribution, in nats;
* ``own_chunk``: the mass on keys in the query's own ``attention_chunk_size`` chunk (1 on
  chunked layers, which see nothing else; the whole context when the config has no chunk);
* ``sink``: the mass on position 0 (the attention sink);
* ``distance``: the expected query - key distance of the attended keys, in positions;
* ``max``: the largest single weight;
* one mass per distance bucket (``distance_bucket_labels``), summing to 1.
"""


def attention_summary_reference(probs: np.ndarray, q_pos: np.ndarray, k_pos: np.ndarray,
                                own_chunk: int | None) -> np.ndarray:
    """``attn.summary`` (B, H, S, F) float64 from a full pattern (B, H, S, T) over query
    positions q_pos (S,) and key positions k_pos (T,): the definition the blockwise kernels
    are tested against (it needs the T x T pattern, so only for short inputs)."""
    p = np.asarray(probs, np.float64)
    q = np.asarray(q_pos, np.int64)[:, None]
    k = np.asarray(k_pos, np.int64)[None, :]
    dist = q - k
    with np.errstate(divide="ignore", invalid="ignore"):
        ent = -np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0).sum(-1)
    own = (k // own_chunk == q // own_chunk) if own_chunk else np.ones_like(dist, bool)
    edges = distance_bucket_edges()
    bucket = np.searchsorted(edges, np.maximum(dist, 0), side="right") - 1  # (S, T)
    feats = [ent, (p * own).sum(-1), (p * (k == 0)).sum(-1), (p * dist).sum(-1), p.max(-1)]
    feats += [(p * (bucket == j)).sum(-1) for j in range(len(edges))]
    return np.stack(feats, -1)
