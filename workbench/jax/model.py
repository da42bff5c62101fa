"""The Llama 4 text model in JAX: a params pytree from a Checkpoint, a pure jitted forward.

``JaxModel`` compiles one ``jax.jit`` variant of ``forward`` per (intervention plan structure,
captured names, capture positions, KV-cache layout) and reuses it; jit itself specialises on
input shapes. Capturing nothing compiles a graph without hook outputs. Expert dispatch is
dropless with static shapes (``moe.expert_tiles``), so routing never causes a recompile.

The params pytree maps canonical names to arrays, except the routed experts: each MoE layer's
stacked ``experts.gate_up_proj`` (E, D, 2I) / ``experts.down_proj`` (E, I, D) are held as one
nn.Linear-layout array per expert, ``experts.{e}.gate_up_proj`` (2I, D) and
``experts.{e}.down_proj`` (D, I), which the dispatch reads in place (see ``moe``).
``state_dict_numpy`` restacks them into checkpoint layout.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from ..checkpoint import Checkpoint
from ..config import ModelConfig
from ..interventions import Plan
from ..model import CaptureSpec, Model, _store, seq_axis
from ..numerics import rope_cos_sin, rope_inv_freq, temperature_scales
from .attention import CacheEntry, Pos, attention, keep_from, linear, rms_norm
from .hooks import Recorder, patch_array, to_numpy
from .moe import expert_names, mlp, moe

JAX_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
Params = dict[str, jax.Array]  # canonical name -> array (the native "module" of this backend)
MAX_VARIANTS = 64
_MIN_KV_CAP = 16


def forward(p: Params, cfg: ModelConfig, ids: jax.Array, plan: Plan, rec: Recorder,
            rope: tuple[jax.Array, jax.Array], temp: jax.Array | None, start: Pos = 0,
            cache: dict[int, CacheEntry] | None = None) -> jax.Array:
    """Logits (B, S, V) for ids (B, S) at absolute positions start..start+S-1.

    Unlike torch's ``forward``, the RoPE tables and query temperatures for these positions are
    arguments (computed on the host by ``workbench.numerics``; ``start`` may be traced while
    decoding).
    """
    h = rec("embed", jnp.take(p["embed_tokens.weight"], ids, axis=0))
    eps = cfg.rms_norm_eps
    for i in range(cfg.num_hidden_layers):
        pre = f"layers.{i}."
        h = rec(pre + "resid_pre", h)
        a = attention(p, rms_norm(h, p[pre + "input_layernorm.weight"], eps), i, cfg, rope,
                      temp, start, cache, rec, plan.ablate.get(i))
        h = rec(pre + "resid_mid", h + a)
        x = rms_norm(h, p[pre + "post_attention_layernorm.weight"], eps)
        f = moe(p, x, i, cfg, plan, rec) if cfg.is_moe(i) else mlp(p, x, i, rec)
        h = rec(pre + "resid_post", h + f)
    h = rec("final_norm", rms_norm(h, p["norm.weight"], eps))
    head = p["embed_tokens.weight"] if cfg.tie_word_embeddings else p["lm_head.weight"]
    return rec("logits", linear(h, head))


@dataclass
class KVCache:
    """Decoding state kept between calls (``Model.new_cache``/``generate``).

    Per layer, (k, v) buffers (B, K, cap, d) whose slot j holds absolute position
    ``k_start[layer] + j``; ``start`` counts the positions consumed. Chunked layers keep only
    the current chunk (as torch's cache does); capacities grow in powers of two, so a decoding
    loop recompiles only when a buffer doubles.
    """

    batch: int
    start: int = 0
    kv: dict[int, tuple[jax.Array, jax.Array]] = field(default_factory=dict)
    k_start: dict[int, int] = field(default_factory=dict)

    def prepare(self, cfg: ModelConfig, n: int) -> tuple[str, tuple[int, ...], Any, Any]:
        """Grow buffers for n new positions: (mode, capacities, buffers, traced offsets)."""
        caps = []
        for layer in range(cfg.num_hidden_layers):
            chunk = cfg.chunk_size(layer)
            ks = self.k_start.get(layer, 0)
            kept = self.start + n - (max(ks, keep_from(self.start, n, chunk)) if chunk else ks)
            have = self.kv[layer][0].shape[2] if layer in self.kv else 0
            cap = have
            if kept > have:
                cap = 1 << (max(kept, _MIN_KV_CAP) - 1).bit_length()
                if layer in self.kv:
                    pad = ((0, 0), (0, 0), (0, cap - have), (0, 0))
                    self.kv[layer] = tuple(jnp.pad(t, pad) for t in self.kv[layer])
            caps.append(cap)
        if not self.kv:
            return "fresh", tuple(caps), None, None
        offsets = (np.int32(self.start),
                   {layer: np.int32(self.k_start[layer]) for layer in self.kv})
        return "continue", tuple(caps), dict(self.kv), offsets

    def commit(self, cfg: ModelConfig, kv: dict[int, tuple[jax.Array, jax.Array]],
               n: int) -> None:
        """Store the buffers returned by a call over n new positions."""
        for layer in range(cfg.num_hidden_layers):
            chunk = cfg.chunk_size(layer)
            if chunk is not None:
                ks = self.k_start.get(layer, 0)
                self.k_start[layer] = max(ks, keep_from(self.start, n, chunk))
            else:
                self.k_start[layer] = 0
        self.kv = dict(kv)
        self.start += n


class JaxModel(Model):
    """``wb.load(path, backend="jax")``: the JAX backend."""

    backend = "jax"

    def __init__(self, config: ModelConfig, tensors: dict[str, np.ndarray],
                 dtype: str = "float32", path: str | None = None):
        super().__init__(config, dtype, path)
        np_dt = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(np.float32)
        self.params: Params = {n: jnp.asarray(a.astype(np_dt, copy=False))
                               for n, a in to_params(config, tensors)}
        self.inv_freq = rope_inv_freq(config)
        self._variants: OrderedDict[tuple, Callable] = OrderedDict()
        # extra XLA options for every compiled variant, e.g. {"xla_backend_optimization_level":
        # 0} compiles about twice as fast, for small models where compiling dominates
        self.compiler_options: dict[str, Any] = {}

    @property
    def module(self) -> Params:
        """The params pytree (canonical name -> jax array), for users going below the API."""
        return self.params

    @property
    def jax_dtype(self) -> Any:
        return JAX_DTYPES[self.dtype]

    @property
    def compiled_variants(self) -> int:
        """How many forward variants (plan x capture x cache layout) are compiled."""
        return len(self._variants)

    def new_cache(self, batch: int) -> KVCache:
        return KVCache(batch)

    def _variant(self, plan: Plan, spec: CaptureSpec, mode: str,
                 kv_caps: tuple[int, ...]) -> Callable:
        pos = spec.positions
        pos_key = None if pos is None else (pos.start, pos.stop, pos.step)
        opts = dict(self.compiler_options)
        if self.dtype == "bfloat16":
            # forbid XLA from keeping fp32 intermediates across casts, so rounding happens
            # where torch rounds (after each op in the model dtype)
            opts.setdefault("xla_allow_excess_precision", False)
        key = (plan.key(), spec.names, pos_key, mode, kv_caps, tuple(sorted(opts.items())))
        fn = self._variants.get(key)
        if fn is not None:
            self._variants.move_to_end(key)
            return fn
        cfg = self.config
        names = spec.names

        def run(params, ids, cos, sin, temp, patches, kv, offsets):
            rec = Recorder(names, plan, patches, pos)
            start: Pos = 0
            cache = None
            if mode == "fresh":
                cache = {i: CacheEntry(None, None, 0, c) for i, c in enumerate(kv_caps)}
            elif mode == "continue":
                start = offsets[0]
                cache = {i: CacheEntry(kv[i][0], kv[i][1], offsets[1][i], c)
                         for i, c in enumerate(kv_caps)}
            logits = forward(params, cfg, ids, plan, rec, (cos, sin), temp, start, cache)
            new_kv = None if cache is None else {i: (e.k, e.v) for i, e in cache.items()}
            return logits, rec.out, new_kv

        fn = jax.jit(run, compiler_options=opts or None)
        self._variants[key] = fn
        while len(self._variants) > MAX_VARIANTS:
            self._variants.popitem(last=False)
        return fn

    def _forward(self, ids, plan, spec: CaptureSpec, cache=None):
        cfg = self.config
        B, S = ids.shape
        start = 0 if cache is None else cache.start
        positions = np.arange(start, start + S)
        cos, sin = rope_cos_sin(positions, self.inv_freq)
        temp = temperature_scales(positions, cfg) if cfg.attn_temperature_tuning else None
        patches = {n: patch_array(v) for n, v in plan.patches.items()}
        before = {} if cache is None else dict(cache.k_start)
        if cache is None:
            mode, kv_caps, kv, offsets = "none", (), None, None
        else:
            mode, kv_caps, kv, offsets = cache.prepare(cfg, S)
        fn = self._variant(plan, spec, mode, kv_caps)
        logits, out, new_kv = fn(self.params, np.asarray(ids, np.int32), cos, sin, temp, patches,
                                 kv, offsets)
        if cache is not None:
            cache.commit(cfg, new_kv, S)
        store = CaptureSpec(spec.names, spec.dtype, None)  # positions were kept inside jit
        arrays = {}
        for n, a in out.items():
            a = to_numpy(a)
            if mode == "continue" and n.endswith("attn.pattern"):
                a = a[..., : start + S - before[int(n.split(".")[1])]]
            arrays[n] = _store(a, store, seq_axis(n))
        return to_numpy(logits), arrays, cache

    def state_dict_numpy(self) -> dict[str, np.ndarray]:
        """Weights as float32 numpy arrays by canonical name, experts restacked (for
        Checkpoint.save)."""
        return from_params(self.config, {n: to_numpy(a) for n, a in self.params.items()})


def to_params(cfg: ModelConfig, tensors: dict[str, np.ndarray]
              ) -> Iterator[tuple[str, np.ndarray]]:
    """Checkpoint tensors -> (name, array) in this backend's params layout: each MoE layer's
    stacked experts split into one nn.Linear-layout array per expert (``experts.{e}.gate_up_proj``
    (2I, D), ``experts.{e}.down_proj`` (D, I)); every other tensor as it is. Lazy, so one
    expert's transposed copy exists at a time while loading."""
    stacked = {n for i in cfg.moe_layers for n in expert_names(i)}
    for n, a in tensors.items():
        if n not in stacked:
            yield n, np.asarray(a)
    for i in cfg.moe_layers:
        gate_up, down = (np.asarray(tensors[n]) for n in expert_names(i))
        for e in range(cfg.num_local_experts):
            gu_name, dn_name = expert_names(i, e)
            yield gu_name, np.ascontiguousarray(gate_up[e].T)
            yield dn_name, np.ascontiguousarray(down[e].T)


def from_params(cfg: ModelConfig, params: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Inverse of ``to_params``: canonical checkpoint names and layouts."""
    out = dict(params)
    for i in cfg.moe_layers:
        per_expert = zip(*(expert_names(i, e) for e in range(cfg.num_local_experts)))
        for name, names in zip(expert_names(i), per_expert):
            out[name] = np.stack([out.pop(n).T for n in names])
    return out


def load(path: str | Path, dtype: str = "float32",
         checkpoint: Checkpoint | None = None) -> JaxModel:
    """Load a checkpoint directory into the jax backend (bf16 weights go straight to jnp)."""
    ck = checkpoint or Checkpoint.open(path)
    return JaxModel(ck.config, ck.model_tensors(), dtype, str(path))
