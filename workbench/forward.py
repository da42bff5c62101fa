"""The Llama 4 forward pass, written once for every backend, device and weight source.

Data flow: ``embed`` -> per layer ``resid_pre`` -> attention -> ``resid_mid`` -> MoE or dense
MLP -> ``resid_post`` -> ``final_norm`` -> ``logits``. This module is the only place a hook
name is emitted; capture, patching, custom hook functions and the per-layer interventions
(ban / force / zero / set_top_k / ablate_head) are applied here too.

Three collaborators stay outside:

* **ops** (``workbench.ops.Ops``): the backend's kernels — linear, RMSNorm, RoPE, attention
  (fused or with its pattern), top-k selection, expert dispatch, KV-cache update. Ops know no
  hook names and no parameter names.
* **a weight source** (``workbench.ops.WeightSource``): hands the forward the parameters of
  the embedding, of layer ``i`` and of the head, on the model's device. Resident weights are one
  source; streamed or sharded weights are others, and none of them changes this file.
* **an executor** (``Executor``): calls the three steps of the forward (``embed_step``,
  ``layer_step``, ``head_step``). The eager executor calls them directly; the JAX backend
  compiles each step once per distinct *layer kind* and reuses it for every layer of that kind,
  so compile time does not grow with depth.

Inside a layer, hook names are relative (``attn.q``, ``moe.router_logits``); the recorder of the
layer adds the ``layers.{i}.`` prefix (``hooks.absolute``). That keeps the traced body of a
layer independent of its index, which is what lets one compiled function serve many layers.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from . import hooks as hk
from .config import ModelConfig
from .interventions import Plan
from .ops import Ops, WeightSource

Array = Any  # a backend array: torch.Tensor or jax.Array
Params = Mapping[str, Any]  # relative parameter name -> array (plus "experts": backend layout)


# ----------------------------------------------------------------------------- recording
class Recorder:
    """Captures, patches and edits hook values where the forward emits them.

    ``want`` and ``edits`` hold names as the forward sees them under ``prefix`` (full names for
    an eager forward; relative names inside one compiled layer, whose prefix is empty). A name
    that is neither captured nor edited costs one set lookup: hooks cost nothing until asked.
    Captured values stay backend arrays (sliced to ``positions`` along the sequence axis); the
    backend converts them to numpy after the forward. With ``nan_check``, every hook's value
    also gets an all-finite flag (``finite``, in forward order), to find where NaN/Inf start.
    """

    def __init__(self, ops: Ops, want: frozenset[str] | set[str], plan: Plan,
                 patches: Mapping[str, Array] | None = None, positions: slice | None = None,
                 prefix: str = "", nan_check: bool = False):
        self.ops = ops
        self.want = want
        self.fns = plan.fns
        self.patches = patches or {}
        self.edits = set(self.patches) | set(plan.fns)
        self.positions = positions
        self.prefix = prefix
        self.nan_check = nan_check
        self.out: dict[str, Array] = {}
        self.finite: dict[str, Array] = {}

    def scope(self, prefix: str) -> Recorder:
        """The same recorder (shared outputs) emitting names under ``prefix``."""
        r = object.__new__(type(self))
        r.__dict__.update(self.__dict__)
        r.prefix = prefix
        return r

    def layer_view(self, layer: int) -> Recorder:
        """A recorder for layer ``layer`` alone that sees relative names (prefix empty): its
        captures, patches and hook functions are this one's under ``layers.{layer}.``, with
        outputs of its own (``merge`` adds them here). Layers with the same hooks then look
        the same to a tracing compiler, which can share one compiled layer among them."""
        pre = hk.absolute(layer, "")

        def rel(names):
            return {n[len(pre):]: v for n, v in names.items() if n.startswith(pre)}
        r = object.__new__(type(self))
        r.__dict__.update(self.__dict__)
        r.want = frozenset(n[len(pre):] for n in self.want if n.startswith(pre))
        r.fns = rel(self.fns)
        r.patches = rel(self.patches)
        r.edits = set(r.patches) | set(r.fns)
        r.prefix = ""
        r.out, r.finite = {}, {}
        return r

    def merge(self, layer: int, view: Recorder) -> None:
        """Add what ``layer_view(layer)`` recorded, under its absolute names."""
        pre = hk.absolute(layer, "")
        self.out.update((pre + n, v) for n, v in view.out.items())
        self.finite.update((pre + n, v) for n, v in view.finite.items())

    def wants(self, rel: str) -> bool:
        name = self.prefix + rel
        return name in self.want or name in self.edits

    def edited(self, rel: str) -> bool:
        """Whether an intervention or hook function replaces ``rel``'s value."""
        return self.prefix + rel in self.edits

    def __call__(self, rel: str, x: Array) -> Array:
        name = self.prefix + rel
        if name in self.edits:
            x = self._edit(name, x)
        if name in self.want:
            self.out[name] = _keep(x, self.positions, hk.seq_axis(name))
        if self.nan_check:
            self.finite[name] = self.ops.all_finite(x)
        return x

    def window(self, rel: str, seq: int) -> tuple[int, int] | None:
        """Rows [lo, hi) of this call's ``seq`` positions that a capture of ``rel`` keeps,
        when it is captured only (not edited) with a contiguous position slice: the forward
        may then compute just those rows (``keep``). None: compute the whole value."""
        name = self.prefix + rel
        p = self.positions
        if name not in self.want or name in self.edits or p is None or self.nan_check:
            return None
        lo, hi, step = p.indices(seq)
        return (lo, max(lo, hi)) if step == 1 else None

    def keep(self, rel: str, x: Array) -> None:
        """Store a captured value already cut to ``window``'s rows."""
        self.out[self.prefix + rel] = x

    def _edit(self, name: str, x: Array) -> Array:
        value = self.patches.get(name)
        if value is not None:
            x = self.ops.broadcast_like(value, x)
        fn = self.fns.get(name)
        if fn is not None:
            y = fn(x)
            if not hasattr(y, "shape") or tuple(y.shape) != tuple(x.shape):
                raise ValueError(f"hook function for {name!r} must return an array of shape "
                                 f"{tuple(x.shape)}, got {getattr(y, 'shape', type(y))}")
            x = self.ops.cast(y, x.dtype)
        return x


def first_nonfinite(finite: Mapping[str, Any], order: list[str]) -> str | None:
    """The first hook, in forward order (``order``: the model's hook names), whose value held a
    NaN or an infinity; None when all were finite."""
    rank = {n: r for r, n in enumerate(order)}
    for name in sorted(finite, key=lambda n: rank.get(n, len(rank))):
        if not bool(finite[name]):
            return name
    return None


def _keep(x: Array, positions: slice | None, axis: int) -> Array:
    if positions is None:
        return x
    idx = [slice(None)] * x.ndim
    idx[axis] = positions
    return x[tuple(idx)]


# ----------------------------------------------------------------------------- layer plans
@dataclass(frozen=True)
class LayerKind:
    """What distinguishes one decoder layer's computation from another's (hashable)."""

    moe: bool
    rope: bool
    qk_norm: bool
    chunk: int | None
    temperature: bool

    @classmethod
    def of(cls, cfg: ModelConfig, layer: int) -> LayerKind:
        return cls(cfg.is_moe(layer), cfg.uses_rope(layer), cfg.uses_qk_norm(layer),
                   cfg.chunk_size(layer), cfg.uses_temperature(layer))


@dataclass(frozen=True)
class LayerPlan:
    """The interventions of one layer, in hashable form (part of a compiled layer's key)."""

    k: int
    ban: tuple[int, ...] = ()
    force: tuple[tuple[int, tuple[int, ...] | None], ...] = ()
    zero: tuple[int, ...] = ()
    ablate: tuple[int, ...] = ()
    temperature: bool = True  # False: disable_temperature, queries unscaled

    @classmethod
    def of(cls, cfg: ModelConfig, plan: Plan, layer: int) -> LayerPlan:
        return cls(plan.k(cfg, layer), tuple(plan.ban.get(layer, ())),
                   tuple(plan.force.get(layer, ())), tuple(plan.zero.get(layer, ())),
                   tuple(plan.ablate.get(layer, ())), layer not in plan.no_temperature)


@dataclass(frozen=True)
class Padding:
    """A padded batch, on the host: what ``run(..., attention_mask=)`` hands the backend.

    ``valid`` (B, L) bool marks real tokens over absolute slots 0..L-1 (the cache's and this
    call's; slots past the call may be padded with True); ``positions`` (B, S) are the RoPE
    positions of this call's tokens (real tokens count 0, 1, ...; pads get 1, as transformers'
    ``generate`` computes ``position_ids``); ``shift`` (B,) is each row's left padding, which
    moves the chunks of chunked layers to start at its first real token (as transformers).
    """

    valid: np.ndarray
    positions: np.ndarray
    shift: np.ndarray

    @classmethod
    def from_mask(cls, mask: np.ndarray) -> Padding:
        """From a (B, S) 0/1 attention mask of a whole (uncached) input."""
        m = np.asarray(mask).astype(bool)
        pos = np.cumsum(m, axis=1) - 1
        pos = np.where(m, pos, 1)
        shift = np.argmax(m, axis=1)  # leading pads (every row holds a token)
        return cls(m, pos.astype(np.int64), shift.astype(np.int64))


class PadMask(NamedTuple):
    """``Padding`` on the backend, as attention kernels take it: ``valid`` (B, L) bool over
    absolute key slots and ``shift`` (B,) int, the left padding of each row. A query at slot q
    of row b sees key slot k iff k <= q, k is valid or k == q (a pad query sees itself, so its
    row stays finite), and on chunked layers (k - shift) // chunk == (q - shift) // chunk."""

    valid: Array
    shift: Array


@dataclass(frozen=True)
class Context:
    """Per-call inputs shared by every layer: RoPE tables ((S, d/2), or (B, S, d/2) for a padded
    batch) and query temperatures for the positions of this call (backend arrays), the
    absolute position of its first token (an int, or a traced scalar while a compiled backend
    decodes), and the padding mask (None without padding)."""

    cos: Array
    sin: Array
    temp: Array | None
    start: Any = 0
    pad: PadMask | None = None


# ----------------------------------------------------------------------------- the steps
EMBED_HOOKS = frozenset({"embed"})  # what embed_step emits
HEAD_HOOKS = frozenset({"final_norm", "logits"})  # what head_step emits


def embed_step(ops: Ops, table: Array, ids: Array, rec: Recorder,
               image: tuple[Array, Array] | None = None) -> Array:
    """Token embeddings (B, S, D). ``image``: (flat positions (n,) of the ``<|patch|>``
    placeholders, projected image features (n, D)), scattered over those positions in order
    (transformers' ``masked_scatter``) before the hook."""
    e = ops.embed(table, ids)
    if image is not None:
        e = ops.scatter_rows(e, image[0], image[1])
    return rec("embed", e)


def layer_step(ops: Ops, cfg: ModelConfig, kind: LayerKind, lp: Params, h: Array,
               ctx: Context, rec: Recorder, lplan: LayerPlan,
               cache: Any = None) -> tuple[Array, Any]:
    """One decoder layer on the residual stream h (B, S, D); returns (h, updated cache entry).

    ``rec`` emits relative names (``attn.q``); ``cache`` is this layer's KV-cache entry in the
    backend's layout (None without a cache). The layer runs in three phases — attention, then
    routing, then the experts — which a backend may also call one by one (``route_phase`` and
    ``expert_phase``), e.g. to read only the chosen experts from disk in between.
    """
    h, x, cache = attention_phase(ops, cfg, kind, lp, h, ctx, rec, lplan, cache)
    if not kind.moe:
        return rec("resid_post", h + mlp_block(ops, lp, x, rec)), cache
    idx, gates = route_phase(ops, cfg, lp, x, rec, lplan)
    return expert_phase(ops, lp, h, x, idx, gates, lp["experts"], rec), cache


def attention_phase(ops: Ops, cfg: ModelConfig, kind: LayerKind, lp: Params, h: Array,
                    ctx: Context, rec: Recorder, lplan: LayerPlan,
                    cache: Any = None) -> tuple[Array, Array, Any]:
    """resid_pre -> attention -> resid_mid; returns (h, the normalised FFN input x, cache)."""
    eps = cfg.rms_norm_eps
    h = rec("resid_pre", h)
    a, cache = attention_block(ops, cfg, kind, lp, ops.rms_norm(h, lp["input_layernorm.weight"],
                                                                eps), ctx, rec, lplan, cache)
    h = rec("resid_mid", h + a)
    return h, ops.rms_norm(h, lp["post_attention_layernorm.weight"], eps), cache


def route_phase(ops: Ops, cfg: ModelConfig, lp: Params, x: Array, rec: Recorder,
                lplan: LayerPlan) -> tuple[Array, Array]:
    """The Llama 4 router on normalised x (B, S, D): raw logits, top-k after bans (-inf) and
    forcing (+inf), sigmoid gates of the chosen experts. Returns flat expert ids (N, k) and the
    gates that scale each expert's input (0 for zeroed experts, which then contribute exactly
    nothing: the experts have no biases)."""
    B, S, D = x.shape
    E, k = cfg.num_local_experts, lplan.k
    logits = ops.linear(x.reshape(-1, D), lp["feed_forward.router.weight"])  # model dtype, as HF
    logits = rec("moe.router_logits", logits.reshape(B, S, E)).reshape(-1, E)
    idx = ops.select_experts(logits, k, lplan.ban, lplan.force, S)
    idx = ops.as_index(rec("moe.topk_indices", idx.reshape(B, S, k)).reshape(-1, k))
    gates = ops.gate_scores(logits, idx)
    gates = rec("moe.topk_scores", gates.reshape(B, S, k)).reshape(-1, k)
    if lplan.zero:
        gates = ops.zero_gates(gates, idx, lplan.zero)
    return idx, gates


def expert_phase(ops: Ops, lp: Params, h: Array, x: Array, idx: Array, gates: Array,
                 experts: Any, rec: Recorder) -> Array:
    """shared(x) + sum_k expert_k(gate_k * x), then the residual add: resid_post (B, S, D).
    ``experts`` is in the layout the backend's dispatch reads (possibly only the chosen ones,
    with ``idx`` numbering them)."""
    B, S, D = x.shape
    return moe_output(ops, lp, h, x, ops.dispatch(x.reshape(-1, D), idx, gates, experts), rec)


def moe_output(ops: Ops, lp: Params, h: Array, x: Array, routed: Array, rec: Recorder) -> Array:
    """The MoE block's end from the routed expert outputs (B*S, D): shared(x) + routed, then
    the residual add (resid_post), for backends that compute ``routed`` piecewise."""
    routed = rec("moe.routed_out", routed.reshape(x.shape))
    shared = rec("moe.shared_out", ops.swiglu(x, lp["feed_forward.shared_expert.gate_proj.weight"],
                                             lp["feed_forward.shared_expert.up_proj.weight"],
                                             lp["feed_forward.shared_expert.down_proj.weight"]))
    return rec("resid_post", h + (shared + routed))


def head_step(ops: Ops, cfg: ModelConfig, norm: Array, head: Array, h: Array,
              rec: Recorder) -> Array:
    """Final RMSNorm and the lm_head: logits (B, S, V)."""
    h = rec("final_norm", ops.rms_norm(h, norm, cfg.rms_norm_eps))
    return rec("logits", ops.linear(h, head))


def attention_block(ops: Ops, cfg: ModelConfig, kind: LayerKind, lp: Params, x: Array,
                    ctx: Context, rec: Recorder, lplan: LayerPlan,
                    cache: Any) -> tuple[Array, Any]:
    """Llama 4 attention on normalised x (B, S, D): projections, RoPE + QK-norm (chunked local
    layers) or query temperature (global NoPE layers), GQA softmax attention, o_proj."""
    H, K, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    q = ops.split_heads(ops.linear(x, lp["self_attn.q_proj.weight"]), H, d)  # (B, H, S, d)
    k = ops.split_heads(ops.linear(x, lp["self_attn.k_proj.weight"]), K, d)
    v = ops.split_heads(ops.linear(x, lp["self_attn.v_proj.weight"]), K, d)
    if kind.rope:
        q, k = ops.rope(q, ctx.cos, ctx.sin), ops.rope(k, ctx.cos, ctx.sin)
        if kind.qk_norm:
            q = ops.rms_norm(q, None, cfg.rms_norm_eps)
            k = ops.rms_norm(k, None, cfg.rms_norm_eps)
    elif kind.temperature and lplan.temperature:
        q = ops.scale_queries(q, ctx.temp)
    q, k, v = rec("attn.q", q), rec("attn.k", k), rec("attn.v", v)
    pad = ctx.pad
    if cache is not None:
        k, v, k_start, cache = ops.cache_update(cache, k, v, ctx.start, kind.chunk,
                                                None if pad is None else pad.shift)
    else:
        k_start = ctx.start
    scale = d ** -0.5
    S = q.shape[2]
    window = rec.window("attn.pattern", S)
    if rec.edited("attn.pattern"):  # an edited pattern flows into the output
        probs = ops.attention_probs(q, k, ctx.start, k_start, kind.chunk, scale, pad)
        o = ops.attend(rec("attn.pattern", probs), v)
    else:
        # capturing the pattern never changes the forward: the output stays the fused
        # kernel's (in bf16 an eager softmax rounds differently and can flip routing)
        o = ops.attention(q, k, v, ctx.start, k_start, kind.chunk, scale, pad)
        if window is not None:  # a query window over every key: never the S x T pattern
            lo, hi = window
            rec.keep("attn.pattern", ops.attention_probs(
                ops.seq_slice(q, lo, hi), k, ctx.start + lo, k_start, kind.chunk, scale, pad))
        elif rec.wants("attn.pattern"):
            rec("attn.pattern", ops.attention_probs(q, k, ctx.start, k_start, kind.chunk,
                                                    scale, pad))
    if rec.wants("attn.summary"):
        lo, hi = rec.window("attn.summary", S) or (0, S)
        summary = ops.attention_summary(ops.seq_slice(q, lo, hi), k, ctx.start + lo, k_start,
                                        kind.chunk, cfg.attention_chunk_size, scale)
        if (lo, hi) == (0, S):
            rec("attn.summary", summary)
        else:
            rec.keep("attn.summary", summary)
    if lplan.ablate:
        o = ops.zero_heads(o, lplan.ablate)
    return rec("attn.out", ops.linear(ops.merge_heads(o), lp["self_attn.o_proj.weight"])), cache


def mlp_block(ops: Ops, lp: Params, x: Array, rec: Recorder) -> Array:
    """Dense SwiGLU feed-forward (the non-MoE layers of interleaved models)."""
    return rec("mlp.out", ops.swiglu(x, lp["feed_forward.gate_proj.weight"],
                                     lp["feed_forward.up_proj.weight"],
                                     lp["feed_forward.down_proj.weight"]))


# ----------------------------------------------------------------------------- the loop
class Executor:
    """Runs the steps of one forward. This one calls them eagerly with one shared recorder
    (``step``: the layer step it calls, ``layer_step`` or a traced version of it, e.g.
    ``torch.compile(layer_step)``); a compiling backend overrides ``embed``/``layer``/``head``
    to call compiled versions of the same steps (and merges what they captured into
    ``rec.out``)."""

    def __init__(self, ops: Ops, cfg: ModelConfig, plan: Plan, rec: Recorder,
                 step: Callable[..., tuple[Array, Any]] | None = None):
        self.ops = ops
        self.cfg = cfg
        self.plan = plan
        self.rec = rec
        self.step = layer_step if step is None else step

    def embed(self, table: Array, ids: Array | np.ndarray,
              image: tuple[Array, Array] | None = None) -> Array:
        ids = self.ops.asarray(ids) if isinstance(ids, np.ndarray) else ids
        return embed_step(self.ops, table, ids, self.rec.scope(""), image)

    def layer(self, i: int, lp: Params, h: Array, ctx: Context, cache: Any) -> tuple[Array, Any]:
        return self.step(self.ops, self.cfg, LayerKind.of(self.cfg, i), lp, h, ctx,
                         self.rec.scope(hk.absolute(i, "")), LayerPlan.of(self.cfg, self.plan, i),
                         cache)

    def span(self, i: int, n: int) -> int:
        """How many layers from layer i (of the n run) ``layers`` takes in one call: one here;
        a compiling backend may run several consecutive layers as one compiled program."""
        return 1

    def layers(self, i: int, lps: list[Params], h: Array, ctx: Context,
               caches: list[Any]) -> tuple[Array, list[Any]]:
        """Layers i .. i + len(lps) - 1 in turn: (h, their new cache entries)."""
        out = []
        for j, (lp, cache) in enumerate(zip(lps, caches, strict=True)):
            h, cache = self.layer(i + j, lp, h, ctx, cache)
            out.append(cache)
        return h, out

    def head(self, norm: Array, head: Array, h: Array) -> Array:
        return head_step(self.ops, self.cfg, norm, head, h, self.rec.scope(""))


def forward(ex: Executor, source: WeightSource, ids: np.ndarray, ctx: Context,
            cache: dict[int, Any] | None = None, stop_at_layer: int | None = None,
            image: tuple[Array, Array] | None = None) -> tuple[Array | None, Array]:
    """Run ids (B, S) through the model: (logits (B, S, V) or None, final residual stream).

    ``source`` supplies the weights (``embedding(ids)``, ``layer(i)``, ``head()``); ``cache``
    maps every layer to its KV-cache entry (the backend's empty entry before the first call)
    and is updated in place. ``stop_at_layer=k`` runs (and reads) layers 0..k-1 only and
    returns no logits. ``image`` (placeholder positions, projected features) replaces the
    embeddings of an image's ``<|patch|>`` tokens (see ``workbench.vision``).
    """
    cfg = ex.cfg
    n = cfg.num_hidden_layers if stop_at_layer is None else stop_at_layer
    source.begin(n)
    table, local = source.embedding(ids)
    h = ex.embed(table, local) if image is None else ex.embed(table, local, image)
    del table
    i = 0
    while i < n:
        span = range(i, i + ex.span(i, n))
        h, entries = ex.layers(i, [source.layer(j) for j in span], h, ctx,
                               [None if cache is None else cache[j] for j in span])
        for j, entry in zip(span, entries, strict=True):
            if cache is not None:
                cache[j] = entry
            source.release(j)
        i = span.stop
    if stop_at_layer is not None:
        return None, h
    norm, head = source.head()
    return ex.head(norm, head, h), h


# ----------------------------------------------------------------------------- weights
class ResidentWeights:
    """The weight source for weights held in memory, one copy, on the model's device.

    ``params`` maps canonical names (``layers.0.self_attn.q_proj.weight``) to backend arrays;
    ``experts(i)`` returns layer i's routed experts in the layout the backend's dispatch reads.
    Per-layer views are built once, so handing a layer to the forward costs nothing.
    """

    def __init__(self, cfg: ModelConfig, params: Mapping[str, Array],
                 experts: Callable[[int], Any]):
        self.cfg = cfg
        self.params = params
        self._layers: list[dict[str, Array]] = []
        for i in range(cfg.num_hidden_layers):
            pre = hk.absolute(i, "")
            lp = {n[len(pre):]: a for n, a in params.items()
                  if n.startswith(pre) and not n.startswith(pre + "feed_forward.experts.")}
            if cfg.is_moe(i):
                lp["experts"] = experts(i)
            self._layers.append(lp)

    def begin(self, layers: int) -> None:
        """Nothing to prepare: every layer is in memory."""

    def embedding(self, ids: Any) -> tuple[Array, Any]:
        return self.params["embed_tokens.weight"], ids

    def layer(self, i: int) -> dict[str, Array]:
        return self._layers[i]

    def release(self, i: int) -> None:
        """Resident weights stay; a streaming source frees layer i here."""

    def head(self) -> tuple[Array, Array]:
        head = "embed_tokens.weight" if self.cfg.tie_word_embeddings else "lm_head.weight"
        return self.params["norm.weight"], self.params[head]
