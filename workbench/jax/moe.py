"""Mixture-of-experts kernels (jax): top-k selection, sparse expert dispatch, SwiGLU.

Dispatch is sparse, dropless and static-shaped, so one compiled graph serves any routing:
assignments are sorted by expert (stable argsort); each expert's rows are cut into tiles of
``tile_rows`` rows, and a loop runs over the tiles in use only (at most ceil(A/T) + E for A
assignments), each tile one ``lax.switch`` branch per expert: its (T, D) rows through that
expert's gate_up (2I, D), SwiGLU and down (D, I). Rows of a tile past its expert's count
belong to the next expert and are written by a later tile. Cost grows with the experts used,
not with E; compiling costs one branch per expert, once per compiled MoE layer kind.

Why this form on XLA:CPU (measurements in the benchmarks' README):
* ``jax.lax.ragged_dot`` is lowered to a dense masked dot there (E times the FLOPs), and
  batched dots (E, C, D) x (E, D, O) run several times below plain 2-D dots, so capacity
  buckets lose to per-expert tiles.
* Indexing a stacked (E, ...) weight inside the loop (``w[e]``) materialises a copy of the
  expert's weight per tile; one array per expert selected by ``lax.switch`` is read in place.
* A skinny (<= 32 rows) product reads its weight faster with the weight in nn.Linear layout
  (out, in), contracting the last axes, so the params hold each expert's projections that way.

On GPUs the experts stay stacked in the checkpoint's layout (``StackedExperts``) and run as
two grouped products, ``jax.lax.ragged_dot`` (kernel "ragged"), or through the same tile loop
on slices of the stacks (kernel "tiles"): ``JaxModel.expert_kernel`` chooses.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from . import cpukernels
from .attention import PRECISION, linear
from .quant import expert_weights, fp8_tokens


def silu(x: jax.Array) -> jax.Array:
    """SiLU computed in fp32 and rounded once to the input dtype (as torch's CPU kernel)."""
    return jax.nn.silu(x.astype(jnp.float32)).astype(x.dtype)


def swiglu(x: jax.Array, gate: jax.Array, up: jax.Array, down: jax.Array) -> jax.Array:
    """nn.Linear-layout SwiGLU: down(silu(gate x) * up x)."""
    return linear(silu(linear(x, gate)) * linear(x, up), down)


SKINNY_ROWS = 64  # fp32 tiles up to this many rows run ``skinny_swiglu``


def skinny_swiglu(x: jax.Array, gate_up: jax.Array, down: jax.Array) -> jax.Array:
    """One expert's SwiGLU on a few fp32 rows x (n, D), computed transposed: W (out, in)
    times x^T, so the weight is the product's left operand.

    XLA:CPU reads a weight about twice as fast this way when n is small (the expert phase
    is weight-bound), provided the (out, n) results are not transposed back into the
    product: optimization barriers keep XLA from folding the transposes into the dots,
    which would give back the slow form. The same sums in another order (fp32 rounding
    only); bf16 is slower this way and keeps ``linear``.
    """
    inter = gate_up.shape[0] // 2
    ht = jax.lax.dot_general(gate_up, x, (((1,), (1,)), ((), ())), precision=PRECISION)
    ht = jax.lax.optimization_barrier(ht)  # (2I, n)
    a = ht[inter:] * silu(ht[:inter])
    yt = jax.lax.dot_general(down, a, (((1,), (0,)), ((), ())), precision=PRECISION)
    return jax.lax.optimization_barrier(yt).T  # (n, D)


def tile_rows(assignments: int, experts: int) -> int:
    """Rows per tile: half the mean expert load as a power of two, clamped to [8, 128], and
    no more than the assignments need (a decode step's one assignment: one row).

    Small tiles waste few rows on lightly loaded experts (large E); large tiles keep the
    products efficient when every expert gets many rows (large batches).
    """
    half = max(assignments // (2 * experts), 1)
    rows = min(max(1 << (half.bit_length() - 1), 8), 128)
    return int(min(rows, 1 << max(assignments - 1, 0).bit_length()))


def expert_names(layer: int, expert: int | None = None) -> tuple[str, str]:
    """Names of an MoE layer's (gate_up, down) weights: the checkpoint's stacked tensors, or,
    given ``expert``, the per-expert nn.Linear-layout arrays of this backend's params."""
    pre = f"layers.{layer}.feed_forward.experts." + ("" if expert is None else f"{expert}.")
    return pre + "gate_up_proj", pre + "down_proj"


def select_experts(logits: jax.Array, k: int, ban: tuple[int, ...],
                   force: tuple[tuple[int, tuple[int, ...] | None], ...], seq: int) -> jax.Array:
    """Top-k expert ids (N, k) after bans (-inf) and forcing (+inf); logits: (N, E), N = B*seq.

    ``jax.lax.top_k`` breaks exact ties towards the lower expert id.
    """
    sel = logits
    if ban:
        sel = sel.at[:, np.asarray(ban)].set(-jnp.inf)
    for expert, pos in force:
        if pos is None:
            sel = sel.at[:, expert].set(jnp.inf)
        else:
            rows = np.isin(np.arange(sel.shape[0]) % seq, pos)
            sel = sel.at[np.flatnonzero(rows), expert].set(jnp.inf)
    return jax.lax.top_k(sel, k)[1]


EXPERT_KERNELS = ("ragged", "tiles")


@jax.tree_util.register_pytree_node_class
class StackedExperts:
    """A layer's routed experts as two stacked arrays in the checkpoint's layout, gate_up
    (E, D, 2I) and down (E, I, D), and the kernel that runs them: "ragged" (one
    ``jax.lax.ragged_dot`` per projection over the expert-sorted rows: a grouped GEMM on
    GPUs) or "tiles" (the tile loop of ``expert_tiles`` on each expert's slices).

    The kernel is static (part of the tree structure), so changing it recompiles."""

    def __init__(self, gate_up: jax.Array, down: jax.Array, kernel: str = "ragged"):
        if kernel not in EXPERT_KERNELS:
            raise ValueError(f"expert kernel {kernel!r}: choose one of {EXPERT_KERNELS}")
        self.gate_up, self.down, self.kernel = gate_up, down, kernel

    def __len__(self) -> int:
        return self.gate_up.shape[0]

    def pairs(self) -> list[tuple[jax.Array, jax.Array]]:
        """Per-expert nn.Linear-layout (gate_up (2I, D), down (D, I)) slices (the tile loop's
        operands; inside a compiled step the slices and transposes fold into the products)."""
        return [(self.gate_up[e].T, self.down[e].T) for e in range(len(self))]

    def tree_flatten(self) -> tuple[tuple[jax.Array, jax.Array], str]:
        return (self.gate_up, self.down), self.kernel

    @classmethod
    def tree_unflatten(cls, kernel: str, children: tuple) -> StackedExperts:
        obj = cls.__new__(cls)
        obj.gate_up, obj.down, obj.kernel = children[0], children[1], kernel
        return obj


def ragged_swiglu(xs: jax.Array, counts: jax.Array, experts: StackedExperts) -> jax.Array:
    """Expert-sorted rows xs (A, D) through their experts, counts[e] rows each (rows past
    ``counts.sum()`` give zeros), as two ``jax.lax.ragged_dot`` grouped products."""
    sizes = counts.astype(jnp.int32)
    gu = jax.lax.ragged_dot(xs, experts.gate_up, sizes, precision=PRECISION)
    inter = gu.shape[-1] // 2
    h = gu[:, inter:] * silu(gu[:, :inter])
    y = jax.lax.ragged_dot(h, experts.down, sizes, precision=PRECISION)
    keep = jnp.arange(xs.shape[0]) < sizes.sum()
    return jnp.where(keep[:, None], y, jnp.zeros_like(y))


def expert_branches(experts: list[Any], tile: int) -> list[Callable[[jax.Array], jax.Array]]:
    """One function per expert taking its tile of rows (tile, D) to the expert's outputs: the
    ``lax.switch`` branches of the dispatch (FP8 experts dequantised per tile)."""
    def ffn(w: Any) -> Callable[[jax.Array], jax.Array]:
        def run(xt: jax.Array) -> jax.Array:
            gate_up, down, act = expert_weights(w, xt.dtype)  # FP8: dequantised per tile
            if not act and xt.dtype == jnp.float32 and tile <= SKINNY_ROWS:
                return skinny_swiglu(xt, gate_up, down)
            gu = linear(fp8_tokens(xt) if act else xt, gate_up)
            inter = gu.shape[-1] // 2
            h = gu[:, inter:] * silu(gu[:, :inter])
            return linear(fp8_tokens(h) if act else h, down)
        return run

    return [ffn(w) for w in experts]


def expert_tiles(xs: jax.Array, counts: jax.Array, offsets: jax.Array,
                 experts: list[tuple[jax.Array, jax.Array]], tile: int) -> jax.Array:
    """Expert outputs (A, D) for expert-sorted inputs xs (A, D), in tiles of ``tile`` rows.

    Expert e's rows xs[offsets[e] : offsets[e] + counts[e]] are cut into ceil(counts[e]/tile)
    tiles; a loop runs only over the tiles in use, each computing its rows with expert e's
    (gate_up (2I, D), down (D, I)) and keeping the rows that belong to e. Every assignment's
    row is computed exactly once and nothing is dropped.
    """
    A, D = xs.shape
    E = len(experts)
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

    branches = expert_branches(experts, tile)

    def body(i, y):
        s = start[i]
        yt = jax.lax.switch(te[i], branches, jax.lax.dynamic_slice_in_dim(xs, s, tile))
        old = jax.lax.dynamic_slice_in_dim(y, s, tile)
        return jax.lax.dynamic_update_slice_in_dim(y, jnp.where(rows < valid[i], yt, old), s, 0)

    y = jax.lax.fori_loop(0, end[-1], body, jnp.zeros((A + tile, D), xs.dtype))
    return y[:A]


def dispatch_rows(xf: jax.Array, idx: jax.Array, gates: jax.Array,
                  experts: list[tuple[jax.Array, jax.Array]] | cpukernels.ExpertTable |
                  StackedExperts, tile: int) -> jax.Array:
    """Per-assignment expert outputs (N*k, D), in ``idx.reshape(-1)`` order, for tokens xf
    (N, D) with choices idx/gates (N, k), idx numbering ``experts`` (arrays, an
    ``ExpertTable``: the CPU kernel on weights by address, or ``StackedExperts``). An id outside
    [0, len(experts)) gives a zero row and costs nothing, so a streamed layer can run its
    chosen experts group by group and merge the rows (``where`` on ``idx >= 0``).

    Each assignment's input is ``x * gate`` in the model dtype (HF scales the expert input).
    """
    k = idx.shape[1]
    E = len(experts)
    flat = idx.reshape(-1)
    ragged = isinstance(experts, StackedExperts) and experts.kernel == "ragged"
    if isinstance(experts, StackedExperts) and not ragged:
        experts = experts.pairs()

    def kernel(xs: jax.Array, counts: jax.Array) -> jax.Array | None:
        """The CPU kernel's (or the grouped products') outputs for expert-sorted rows xs,
        when it serves them."""
        if ragged:
            return ragged_swiglu(xs, counts, experts)
        if isinstance(experts, cpukernels.ExpertTable):  # weights by address: always
            return cpukernels.experts_at(xs, counts, experts)
        if cpukernels.serves_experts(xs, experts, tile):
            return cpukernels.experts(xs, counts, experts)
        return None

    if flat.shape[0] == 1:  # one assignment (a decode step): its expert, no sort or loop
        x1 = xf[:1] * gates.reshape(-1)[:, None]
        y = kernel(x1, (jnp.arange(E) == flat[0]).astype(jnp.int32))
        if y is not None:
            return y
        ok = (flat[0] >= 0) & (flat[0] < E)
        y = jax.lax.switch(jnp.where(ok, flat[0], 0), expert_branches(experts, 1), x1)
        return jnp.where(ok, y, jnp.zeros_like(y))
    key = jnp.where((flat >= 0) & (flat < E), flat, E)  # outside the group: sorted last
    order = jnp.argsort(key, stable=True)
    counts = jnp.bincount(key, length=E + 1)[:E]
    offsets = jnp.cumsum(counts) - counts
    xs = xf[order // k] * gates.reshape(-1)[order][:, None]
    y = kernel(xs, counts)  # the CPU kernel: each expert's rows
    if y is None:
        y = expert_tiles(xs, counts, offsets, experts, tile)
    return jnp.zeros_like(y).at[order].set(y)


def combine_rows(rows: jax.Array, k: int) -> jax.Array:
    """(N*k, D) per-assignment outputs -> (N, D): with k > 1 summed in fp32 and cast once."""
    if k == 1:
        return rows
    N = rows.shape[0] // k
    return rows.reshape(N, k, -1).astype(jnp.float32).sum(1).astype(rows.dtype)


def dispatch(xf: jax.Array, idx: jax.Array, gates: jax.Array,
             experts: list[tuple[jax.Array, jax.Array]], tile: int | None = None) -> jax.Array:
    """Routed expert outputs (N, D) for tokens xf (N, D) with choices idx/gates (N, k), idx
    numbering ``experts`` (every expert, or only those a streamed layer read); ``tile``
    defaults to ``tile_rows`` of the assignments over ``len(experts)``."""
    tile = tile or tile_rows(idx.size, len(experts))  # looked up per trace
    return combine_rows(dispatch_rows(xf, idx, gates, experts, tile), idx.shape[1])


def zero_gates(gates: jax.Array, idx: jax.Array, experts: tuple[int, ...]) -> jax.Array:
    """gates with 0 where idx is one of ``experts``."""
    return jnp.where(jnp.isin(idx, np.asarray(experts)), jnp.zeros((), gates.dtype), gates)
