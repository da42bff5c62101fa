"""The jax backend: params on a jax device, the shared forward with compiled steps.

The forward loop (``workbench.forward``) runs on the host; each of its steps — the embedding,
one decoder layer, the head — runs as a ``jax.jit`` function compiled once per distinct
*kind* and reused: every layer with the same structure (MoE or dense, RoPE or NoPE, chunk,
QK-norm, temperature), the same interventions, captured hooks and KV-cache layout calls the same
compiled function with its own parameters as arguments. Compile time therefore depends on the
number of distinct layer kinds (four or fewer for Llama 4), not on depth. Expert dispatch is
dropless with static shapes (``moe.expert_tiles``), so routing never causes a recompile.

The params map canonical names to arrays, except the routed experts: each MoE layer's stacked
``experts.gate_up_proj`` (E, D, 2I) / ``experts.down_proj`` (E, I, D) are held as one
nn.Linear-layout array per expert, ``experts.{e}.gate_up_proj`` (2I, D) and
``experts.{e}.down_proj`` (D, I), which the dispatch reads in place (see ``moe``).
``state_dict_numpy`` restacks them into checkpoint layout. On GPUs (or with
``expert_layout="stacked"``) bf16/fp32 experts stay stacked as the checkpoint holds them, the
operands of a grouped product (``moe.StackedExperts``; ``JaxModel.expert_kernel``).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from .. import hooks as hk
from ..checkpoint import Checkpoint, ExpertWeights
from ..config import ModelConfig
from ..forward import (
    EMBED_HOOKS,
    HEAD_HOOKS,
    Context,
    Executor,
    LayerKind,
    LayerPlan,
    PadMask,
    Recorder,
    ResidentWeights,
    attention_phase,
    embed_step,
    forward,
    head_step,
    layer_step,
    moe_output,
    route_phase,
)
from ..interventions import Plan
from ..model import CaptureSpec, Model, store
from ..numerics import rope_cos_sin, rope_inv_freq, temperature_scales
from ..plan import EXPERT_GROUP_BYTES
from ..quant import FP8, check_quant, dequantize
from ..streaming import StreamedWeights, check_offload, parse_bytes, streamed_state_dict
from ..vision.forward import rope_tables, split_params, vision_forward, vision_status
from ..vision.jax_ops import CompiledVision, JaxVisionOps
from . import parallel
from .attention import CacheEntry, keep_from
from .cpukernels import ExpertTable, expert_table
from .moe import (
    EXPERT_KERNELS,
    StackedExperts,
    combine_rows,
    dispatch_rows,
    expert_names,
    tile_rows,
)
from .ops import JAX_DTYPES, host_array, resolve_device
from .quant import FP8Expert

Params = dict[str, jax.Array]  # canonical name -> array (the native "module" of this backend)
MAX_STEPS = 256
_ALIGN = 64  # bytes: host buffers aligned so, jax's CPU client uses in place
_XLA_TRANSPOSE_BYTES = 32 << 20
_MIN_KV_CAP = 16
DECODE_GROUP = 8
DECODE_GROUP_TOKENS = 4
HEAD_BLOCK_BYTES = 256 << 20
"""Float32 logits (all batch rows) above which the head runs over blocks of positions, each
block copied into the host result as it comes (no device-side logits of the whole call)."""


@dataclass
class KVCache:
    """Decoding state kept between calls (``Model.new_cache``/``generate``).

    Per layer, (k, v) buffers (B, K, cap, d) whose slot j holds absolute position
    ``k_start[layer] + j``; ``start`` counts the positions consumed. Chunked layers keep only
    the current chunk; capacities grow in powers of two, so a decoding loop recompiles only
    when a buffer doubles.
    """

    batch: int
    start: int = 0
    kv: dict[int, tuple[jax.Array, jax.Array]] = field(default_factory=dict)
    k_start: dict[int, int] = field(default_factory=dict)
    shift: np.ndarray | None = None  # a padded batch's left padding per row

    def prepare(self, cfg: ModelConfig, n: int) -> dict[int, CacheEntry]:
        """Grow buffers for n new positions; the per-layer entries the forward continues."""
        entries = {}
        for layer in range(cfg.num_hidden_layers):
            chunk = cfg.chunk_size(layer)
            ks = self.k_start.get(layer, 0)
            kept = self.start + n - (max(ks, int(keep_from(self.start, n, chunk, self.shift)))
                                     if chunk else ks)
            have = self.kv[layer][0].shape[2] if layer in self.kv else 0
            cap = have
            if kept > have:
                cap = 1 << (max(kept, _MIN_KV_CAP) - 1).bit_length()
                if layer in self.kv:
                    pad = ((0, 0), (0, 0), (0, cap - have), (0, 0))
                    self.kv[layer] = tuple(jax.numpy.pad(t, pad) for t in self.kv[layer])
            if layer in self.kv:
                k, v = self.kv[layer]
                entries[layer] = CacheEntry(k, v, np.int32(ks), cap)
            else:
                entries[layer] = CacheEntry(None, None, 0, cap)
        return entries

    def commit(self, cfg: ModelConfig, entries: dict[int, CacheEntry], n: int) -> None:
        """Store the buffers returned by a call over n new positions."""
        for layer in range(cfg.num_hidden_layers):
            chunk = cfg.chunk_size(layer)
            if chunk is not None:
                ks = self.k_start.get(layer, 0)
                self.k_start[layer] = max(ks, int(keep_from(self.start, n, chunk, self.shift)))
            else:
                self.k_start[layer] = 0
            self.kv[layer] = (entries[layer].k, entries[layer].v)
        self.start += n


class JaxModel(Model):
    """``wb.load(path, backend="jax")``: the JAX backend.

    ``tensors`` maps canonical names to numpy arrays (checkpoint layout); each is converted and
    placed on the device one at a time. On the CPU, jax adopts a suitably aligned host array
    without copying, so weights memory-mapped from a checkpoint in the model's dtype stay one
    copy.
    """

    backend = "jax"

    def __init__(self, config: ModelConfig, tensors: Mapping[str, np.ndarray],
                 dtype: str = "float32", path: str | None = None, device: Any = None, *,
                 done: Callable[[str], None] | None = None,
                 stream: Checkpoint | None = None, max_memory: int | None = None,
                 mesh: Mesh | None = None, quant: str | None = None,
                 expert_layout: str | None = None):
        super().__init__(config, dtype, path)
        self.mesh = mesh  # expert parallel: experts sharded on its "expert" axis (parallel.py)
        self._device = resolve_device(device) if mesh is None else mesh.devices.flat[0]
        self._placement: Any = self._device if mesh is None else \
            NamedSharding(mesh, PartitionSpec())
        self.quant = quant  # None, or how FP8 weights run: "weights" | "w8a8"
        self.params: Params = {}
        self.aliased = 0  # tensors adopted from host memory without a copy (CPU only)
        self.vision_problem = vision_status(config, tensors)
        if expert_layout not in (None, "stacked", "per_expert"):
            raise ValueError(f"expert_layout={expert_layout!r}: choose 'stacked', "
                             "'per_expert' or None (stacked on GPUs)")
        # resident bf16/fp32 experts: stacked (grouped products) on GPUs, per expert elsewhere
        self.stacked_experts = mesh is None and stream is None and quant is None and (
            expert_layout == "stacked" or
            (expert_layout is None and self._device.platform == "gpu"))
        self._expert_kernel = "ragged"
        for n, a in to_params(config, tensors if mesh is None else
                              parallel.without_experts(config, tensors), done,
                              stacked=self.stacked_experts):
            # FP8 experts stay FP8 and their scales float32; the rest in the model dtype
            self.params[n] = self.put_stored(a) if n.endswith("_scale") or a.dtype == FP8 \
                else self.put(a)
            del a
        self.ops = JaxVisionOps(self._device) if mesh is None else \
            parallel.ExpertParallelOps(mesh)
        E = config.num_local_experts
        if mesh is not None:  # every device holds its E/n experts of each MoE layer
            self.expert_slots = {}
            for i in config.moe_layers:
                self.expert_slots[i] = parallel.shard_experts(config, mesh, tensors, i,
                                                              self._np_dtype)
                for n in expert_names(i):
                    if done:
                        done(n)
            self.weights = ResidentWeights(config, self.params, self.expert_slots.__getitem__)
        act = quant == "w8a8"
        if mesh is not None:
            pass  # the sharded experts above
        elif stream is not None:  # streamed: copies on demand, experts in nn.Linear layout

            def put(view: np.ndarray) -> jax.Array:
                return self.put(view, copy=True)

            def put_expert(w: ExpertWeights) -> Any:
                if not w.quantized:
                    return put(w.gate_up.T), put(w.down.T)
                return FP8Expert(*(self.put_stored(a) for a in (
                    w.gate_up.T, w.down.T, w.gate_up_scale, w.down_scale)), act=act)

            self.weights: ResidentWeights | StreamedWeights = StreamedWeights(
                stream, put, put_expert, max_memory)
        elif self.stacked_experts:
            def experts(i: int) -> StackedExperts:
                gu, dn = (self.params[n] for n in expert_names(i))
                return StackedExperts(gu, dn, self._expert_kernel)

            self.weights = ResidentWeights(config, self.params, experts)
        else:
            def experts(i: int) -> list[Any]:
                out = []
                for e in range(E):
                    gu, dn = (self.params[n] for n in expert_names(i, e))
                    scales = [self.params.get(n + "_scale") for n in expert_names(i, e)]
                    out.append((gu, dn) if scales[0] is None else
                               FP8Expert(gu, dn, *scales, act=act))
                return out

            self.weights = ResidentWeights(config, self.params, experts)
        self.inv_freq = rope_inv_freq(config)
        self._steps: OrderedDict[tuple, Callable] = OrderedDict()
        self._signatures: set[tuple] = set()
        # extra XLA options for every compiled step, e.g. {"xla_backend_optimization_level":
        # 0} compiles about twice as fast, for small models where compiling dominates
        self.compiler_options: dict[str, Any] = {}
        # streamed MoE layers hold at most this many bytes of chosen experts at once (plus
        # the expert cache): experts are read and run group by group
        self.expert_group_bytes = EXPERT_GROUP_BYTES
        # a continued call of at most DECODE_GROUP_TOKENS positions (a decoding step) on
        # resident weights runs this many consecutive layers as one compiled program (1: a
        # program per layer, as a prefill): fewer calls and no Python between layers, for
        # one compile of that many layers (groups alike share it)
        self.decode_group = DECODE_GROUP
        self._tables: dict[int, tuple[list, list | ExpertTable]] = {}

    @property
    def expert_kernel(self) -> str:
        """How stacked experts (``stacked_experts``: GPUs) run: "ragged" (two
        ``jax.lax.ragged_dot`` grouped products per MoE layer) or "tiles" (the tile loop on
        each expert's slices). Settable; each kernel compiles its own steps."""
        return self._expert_kernel

    @expert_kernel.setter
    def expert_kernel(self, kernel: str) -> None:
        if kernel not in EXPERT_KERNELS:
            raise ValueError(f"expert_kernel={kernel!r}: choose one of {EXPERT_KERNELS}")
        self._expert_kernel = kernel
        if not self.stacked_experts:
            return
        for i in self.config.moe_layers:
            lp = self.weights.layer(i)
            lp["experts"] = StackedExperts(lp["experts"].gate_up, lp["experts"].down, kernel)

    def expert_table(self, i: int, experts: list) -> list | ExpertTable:
        """Layer i's routed experts by address (``ExpertTable``, built once), for decoding
        steps; the list itself where the kernel cannot take them so."""
        hit = self._tables.get(i)
        if hit is None or hit[0] is not experts:
            hit = self._tables[i] = (experts, expert_table(experts) or experts)
        return hit[1]

    def put_stored(self, a: np.ndarray) -> jax.Array:
        """A host array on the device in its own dtype (FP8 weights, float32 scales), C order."""
        return jax.device_put(np.ascontiguousarray(a), self._device)

    def put(self, a: np.ndarray, copy: bool = False) -> jax.Array:
        """A host array on the device in the model's dtype, with at most one copy: on the CPU
        a 64-byte-aligned array already in the dtype is adopted in place (unless ``copy``)."""
        np_dt = self._np_dtype
        host = np.asarray(a)
        if host.ndim == 2 and host.nbytes >= _XLA_TRANSPOSE_BYTES and \
                not host.flags.c_contiguous and host.T.flags.c_contiguous:
            # a large transposed view (an expert in nn.Linear layout): read it in file order,
            # then let XLA transpose on the device, several times faster than numpy's strided
            # copy (small ones are not worth compiling a transpose for)
            return jnp.transpose(self.put(host.T, copy))
        cpu = self._device.platform == "cpu"
        if cpu and (copy or host.dtype != np_dt or host.ctypes.data % _ALIGN
                    or not host.flags.c_contiguous):
            host = _aligned(host, np_dt)  # the one copy, which jax then adopts
        elif host.dtype != np_dt:
            host = host.astype(np_dt)
        arr = jax.device_put(host, self._placement)
        if cpu and not copy and _pointer(arr) == np.asarray(a).ctypes.data:
            self.aliased += 1
        return arr

    @property
    def _np_dtype(self) -> np.dtype:
        return np.dtype(ml_dtypes.bfloat16) if self.dtype == "bfloat16" else np.dtype(np.float32)

    @property
    def device(self) -> jax.Device:
        """The jax device holding the params and running the compiled steps."""
        return self._device

    @property
    def module(self) -> Params:
        """The params pytree (canonical name -> jax array), for users going below the API."""
        return self.params

    @property
    def jax_dtype(self) -> Any:
        return JAX_DTYPES[self.dtype]

    @property
    def compiled_variants(self) -> int:
        """How many distinct forward variants (plan x capture x cache layout) have run."""
        return len(self._signatures)

    @property
    def compiled_steps(self) -> int:
        """How many compiled step functions (embedding, layer kinds, head) are cached."""
        return len(self._steps)

    def new_cache(self, batch: int) -> KVCache:
        return KVCache(batch)

    def _options(self) -> dict[str, Any]:
        opts = dict(self.compiler_options)
        if self.dtype == "bfloat16":
            # forbid XLA from keeping fp32 intermediates across casts, so rounding happens
            # where torch rounds (after each op in the model dtype)
            opts.setdefault("xla_allow_excess_precision", False)
        return opts

    def _step(self, key: tuple, build: Callable[[], Callable],
              donate: tuple[int, ...] = ()) -> Callable:
        """The compiled function of ``key`` (built once); ``donate``: argument positions whose
        buffers the call may reuse for its outputs (a continued KV cache is updated in place
        instead of copied on every decoding step)."""
        opts = self._options()
        key = key + (tuple(sorted(opts.items())), donate)
        fn = self._steps.get(key)
        if fn is not None:
            self._steps.move_to_end(key)
            return fn
        fn = jax.jit(build(), compiler_options=opts or None, donate_argnums=donate)
        self._steps[key] = fn
        while len(self._steps) > MAX_STEPS:
            self._steps.popitem(last=False)
        return fn

    def _forward(self, ids, plan, spec: CaptureSpec, cache=None, stop_at_layer=None, pad=None,
                 images=None):
        cfg = self.config
        S = ids.shape[1]
        start = 0 if cache is None else cache.start
        positions = np.arange(start, start + S)
        cos, sin = rope_cos_sin(positions if pad is None else pad.positions, self.inv_freq)
        # the query temperature follows the slot, as transformers' Llama 4 computes it
        temp = temperature_scales(positions, cfg) if cfg.attn_temperature_tuning else None
        if cache is not None:
            cache.shift = None if pad is None else pad.shift
        entries = None if cache is None else cache.prepare(cfg, S)
        continuing = cache is not None and bool(cache.kv)
        mask = None
        if pad is not None:
            # slots padded (as valid) to a power of two: decode steps reuse compiled steps
            L = pad.valid.shape[1]
            valid = np.ones((pad.valid.shape[0], 1 << max(4, (L - 1).bit_length())), bool)
            valid[:, :L] = pad.valid
            mask = PadMask(jax.device_put(valid, self._device),
                           self.ops.asarray(pad.shift.astype(np.int32)))
        # small per-call inputs go to the compiled steps as host arrays (jit copies them in
        # far faster than a device_put each); a mesh places them replicated
        put = host_array if self.mesh is None else self.ops.asarray
        ctx = Context(put(cos), put(sin), None if temp is None else put(temp),
                      np.int32(start) if continuing else 0, mask)
        before = {} if cache is None else dict(cache.k_start)
        pos = spec.positions
        self._signatures.add((plan.key(), spec.names, None if pos is None else
                              (pos.start, pos.stop, pos.step),
                              "none" if cache is None else "continue" if continuing else "fresh",
                              None if entries is None else tuple(e.cap for e in
                                                                 entries.values()),
                              stop_at_layer, spec.nan_check, pad is not None))
        # a decoding step on resident weights: consecutive layers as one compiled program,
        # routed experts by address
        decode = continuing and S <= DECODE_GROUP_TOKENS and \
            isinstance(self.weights, ResidentWeights)
        group = self.decode_group if decode else 1
        whole = decode and group >= cfg.num_hidden_layers and stop_at_layer is None and \
            images is None and self.mesh is None
        ex = _CompiledSteps(self, plan, spec, {n: host_array(v) for n, v in
                                               plan.patches.items()}, group, decode, whole)
        image = None if images is None else self._image(images, spec, ex.rec)
        logits, _ = forward(ex, self.weights, ids, ctx, entries, stop_at_layer, image)
        if cache is not None:
            cache.commit(cfg, entries, S)
        self._check_finite(ex.rec.finite, "jax")
        arrays = {}
        for n, a in ex.rec.out.items():
            a = self.ops.to_numpy(a)
            if continuing and hk.is_pattern(n):  # drop the buffer's unused slots
                a = a[..., : start + S - before[hk.layer_of(n)]]
            arrays[n] = store(a, spec)
        if logits is not None and not isinstance(logits, np.ndarray):  # (see ``head``)
            logits = self.ops.to_numpy(logits)
        return logits, arrays, cache

    def _image(self, images: tuple[np.ndarray, np.ndarray], spec: CaptureSpec,
               rec: Recorder) -> tuple[jax.Array, jax.Array]:
        """The vision path (compiled steps) on checked tiles: (placeholder positions,
        features (n, D))."""
        vc = self.config.vision
        pixels, positions = images
        cos, sin = (self.ops.asarray(a) for a in rope_tables(vc))
        ex = CompiledVision(self, vc, rec, spec.names, spec.nan_check)
        feats = vision_forward(ex, split_params(vc, self.params),
                               self.ops.asarray(pixels).astype(self.jax_dtype), cos, sin)
        return self.ops.asarray(positions), feats.reshape(-1, feats.shape[-1])

    def state_dict_numpy(self) -> dict[str, np.ndarray]:
        """Weights as float32 numpy arrays by canonical name, experts restacked (for
        Checkpoint.save)."""
        if isinstance(self.weights, StreamedWeights):
            return streamed_state_dict(self.weights)
        if self.mesh is not None:
            host = {n: self.ops.to_numpy(a) for n, a in self.params.items()}
            for i, slots in self.expert_slots.items():
                host.update(parallel.stacked_experts(self.config, self.mesh, slots, i))
            return host
        host = {n: np.asarray(a) for n, a in self.params.items() if n.endswith("_scale")}
        out = {}
        for n, a in self.params.items():
            if n.endswith("_scale"):
                continue
            out[n] = self.ops.to_numpy(a) if n + "_scale" not in host else \
                dequantize(np.asarray(a), host[n + "_scale"])
        return from_params(self.config, out)


class _CompiledSteps(Executor):
    """Runs each step of the shared forward as a compiled function, one per step kind.

    A step's key holds everything that shapes its graph: the layer kind and interventions,
    the hooks captured or edited in its scope (by relative name), patch shapes, the capture
    position slice and the KV-cache layout. jit adds the argument shapes. Captured values come
    back as outputs and are merged into ``rec.out`` under their absolute names.

    With ``group`` > 1 (a decoding step on resident weights), consecutive layers run as one
    compiled program, ``group`` layers at a time (groups start at multiples of ``group``):
    fewer calls per token, no Python between their layers, and XLA schedules across them.
    Inside a group, layer i + j is named ``layers.{j}.…``, so groups alike share a program.
    """

    def __init__(self, model: JaxModel, plan: Plan, spec: CaptureSpec,
                 patches: dict[str, np.ndarray], group: int = 1, by_address: bool = False,
                 whole: bool = False):
        super().__init__(model.ops, model.config, plan,
                         Recorder(model.ops, spec.names, plan, nan_check=spec.nan_check))
        self.model = model
        self.spec = spec
        self.patches = patches
        self.group = group
        self.by_address = by_address  # resident routed experts as ``ExpertTable``s
        # every layer in one group (and the head run): one program per call, the embedding
        # and the head included (``logits``: its result)
        self.whole = whole
        self.logits: jax.Array | None = None

    def _call(self, key: tuple, rename: Callable[[str], str | None],
              back: Callable[[str], str], step: Callable[..., Any], *args: Any,
              donate: tuple[int, ...] = ()) -> Any:
        """``step(*args, rec)`` compiled, its hooks those that ``rename`` maps to the names
        the step emits (None: outside it); ``back`` maps them back to absolute names."""
        def scoped(names):
            return {r: v for r, v in ((rename(n), v) for n, v in names.items())
                    if r is not None}
        want = frozenset(r for r in map(rename, self.spec.names) if r is not None)
        fns = scoped(self.plan.fns)
        patches = scoped(self.patches)
        pos = self.spec.positions
        nan_check = self.rec.nan_check
        full = key + (want, tuple(sorted((n, id(f)) for n, f in fns.items())),
                      tuple(sorted((n, v.shape, v.dtype.str) for n, v in patches.items())),
                      None if pos is None else (pos.start, pos.stop, pos.step), nan_check)
        ops = self.ops

        def build() -> Callable:
            def run(patch_values, *a):
                rec = Recorder(ops, want, Plan(fns=fns), patch_values, pos, nan_check=nan_check)
                return step(*a, rec), rec.out, rec.finite
            return run

        # argument i of ``args`` is argument i + 1 of ``run``
        fn = self.model._step(full, build, tuple(i + 1 for i in donate))
        result, out, finite = fn(patches, *args)
        for n, v in out.items():
            self.rec.out[back(n)] = v
        for n, v in finite.items():
            self.rec.finite[back(n)] = v
        return result

    @staticmethod
    def _names(names: frozenset[str]) -> tuple[Callable[[str], str | None],
                                               Callable[[str], str]]:
        """Renaming for a step outside the layers that emits ``names``."""
        return (lambda n: n if n in names else None), (lambda n: n)

    def embed(self, table: jax.Array, ids: jax.Array | np.ndarray,
              image: tuple[jax.Array, jax.Array] | None = None) -> jax.Array:
        if isinstance(ids, np.ndarray):
            ids = host_array(ids) if self.model.mesh is None else self.ops.asarray(ids)
        if self.whole and image is None:  # run by the program of every layer
            return _Embedding(table, ids)

        def step(table, ids, image, rec):
            return embed_step(self.ops, table, ids, rec, image)
        return self._call(("embedding", image is None), *self._names(EMBED_HOOKS), step,
                          table, ids, image)

    def head(self, norm: jax.Array, head: jax.Array, h: jax.Array) -> jax.Array | np.ndarray:
        if self.logits is not None:  # computed by the program of every layer
            return self.logits
        cfg = self.cfg

        def step(norm, head, h, rec):
            return head_step(self.ops, cfg, norm, head, h, rec)
        B, S = h.shape[:2]
        rows = max(1, HEAD_BLOCK_BYTES // (B * cfg.vocab_size * 4))
        touched = any(n in HEAD_HOOKS for n in (*self.spec.names, *self.plan.fns,
                                                 *self.patches))
        if S <= rows or touched or self.rec.nan_check:
            return self._call(("head",), *self._names(HEAD_HOOKS), step, norm, head, h)
        # a long sequence: the logits go straight into one float32 host array, a block of
        # positions at a time, instead of a device array plus its host copy
        out = np.empty((B, S, cfg.vocab_size), np.float32)
        for s0 in range(0, S, rows):
            part = self._call(("head",), *self._names(HEAD_HOOKS), step, norm, head,
                              h[:, s0:s0 + rows])
            out[:, s0:s0 + rows] = np.asarray(part)
            del part
        return out

    def span(self, i: int, n: int) -> int:
        g = self.group
        return 1 if g <= 1 else min(g - i % g, n - i)

    def layers(self, i: int, lps: list[dict[str, Any]], h: jax.Array, ctx: Context,
               caches: list[CacheEntry | None]) -> tuple[jax.Array, list[CacheEntry | None]]:
        if not all(lp.get("experts") is None or isinstance(lp["experts"], list | StackedExperts)
                   for lp in lps):
            return super().layers(i, lps, h, ctx, caches)  # streamed experts: ``layer``
        # every weight resident: one compiled step for the layers, named layers.0, 1, ...
        cfg, ops, count = self.cfg, self.ops, len(lps)
        if self.by_address:
            lps = [lp if lp.get("experts") is None else
                   {**lp, "experts": self.model.expert_table(i + j, lp["experts"])}
                   for j, lp in enumerate(lps)]
        kinds = tuple(LayerKind.of(cfg, j) for j in range(i, i + count))
        lplans = tuple(LayerPlan.of(cfg, self.plan, j) for j in range(i, i + count))
        modes = tuple(_mode(e) for e in caches)
        caps = tuple(None if e is None else e.cap for e in caches)
        kv = [None if e is None else (e.k, e.v, e.k_start) for e in caches]
        going = "continue" in modes
        # the program of every layer (``whole``) also embeds the ids and runs the head
        first = isinstance(h, _Embedding)
        last = self.whole and i + count == cfg.num_hidden_layers
        ends = ((h.table, h.ids) if first else None,
                self.model.weights.head() if last else None)
        outside = (EMBED_HOOKS if first else frozenset()) | (HEAD_HOOKS if last else frozenset())

        def step(lps, h, cos, sin, temp, kv, start, pad, ends, rec):
            if first:
                h = embed_step(ops, *ends[0], rec)
            new = []
            for j in range(count):
                entry = None if modes[j] == "none" else CacheEntry(*kv[j], caps[j])
                c = Context(cos, sin, temp, start if modes[j] == "continue" else 0, pad)
                h, e = layer_step(ops, cfg, kinds[j], lps[j], h, c,
                                  rec.scope(hk.absolute(j, "")), lplans[j], entry)
                new.append(None if e is None else (e.k, e.v, e.k_start))
            logits = head_step(ops, cfg, *ends[1], h, rec) if last else None
            return (h, logits), new

        def rename(n: str) -> str | None:
            layer = hk.layer_of(n)
            if layer is None:
                return n if n in outside else None
            return hk.absolute(layer - i, hk.relative(n)) if i <= layer < i + count else None

        def back(r: str) -> str:
            layer = hk.layer_of(r)
            return r if layer is None else hk.absolute(layer + i, hk.relative(r))

        # continued caches' buffers are replaced by the step's outputs: let XLA reuse them
        donate = (5,) if all(m == "continue" for m in modes) else ()
        (h, logits), new = self._call(("layers", kinds, lplans, modes, caps, first, last),
                                      rename, back, step, lps, None if first else h, ctx.cos,
                                      ctx.sin, ctx.temp, kv, ctx.start if going else None,
                                      ctx.pad, ends, donate=donate)
        if last:
            self.logits = logits
        return h, [None if e is None else CacheEntry(e[0], e[1], e[2], cap)
                   for e, cap in zip(new, caps, strict=True)]

    def layer(self, i: int, lp: dict[str, Any], h: jax.Array, ctx: Context,
              entry: CacheEntry | None) -> tuple[jax.Array, CacheEntry | None]:
        """A layer whose routed experts are streamed: attention and routing, then the chosen
        experts read group by group, then the rest of the block."""
        cfg, ops = self.cfg, self.ops
        kind, lplan = LayerKind.of(cfg, i), LayerPlan.of(cfg, self.plan, i)
        mode = _mode(entry)
        cap = None if entry is None else entry.cap
        kv = None if entry is None else (entry.k, entry.v, entry.k_start)
        start = ctx.start if mode == "continue" else None

        def rename(n: str) -> str | None:
            return hk.relative(n) if hk.layer_of(n) == i else None

        def back(r: str) -> str:
            return hk.absolute(i, r)

        # a continued cache's buffers are replaced by the step's outputs: let XLA reuse them
        donate = (5,) if mode == "continue" else ()
        experts = lp["experts"]

        def cache_in(kv):
            return None if mode == "none" else CacheEntry(kv[0], kv[1], kv[2], cap)

        def cache_out(e):
            return None if e is None else (e.k, e.v, e.k_start)

        # streamed experts: attention and routing, then read the chosen experts, then them
        dense = {n: a for n, a in lp.items() if n != "experts"}

        def route(lp, h, cos, sin, temp, kv, start, pad, rec):
            c = Context(cos, sin, temp, start if mode == "continue" else 0, pad)
            h, x, e = attention_phase(ops, cfg, kind, lp, h, c, rec, lplan, cache_in(kv))
            idx, gates = route_phase(ops, cfg, lp, x, rec, lplan)
            return (h, x, idx, gates), cache_out(e)

        (h, x, idx, gates), new = self._call(("route", kind, lplan, mode, cap), rename, back,
                                             route, dense, h, ctx.cos, ctx.sin, ctx.temp, kv,
                                             start, ctx.pad, donate=donate)
        # the chosen experts, group by group within ``expert_group_bytes``: each group's
        # assignment rows are computed by one compiled call and merged; the end of the block
        # (hooks, shared expert, residual) runs once on the merged rows
        used = np.unique(np.asarray(idx))
        E = experts.num_experts
        tile = tile_rows(int(np.prod(idx.shape)), E)  # as the resident dispatch: same rows
        rows = None
        for group in experts.groups(used.tolist(), self.model.expert_group_bytes):
            weights = experts.fetch(group)
            n = min(E, 1 << (len(group) - 1).bit_length())  # few compiled sizes
            chosen = [weights[e] for e in group]
            chosen += [chosen[0]] * (n - len(chosen))
            remap = np.full(E, -1, np.int32)
            remap[group] = np.arange(len(group), dtype=np.int32)

            def part(x, idx, gates, remap, chosen, rows, rec):
                local = jnp.take(remap, idx)
                y = dispatch_rows(x.reshape(-1, x.shape[-1]), local, gates, chosen, tile)
                if rows is None:
                    return y
                return jnp.where((local.reshape(-1) >= 0)[:, None], y, rows)

            rows = self._call(("experts", n, tile, rows is None), lambda _: None, back, part,
                              x, idx, gates, remap, chosen, rows)
            del weights, chosen

        k = idx.shape[-1]

        def finish(lp, h, x, rows, rec):
            return moe_output(ops, lp, h, x, combine_rows(rows, k), rec)

        h = self._call(("moe_out", k), rename, back, finish, dense, h, x, rows)
        return h, None if new is None else CacheEntry(new[0], new[1], new[2], cap)


class _Embedding(NamedTuple):
    """The embedding of a call whose one program runs every layer: done inside it."""

    table: jax.Array
    ids: np.ndarray | jax.Array


def _mode(entry: CacheEntry | None) -> str:
    """A layer's cache mode in a call: "none" (no cache), "fresh" (first call), "continue"."""
    return "none" if entry is None else "fresh" if entry.k is None else "continue"


def _aligned(a: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """A C-contiguous copy of ``a`` in ``dtype`` whose data starts on an ``_ALIGN``-byte
    boundary, which jax's CPU client adopts without copying again."""
    n = int(np.prod(a.shape, dtype=np.int64)) * dtype.itemsize
    buf = np.empty(n + _ALIGN, np.uint8)
    off = (-buf.ctypes.data) % _ALIGN
    out = buf[off:off + n].view(dtype).reshape(a.shape)
    out[...] = a
    return out


def _pointer(a: jax.Array) -> int | None:
    try:
        return a.unsafe_buffer_pointer()
    except Exception:  # noqa: BLE001 - not every array type exposes its buffer
        return None


def to_params(cfg: ModelConfig, tensors: Mapping[str, np.ndarray],
              done: Callable[[str], None] | None = None,
              stacked: bool = False) -> Iterator[tuple[str, np.ndarray]]:
    """Checkpoint tensors -> (name, array) in this backend's params layout: each MoE layer's
    stacked experts split into one nn.Linear-layout array per expert (``experts.{e}.gate_up_proj``
    (2I, D), ``experts.{e}.down_proj`` (D, I), as transposed views), or with ``stacked`` kept
    as the checkpoint stacks them; every other tensor as it is. Lazy, so nothing is copied
    here; ``done(name)`` is called once a checkpoint tensor is no longer needed."""
    if stacked:
        for n in tensors:
            yield n, tensors[n]
            if done:
                done(n)
        return
    stacked_names = {n for i in cfg.moe_layers for n in expert_names(i)}
    expert = getattr(tensors, "expert", None)  # one expert as stored (FP8 with its scales)
    for n in tensors:
        if n not in stacked_names:
            yield n, tensors[n]
            if done:
                done(n)
    for i in cfg.moe_layers:
        names = expert_names(i)
        if names[0] not in tensors:  # a streamed model holds no resident experts
            continue
        gate_up, down = (None, None) if expert else (tensors[n] for n in names)
        for e in range(cfg.num_local_experts):
            gu_name, dn_name = expert_names(i, e)
            w = expert(i, e) if expert else ExpertWeights(gate_up[e], down[e], None, None)
            yield gu_name, np.asarray(w.gate_up).T  # a view; the loader makes the one copy
            yield dn_name, np.asarray(w.down).T
            if w.quantized:
                yield gu_name + "_scale", w.gate_up_scale
                yield dn_name + "_scale", w.down_scale
            del w
        del gate_up, down
        for n in names:
            if done:
                done(n)


def from_params(cfg: ModelConfig, params: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Inverse of ``to_params``: canonical checkpoint names and layouts."""
    out = dict(params)
    for i in cfg.moe_layers:
        if expert_names(i)[0] in out:  # held stacked
            continue
        per_expert = zip(*(expert_names(i, e) for e in range(cfg.num_local_experts)))
        for name, names in zip(expert_names(i), per_expert):
            out[name] = np.stack([out.pop(n).T for n in names])
    return out


def load(path: str | Path, dtype: str = "float32", checkpoint: Checkpoint | None = None,
         device: Any = None, offload: str | None = None,
         max_memory: int | str | None = None, expert_parallel: bool = False,
         mesh: Mesh | None = None, quant: str | None = None,
         expert_layout: str | None = None) -> JaxModel:
    """Load a checkpoint directory into the jax backend, one tensor at a time.

    Tensors are read from the memory-mapped shards and placed on the device one by one; a
    tensor jax could not adopt in place has its file pages released once it is copied.
    ``offload="disk"`` streams instead: nothing is read until a forward needs it
    (``workbench.streaming``), with an expert cache of ``max_memory`` bytes.
    ``expert_parallel=True`` / ``mesh=`` shard the experts over a device mesh
    (``workbench.jax.parallel``).

    FP8 checkpoints keep their routed experts in FP8 (resident or in the streamed cache),
    dequantised per tile inside the compiled dispatch; ``quant="w8a8"`` also quantises the
    expert inputs per token (``workbench.quant.check_quant``). FP8 dense weights are
    dequantised when loaded.

    ``expert_layout``: "stacked" holds resident bf16/fp32 experts as the checkpoint stacks
    them, run by grouped products (``JaxModel.expert_kernel``), "per_expert" one array per
    expert (the CPU's tile loop and kernels); None: stacked on GPUs.
    """
    ck = checkpoint or Checkpoint.open(path)
    mode = check_quant(quant, ck)
    ep_mesh = parallel.resolve_mesh(ck.config, expert_parallel, mesh, device)
    if ep_mesh is not None:
        if offload is not None:
            raise ValueError("expert_parallel / mesh= hold every expert in device memory, "
                             "sharded; offload='disk' streams them from one host instead: "
                             "choose one")
        if mode is not None:
            raise ValueError(f"{path} is an FP8 checkpoint: expert_parallel / mesh= shard "
                             "bf16/fp32 experts only; load it without expert_parallel, or "
                             "dequantise it first")
        views = _Views(ck)
        model = JaxModel(ck.config, views, dtype, str(path), done=views.done, mesh=ep_mesh)
        model.vision_problem = ck.vision_problem
        return model
    if check_offload(offload, max_memory) == "disk":
        ck.weight_names()  # a streamed forward needs every layer too
        model = JaxModel(ck.config, {n: ck.view(n) for n in ck.vision_names()}, dtype,
                         str(path), device, stream=ck, max_memory=parse_bytes(max_memory),
                         quant=mode)
        model.vision_problem = ck.vision_problem
        return model
    views = _Views(ck)
    model = JaxModel(ck.config, views, dtype, str(path), device, done=views.done, quant=mode,
                     expert_layout=expert_layout)
    model.vision_problem = ck.vision_problem
    if model.aliased == 0:
        ck.close()
    return model


class _Views(Mapping[str, np.ndarray]):
    """A checkpoint's weights as zero-copy views, read lazily; ``done`` drops a tensor's file
    pages from memory (pages jax adopted are read back from the file when next touched)."""

    def __init__(self, ck: Checkpoint):
        self.ck = ck
        self.names = ck.weight_names() + ck.vision_names()

    def __getitem__(self, name: str) -> np.ndarray:
        if self.ck.is_quantized(name) and ".experts." not in name:
            return self.ck.dequantized(name)  # FP8 dense weights: dequantised when loaded
        return self.ck.view(name)

    def __contains__(self, name: object) -> bool:
        return name in self.names

    def expert(self, layer: int, e: int) -> ExpertWeights:
        """Routed expert e of ``layer`` as stored (FP8 with its scales)."""
        return self.ck.expert(layer, e)

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)

    def done(self, name: str) -> None:
        if ".experts." in name:  # read expert by expert: drop each one's pages
            for e in range(self.ck.config.num_local_experts):
                self.ck.evict_expert(hk.layer_of(name), e)
            return
        self.ck.evict(name)
