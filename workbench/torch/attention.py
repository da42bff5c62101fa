"""Llama 4 attention (torch): projections, interleaved RoPE, QK-norm, temperature, masks."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..config import ModelConfig
from ..numerics import attention_mask
from .hooks import Recorder


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """HF Llama4TextRMSNorm: normalise in fp32, cast back, then multiply by the weight."""
    xf = x.float()
    y = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return y if weight is None else y * weight


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Interleaved-pair (complex) RoPE in fp32, as HF: pairs (x[2i], x[2i+1]) times e^{i theta}.

    x: (B, S, N, d); cos/sin: (S, d/2).
    """
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    f = torch.complex(cos, sin)[None, :, None, :]
    return torch.view_as_real(xc * f).flatten(-2).to(x.dtype)


def attention(p: dict[str, torch.Tensor], x: torch.Tensor, layer: int, cfg: ModelConfig,
              rope: tuple[torch.Tensor, torch.Tensor], temp: torch.Tensor | None,
              start: int, cache: dict | None, rec: Recorder,
              ablate: list[int] | None) -> torch.Tensor:
    """One attention block on normalised input x (B, S, D); returns o_proj output (B, S, D)."""
    B, S, _ = x.shape
    H, K, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    pre = f"layers.{layer}.self_attn."
    q = (x @ p[pre + "q_proj.weight"].T).view(B, S, H, d)
    k = (x @ p[pre + "k_proj.weight"].T).view(B, S, K, d)
    v = (x @ p[pre + "v_proj.weight"].T).view(B, S, K, d)
    if cfg.uses_rope(layer):
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cfg.uses_qk_norm(layer):
            q, k = rms_norm(q, None, cfg.rms_norm_eps), rms_norm(k, None, cfg.rms_norm_eps)
    elif temp is not None:
        q = (q * temp[None, :, None, None]).to(q.dtype)
    h = f"layers.{layer}.attn."
    q = rec(h + "q", q.transpose(1, 2))
    k = rec(h + "k", k.transpose(1, 2))
    v = rec(h + "v", v.transpose(1, 2))
    if cache is not None:
        k, v, k_start = cache_update(cache, layer, k, v, start, cfg.chunk_size(layer))
    else:
        k_start = start
    chunk = cfg.chunk_size(layer)
    scale = d ** -0.5
    if rec.wants(h + "pattern"):
        o = _explicit(q, k, v, start, k_start, chunk, scale, rec, h + "pattern")
    else:
        o = _fused(q, k, v, start, k_start, chunk, scale)
    if ablate:
        o = o.clone()
        o[:, ablate] = 0
    o = o.transpose(1, 2).reshape(B, S, H * d)
    return rec(h + "out", o @ p[pre + "o_proj.weight"].T)


def _positions(start: int, n: int, device) -> torch.Tensor:
    return torch.arange(start, start + n, device=device)


def _mask(S: int, Tk: int, start: int, k_start: int, chunk: int | None) -> torch.Tensor:
    import numpy as np
    m = attention_mask(np.arange(start, start + S), np.arange(k_start, k_start + Tk), chunk)
    return torch.from_numpy(m)


def _explicit(q, k, v, start, k_start, chunk, scale, rec, name):
    """Softmax attention with the probabilities materialised (B, H, S, Tk), as HF eager does."""
    H, K = q.shape[1], k.shape[1]
    kr = k.repeat_interleave(H // K, dim=1)
    vr = v.repeat_interleave(H // K, dim=1)
    scores = (q @ kr.transpose(-1, -2)) * scale
    m = _mask(q.shape[2], k.shape[2], start, k_start, chunk)
    scores = scores.masked_fill(~m, torch.finfo(scores.dtype).min)
    probs = rec(name, torch.softmax(scores, dim=-1))
    return probs @ vr


def _fused(q, k, v, start, k_start, chunk, scale):
    """SDPA without a T x T buffer in Python; chunked layers run blockwise per chunk."""
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
    m = _mask(S, k.shape[2], start, k_start, chunk)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=m, scale=scale, enable_gqa=True)


def cache_update(cache: dict, layer: int, k: torch.Tensor, v: torch.Tensor, start: int,
                 chunk: int | None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Append new keys/values; chunked layers drop keys no future query can see."""
    entry = cache.get(layer)
    if entry is None:
        ks, vs, k_start = k, v, start
    else:
        ks = torch.cat([entry[0], k], dim=2)
        vs = torch.cat([entry[1], v], dim=2)
        k_start = entry[2]
    if chunk is not None:
        keep_from = ((start + k.shape[2] - 1) // chunk) * chunk  # chunk of the last query
        # keys needed by the queries of this call are still used below: trim after use
        cache[layer] = (ks[:, :, max(0, keep_from - k_start):],
                        vs[:, :, max(0, keep_from - k_start):], max(k_start, keep_from))
    else:
        cache[layer] = (ks, vs, k_start)
    return ks, vs, k_start
