"""The streaming CPU kernels (``workbench.cpukernels``) in jax: an XLA FFI custom call that
jitted code runs like any other op, used for few-row products on the CPU."""

from __future__ import annotations

import math
import threading
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .. import cpukernels as shared

_lock = threading.Lock()
_state: dict[str, object] = {}  # "ok": bool, "error": str


def ready() -> bool:
    """True when the custom call is built and registered with XLA (built on first use)."""
    if "ok" not in _state:
        with _lock:
            if "ok" not in _state:
                _state["ok"], _state["error"] = _register()
    return bool(_state["ok"])


def why_not_ready() -> str:
    """Why ``ready()`` is False ("" when it is True)."""
    ready()
    return str(_state["error"])


def _register() -> tuple[bool, str]:
    if not shared.available():
        return False, shared.why_unavailable()
    try:
        lib = shared.ffi_library(jax.ffi.include_dir())
    except OSError as e:
        return False, f"could not build the XLA custom call: {e}"
    jax.ffi.register_ffi_target("workbench_linear", jax.ffi.pycapsule(lib.WbLinear),
                                platform="cpu")
    jax.ffi.register_ffi_target("workbench_experts", jax.ffi.pycapsule(lib.WbExperts),
                                platform="cpu")
    jax.ffi.register_ffi_target("workbench_experts_at", jax.ffi.pycapsule(lib.WbExpertsAt),
                                platform="cpu")
    jax.ffi.register_ffi_target("workbench_attn1", jax.ffi.pycapsule(lib.WbAttn1),
                                platform="cpu")
    return True, ""


def serves_linear(x: jax.Array, w: jax.Array) -> bool:
    """Whether ``x @ w.T`` goes through the kernel: at most ``MAX_LINEAR_ROWS`` rows, fp32 or
    bf16, on the CPU, a weight of at least ``MIN_LINEAR_BYTES``. (XLA:CPU's fp32 product of
    one row reads a little slower than the kernel and of two to four rows at about half its
    rate; its bf16 one at a fraction of it.)"""
    return (x.dtype == w.dtype and x.dtype in (jnp.float32, jnp.bfloat16) and w.ndim == 2
            and math.prod(x.shape[:-1]) <= shared.MAX_LINEAR_ROWS
            and w.size * w.dtype.itemsize >= shared.MIN_LINEAR_BYTES
            and jax.default_backend() == "cpu" and ready())


def serves_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> bool:
    """Whether a decoding step's attention (q (B, H, 1, d), the cache k and v (B, K, cap, d))
    runs in the kernel: on the CPU, fp32 or bf16 throughout, d at most 1024, K dividing H."""
    return (shared.attention_shapes(q.shape, k.shape, v.shape) and q.dtype == k.dtype == v.dtype
            and q.dtype in (jnp.float32, jnp.bfloat16)
            and jax.default_backend() == "cpu" and ready())


def attention(q: jax.Array, k: jax.Array, v: jax.Array, first: jax.Array, count: jax.Array,
              scale: float) -> jax.Array:
    """softmax(q k^T * scale) v for one query per head over cache slots ``first`` ..
    ``first + count`` (traced int32 scalars; at least one slot), GQA: the torch backend's
    decode attention kernel, with its rounding (bf16: the softmax weights rounded to bf16
    before they weigh v, the output once at the end)."""
    out = jax.ShapeDtypeStruct(q.shape, q.dtype)
    keys = jnp.stack([jnp.asarray(first, jnp.int32), jnp.asarray(count, jnp.int32)])
    return jax.ffi.ffi_call("workbench_attn1", out, vmap_method="sequential")(
        q, k, v, keys, scale=np.float32(scale), threads=np.int32(shared.threads()))


POOL = 0  # the ``threads`` attribute asking for helper tasks on XLA's own thread pool


def call_threads(rows: int) -> int:
    """The ``threads`` attribute of one custom call. With more than one thread allowed
    (``workbench.cpukernels.threads()``), a call of at most ``MAX_LINEAR_ROWS`` rows (a decode
    step's products and expert) cuts its work into parts that the thread running it and a
    helper task on XLA's intra-op pool take in turn (``POOL``): XLA also runs independent ops
    of a step side by side on that pool (q, k and v; the shared and the routed experts), and
    the kernels' own worker thread would compete with them for the cores. A larger call (a
    prefill's expert phase) uses the kernels' worker."""
    n = shared.threads()
    if n < 2:
        return 1
    return POOL if rows <= shared.MAX_LINEAR_ROWS else n


def linear(x: jax.Array, w: jax.Array) -> jax.Array:
    """x (..., K) @ w.T for w (O, K), in x's dtype (bf16: sums in fp32, rounded once)."""
    out = jax.ShapeDtypeStruct((*x.shape[:-1], w.shape[0]), x.dtype)
    return jax.ffi.ffi_call("workbench_linear", out, vmap_method="sequential")(
        x, w, threads=np.int32(call_threads(math.prod(x.shape[:-1]))))


def faster_than_xla(dtype: jnp.dtype, rows: int, tile: int) -> bool:
    """Whether the kernel beats XLA:CPU on an expert phase of ``rows`` rows whose tile loop
    would use ``tile``-row tiles: in bf16 always (XLA's bf16 products on few rows are slow);
    in fp32 when the tiles are the smallest, 8 rows (a decode step's one row, or a prefill
    whose experts get fewer than 32 rows each on average: weight-read-bound). The choice
    depends on the tile, not on the experts passed, so a streamed layer's groups of experts
    compute exactly what the resident layer computes."""
    if dtype == jnp.bfloat16:
        return True
    return rows >= 1 and tile <= 8


def serves_experts(xs: jax.Array, experts: list, tile: int) -> bool:
    """Whether the expert phase on rows xs (tile loop tiles of ``tile`` rows) goes through
    the kernel: on the CPU, every expert a pair of plain (not FP8) 2-D weights in xs's dtype,
    fp32 or bf16, where ``faster_than_xla``."""
    if xs.dtype not in (jnp.float32, jnp.bfloat16) or not experts or \
            not faster_than_xla(xs.dtype, xs.shape[0], tile):
        return False
    for pair in experts:
        if not (isinstance(pair, tuple) and len(pair) == 2 and all(
                isinstance(w, jax.Array) and w.dtype == xs.dtype and w.ndim == 2 for w in pair)):
            return False
    return jax.default_backend() == "cpu" and ready()


def experts(xs: jax.Array, counts: jax.Array, experts: list) -> jax.Array:
    """Expert outputs (A, D) for expert-sorted rows xs (A, D): expert e (gate_up (2I, D),
    down (D, I)) takes the next ``counts[e]`` rows; rows past them are zero."""
    out = jax.ShapeDtypeStruct(xs.shape, xs.dtype)
    gus = [gu for gu, _ in experts]
    dns = [dn for _, dn in experts]
    return jax.ffi.ffi_call("workbench_experts", out, vmap_method="sequential")(
        xs, counts.astype(jnp.int32), *gus, *dns,
        threads=np.int32(call_threads(xs.shape[0])))


@jax.tree_util.register_pytree_node_class
class ExpertTable:
    """A layer's routed experts for the kernel by address: one small array of the (gate_up
    (2I, D), down (D, I)) weights' 64-bit addresses (as int32 pairs: (2, 2E)) instead of the
    2E arrays.

    A compiled call pays for every array it is passed, each time (about a microsecond or
    more apiece, most of a decode step's dispatch at E = 128: 256 arrays per MoE layer); the
    addresses cost one. The weights must outlive the table and never change: ``weights`` keeps
    them referenced (it is not part of the pytree, so it never reaches a compiled step).
    Layers of the same shapes have equal structure and share compiled steps.
    """

    def __init__(self, table: jax.Array, shape: tuple[int, int, int], dtype: str,
                 weights: list | None = None):
        self.table = table
        self.shape = shape  # (E, D, I)
        self.dtype = dtype
        self.weights = weights

    def __len__(self) -> int:
        return self.shape[0]

    def tree_flatten(self) -> tuple[tuple[jax.Array], tuple[tuple[int, int, int], str]]:
        return (self.table,), (self.shape, self.dtype)

    @classmethod
    def tree_unflatten(cls, aux: tuple, children: tuple) -> ExpertTable:
        return cls(children[0], *aux)


def expert_table(experts: Any) -> ExpertTable | None:
    """``experts`` (a list of (gate_up, down) pairs) by address, when the kernel can run them
    that way: on the CPU, every expert a pair of plain C-order arrays (2I, D), (D, I) of one
    dtype, fp32 or bf16, of one device; else None."""
    if not isinstance(experts, list) or not experts or jax.default_backend() != "cpu" or \
            not ready():
        return None
    first = experts[0]
    if not (isinstance(first, tuple) and len(first) == 2):
        return None
    dt = first[0].dtype if isinstance(first[0], jax.Array) else None
    if dt not in (jnp.float32, jnp.bfloat16) or first[0].ndim != 2:
        return None
    two_i, D = first[0].shape
    I = two_i // 2
    want = ((2 * I, D), (D, I))
    table = np.empty((2, len(experts)), np.int64)
    for e, pair in enumerate(experts):
        if not (isinstance(pair, tuple) and len(pair) == 2):
            return None
        for j, w in enumerate(pair):
            if not isinstance(w, jax.Array) or w.dtype != dt or w.shape != want[j] or \
                    w.is_deleted() or len(w.devices()) != 1 or \
                    next(iter(w.devices())).platform != "cpu" or \
                    not _default_layout(w):
                return None
            table[j, e] = w.unsafe_buffer_pointer()
    return ExpertTable(jax.device_put(table.view(np.int32), next(iter(first[0].devices()))),
                       (len(experts), D, I), str(dt), list(experts))


def _default_layout(w: jax.Array) -> bool:
    """Whether w's buffer is in C order (the default, row-major layout)."""
    return tuple(w.format.layout.major_to_minor) == tuple(range(w.ndim))


def experts_at(xs: jax.Array, counts: jax.Array, experts: ExpertTable) -> jax.Array:
    """``experts(xs, counts, ...)`` for experts given by address (``expert_table``)."""
    out = jax.ShapeDtypeStruct(xs.shape, xs.dtype)
    return jax.ffi.ffi_call("workbench_experts_at", out, vmap_method="sequential")(
        xs, counts.astype(jnp.int32), experts.table, inter=np.int64(experts.shape[2]),
        threads=np.int32(call_threads(xs.shape[0])))
