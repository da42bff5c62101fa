"""Attention kernels (torch): RMSNorm, interleaved RoPE, masks, SDPA / explicit softmax, KV cache.

Rounding follows transformers' Llama 4 eager code on CPU: norms and RoPE in fp32 and cast
back; the explicit path rounds scores and probabilities to the model dtype.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..numerics import attention_mask


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """HF Llama4TextRMSNorm: normalise in fp32, cast back, then multiply by the weight."""
    xf = x.float()
    y = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return y if weight is None else y * weight


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Interleaved-pair (complex) RoPE in fp32, as HF: pairs (x[2i], x[2i+1]) times e^{i theta}.

    x: (B, N, S, d); cos/sin: (S, d/2).
    """
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    f = torch.complex(cos, sin)[None, None]
    return torch.view_as_real(xc * f).flatten(-2).to(x.dtype)


def mask(S: int, T: int, start: int, k_start: int, chunk: int | None,
         device: torch.device) -> torch.Tensor:
    """(S, T) boolean mask for queries at start.. and keys at k_start.. (shared numpy rule)."""
    m = attention_mask(np.arange(start, start + S), np.arange(k_start, k_start + T), chunk)
    return torch.from_numpy(m).to(device)


def attention_probs(q: torch.Tensor, k: torch.Tensor, start: int, k_start: int,
                    chunk: int | None, scale: float) -> torch.Tensor:
    """Softmax probabilities (B, H, S, T) after the mask, as HF eager attention computes them."""
    H, K = q.shape[1], k.shape[1]
    kr = k.repeat_interleave(H // K, dim=1)
    scores = (q @ kr.transpose(-1, -2)) * scale
    m = mask(q.shape[2], k.shape[2], start, k_start, chunk, q.device)
    scores = scores.masked_fill(~m, torch.finfo(scores.dtype).min)
    return torch.softmax(scores, dim=-1)


def attend(probs: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """probs (B, H, S, T) @ v (B, K, T, d), repeating kv heads: (B, H, S, d)."""
    return probs.to(v.dtype) @ v.repeat_interleave(probs.shape[1] // v.shape[1], dim=1)


def fused(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int, k_start: int,
          chunk: int | None, scale: float) -> torch.Tensor:
    """SDPA with no T x T buffer built here; a prefill of chunked layers runs per chunk."""
    B, H, S, d = q.shape
    if start == 0 and k_start == 0 and k.shape[2] == S:
        if chunk is None or S <= chunk:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale,
                                                  enable_gqa=True)
        n = -(-S // chunk)
        pad = n * chunk - S

        def blocks(t: torch.Tensor) -> torch.Tensor:
            t = F.pad(t, (0, 0, 0, pad))
            return t.view(B, t.shape[1], n, chunk, d).transpose(1, 2)

        o = F.scaled_dot_product_attention(blocks(q), blocks(k), blocks(v), is_causal=True,
                                           scale=scale, enable_gqa=True)
        return o.transpose(1, 2).reshape(B, H, n * chunk, d)[:, :, :S]
    m = mask(S, k.shape[2], start, k_start, chunk, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=m, scale=scale, enable_gqa=True)


# keys, values (B, K, T, d) and the position of their first slot; (None, None, 0) when empty
CacheEntry = tuple[torch.Tensor | None, torch.Tensor | None, int]
EMPTY: CacheEntry = (None, None, 0)


def cache_update(entry: CacheEntry, k: torch.Tensor, v: torch.Tensor, start: int,
                 chunk: int | None) -> tuple[torch.Tensor, torch.Tensor, int, CacheEntry]:
    """Append new keys/values; chunked layers drop keys no later query can see.

    Returns the keys/values this call attends to, their first position, and the new entry.
    """
    if entry[0] is None:
        ks, vs, k_start = k, v, start
    else:
        ks = torch.cat([entry[0], k], dim=2)
        vs = torch.cat([entry[1], v], dim=2)
        k_start = entry[2]
    if chunk is None:
        return ks, vs, k_start, (ks, vs, k_start)
    keep_from = ((start + k.shape[2] - 1) // chunk) * chunk  # chunk of the last query
    cut = max(0, keep_from - k_start)
    return ks, vs, k_start, (ks[:, :, cut:], vs[:, :, cut:], max(k_start, keep_from))
