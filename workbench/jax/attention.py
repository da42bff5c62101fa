"""Attention kernels (jax): linear, RMSNorm, interleaved RoPE, masks, softmax attention, KV cache.

Pure functions traced under ``jax.jit``. fp32 dots run at ``Precision.HIGHEST`` (no TF32/bf16
passes on accelerators), so fp32 results match torch and transformers to rounding.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from ..forward import PadMask
from ..numerics import DISTANCE_BUCKETS, chunk_keep
from . import cpukernels

PRECISION = jax.lax.Precision.HIGHEST
Pos = int | jax.Array  # an absolute position: a Python int when static, a traced scalar otherwise


def linear(x: jax.Array, w: jax.Array) -> jax.Array:
    """``x @ w.T`` for an nn.Linear-layout weight (out, in), accumulated in fp32 and rounded
    once to x's dtype, as torch's CPU matmul does. Asking XLA:CPU for an fp32 result is also
    what selects its fast bf16 kernels (a bf16-out dot takes a several times slower path; the
    benchmarks' README has the measurements).

    A single row (a decode step) is padded to two: for one row of a bf16 x, XLA:CPU converts
    the whole weight to fp32 first, a temporary twice the weight's size (4 GB for Scout's
    lm_head) and about ten times slower than the two-row product.

    A few rows (a decode step) on the CPU go through the streaming kernel of
    ``workbench.cpukernels`` instead, which reads the weight at the memory's rate."""
    if cpukernels.serves_linear(x, w):
        return cpukernels.linear(x, w)
    if x.dtype != jnp.float32 and math.prod(x.shape[:-1]) == 1:
        x2 = jnp.pad(x.reshape(1, x.shape[-1]), ((0, 1), (0, 0)))
        return linear(x2, w)[0].reshape(*x.shape[:-1], w.shape[0])
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
    f = jax.lax.complex(cos, sin)
    y = xc * (f[:, None] if f.ndim == 3 else f[None, None])  # (B, S, d/2): a padded batch
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


def keep_from(start: Pos, n: int, chunk: int, shift=None) -> Pos:
    """First position a chunked layer must keep after queries start..start+n-1 (the last
    query's chunk start; with ``shift``, a padded batch's left padding per row, the earliest
    such start of any row); works on Python ints (host bookkeeping) and traced scalars
    alike."""
    return chunk_keep(start, n, chunk, shift)


def _mask(S: int, Tk: int, start: Pos, k_start: Pos, chunk: int | None) -> jax.Array:
    """(S, Tk) boolean mask, the rule of ``numerics.attention_mask`` built in the graph from
    iotas (no S x Tk constant is embedded; positions may be traced while decoding)."""
    q = start + jnp.arange(S)[:, None]
    k = k_start + jnp.arange(Tk)[None, :]
    m = k <= q
    if chunk is not None:
        m &= (k // chunk) == (q // chunk)
    return m


def _pad_mask(S: int, Tk: int, start: Pos, k_start: Pos, chunk: int | None,
              pad: PadMask) -> jax.Array:
    """(B, S, Tk) boolean mask of a padded batch (``forward.PadMask``'s rule): causal, a valid
    key or the query itself, and (chunked layers) the same chunk counted from each row's
    first real token. Key slots past ``pad.valid`` count as valid (causality hides them)."""
    q = start + jnp.arange(S)[:, None]
    k = k_start + jnp.arange(Tk)[None, :]
    m = (k <= q)[None]
    if chunk is not None:
        s = pad.shift[:, None, None]
        m &= ((k[None] - s) // chunk) == ((q[None] - s) // chunk)
    valid = jnp.take(pad.valid, k_start + jnp.arange(Tk), axis=1, mode="fill",
                     fill_value=True)
    return m & (valid[:, None, :] | (k == q)[None])


def attention_probs(q: jax.Array, k: jax.Array, start: Pos, k_start: Pos, chunk: int | None,
                    scale: float, pad: PadMask | None = None) -> jax.Array:
    """Softmax probabilities (B, H, S, T) after the mask, as HF eager attention computes them:
    scores and probabilities rounded to the model dtype (softmax itself runs in fp32)."""
    B, H, S, d = q.shape
    K, Tk = k.shape[1], k.shape[2]
    qg = q.reshape(B, K, H // K, S, d)
    scores = jnp.einsum("bkgsd,bktd->bkgst", qg, k, precision=PRECISION,
                        preferred_element_type=jnp.float32).astype(q.dtype) * scale
    scores = scores.reshape(B, H, S, Tk)
    m = _mask(S, Tk, start, k_start, chunk) if pad is None else \
        _pad_mask(S, Tk, start, k_start, chunk, pad)[:, None]
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
    # one query (a decoding step): contract without the unit query axis, which XLA:CPU
    # lowers to a several times faster dot over a long cache
    sq, qg = ("", q.reshape(B, K, H // K, d)) if S == 1 else ("s", q.reshape(B, K, H // K, S, d))
    if S == 1:
        mask = mask[..., 0, :]
    s = jnp.einsum(f"bkg{sq}d,bktd->bkg{sq}t", qg, k, precision=PRECISION,
                   preferred_element_type=jnp.float32) * scale
    s = jnp.where(mask, s, -jnp.inf)
    e = jnp.exp(s - jnp.max(s, axis=-1, keepdims=True))
    o = jnp.einsum(f"bkg{sq}t,bktd->bkg{sq}d", e.astype(q.dtype), v, precision=PRECISION,
                   preferred_element_type=jnp.float32)
    o = o / jnp.sum(e, axis=-1, keepdims=True)
    return o.astype(q.dtype).reshape(B, H, S, d)


# ----------------------------------------------------------------------------- blockwise kernels
BLOCKWISE_MIN = 1 << 22
"""Size (elements, all batch rows and heads) of the unblocked score buffer (B*H*S*T for a
masked call, B*H*S*chunk for a chunked prefill) above which ``fused`` goes blockwise: 16 MiB
in fp32, e.g. 1024 x 1024 tokens at 4 heads. Shorter calls keep the unblocked kernels and
their exact rounding; from about this size on the blockwise kernel is also the faster one
on CPU (it skips the masked half). Read at trace time."""
BLOCK_Q = 512
"""Query rows per block of the blockwise kernels (read at trace time). 512 x 512 measured
best on XLA:CPU (fp32 and bf16; 256 and 1024 were 5-20% slower): large enough for efficient
dots and a short loop, small enough (1 MiB of scores per head) to stay in cache."""
BLOCK_K = 512
"""Key columns per block of the blockwise kernels (read at trace time)."""
_NEG = -1e30
"""Score of a masked key in the blockwise kernels: finite, so a row that has seen no visible
key yet stays NaN-free (its garbage is multiplied by exp(_NEG - max) = 0 once it does)."""


def device_attention(q: jax.Array, k: jax.Array, v: jax.Array, scale: float,
                     implementation: str | None = None) -> jax.Array:
    """Causal GQA attention of a prefill from position 0 (q, k, v at the same positions) by
    ``jax.nn.dot_product_attention``: on an NVIDIA GPU with bf16/fp16 inputs, cuDNN's fused
    flash kernel (``implementation=None`` lets jax choose; "xla" is the portable reference)."""
    def bthd(t: jax.Array) -> jax.Array:
        return t.transpose(0, 2, 1, 3)

    o = jax.nn.dot_product_attention(bthd(q), bthd(k), bthd(v), scale=scale, is_causal=True,
                                     implementation=implementation)
    return bthd(o)


def fused(q: jax.Array, k: jax.Array, v: jax.Array, start: Pos, k_start: Pos,
          chunk: int | None, scale: float, platform: str = "cpu",
          pad: PadMask | None = None) -> jax.Array:
    """Attention without a T x T buffer. A prefill from position 0 of a chunked layer runs
    per chunk (chunk x chunk blocks); other calls are masked. Calls whose unblocked score
    buffer would exceed ``BLOCKWISE_MIN`` elements run ``flash`` (for small chunks: the
    per-chunk kernel, a bounded group of chunks at a time), so short calls keep the
    unblocked kernels' exact rounding. On a GPU (``platform="gpu"``), a long bf16/fp16
    prefill of a global layer runs ``device_attention`` (cuDNN) instead of ``flash``. An
    unpadded decoding step (one query) on the CPU runs the CPU kernel (``cpukernels``), as in
    the torch backend.
    A padded batch (``pad``) runs masked: ``flash`` with the padding mask above
    ``BLOCKWISE_MIN``, else one masked kernel (never the per-chunk or cuDNN paths)."""
    B, H, S, d = q.shape
    T = k.shape[2]
    if pad is not None:
        if B * H * S * T > BLOCKWISE_MIN:
            return flash(q, k, v, start, k_start, chunk, scale, pad)
        return _sdpa(q, k, v, _pad_mask(S, T, start, k_start, chunk, pad)[:, None, None],
                     scale)
    if S == 1 and platform == "cpu" and cpukernels.serves_attention(q, k, v):
        # a decoding step on the CPU: the keys it sees are one run of slots, ending at its own
        # (chunked layers: from its chunk's first position), which the kernel reads once per
        # kv head; the slots past it (not yet written) are never read
        first = 0 if chunk is None else jnp.maximum(0, (start // chunk) * chunk - k_start)
        return cpukernels.attention(q, k, v, first, start - k_start - first + 1, scale)
    fresh = isinstance(start, int) and start == 0 and isinstance(k_start, int) and k_start == 0
    if platform == "gpu" and fresh and T == S and chunk is None and \
            B * H * S * T > BLOCKWISE_MIN and q.dtype in (jnp.bfloat16, jnp.float16):
        return device_attention(q, k, v, scale)
    if fresh and T == S and chunk is not None and S > chunk:
        big = B * H * S * chunk > BLOCKWISE_MIN
        if big and chunk > BLOCK_Q:
            return flash(q, k, v, start, k_start, chunk, scale)
        return _per_chunk(q, k, v, chunk, scale, max(1, BLOCKWISE_MIN // (B * H * chunk * chunk))
                          if big else None)
    if B * H * S * T > BLOCKWISE_MIN:
        return flash(q, k, v, start, k_start, chunk, scale)
    if fresh and T == S:
        chunk = None  # S <= chunk: causal only
    return _sdpa(q, k, v, _mask(S, T, start, k_start, chunk), scale)


def _per_chunk(q: jax.Array, k: jax.Array, v: jax.Array, chunk: int, scale: float,
               group: int | None) -> jax.Array:
    """A chunked layer's prefill from position 0 as causal attention within each chunk:
    all n chunks (x batch) at once, or ``group`` chunks at a time (a sequential map)."""
    B, H, S, d = q.shape
    n = -(-S // chunk)
    g = n if group is None else min(group, n)
    m = -(-n // g)

    def blocks(t: jax.Array) -> jax.Array:  # (m, g * B, N, chunk, d), chunk-major
        t = jnp.pad(t, ((0, 0), (0, 0), (0, m * g * chunk - S), (0, 0)))
        t = t.reshape(B, t.shape[1], m * g, chunk, d).transpose(2, 0, 1, 3, 4)
        return t.reshape(m, g * B, t.shape[2], chunk, d)

    mask = _mask(chunk, chunk, 0, 0, None)
    qb, kb, vb = blocks(q), blocks(k), blocks(v)
    if m == 1:
        o = _sdpa(qb[0], kb[0], vb[0], mask, scale)[None]
    else:
        o = jax.lax.map(lambda a: _sdpa(*a, mask, scale), (qb, kb, vb))
    o = o.reshape(m * g, B, H, chunk, d).transpose(1, 2, 0, 3, 4)
    return o.reshape(B, H, m * g * chunk, d)[:, :, :S]


def _seq_pad(t: jax.Array, n: int) -> jax.Array:
    """t (B, N, L, d) zero-padded along the sequence axis to length n."""
    return jnp.pad(t, ((0, 0), (0, 0), (0, n - t.shape[2]), (0, 0)))


def _block_sizes(S: int, T: int, chunk: int | None) -> tuple[int, int]:
    """Query and key block sizes: ``BLOCK_Q`` x ``BLOCK_K``, at most the input's length and
    (chunked layers) the chunk, so no block holds more than two chunks' worth of pairs."""
    c = chunk or max(S, T)
    return min(BLOCK_Q, S, c), min(BLOCK_K, T, c)


def _query_blocks(q: jax.Array, K: int, bq: int) -> jax.Array:
    """q (B, H, S, d) -> (nq, B, K, G, bq, d): query blocks, grouped by kv head, zero-padded."""
    B, H, S, d = q.shape
    nq = -(-S // bq)
    qb = _seq_pad(q, nq * bq).reshape(B, K, H // K, nq, bq, d)
    return jnp.moveaxis(qb, 3, 0)


def _key_range(q0: jax.Array, bq: int, start: Pos, S: int, k_start: Pos, T: int, bk: int,
               chunk: int | None) -> tuple[jax.Array, jax.Array]:
    """Key blocks [lo, hi) that queries q0..q0+bq-1 (the real ones: < start + S) can see."""
    last = jnp.minimum(q0 + bq, start + S) - 1
    hi = jnp.clip((last - k_start) // bk + 1, 0, -(-T // bk))
    first = 0 if chunk is None else (q0 // chunk) * chunk
    lo = jnp.clip((first - k_start) // bk, 0, hi)
    return lo, hi


def _block_scores(qi: jax.Array, kt: jax.Array, j: jax.Array, bk: int) -> jax.Array:
    """Unscaled fp32 scores (B, K, G, bq, bk) of query block qi against key block j of the
    transposed keys kt (B, K, d, T)."""
    kj = jax.lax.dynamic_slice_in_dim(kt, j * bk, bk, axis=3)
    return jnp.einsum("bkgqd,bkdt->bkgqt", qi, kj, precision=PRECISION,
                      preferred_element_type=jnp.float32)


def _keys_t(k: jax.Array, bk: int) -> jax.Array:
    """k (B, K, T, d) -> (B, K, d, T') zero-padded to whole key blocks, laid out so that a
    key block is a contiguous slice the score dot reads without a copy."""
    return jnp.swapaxes(_seq_pad(k, -(-k.shape[2] // bk) * bk), 2, 3)


def _block_mask(qpos: jax.Array, kpos: jax.Array, kidx: jax.Array, T: int,
                chunk: int | None, pad: PadMask | None = None) -> jax.Array:
    """(bq, bk) visibility: causal, a real key slot, and (chunked) the query's chunk; with
    ``pad`` (B, 1, 1, bq, bk): also a valid key or the query itself, chunks shifted by each
    row's left padding."""
    qp, kp = qpos[:, None], kpos[None, :]
    m = (kp <= qp) & (kidx < T)[None, :]
    if pad is None:
        if chunk is not None:
            m &= (kp // chunk) == (qp // chunk)
        return m
    m = m[None]
    if chunk is not None:
        s = pad.shift[:, None, None]
        m &= ((kp[None] - s) // chunk) == ((qp[None] - s) // chunk)
    valid = jnp.take(pad.valid, kpos, axis=1, mode="fill", fill_value=True)
    m &= valid[:, None, :] | (kp == qp)[None]
    return m[:, None, None]


def _map_blocks(fn, qb: jax.Array) -> jax.Array:
    """Run fn(i, query block) over the query blocks (sequentially: one block's buffers live at
    a time); returns the stacked results (nq, ...)."""
    return jax.lax.map(lambda a: fn(*a), (jnp.arange(qb.shape[0]), qb))


def _unblock(o: jax.Array, S: int) -> jax.Array:
    """(nq, B, K, G, bq, x) per-block results -> (B, K*G, S, x)."""
    nq, B, K, G, bq, x = o.shape
    return jnp.moveaxis(o, 0, 3).reshape(B, K * G, nq * bq, x)[:, :, :S]


def _round_to(x: jax.Array, dtype) -> jax.Array:
    """fp32 x rounded to ``dtype``'s precision, kept in fp32 (a reduce-precision op, which
    XLA keeps even where it may drop a convert pair)."""
    fi = jnp.finfo(dtype)
    if fi.bits >= 32:
        return x
    return jax.lax.reduce_precision(x, exponent_bits=fi.nexp, mantissa_bits=fi.nmant)


def flash(q: jax.Array, k: jax.Array, v: jax.Array, start: Pos, k_start: Pos,
          chunk: int | None, scale: float, pad: PadMask | None = None) -> jax.Array:
    """Blockwise (online-softmax) attention, the mask of ``fused``: for each block of
    ``BLOCK_Q`` queries, a loop over only the ``BLOCK_K``-key blocks it can see (causal; on
    chunked layers from its first query's chunk on). Memory O(block^2), never S x T; a causal
    global layer costs S*T/2, a chunked one S*chunk. Rounded as ``_sdpa``: fp32 scores,
    exp(s - running max) cast to the model dtype for the value product (fp32 accumulation,
    rescaled when the max grows), divided by the fp32 sum at the end.
    Key blocks wholly before the block's first query skip the mask on global layers. A padded
    batch (``pad``) masks every block (and on chunked layers starts at the first key block,
    since its rows' chunks are shifted)."""
    B, H, S, d = q.shape
    K, T = k.shape[1], k.shape[2]
    G = H // K
    bq, bk = _block_sizes(S, T, chunk)
    dt = q.dtype
    # dots in fp32 on the inputs upcast (exact: the products of model-dtype values and their
    # fp32 sums are what a model-dtype dot accumulating in fp32 computes), e rounded to dt
    f32 = jnp.float32
    kt = _keys_t(k.astype(f32), bk)
    vp = _seq_pad(v.astype(f32), kt.shape[3])

    def block(i, qi):
        q0 = start + i * bq
        qpos = q0 + jnp.arange(bq)
        lo, hi = _key_range(q0, bq, start, S, k_start, T, bk, chunk)
        if pad is not None:
            lo = jnp.zeros_like(lo)
        # blocks before ``mid`` hold only keys <= q0: visible to every query of a global layer
        mid = lo if chunk is not None or pad is not None else \
            jnp.clip((q0 - k_start + 1) // bk, lo, hi)

        def step(masked):
            def body(j, carry):
                m, l, acc = carry
                r = _block_scores(qi, kt, j, bk)
                if masked:
                    kidx = j * bk + jnp.arange(bk)
                    r = jnp.where(_block_mask(qpos, k_start + kidx, kidx, T, chunk, pad), r,
                                  _NEG)
                # max(r) * scale == max(r * scale): the scaling fuses into the exponential
                m2 = jnp.maximum(m, jnp.max(r, axis=-1) * scale)
                a = jnp.exp(m - m2)
                e = jnp.exp(r * scale - m2[..., None])
                vj = jax.lax.dynamic_slice_in_dim(vp, j * bk, bk, axis=2)
                pv = jnp.einsum("bkgqt,bktd->bkgqd", _round_to(e, dt), vj,
                                precision=PRECISION, preferred_element_type=f32)
                return m2, a * l + jnp.sum(e, axis=-1), a[..., None] * acc + pv
            return body

        carry = (jnp.full((B, K, G, bq), _NEG, jnp.float32), jnp.zeros((B, K, G, bq), jnp.float32),
                 jnp.zeros((B, K, G, bq, d), jnp.float32))
        carry = jax.lax.fori_loop(lo, mid, step(False), carry)
        _, l, acc = jax.lax.fori_loop(mid, hi, step(True), carry)
        return (acc / jnp.where(l > 0, l, 1.0)[..., None]).astype(dt)  # l = 0: padding rows

    return _unblock(_map_blocks(block, _query_blocks(q.astype(f32), K, bq)), S)


def _bucket(dist: jax.Array) -> jax.Array:
    """Distance bucket (``numerics.distance_bucket_edges``) of int32 distances: 0 for d <= 0,
    floor(log2 d) + 1 for d >= 1, at most ``DISTANCE_BUCKETS - 1``."""
    b = 32 - jax.lax.clz(jnp.maximum(dist, 1).astype(jnp.int32))
    return jnp.where(dist <= 0, 0, jnp.minimum(b, DISTANCE_BUCKETS - 1))


def attention_summary(q: jax.Array, k: jax.Array, start: Pos, k_start: Pos, chunk: int | None,
                      own_chunk: int | None, scale: float) -> jax.Array:
    """``numerics.SUMMARY_FEATURES`` (B, H, S, F) float32 of the attention distribution of each
    query (mask of ``fused``; fp32 scores from the inputs), computed with ``flash``'s block loop
    and online softmax (never an S x T buffer). Per query it keeps the running max m and sum
    l = sum e (e = exp(s - m)) and, rescaled whenever m grows: sum e (s - m) (entropy
    = log l - that / l), the mass in the query's own ``own_chunk`` chunk, sum e (q - k) and the
    mass per distance bucket; the sink weight and the max weight (1 / l) come at the end.
    Key blocks more than a block before the query block (distances within a factor of 2) touch
    at most two buckets and split their mass with one comparison; nearer blocks compare
    against every bucket their distances can reach."""
    B, H, S, d = q.shape
    K, T = k.shape[1], k.shape[2]
    G = H // K
    bq, bk = _block_sizes(S, T, chunk)
    q, k = q.astype(jnp.float32), k.astype(jnp.float32)  # exact; fp32 dots are the fast ones
    kt = _keys_t(k, bk)
    nb = DISTANCE_BUCKETS
    near_buckets = min((2 * bq + 2 * bk).bit_length() + 1, nb)  # near blocks: d < 2bq + 2bk
    # key position 0 (the sink): slot -k_start when the keys start there
    k_zero = jax.lax.dynamic_index_in_dim(k, jnp.clip(-k_start, 0, T - 1), axis=2,
                                          keepdims=False)  # (B, K, d)

    def block(i, qi):
        q0 = start + i * bq
        qpos = q0 + jnp.arange(bq)
        lo, hi = _key_range(q0, bq, start, S, k_start, T, bk, chunk)
        # blocks before ``near``: keys at distances [dmin, dmax] with dmax < 2 dmin, dmin >= 1
        near = jnp.clip(-((k_start + bq + 2 * bk - 3 - q0) // bk), lo, hi)

        def step(far):
            def body(j, carry):
                m, l, ent, own, dist, mass = carry
                s = _block_scores(qi, kt, j, bk) * scale
                kidx = j * bk + jnp.arange(bk)
                kpos = k_start + kidx
                if not far or chunk is not None:
                    s = jnp.where(_block_mask(qpos, kpos, kidx, T, chunk), s, _NEG)
                m2 = jnp.maximum(m, jnp.max(s, axis=-1))
                a = jnp.exp(m - m2)
                e = jnp.exp(s - m2[..., None])
                se = jnp.sum(e, axis=-1)
                ent = a * (ent + (m - m2) * l) + jnp.sum(e * (s - m2[..., None]), axis=-1)
                if own_chunk is not None:
                    same = (kpos[None, :] // own_chunk) == (qpos[:, None] // own_chunk)
                    own = a * own + jnp.sum(jnp.where(same, e, 0.0), axis=-1)
                dq = qpos[:, None] - kpos[None, :]  # (bq, bk) int32
                dist = a * dist + jnp.sum(e * dq.astype(jnp.float32), axis=-1)
                mass = a[..., None] * mass
                if far:
                    # the block's distances span buckets b and b + 1 (the latter from 2^b on)
                    b = _bucket(q0 - (k_start + j * bk + bk - 1))
                    upper = jnp.sum(jnp.where(dq >= jnp.left_shift(1, jnp.minimum(b, 30)), e,
                                              0.0), axis=-1)
                    upper = jnp.where(b < nb - 1, upper, 0.0)
                    ids = jnp.arange(nb)
                    mass = (mass + (se - upper)[..., None] * (ids == b)
                            + upper[..., None] * (ids == b + 1))
                else:
                    bid = _bucket(dq)
                    cols = [jnp.sum(jnp.where(bid == t, e, 0.0), axis=-1)
                            for t in range(near_buckets)]
                    mass = mass.at[..., :near_buckets].add(jnp.stack(cols, axis=-1))
                return m2, a * l + se, ent, own, dist, mass
            return body

        z = jnp.zeros((B, K, G, bq), jnp.float32)
        carry = (jnp.full((B, K, G, bq), _NEG, jnp.float32), z, z, z, z,
                 jnp.zeros((B, K, G, bq, nb), jnp.float32))
        carry = jax.lax.fori_loop(lo, near, step(True), carry)
        m, l, ent, own, dist, mass = jax.lax.fori_loop(near, hi, step(False), carry)
        l = jnp.where(l > 0, l, 1.0)
        s0 = jnp.einsum("bkgqd,bkd->bkgq", qi, k_zero, precision=PRECISION,
                        preferred_element_type=jnp.float32) * scale
        sees0 = (k_start <= 0) & (qpos >= 0)
        if chunk is not None:
            sees0 &= qpos < chunk
        sink = jnp.where(sees0, jnp.exp(jnp.minimum(s0 - m, 0.0)) / l, 0.0)
        own = own / l if own_chunk is not None else jnp.ones_like(l)
        feats = [jnp.log(l) - ent / l, own, sink, dist / l, 1.0 / l]
        return jnp.concatenate([jnp.stack(feats, axis=-1), mass / l[..., None]], axis=-1)

    return _unblock(_map_blocks(block, _query_blocks(q, K, bq)), S)


def cache_update(entry: CacheEntry, k: jax.Array, v: jax.Array, start: Pos,
                 chunk: int | None, shift: jax.Array | None = None
                 ) -> tuple[jax.Array, jax.Array, Pos, CacheEntry]:
    """Append new keys/values; chunked layers drop keys no later query can see.

    Returns the keys/values this call attends to, the position of their first slot, and the
    new entry. The stored buffers keep a fixed capacity ``entry.cap``: the new entry is the
    window starting at the kept position (the host grows ``cap`` beforehand if needed).
    """
    S = k.shape[2]
    if entry.k is not None and chunk is None:
        # a global layer keeps every key: write in place (the host sized ``cap`` to hold
        # them), no copy of the whole cache per call; unwritten slots are masked as future
        off = start - entry.k_start
        ks = jax.lax.dynamic_update_slice_in_dim(entry.k, k.astype(entry.k.dtype), off, axis=2)
        vs = jax.lax.dynamic_update_slice_in_dim(entry.v, v.astype(entry.v.dtype), off, axis=2)
        return ks, vs, entry.k_start, CacheEntry(ks, vs, entry.k_start, entry.cap)
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
        keep = jnp.maximum(k_start, keep_from(start, S, chunk, shift))
    idx = (keep - k_start) + jnp.arange(entry.cap)
    new = CacheEntry(jnp.take(ks, idx, axis=2, mode="fill", fill_value=0),
                     jnp.take(vs, idx, axis=2, mode="fill", fill_value=0), keep, entry.cap)
    return ks, vs, k_start, new
