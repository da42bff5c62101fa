"""Attention kernels (jax): linear, RMSNorm, interleaved RoPE, masks, softmax attention, KV cache.

Pure functions traced under ``jax.jit``. fp32 dots run at ``Precision.HIGHEST`` (no TF32/bf16
passes on accelerators), so fp32 results match torch and transformers to rounding.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

PRECISION = jax.lax.Precision.HIGHEST
Pos = int | jax.Array  # an absolute position: a Python int when static, a traced scalar otherwise


def linear(x: jax.Array, w: jax.Array) -> jax.Array:
    """``x @ w.T`` for an nn.Linear-layout weight (out, in), accumulated in fp32 and rounded
    once to x's dtype, as torch's CPU matmul does. Asking XLA:CPU for an fp32 result is also
    what selects its fast bf16 kernels (a bf16-out dot takes a several times slower path; the
    benchmarks' README has the measurements)."""
    return jax.lax.dot_general(x, w, (((x.ndim - 1,), (1,)), ((), ())), precision=PRECISION,
                               preferred_element_type=jnp.float32).astype(x.dtype)


def rms_norm(x: jax.Array, weight: jax.Array | None, eps: float) -> jax.Array:
    """HF Llama4TextRMSNorm: normalise in fp32, cast back, then multiply by the weight."""
    xf = x.astype(jnp.float32)
    y = (xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)).astype(x.dtype)
    return y if weight is None else y * weight


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Interleaved-pair (complex) RoPE in fp32, as HF: pairs (x[2i], x[2i+1]) times e^{i theta}.

    x: (B, N, S, d); cos/sin: (S, d/2) float32 tables from ``workbench.numerics``.
    """
    xf = x.astype(jnp.float32).reshape(*x.shape[:-1], -1, 2)
    xc = jax.lax.complex(xf[..., 0], xf[..., 1])
    y = xc * jax.lax.complex(cos, sin)[None, None]
    return jnp.stack((y.real, y.imag), axis=-1).reshape(x.shape).astype(x.dtype)


class CacheEntry(NamedTuple):
    """One layer's KV cache inside the traced forward: slot j of k/v holds position k_start + j.

    ``k``/``v`` are (B, K, cap, d) buffers of a fixed capacity (so decoding steps reuse one
    compiled graph); they are None before anything was cached. Slots past the last written
    position hold zeros or stale keys, which the causal mask never lets a query see.
    """

    k: jax.Array | None
    v: jax.Array | None
    k_start: Pos
    cap: int


def keep_from(start: Pos, n: int, chunk: int) -> Pos:
    """First position a chunked layer must keep after queries start..start+n-1 (the last
    query's chunk start); works on Python ints (host bookkeeping) and traced scalars alike."""
    return ((start + n - 1) // chunk) * chunk


def _mask(S: int, Tk: int, start: Pos, k_start: Pos, chunk: int | None) -> jax.Array:
    """(S, Tk) boolean mask, the rule of ``numerics.attention_mask`` built in the graph from
    iotas (no S x Tk constant is embedded; positions may be traced while decoding)."""
    q = start + jnp.arange(S)[:, None]
    k = k_start + jnp.arange(Tk)[None, :]
    m = k <= q
    if chunk is not None:
        m &= (k // chunk) == (q // chunk)
    return m


def attention_probs(q: jax.Array, k: jax.Array, start: Pos, k_start: Pos, chunk: int | None,
                    scale: float) -> jax.Array:
    """Softmax probabilities (B, H, S, T) after the mask, as HF eager attention computes them:
    scores and probabilities rounded to the model dtype (softmax itself runs in fp32)."""
    B, H, S, d = q.shape
    K, Tk = k.shape[1], k.shape[2]
    qg = q.reshape(B, K, H // K, S, d)
    scores = jnp.einsum("bkgsd,bktd->bkgst", qg, k, precision=PRECISION,
                        preferred_element_type=jnp.float32).astype(q.dtype) * scale
    scores = scores.reshape(B, H, S, Tk)
    m = _mask(S, Tk, start, k_start, chunk)
    scores = jnp.where(m, scores, jnp.finfo(scores.dtype).min)
    return jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(q.dtype)


def attend(probs: jax.Array, v: jax.Array) -> jax.Array:
    """probs (B, H, S, T) times v (B, K, T, d) per kv group, fp32 accumulation: (B, H, S, d)."""
    B, H, S, Tk = probs.shape
    K = v.shape[1]
    o = jnp.einsum("bkgst,bktd->bkgsd", probs.reshape(B, K, H // K, S, Tk), v,
                   precision=PRECISION, preferred_element_type=jnp.float32)
    return o.astype(v.dtype).reshape(B, H, S, v.shape[-1])


def _sdpa(q, k, v, mask, scale):
    """Grouped-query attention rounded like torch's fused CPU kernel: fp32 scores, unnormalised
    exp(s - max) cast to the model dtype for the value product (fp32 accumulation), then
    divided by the fp32 row sum. In fp32 this is plain softmax attention."""
    B, H, S, d = q.shape
    K = k.shape[1]
    qg = q.reshape(B, K, H // K, S, d)
    s = jnp.einsum("bkgsd,bktd->bkgst", qg, k, precision=PRECISION,
                   preferred_element_type=jnp.float32) * scale
    s = jnp.where(mask, s, -jnp.inf)
    e = jnp.exp(s - jnp.max(s, axis=-1, keepdims=True))
    o = jnp.einsum("bkgst,bktd->bkgsd", e.astype(q.dtype), v, precision=PRECISION,
                   preferred_element_type=jnp.float32)
    o = o / jnp.sum(e, axis=-1, keepdims=True)
    return o.astype(q.dtype).reshape(B, H, S, d)


def fused(q: jax.Array, k: jax.Array, v: jax.Array, start: Pos, k_start: Pos,
          chunk: int | None, scale: float) -> jax.Array:
    """Attention without materialising a T x T buffer for chunked layers: a prefill from
    position 0 runs blockwise per chunk (B*n blocks of chunk x chunk); otherwise masked."""
    B, H, S, d = q.shape
    fresh = isinstance(start, int) and start == 0 and isinstance(k_start, int) and k_start == 0
    if fresh and k.shape[2] == S:
        if chunk is None or S <= chunk:
            return _sdpa(q, k, v, _mask(S, S, 0, 0, None), scale)
        n = -(-S // chunk)
        pad = n * chunk - S

        def blocks(t: jax.Array) -> jax.Array:
            t = jnp.pad(t, ((0, 0), (0, 0), (0, pad), (0, 0)))
            t = t.reshape(B, t.shape[1], n, chunk, d).transpose(0, 2, 1, 3, 4)
            return t.reshape(B * n, t.shape[2], chunk, d)

        o = _sdpa(blocks(q), blocks(k), blocks(v), _mask(chunk, chunk, 0, 0, None), scale)
        o = o.reshape(B, n, H, chunk, d).transpose(0, 2, 1, 3, 4).reshape(B, H, n * chunk, d)
        return o[:, :, :S]
    return _sdpa(q, k, v, _mask(S, k.shape[2], start, k_start, chunk), scale)


def cache_update(entry: CacheEntry, k: jax.Array, v: jax.Array, start: Pos,
                 chunk: int | None) -> tuple[jax.Array, jax.Array, Pos, CacheEntry]:
    """Append new keys/values; chunked layers drop keys no later query can see.

    Returns the keys/values this call attends to, the position of their first slot, and the
    new entry. The stored buffers keep a fixed capacity ``entry.cap``: the new entry is the
    window starting at the kept position (the host grows ``cap`` beforehand if needed).
    """
    S = k.shape[2]
    if entry.k is None:
        ks, vs, k_start = k, v, start
    else:
        k_start = entry.k_start
        pad = ((0, 0), (0, 0), (0, S), (0, 0))
        off = start - k_start
        ks = jax.lax.dynamic_update_slice_in_dim(jnp.pad(entry.k, pad), k, off, axis=2)
        vs = jax.lax.dynamic_update_slice_in_dim(jnp.pad(entry.v, pad), v, off, axis=2)
    keep = k_start
    if chunk is not None:
        # keys needed by the queries of this call are used above: trim after use
        keep = jnp.maximum(k_start, keep_from(start, S, chunk))
    idx = (keep - k_start) + jnp.arange(entry.cap)
    new = CacheEntry(jnp.take(ks, idx, axis=2, mode="fill", fill_value=0),
                     jnp.take(vs, idx, axis=2, mode="fill", fill_value=0), keep, entry.cap)
    return ks, vs, k_start, new
