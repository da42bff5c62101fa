"""Attention kernels (torch): RMSNorm, interleaved RoPE, masks, SDPA / explicit softmax, KV cache.

Rounding follows transformers' Llama 4 eager code on CPU: norms and RoPE in fp32 and cast
back; the explicit path rounds scores and probabilities to the model dtype. Nothing here builds
an S x T buffer for long inputs: prefill runs causal SDPA, long masked calls and the attention
summary run in blocks, and the KV cache appends in place into preallocated buffers.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..forward import PadMask
from ..numerics import attention_mask, chunk_keep, distance_bucket_edges
from . import cpukernels


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """HF Llama4TextRMSNorm: normalise in fp32, cast back, then multiply by the weight (CPU
    inference: one call of the CPU kernel, ``cpukernels.rms_norm``)."""
    if cpukernels.serves_norm(x, weight):
        return cpukernels.rms_norm(x, weight, eps)
    xf = x.float()
    y = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return y if weight is None else y * weight


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Interleaved-pair (complex) RoPE in fp32, as HF: pairs (x[2i], x[2i+1]) times e^{i theta}.

    x: (B, N, S, d); cos/sin: (S, d/2). CPU inference: one call of ``cpukernels.rope``.
    """
    if cpukernels.serves_rope(x, cos, sin):
        return cpukernels.rope(x, cos, sin)
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    f = torch.complex(cos, sin)
    f = f[:, None] if f.ndim == 3 else f[None, None]  # per-row tables of a padded batch
    return torch.view_as_real(xc * f).flatten(-2).to(x.dtype)


def mask(S: int, T: int, start: int, k_start: int, chunk: int | None,
         device: torch.device) -> torch.Tensor:
    """(S, T) boolean mask for queries at start.. and keys at k_start.. (shared numpy rule)."""
    m = attention_mask(np.arange(start, start + S), np.arange(k_start, k_start + T), chunk)
    return torch.from_numpy(m).to(device)


def pad_mask(S: int, T: int, start: int, k_start: int, chunk: int | None,
             pad: PadMask) -> torch.Tensor:
    """(B, 1, S, T) boolean mask of a padded batch (``forward.PadMask``'s rule): causal, a
    valid key or the query itself, and (chunked layers) the same chunk counted from each
    row's first real token."""
    dev = pad.valid.device
    q = torch.arange(start, start + S, device=dev)[:, None]
    k = torch.arange(k_start, k_start + T, device=dev)[None, :]
    m = (k <= q)[None]
    if chunk is not None:
        s = pad.shift[:, None, None]
        m = m & (torch.div(k[None] - s, chunk, rounding_mode="floor")
                 == torch.div(q[None] - s, chunk, rounding_mode="floor"))
    valid = pad.valid[:, k_start:k_start + T]
    return (m & (valid[:, None, :] | (k == q)[None]))[:, None]


def attention_probs(q: torch.Tensor, k: torch.Tensor, start: int, k_start: int,
                    chunk: int | None, scale: float, pad: PadMask | None = None) -> torch.Tensor:
    """Softmax probabilities (B, H, S, T) after the mask, as HF eager attention computes them."""
    H, K = q.shape[1], k.shape[1]
    kr = k.repeat_interleave(H // K, dim=1)
    scores = (q @ kr.transpose(-1, -2)) * scale
    m = (mask(q.shape[2], k.shape[2], start, k_start, chunk, q.device) if pad is None
         else pad_mask(q.shape[2], k.shape[2], start, k_start, chunk, pad))
    scores = scores.masked_fill(~m, torch.finfo(scores.dtype).min)
    return torch.softmax(scores, dim=-1)


def attend(probs: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """probs (B, H, S, T) @ v (B, K, T, d), repeating kv heads: (B, H, S, d)."""
    return probs.to(v.dtype) @ v.repeat_interleave(probs.shape[1] // v.shape[1], dim=1)


MASK_ELEMS = 1 << 22
"""Mask elements (queries x keys) above which a masked ``fused`` call (a continuation) runs
per block of queries over only the keys each block can see: SDPA with a mask converts it to a
float buffer, so one S x T mask would grow quadratically with a long continuation."""


def fused(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int, k_start: int,
          chunk: int | None, scale: float, pad: PadMask | None = None) -> torch.Tensor:
    """SDPA with no T x T buffer built here: a prefill runs causal SDPA (per chunk on chunked
    layers), a decode step that sees every key given runs unmasked, and any other call (a
    continuation) runs masked, in query blocks of at most ``MASK_ELEMS`` mask elements over the
    keys each block can see when one mask would be larger. A padded batch (``pad``) always
    runs masked (``pad_mask``), in query blocks when its mask would be larger."""
    B, H, S, d = q.shape
    T = k.shape[2]
    if pad is not None:
        return _fused_padded(q, k, v, start, k_start, chunk, scale, pad)
    if start == 0 and k_start == 0 and T == S:
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
    if S == 1 and k_start + T - 1 <= start and (chunk is None or k_start >= start // chunk * chunk):
        # a decode step that sees every key given (the usual case): no mask; on the CPU one
        # call of the kernel (SDPA's overhead dominates a step's few keys)
        if cpukernels.serves_attention(q, k, v):
            return cpukernels.attention(q, k, v, scale)
        return F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=True)
    if S * T <= MASK_ELEMS:
        m = mask(S, T, start, k_start, chunk, q.device)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=m, scale=scale, enable_gqa=True)
    o = q.new_empty(B, H, S, d)
    width = T if chunk is None else min(T, chunk)
    for i0, i1, lo, hi in _query_blocks(S, T, start, k_start, chunk,
                                        max(1, MASK_ELEMS // width)):
        m = mask(i1 - i0, hi - lo, start + i0, k_start + lo, chunk, q.device)
        o[:, :, i0:i1] = F.scaled_dot_product_attention(
            q[:, :, i0:i1], k[:, :, lo:hi], v[:, :, lo:hi], attn_mask=m, scale=scale,
            enable_gqa=True)
    return o


def _fused_padded(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int,
                  k_start: int, chunk: int | None, scale: float, pad: PadMask) -> torch.Tensor:
    """``fused`` for a padded batch: SDPA with its (B, 1, S, T) mask, per block of queries
    (over the keys up to the block's last query) when the mask would exceed ``MASK_ELEMS``."""
    B, H, S, d = q.shape
    T = k.shape[2]
    bq = max(1, MASK_ELEMS // max(1, B * T))
    if S <= bq:
        m = pad_mask(S, T, start, k_start, chunk, pad)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=m, scale=scale, enable_gqa=True)
    o = q.new_empty(B, H, S, d)
    for i0 in range(0, S, bq):
        i1 = min(S, i0 + bq)
        hi = max(1, min(T, start + i1 - k_start))
        m = pad_mask(i1 - i0, hi, start + i0, k_start, chunk, pad)
        o[:, :, i0:i1] = F.scaled_dot_product_attention(
            q[:, :, i0:i1], k[:, :, :hi], v[:, :, :hi], attn_mask=m, scale=scale,
            enable_gqa=True)
    return o


def _query_blocks(S: int, T: int, start: int, k_start: int, chunk: int | None,
                  bq: int) -> list[tuple[int, int, int, int]]:
    """Blocks (i0, i1, lo, hi) of at most ``bq`` query rows (not crossing a chunk boundary on
    chunked layers) and the key slots [lo, hi) their queries can see: from the first query's
    chunk (chunked layers) up to the last query (causal)."""
    out = []
    i0 = 0
    while i0 < S:
        p0 = start + i0
        i1 = min(S, i0 + bq)
        first = k_start
        if chunk is not None:
            i1 = min(i1, (p0 // chunk + 1) * chunk - start)
            first = max(k_start, (p0 // chunk) * chunk)
        lo = min(max(0, first - k_start), T)
        hi = max(lo, min(T, start + i1 - k_start))
        out.append((i0, i1, lo, hi))
        i0 = i1
    return out


# ----------------------------------------------------------------------------- attention summary
SUMMARY_BLOCK_Q = 128
"""Query rows per block of ``attention_summary``."""
SUMMARY_BLOCK_ELEMS = 1 << 22
"""Score elements (batch x heads x query rows x key columns) per block of ``attention_summary``:
its key blocks hold ``SUMMARY_BLOCK_ELEMS // (B * H * rows)`` keys (at least 256)."""


def _buckets(dist: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
    """Distance bucket (int64) of int64 distances (negative ones count as 0)."""
    return torch.searchsorted(edges, dist.clamp(min=0), right=True) - 1


def attention_summary(q: torch.Tensor, k: torch.Tensor, start: int, k_start: int,
                      chunk: int | None, own_chunk: int | None, scale: float, *,
                      block_q: int | None = None, block_k: int | None = None) -> torch.Tensor:
    """``numerics.SUMMARY_FEATURES`` (B, H, S, F) float32 of each query's attention distribution
    (mask of ``fused``; scores ``scale * q . k`` in fp32), blockwise: per block of ``block_q``
    queries a loop over only the key blocks (``block_k`` keys) its queries can see, with an
    online softmax. Per query it keeps the running max m and l = sum e (e = exp(s - m)) and,
    rescaled by exp(m_old - m_new) whenever m grows: sum e (s - m) (entropy = log l - that / l),
    the mass in the query's ``own_chunk`` chunk, the weight of key position 0, sum e (q - k)
    and the mass per distance bucket; the max weight is 1 / l. Memory O(B H block_q block_k),
    never S x T. A query that sees no key gets zeros (entropy 0, max 1)."""
    B, H, S, d = q.shape
    K, T = k.shape[1], k.shape[2]
    G = H // K
    edges_np = distance_bucket_edges()
    nb = len(edges_np)
    dev = q.device
    edges = torch.as_tensor(edges_np, device=dev)
    bq = max(1, min(block_q or SUMMARY_BLOCK_Q, S))
    bk = block_k or max(256, SUMMARY_BLOCK_ELEMS // (B * H * bq))
    # e @ ones_rel: (sum e, sum e (k - kb0)) of a key block in one pass
    ones_rel = torch.stack([torch.ones(min(bk, T), device=dev),
                            torch.arange(min(bk, T), device=dev, dtype=torch.float32)], -1)
    own_all = own_chunk is None or (chunk is not None and own_chunk % chunk == 0)
    out = torch.empty(B, H, S, 5 + nb, dtype=torch.float32, device=dev)
    neg = float("-inf")
    for i0, i1, lo, hi in _query_blocks(S, T, start, k_start, chunk, bq):
        n = i1 - i0
        p0, p_last = start + i0, start + i1 - 1
        qpos = torch.arange(p0, p0 + n, device=dev)
        qf = (q[:, :, i0:i1].float() * scale).reshape(B, K, G * n, d)
        m = torch.full((B, H, n), neg, device=dev)
        l, ent, own, sink, dist = (torch.zeros(B, H, n, device=dev) for _ in range(5))
        mass = torch.zeros(B, H, n, nb, device=dev)
        for j0 in range(lo, hi, bk):
            j1 = min(hi, j0 + bk)
            w = j1 - j0
            kb0, kb1 = k_start + j0, k_start + j1  # key positions [kb0, kb1)
            s = torch.matmul(qf, k[:, :, j0:j1].float().transpose(-1, -2)).view(B, H, n, w)
            kpos = None
            visible = None
            if kb1 - 1 > p0 or (chunk is not None and kb0 // chunk != p_last // chunk):
                kpos = torch.arange(kb0, kb1, device=dev)
                visible = kpos[None, :] <= qpos[:, None]
                if chunk is not None:
                    visible &= (kpos[None, :] // chunk) == (qpos[:, None] // chunk)
                s.masked_fill_(~visible, neg)
            m_new = torch.maximum(m, s.amax(-1))
            m_safe = m_new.masked_fill(m_new == neg, 0.0)
            alpha = torch.exp(m - m_safe)
            shift = (m - m_safe).masked_fill(m == neg, 0.0)
            s.sub_(m_safe[..., None])
            e = torch.exp(s)
            if visible is not None:
                s.masked_fill_(~visible, 0.0)
            sums = e @ ones_rel[:w]
            lb = sums[..., 0]
            ent = alpha * (ent + shift * l) + s.mul_(e).sum(-1)
            l = alpha * l + lb
            del s
            # sum e (q - k) = lb (q - kb0) - sum e (k - kb0): block-relative, no cancellation
            dist = alpha * dist + lb * (qpos - kb0).float() - sums[..., 1]
            sink = alpha * sink
            if kb0 <= 0 < kb1:
                sink = sink + e[..., -kb0]
            if not own_all:
                start_last = (p_last // own_chunk) * own_chunk
                if kb0 >= start_last:
                    own_b = lb
                elif kb1 - 1 < (p0 // own_chunk) * own_chunk:
                    own_b = torch.zeros_like(lb)
                else:
                    kp = kpos if kpos is not None else torch.arange(kb0, kb1, device=dev)
                    same = kp[None, :] >= ((qpos // own_chunk) * own_chunk)[:, None]
                    own_b = torch.where(same, e, 0.0).sum(-1)
                own = alpha * own + own_b
            mass.mul_(alpha[..., None])
            _add_bucket_mass(mass, e, lb, p0 - kb0, n, edges_np, edges)
            m = m_new
        seen = l > 0
        l = torch.where(seen, l, 1.0)
        feats = [torch.where(seen, torch.log(l) - ent / l, 0.0),
                 torch.ones_like(l) if own_all else own / l, sink / l, dist / l, 1.0 / l]
        out[:, :, i0:i1, :5] = torch.stack(feats, -1)
        out[:, :, i0:i1, 5:] = mass / l[..., None]
    return out


def _add_bucket_mass(mass: torch.Tensor, e: torch.Tensor, lb: torch.Tensor, c: int, n: int,
                     edges_np: np.ndarray, edges: torch.Tensor) -> None:
    """Add a block's weights e (B, H, n, w) to ``mass`` (B, H, n, buckets) by distance bucket.
    The distance of query row i to key column j is c + i - j (Toeplitz): a block whose
    distances fall in one bucket adds its row sums lb there; across one bucket edge E, row i's
    keys up to column c - E + i are in the upper bucket (a prefix sum plus an n-wide band);
    across more (near the diagonal) every weight is scattered to its bucket."""
    B, H, _, w = e.shape
    b_lo, b_hi = (int(b) for b in np.searchsorted(
        edges_np, [max(0, c - (w - 1)), max(0, c + n - 1)], side="right") - 1)
    if b_lo == b_hi:
        mass[..., b_lo] += lb
    elif b_hi == b_lo + 1:
        t = c - int(edges_np[b_hi])  # row i: columns <= t + i are at distance >= E
        a, z = max(t, 0), min(t + n, w)
        upper = e[..., :a].sum(-1)
        if z > a:
            rows = torch.arange(n, device=e.device)[:, None]
            cols = torch.arange(a, z, device=e.device)[None, :]
            upper = upper + torch.where(cols <= t + rows, e[..., a:z], 0.0).sum(-1)
        mass[..., b_hi] += upper
        mass[..., b_lo] += lb - upper
    else:
        # bucket each diagonal once, then unfold to the (n, w) Toeplitz layout
        diag = _buckets(c + n - 1 - torch.arange(n + w - 1, device=e.device), edges)
        idx = diag.unfold(0, w, 1).flip(0)  # row i = query row i
        mass.scatter_add_(-1, idx.expand(B, H, n, w), e)


# ----------------------------------------------------------------------------- KV cache
CACHE_BLOCK = 1024
"""Slots a global layer's cache buffer grows by at least (and is rounded up to) when full; it
also grows by at least an eighth of what it holds, so appends cost amortised O(1)."""


class KVBuffer:
    """One layer's cached keys and values, preallocated: buffers (B, K, cap, d) whose slots
    [off, off + n) hold positions pos, pos + 1, ... . Appends write in place; a global layer's
    buffer grows (copying) only when full, a chunked layer's keeps at most two chunks (what a
    later query can still see, plus room for the next ones) and moves the kept keys to its front
    when its end is reached. The keys/values handed to attention are views of the buffer, valid
    until the next append (the forward uses them before that)."""

    __slots__ = ("k", "v", "off", "n", "pos")

    def __init__(self, k: torch.Tensor | None, v: torch.Tensor | None, off: int, n: int,
                 pos: int):
        self.k, self.v, self.off, self.n, self.pos = k, v, off, n, pos

    @property
    def capacity(self) -> int:
        return self.k.shape[2]

    def keys(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The cached keys and values (B, K, n, d): views of the buffers."""
        sl = slice(self.off, self.off + self.n)
        return self.k[:, :, sl], self.v[:, :, sl]


CacheEntry = KVBuffer
EMPTY: CacheEntry = KVBuffer(None, None, 0, 0, 0)
"""The entry of a layer before its first call (shared, never written: the first call makes
the layer's own buffer). Not None: the forward reads None as "no cache"."""


def _alloc(like: torch.Tensor, cap: int) -> torch.Tensor:
    B, K, _, d = like.shape
    return like.new_empty(B, K, cap, d)


def _capacity(need: int, chunk: int | None) -> int:
    """Buffer slots for ``need`` keys: two chunks on chunked layers (at least ``need``), else
    ``need`` plus an eighth (at least ``CACHE_BLOCK``), rounded up to ``CACHE_BLOCK``."""
    if chunk is not None:
        return max(need, 2 * chunk)
    grown = need + max(CACHE_BLOCK, need // 8)
    return -(-grown // CACHE_BLOCK) * CACHE_BLOCK


def cache_update(entry: CacheEntry, k: torch.Tensor, v: torch.Tensor, start: int,
                 chunk: int | None, shift: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, int, CacheEntry]:
    """Append new keys/values; chunked layers drop keys no later query can see.

    Returns the keys/values this call attends to (the cached keys then the new ones, from the
    entry's first position: views of the buffer when they fit in it), their first position,
    and the updated entry (the same buffer, updated in place, when there is one). Dropped keys
    are only marked dropped: the views handed back stay intact until the next call.
    """
    S = k.shape[2]
    in_buf = False
    if entry.k is None:
        ks, vs, k_start, n_all = k, v, start, S
    else:
        k_start, n_all = entry.pos, entry.n + S
        if entry.off + n_all > entry.capacity and n_all <= entry.capacity:
            _compact(entry)
        if entry.off + n_all <= entry.capacity:  # in place
            end = entry.off + entry.n
            entry.k[:, :, end:end + S] = k
            entry.v[:, :, end:end + S] = v
            entry.n = n_all
            ks, vs = entry.keys()
            in_buf = True
        elif chunk is None:  # a global layer's buffer is full: grow it
            cap, n = _capacity(n_all, None), entry.n
            grown = KVBuffer(_alloc(k, cap), _alloc(v, cap), 0, n_all, k_start)
            for old, buf, x in ((entry.k, grown.k, k), (entry.v, grown.v, v)):
                buf[:, :, :n] = old[:, :, entry.off:entry.off + n]
                buf[:, :, n:n_all] = x
            entry = grown
            ks, vs = entry.keys()
            in_buf = True
        else:  # a chunked layer's call longer than its buffer: attend to a one-off copy
            ck, cv = entry.keys()
            ks, vs = torch.cat([ck, k], dim=2), torch.cat([cv, v], dim=2)
    # what later queries can see: everything (global), from the last query's chunk (chunked)
    keep = k_start if chunk is None else max(k_start, int(chunk_keep(
        start, S, chunk, None if shift is None else shift.cpu().numpy())))
    cut = keep - k_start
    n_keep = n_all - cut
    if in_buf:
        entry.off, entry.n, entry.pos = entry.off + cut, n_keep, keep
        return ks, vs, k_start, entry
    if entry.k is not None and entry.capacity >= _capacity(n_keep + 1, chunk):
        new = KVBuffer(entry.k, entry.v, 0, n_keep, keep)  # ks is a copy: reuse the buffer
    else:
        cap = _capacity(n_keep + 1, chunk)
        new = KVBuffer(_alloc(k, cap), _alloc(v, cap), 0, n_keep, keep)
    new.k[:, :, :n_keep] = ks[:, :, cut:]
    new.v[:, :, :n_keep] = vs[:, :, cut:]
    return ks, vs, k_start, new


def _compact(entry: KVBuffer) -> None:
    """Move a buffer's live slots to its front (a chunked layer whose end is reached)."""
    n, off = entry.n, entry.off
    for buf in (entry.k, entry.v):
        live = buf[:, :, off:off + n]
        buf[:, :, :n] = live if off >= n else live.clone()  # clone: the ranges overlap
    entry.off = 0
