"""Llama 4 feed-forward (jax): sigmoid top-k router, sparse expert dispatch, shared expert.

Dispatch is sparse and dropless with static shapes, by one of two paths chosen from the static
bucket size C (a host-side argument, see ``capacity``/``tiled``):

* bucketed: assignments are sorted by expert (stable argsort) into a buffer (E, C, D) of fixed
  capacity C (a power of two, at most tokens*k), one einsum per expert runs over it, and each
  assignment's output is gathered back. ``moe`` also returns the largest expert load so the
  host can verify ``max load <= C`` and rerun with a bigger bucket: no token is ever dropped.
* tiled: used when the bucket buffer would be mostly padding (E*C > 2*tokens*k and E*C >=
  ``MIN_TILED_ROWS``; ``capacity`` then returns tokens*k, so the layer never reruns). The sorted
  assignments are cut per expert into tiles of ``TILE`` rows, and a loop runs over the tiles in
  use only (at most ceil(tokens*k/TILE) + E), each a (TILE, D) x (D, 2I) product with its
  expert's weights, like torch's per-expert loop. Same ops per row, so the same numerics.

Measured on this 2-core CPU (mini config: hidden 1024, expert width 1024, 512 tokens, random
router; ms per MoE layer including routing, range of three runs on a shared machine), fp32:
E=16 (max load 42, C=64): bucketed 137-336, ``jax.lax.ragged_dot`` 967-2052, dense all-experts
904-1051; E=128 (max load 10, C=16): bucketed 783-1502, ragged_dot 8836-9317, dense 7424-9337.
XLA:CPU lowers ragged_dot to a dense masked dot (E times the FLOPs), so the bucket is used.
Dispatch alone, same shapes (best of 3): E=16, C=64: bucketed 110, tiles of 8/16/32 rows
266/152/138 (so E=16 keeps the bucket); E=128, max load 9, C=16: bucketed 591, tiles of
8/16/32 rows 531/500/752. With the benchmark's router (E=128, max load ~36) the bucket needs
C=64, i.e. 8192 rows for 512 tokens, which the tiles avoid.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ..config import ModelConfig
from ..interventions import Plan
from .attention import PRECISION, linear
from .hooks import Recorder


def silu(x: jax.Array) -> jax.Array:
    """SiLU computed in fp32 and rounded once to the input dtype (as torch's CPU kernel)."""
    return jax.nn.silu(x.astype(jnp.float32)).astype(x.dtype)


def swiglu(x: jax.Array, gate: jax.Array, up: jax.Array, down: jax.Array) -> jax.Array:
    """nn.Linear-layout SwiGLU: down(silu(gate x) * up x)."""
    return linear(silu(linear(x, gate)) * linear(x, up), down)


TILE = 16  # rows per tile of the tiled dispatch
MIN_TILED_ROWS = 2048  # a bucket buffer E*C smaller than this is never replaced by tiles


def tiled(assignments: int, experts: int, cap: int) -> bool:
    """Whether ``dispatch`` runs the tiled path for this static bucket size (see ``capacity``)."""
    return cap >= assignments and experts > 2 and experts * cap >= MIN_TILED_ROWS


def capacity(n: int, k: int, experts: int, load: int | None = None) -> int:
    """Bucket size C for n tokens routed to k experts each: a power of two, at most n*k.

    Without an observed ``load`` the guess is twice the mean load (at least 32). When the
    bucket buffer would hold more than twice the assignments (E*C > 2*n*k, and at least
    ``MIN_TILED_ROWS`` rows) the result is n*k, which selects the tiled dispatch: it holds any
    load, so such a layer never overflows and never reruns.
    """
    need = max(2 * -(-n * k // experts), 32) if load is None else max(int(load), 1)
    cap = min(n * k, 1 << (need - 1).bit_length())
    if experts * cap > 2 * n * k and experts * cap >= MIN_TILED_ROWS and experts > 2:
        return n * k
    return cap


def select_experts(logits: jax.Array, k: int, layer: int, plan: Plan, seq: int) -> jax.Array:
    """Top-k expert ids (N, k) after bans (-inf) and forcing (+inf); logits: (N, E), N = B*seq.

    ``jax.lax.top_k`` breaks exact ties towards the lower expert id.
    """
    sel = logits
    ban = plan.ban.get(layer)
    force = plan.force.get(layer)
    if ban:
        sel = sel.at[:, np.asarray(ban)].set(-jnp.inf)
    for expert, pos in force or ():
        if pos is None:
            sel = sel.at[:, expert].set(jnp.inf)
        else:
            rows = np.isin(np.arange(sel.shape[0]) % seq, pos)
            sel = sel.at[np.flatnonzero(rows), expert].set(jnp.inf)
    return jax.lax.top_k(sel, k)[1]


def expert_matmul(buf: jax.Array, w: jax.Array) -> jax.Array:
    """Each expert's bucket times that expert's matrix: (E, C, In) x (E, In, Out) -> (E, C, Out)."""
    return jnp.einsum("eci,eio->eco", buf, w, precision=PRECISION)


def tiled_experts(xs: jax.Array, counts: jax.Array, offsets: jax.Array, gate_up: jax.Array,
                  down: jax.Array, tile: int) -> jax.Array:
    """Expert outputs (A, D) for expert-sorted inputs xs (A, D), in tiles of ``tile`` rows.

    Expert e's rows xs[offsets[e] : offsets[e] + counts[e]] are cut into ceil(counts[e]/tile)
    tiles; a loop runs only over the tiles in use (at most ceil(A/tile) + min(E, A)), each one
    (tile, D) x (D, 2I) and (tile, I) x (I, D) with that expert's weights, and keeps the rows
    of the tile that belong to its expert (the rest, the next expert's, are written by a later
    tile). Every assignment's row is computed exactly once and nothing is dropped.
    """
    A, D = xs.shape
    E = gate_up.shape[0]
    n_max = -(-A // tile) + min(E, A)
    per = (counts + tile - 1) // tile  # tiles per expert
    end = jnp.cumsum(per)
    t = jnp.arange(n_max, dtype=end.dtype)
    te = jnp.minimum(jnp.searchsorted(end, t, side="right"), E - 1).astype(jnp.int32)
    j = t - (end[te] - per[te])
    start = (offsets[te] + j * tile).astype(jnp.int32)
    valid = jnp.clip(counts[te] - j * tile, 0, tile)
    xs = jnp.concatenate([xs, jnp.zeros((tile, D), xs.dtype)])  # a slice never clamps
    rows = jnp.arange(tile)[:, None]

    def body(i, y):
        s = start[i]
        xt = jax.lax.dynamic_slice_in_dim(xs, s, tile)
        gu = expert_matmul(xt[None], gate_up[te[i]][None])
        inter = gu.shape[-1] // 2
        act = gu[..., inter:] * silu(gu[..., :inter])
        yt = expert_matmul(act, down[te[i]][None])[0]
        old = jax.lax.dynamic_slice_in_dim(y, s, tile)
        return jax.lax.dynamic_update_slice_in_dim(y, jnp.where(rows < valid[i], yt, old), s, 0)

    y = jax.lax.fori_loop(0, end[-1], body, jnp.zeros((A + tile, D), xs.dtype))
    return y[:A]


def dispatch(xf: jax.Array, idx: jax.Array, scores: jax.Array, gate_up: jax.Array,
             down: jax.Array, cap: int, zero: list[int] | None) -> tuple[jax.Array, jax.Array]:
    """Routed expert outputs (N, D) for tokens xf (N, D) with choices idx/scores (N, k).

    Each assignment's input is ``x * score`` in the model dtype (HF scales the expert input);
    with k > 1 the outputs are summed in fp32 and cast once. Returns also the largest load.
    """
    N, D = xf.shape
    E = gate_up.shape[0]
    k = idx.shape[1]
    flat = idx.reshape(-1)
    A = flat.shape[0]
    order = jnp.argsort(flat, stable=True)
    counts = jnp.bincount(flat, length=E)
    offsets = jnp.cumsum(counts) - counts
    if tiled(A, E, cap):
        xs = xf[order // k] * scores.reshape(-1)[order][:, None]
        y = tiled_experts(xs, counts, offsets, gate_up, down, TILE)
        out = jnp.zeros_like(y).at[order].set(y)
    else:
        out = bucketed_experts(xf, order, flat, counts, offsets, scores, gate_up, down, cap, k)
    if zero:
        out = out * (~jnp.isin(flat, np.asarray(zero)))[:, None].astype(out.dtype)
    if k == 1:
        routed = out
    else:
        routed = out.reshape(N, k, D).astype(jnp.float32).sum(1).astype(xf.dtype)
    return routed, counts.max()


def bucketed_experts(xf: jax.Array, order: jax.Array, flat: jax.Array, counts: jax.Array,
                     offsets: jax.Array, scores: jax.Array, gate_up: jax.Array,
                     down: jax.Array, cap: int, k: int) -> jax.Array:
    """Expert outputs (A, D) per assignment via the bucket buffer (E, C, D); zero if dropped."""
    A = flat.shape[0]
    E, _, D = down.shape
    slot = jnp.arange(cap)
    src = order[jnp.minimum(offsets[:, None] + slot[None, :], A - 1)]  # (E, C) assignments
    valid = slot[None, :] < counts[:, None]
    buf = xf[src // k] * scores.reshape(-1)[src][..., None]
    buf = jnp.where(valid[..., None], buf, jnp.zeros((), xf.dtype))
    gu = expert_matmul(buf, gate_up)
    inter = gu.shape[-1] // 2
    act = gu[..., inter:] * silu(gu[..., :inter])
    y = expert_matmul(act, down).reshape(E * cap, D)
    rank = jnp.zeros(A, jnp.int32).at[order].set(jnp.arange(A, dtype=jnp.int32)
                                                 - offsets[flat[order]].astype(jnp.int32))
    return jnp.take(y, flat * cap + rank, axis=0, mode="fill", fill_value=0)


def moe(p: dict[str, jax.Array], x: jax.Array, layer: int, cfg: ModelConfig, plan: Plan,
        rec: Recorder, cap: int) -> tuple[jax.Array, jax.Array]:
    """MoE block on normalised input x (B, S, D): shared(x) + sum_k expert_k(sigmoid(r_k) * x).

    ``cap`` is the static bucket size; returns the output and the largest expert load.
    """
    B, S, D = x.shape
    E = cfg.num_local_experts
    k = plan.k(cfg, layer)
    pre = f"layers.{layer}.feed_forward."
    h = f"layers.{layer}.moe."
    xf = x.reshape(-1, D)
    logits = linear(xf, p[pre + "router.weight"])  # model dtype, as HF computes it
    logits = rec(h + "router_logits", logits.reshape(B, S, E)).reshape(-1, E)
    idx = select_experts(logits, k, layer, plan, S)
    idx = rec(h + "topk_indices", idx.reshape(B, S, k)).reshape(-1, k).astype(jnp.int32)
    scores = jax.nn.sigmoid(jnp.take_along_axis(logits, idx, axis=1).astype(jnp.float32))
    scores = rec(h + "topk_scores", scores.astype(x.dtype).reshape(B, S, k)).reshape(-1, k)
    routed, load = dispatch(xf, idx, scores, p[pre + "experts.gate_up_proj"],
                            p[pre + "experts.down_proj"], cap, plan.zero.get(layer))
    routed = rec(h + "routed_out", routed.reshape(B, S, D))
    shared = swiglu(x, p[pre + "shared_expert.gate_proj.weight"],
                    p[pre + "shared_expert.up_proj.weight"],
                    p[pre + "shared_expert.down_proj.weight"])
    shared = rec(h + "shared_out", shared)
    return shared + routed, load


def mlp(p: dict[str, jax.Array], x: jax.Array, layer: int, rec: Recorder) -> jax.Array:
    """Dense SwiGLU layer (Maverick's non-MoE layers)."""
    pre = f"layers.{layer}.feed_forward."
    y = swiglu(x, p[pre + "gate_proj.weight"], p[pre + "up_proj.weight"],
               p[pre + "down_proj.weight"])
    return rec(f"layers.{layer}.mlp.out", y)
