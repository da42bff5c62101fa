"""Expert parallelism on a jax ``Mesh``: experts sharded on an ``"expert"`` axis.

``wb.load(path, backend="jax", expert_parallel=True)`` builds a one-axis mesh over
``jax.devices()``; ``mesh=Mesh(devices, ("data", "expert"))`` uses the caller's. Expert ``e`` of
every MoE layer lives on expert-shard ``e // (E / n)``; everything else (embedding, attention,
norms, router, shared expert, head) is replicated, and with a ``"data"`` axis the batch is split
over it (the embedding's output carries that sharding and XLA propagates it; the batch must
then be a multiple of the ``"data"`` axis size).

The forward is the shared one (``workbench.forward``); only the expert dispatch differs
(``ExpertParallelOps.dispatch``). Inside ``jax.shard_map``, each (data, expert) shard takes its
slice of the tokens and:

1. sorts its (token, choice) assignments by expert, hence by destination shard;
2. exchanges per-expert counts with ``all_to_all`` (each shard learns how many rows every
   other shard sends it, and for which of its experts);
3. exchanges the rows with ``all_to_all``. The buffer for each (source, destination) pair holds
   every assignment of the source shard, a capacity no routing can overflow (all tokens on one
   expert included), so nothing is ever dropped and no ``ragged_all_to_all`` (not implemented
   on CPU) is needed; only the counted rows are computed;
4. runs its local experts on the received rows with the single-device tile kernel
   (``moe.expert_tiles``), then sends the results back with ``all_to_all``;
5. puts the results in assignment order and sums each token's k choices in fp32 exactly as the
   single-device dispatch does.

Each expert's weights are held as ``E / n`` *slot* arrays per projection: slot ``j`` stacks
expert ``s * E/n + j`` of every shard ``s`` along a leading axis sharded on ``"expert"``, so a
device holds exactly its own experts, in the nn.Linear layout the tile kernel reads in place.
The loader reads each device's experts only (``jax.make_array_from_callback``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from ..config import ModelConfig
from ..model import InputError
from ..vision.jax_ops import JaxVisionOps
from .moe import combine_rows, expert_names, expert_tiles, tile_rows
from .ops import host_array, resolve_device

EXPERT_AXIS = "expert"
DATA_AXIS = "data"
Slots = list[tuple[jax.Array, jax.Array]]  # per local slot: (gate_up (n, 2I, D), down (n, D, I))


def resolve_mesh(cfg: ModelConfig, expert_parallel: bool, mesh: Any,
                 device: Any = None) -> Mesh | None:
    """The mesh an expert-parallel jax model runs on, or None for a single-device model.

    ``mesh``: a ``jax.sharding.Mesh`` with an ``"expert"`` axis and optionally a ``"data"``
    axis; with ``expert_parallel=True`` and no mesh, one ``"expert"`` axis over every device of
    ``device``'s platform (default: ``jax.devices()``). The number of experts must be a multiple
    of the ``"expert"`` axis size.
    """
    if not isinstance(expert_parallel, bool | np.bool_):
        raise ValueError(f"expert_parallel={expert_parallel!r} must be True or False")
    if mesh is None and not expert_parallel:
        return None
    if mesh is None:
        devices = jax.devices() if device is None else jax.devices(
            resolve_device(device).platform)
        mesh = Mesh(np.array(devices), (EXPERT_AXIS,))
    elif not isinstance(mesh, Mesh):
        raise ValueError(f"mesh={mesh!r}: give a jax.sharding.Mesh with an {EXPERT_AXIS!r} axis "
                         f"(e.g. Mesh(np.array(jax.devices()).reshape(2, -1), "
                         f"({DATA_AXIS!r}, {EXPERT_AXIS!r})))")
    names = tuple(mesh.axis_names)
    if EXPERT_AXIS not in names:
        raise ValueError(f"mesh axes {names}: an expert-parallel mesh needs an axis named "
                         f"{EXPERT_AXIS!r} (and optionally {DATA_AXIS!r})")
    extra = [a for a in names if a not in (EXPERT_AXIS, DATA_AXIS)]
    if extra:
        raise ValueError(f"mesh axes {names}: only {EXPERT_AXIS!r} and {DATA_AXIS!r} are "
                         f"supported, not {extra}")
    n = mesh.shape[EXPERT_AXIS]
    E = cfg.num_local_experts
    if E % n:
        raise ValueError(f"expert_parallel: the model's {E} experts cannot be split evenly over "
                         f"{n} devices on the {EXPERT_AXIS!r} axis; use a number of devices that "
                         f"divides {E} (pass mesh= with an {EXPERT_AXIS!r} axis of that size)")
    # shard_map needs axes whose sharding XLA may choose (Auto): rebuild the caller's mesh so
    # a jax.make_mesh(...) mesh (Explicit axes by default) works too
    return Mesh(mesh.devices, names)


def experts_per_device(cfg: ModelConfig, mesh: Mesh) -> int:
    """E / n: the experts of one MoE layer that one device holds."""
    return cfg.num_local_experts // mesh.shape[EXPERT_AXIS]


def without_experts(cfg: ModelConfig, tensors: Mapping[str, np.ndarray]
                    ) -> dict[str, np.ndarray]:
    """``tensors`` without the routed experts (which ``shard_experts`` places)."""
    stacked = {n for i in cfg.moe_layers for n in expert_names(i)}
    return {n: tensors[n] for n in tensors if n not in stacked}


def shard_experts(cfg: ModelConfig, mesh: Mesh, tensors: Mapping[str, np.ndarray], layer: int,
                  dtype: np.dtype) -> Slots:
    """Layer ``layer``'s experts as slot arrays sharded on ``"expert"`` (see the module doc).

    ``tensors`` holds the checkpoint's stacked ``gate_up_proj`` (E, D, 2I) and ``down_proj``
    (E, I, D) (memory-mapped views); each device's shard is read from them alone, transposed to
    nn.Linear layout and converted to ``dtype``.
    """
    gu_name, dn_name = expert_names(layer)
    gate_up, down = tensors[gu_name], tensors[dn_name]
    E = cfg.num_local_experts
    for name, a in ((gu_name, gate_up), (dn_name, down)):
        if a.ndim != 3 or a.shape[0] != E:
            raise ValueError(f"tensor {name!r}: expected stacked experts of shape ({E}, ...), "
                             f"got {tuple(a.shape)}")
    per = experts_per_device(cfg, mesh)
    n = mesh.shape[EXPERT_AXIS]
    sharding = NamedSharding(mesh, P(EXPERT_AXIS))
    slots: Slots = []
    for j in range(per):
        pair = []
        for stacked in (gate_up, down):
            shape = (n, stacked.shape[2], stacked.shape[1])

            def read(index: tuple[slice, ...], stacked=stacked, j=j) -> np.ndarray:
                shards = range(n)[index[0]]
                return np.stack([np.asarray(stacked[s * per + j]).T.astype(dtype)
                                 for s in shards])

            pair.append(jax.make_array_from_callback(shape, sharding, read))
        slots.append((pair[0], pair[1]))
    return slots


def stacked_experts(cfg: ModelConfig, mesh: Mesh, slots: Slots, layer: int
                    ) -> dict[str, np.ndarray]:
    """The inverse of ``shard_experts``: checkpoint-layout float32 stacks of one layer."""
    per = experts_per_device(cfg, mesh)
    n = mesh.shape[EXPERT_AXIS]
    host = [(np.asarray(jax.device_get(gu), np.float32), np.asarray(jax.device_get(dn),
                                                                    np.float32))
            for gu, dn in slots]
    order = [(s, j) for s in range(n) for j in range(per)]  # expert s * per + j
    gu_name, dn_name = expert_names(layer)
    return {gu_name: np.stack([host[j][0][s].T for s, j in order]),
            dn_name: np.stack([host[j][1][s].T for s, j in order])}


def expert_bytes_per_device(slots_by_layer: Mapping[int, Slots]) -> dict[str, int]:
    """Bytes of routed-expert weights each device holds, by device (``str(device)``)."""
    out: dict[str, int] = {}
    for slots in slots_by_layer.values():
        for pair in slots:
            for a in pair:
                for shard in a.addressable_shards:
                    key = str(shard.device)
                    out[key] = out.get(key, 0) + shard.data.nbytes
    return out


def exchange_bytes(mesh: Mesh, tokens: int, k: int, hidden: int, itemsize: int,
                   experts: int) -> dict[str, int]:
    """Bytes one MoE layer's dispatch sends from each device to the others through
    ``all_to_all``: the count exchange, and the row buffers out and back, whose blocks hold
    every assignment of the shard (the capacity no routing can overflow) whatever the routing;
    ``payload`` is what balanced routing's rows fill of them."""
    n = mesh.shape[EXPERT_AXIS]
    groups = n * (mesh.shape[DATA_AXIS] if DATA_AXIS in mesh.axis_names else 1)
    local = -(-tokens // groups) * k  # assignments per shard
    counts = (n - 1) * (experts // n) * 4
    rows = (n - 1) * local * hidden * itemsize
    return {"counts": counts, "rows_out": rows, "rows_back": rows,
            "payload": 2 * local * hidden * itemsize * (n - 1) // n,
            "total": counts + 2 * rows}


class ExpertParallelOps(JaxVisionOps):
    """The jax kernels (vision included), replicated on ``mesh``, with an all-to-all dispatch."""

    def __init__(self, mesh: Mesh):
        super().__init__(mesh.devices.flat[0])
        self.mesh = mesh
        self.replicated = NamedSharding(mesh, P())
        self.data = mesh.shape[DATA_AXIS] if DATA_AXIS in mesh.axis_names else 1

    def asarray(self, a: np.ndarray) -> jax.Array:
        return jax.device_put(host_array(np.asarray(a)), self.replicated)

    def embed(self, table: jax.Array, ids: jax.Array) -> jax.Array:
        h = super().embed(table, ids)
        if self.data > 1:  # split the batch over "data"
            if h.shape[0] % self.data:
                raise InputError(f"a batch of {h.shape[0]} sequences cannot be split over the "
                                 f"mesh's {DATA_AXIS!r} axis of {self.data} devices: pass a "
                                 f"batch that is a multiple of {self.data}, or use a mesh "
                                 f"without a {DATA_AXIS!r} axis")
            h = jax.lax.with_sharding_constraint(h, NamedSharding(self.mesh, P(DATA_AXIS)))
        return h

    def dispatch(self, xf: jax.Array, idx: jax.Array, gates: jax.Array, experts: Slots
                 ) -> jax.Array:
        # the tokens stay as the dense part holds them (replicated, or split by batch over
        # "data"): without this, XLA would propagate the dispatch's split of the tokens over
        # "expert" back into attention and forward into the shared expert, changing how
        # their products are blocked and so their rounding
        rows = NamedSharding(self.mesh, P(DATA_AXIS) if self.data > 1 else P())
        xf, idx, gates = (jax.lax.with_sharding_constraint(a, rows) for a in (xf, idx, gates))
        return jax.lax.with_sharding_constraint(dispatch(self.mesh, xf, idx, gates, experts),
                                                rows)


def dispatch(mesh: Mesh, xf: jax.Array, idx: jax.Array, gates: jax.Array, slots: Slots,
             tile: int | None = None) -> jax.Array:
    """Routed expert outputs (N, D) for tokens xf (N, D) with choices idx/gates (N, k) over
    experts sharded as ``slots``: the all-to-all dispatch of the module doc, traced under jit.
    ``tile`` defaults to the single-device dispatch's tile for the same routing."""
    N, D = xf.shape
    k = idx.shape[1]
    n = mesh.shape[EXPERT_AXIS]
    per = len(slots)
    tile = tile or tile_rows(N * k, n * per)
    rows_axes: Any = (DATA_AXIS, EXPERT_AXIS) if DATA_AXIS in mesh.axis_names else EXPERT_AXIS
    groups = n * (mesh.shape[DATA_AXIS] if DATA_AXIS in mesh.axis_names else 1)
    pad = (-N) % groups
    if pad:  # padding rows choose no expert (-1) and are dropped after
        xf = jnp.concatenate([xf, jnp.zeros((pad, D), xf.dtype)])
        idx = jnp.concatenate([idx, jnp.full((pad, k), -1, idx.dtype)])
        gates = jnp.concatenate([gates, jnp.zeros((pad, k), gates.dtype)])

    def local(x: jax.Array, ix: jax.Array, g: jax.Array, w: Slots) -> jax.Array:
        return _local_dispatch(x, ix, g, [(gu[0], dn[0]) for gu, dn in w], n, tile)

    spec = P(rows_axes)
    fn = jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, spec,
                                                   [(P(EXPERT_AXIS), P(EXPERT_AXIS))] * per),
                       out_specs=spec, check_vma=False)
    return fn(xf, idx, gates, slots)[:N]


def _local_dispatch(x: jax.Array, idx: jax.Array, gates: jax.Array,
                    experts: list[tuple[jax.Array, jax.Array]], n: int, tile: int) -> jax.Array:
    """One shard's part of the dispatch: its tokens x (m, D) and choices (m, k) out to the
    shards holding the chosen experts, its own experts over what it receives, results back."""
    m, D = x.shape
    k = idx.shape[1]
    per = len(experts)
    E = n * per
    A = m * k  # this shard's assignments: the per-destination capacity
    flat = idx.reshape(-1)
    key = jnp.where((flat >= 0) & (flat < E), flat, E)  # padding rows sort last
    order = jnp.argsort(key, stable=True)
    skey = key[order]
    send_e = jnp.bincount(key, length=E + 1)[:E].reshape(n, per)  # rows per (dest, expert)
    send_n = send_e.sum(1)
    send_off = jnp.cumsum(send_n) - send_n
    xs = x[order // k] * gates.reshape(-1)[order][:, None]  # gate-scaled, expert-sorted
    r = jnp.arange(A)
    take = jnp.minimum(send_off[:, None] + r[None, :], A - 1)
    send = jnp.where((r[None, :] < send_n[:, None])[..., None], xs[take], 0)  # (n, A, D)

    # count exchange, then the rows: recv[s] = what shard s sent here, sorted by local expert
    recv_e = jax.lax.all_to_all(send_e, EXPERT_AXIS, 0, 0, tiled=True)  # (n src, per)
    recv = jax.lax.all_to_all(send, EXPERT_AXIS, 0, 0, tiled=True)  # (n src, A, D)

    bounds = jnp.cumsum(recv_e, axis=1)  # per source: end of each local expert's rows
    local_e = jax.vmap(lambda b: jnp.searchsorted(b, r, side="right"))(bounds)  # per in 0..per
    key2 = local_e.reshape(-1)  # rows past a source's count get ``per``: sorted last, unused
    order2 = jnp.argsort(key2, stable=True)
    counts = recv_e.sum(0)
    y = expert_tiles(recv.reshape(-1, D)[order2], counts, jnp.cumsum(counts) - counts,
                     experts, tile)
    y = jnp.zeros_like(y).at[order2].set(y).reshape(n, A, D)

    back = jax.lax.all_to_all(y, EXPERT_AXIS, 0, 0, tiled=True)  # (n dest, A, D)
    dest = jnp.minimum(skey // per, n - 1)
    ys = jnp.where((skey < E)[:, None], back[dest, r - send_off[dest]], 0)
    return combine_rows(jnp.zeros_like(ys).at[order].set(ys), k)
