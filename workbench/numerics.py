"""Numerics shared by both backends, computed once in numpy: RoPE tables, query temperatures,
attention masks. Keeping them here means torch and jax see bit-identical tables."""

from __future__ import annotations

import math

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


def chunk_boundaries(seq_len: int, chunk: int | None) -> list[int]:
    """Positions where a new attention chunk starts (excluding 0)."""
    if chunk is None:
        return []
    return list(range(chunk, seq_len, chunk))
