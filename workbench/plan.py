"""`workbench plan`: will a model fit, resident or streamed, and what will a step read?

From a config alone (a checkpoint directory, a config.json or a preset) this computes the bytes
of the weights in a dtype, the memory each mode needs (resident: every weight; streamed: two
layers' dense weights, the experts of one layer, the head, and the expert cache), and the bytes
a prefill and a decode step read when streaming. A quick read of the checkpoint's own files (or
of memory, without a checkpoint) measures the read rate that turns bytes into seconds.

``context=`` adds a long-context projection per context length T (``context_plan``): the KV
cache each layer kind keeps (a chunked layer at most one chunk of keys and values, a global
layer all T), the whole model's KV cache, the attention FLOPs of a prefill of T tokens and of
one decode step after T tokens, and the KV bytes that decode step reads.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .config import ModelConfig, human_bytes
from .streaming import parse_bytes

ITEMSIZE = {"bfloat16": 2, "float16": 2, "float32": 4, "float8": 1}
EXPERT_GROUP_BYTES = 1 << 30  # the jax backend's default ``expert_group_bytes``


@dataclass(frozen=True)
class Plan:
    """The numbers behind `workbench plan` (bytes, bytes per second, seconds)."""

    dtype: str
    backend: str
    memory: int
    weights: int  # every weight of the language model in ``dtype``
    dense_per_layer: int  # largest layer's weights other than routed experts
    expert: int  # one routed expert
    head: int  # final norm + lm_head (the embedding when tied)
    resident_need: int
    streamed_need: int
    mode: str  # "resident", "disk" or "does not fit"
    prefill_tokens: int
    prefill_read: int
    decode_read: int
    read_rate: float
    read_rate_source: str
    prefill_s: float
    decode_s: float
    contexts: tuple[ContextPlan, ...] = field(default=())  # one per context= length

    def as_dict(self) -> dict:
        return asdict(self)


# ----------------------------------------------------------------------------- long context

_CONTEXT_UNITS = {"": 1, "K": 1024, "M": 1024**2}


def parse_context(value: int | str) -> int:
    """A context length in tokens: an int, or a string such as ``"262144"``, ``"128K"``,
    ``"1M"``, ``"10M"`` (K = 1024, M = 1024**2 tokens: Scout's "10M" context is its
    max_position_embeddings, 10485760)."""
    if isinstance(value, bool):
        raise ValueError(f"context={value!r}: give a token count such as 262144, '1M' or '10M'")
    if isinstance(value, int | np.integer):
        n = int(value)
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmM]?)\s*", str(value).replace("_", ""))
        if not m:
            raise ValueError(f"context={value!r}: give a token count such as 262144, '128K', "
                             "'1M' or '10M' (K = 1024, M = 1024**2 tokens)")
        x = float(m.group(1)) * _CONTEXT_UNITS[m.group(2).upper()]
        if x != int(x):
            raise ValueError(f"context={value!r} is not a whole number of tokens")
        n = int(x)
    if n < 1:
        raise ValueError(f"context={value!r} must be at least 1 token")
    return n


@dataclass(frozen=True)
class LayerKindContext:
    """One attention kind at a context of ``tokens`` (per layer of the kind; batch 1)."""

    kind: str  # "chunked" or "global"
    window: int | None  # attention_chunk_size of a chunked layer; None: global
    layers: int  # how many layers are of this kind
    kv_tokens: int  # keys (and values) a layer keeps after T tokens: min(T, chunk) or T
    kv_bytes: int  # keys + values a layer keeps: 2 * K * d * kv_tokens * itemsize
    prefill_pairs: int  # causal (query, key) pairs a prefill of T tokens scores
    prefill_flops: float  # 4 * H * d * prefill_pairs (2 H d for QK^T, 2 H d for PV)
    decode_keys: int  # keys one decode step after T tokens attends: min(T, chunk) or T
    decode_flops: float  # 4 * H * d * decode_keys
    decode_kv_read: int  # bytes of keys + values that step reads: 2 * K * d * keys * item


@dataclass(frozen=True)
class ContextPlan:
    """Attention memory and work of the whole model at a context of ``tokens`` (batch 1)."""

    tokens: int
    dtype: str
    beyond_max_positions: bool  # tokens > config.max_position_embeddings
    kinds: tuple[LayerKindContext, ...]
    kv_bytes: int  # the whole model's KV cache after T tokens
    prefill_attn_flops: float  # attention (QK^T and PV) FLOPs of a prefill of T tokens
    prefill_linear_flops: float  # the weights' matmuls: 2 * (active params - embedding) * T
    decode_attn_flops: float  # attention FLOPs of one decode step after T tokens
    decode_kv_read: int  # KV bytes that step reads (every key and value it attends)

    def as_dict(self) -> dict:
        return asdict(self)


def causal_pairs(tokens: int, window: int | None) -> int:
    """(query, key) pairs a causal prefill of ``tokens`` scores: T (T + 1) / 2 for global
    attention; per chunk of ``window`` tokens c (c + 1) / 2 for chunked attention (queries see
    the keys of their own chunk up to themselves)."""
    if window is None or window >= tokens:
        return tokens * (tokens + 1) // 2
    n, r = divmod(tokens, window)
    return n * window * (window + 1) // 2 + r * (r + 1) // 2


def context_plan(cfg: ModelConfig, tokens: int | str, dtype: str = "bfloat16") -> ContextPlan:
    """KV cache, attention FLOPs and decode KV reads at a context of ``tokens`` (batch 1).

    A chunked layer keeps at most one chunk (``attention_chunk_size``) of keys and values (the
    KV cache drops keys no later query can see), a global (NoPE, or unchunked) layer all T; a
    decode step after T tokens attends and reads every key and value its layer keeps (an upper
    bound on chunked layers, whose cache holds T mod chunk of them, at most one chunk).
    Attention FLOPs count multiply-adds as 2: 2 H d per (query, key) pair for the scores and
    2 H d for the probabilities times values, over the pairs the causal mask allows.
    """
    if dtype not in ITEMSIZE:
        raise ValueError(f"dtype={dtype!r}: choose one of {sorted(ITEMSIZE)}")
    T = parse_context(tokens)
    item = ITEMSIZE[dtype]
    H, K, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    windows: dict[int | None, int] = {}
    for i in range(cfg.num_hidden_layers):
        w = cfg.chunk_size(i)
        windows[w] = windows.get(w, 0) + 1
    kinds = []
    for w, n in sorted(windows.items(), key=lambda kv: (kv[0] is None, kv[0] or 0)):
        kept = T if w is None else min(T, w)
        pairs = causal_pairs(T, w)
        kinds.append(LayerKindContext(
            kind="global" if w is None else "chunked", window=w, layers=n, kv_tokens=kept,
            kv_bytes=2 * K * d * kept * item, prefill_pairs=pairs,
            prefill_flops=4.0 * H * d * pairs, decode_keys=kept,
            decode_flops=4.0 * H * d * kept, decode_kv_read=2 * K * d * kept * item))
    counts = cfg.param_counts()
    linear = 2.0 * (counts["active"] - cfg.vocab_size * cfg.hidden_size) * T
    return ContextPlan(
        tokens=T, dtype=dtype, beyond_max_positions=T > cfg.max_position_embeddings,
        kinds=tuple(kinds), kv_bytes=sum(k.layers * k.kv_bytes for k in kinds),
        prefill_attn_flops=sum(k.layers * k.prefill_flops for k in kinds),
        prefill_linear_flops=linear,
        decode_attn_flops=sum(k.layers * k.decode_flops for k in kinds),
        decode_kv_read=sum(k.layers * k.decode_kv_read for k in kinds))


def human_flops(x: float) -> str:
    """``1.35e17 -> '135 PFLOP'`` (three significant digits)."""
    for unit, div in (("EFLOP", 1e18), ("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9),
                      ("MFLOP", 1e6), ("kFLOP", 1e3)):
        if abs(x) >= div:
            return f"{x / div:.3g} {unit}"
    return f"{x:.0f} FLOP"


def context_text(plans: list[ContextPlan] | tuple[ContextPlan, ...], cfg: ModelConfig) -> str:
    """The long-context projection as a table, one column per context length."""
    if not plans:
        return ""
    gb = human_bytes
    kinds = plans[0].kinds

    def label(k: LayerKindContext) -> str:
        what = f"chunked ({k.window})" if k.window is not None else "global"
        return f"{what} x{k.layers}"

    rows: list[tuple[str, list[str]]] = [
        ("context (tokens)", [f"{p.tokens:,}" for p in plans])]
    for j, k in enumerate(kinds):
        rows.append((f"KV per layer, {label(k)}", [gb(p.kinds[j].kv_bytes) for p in plans]))
    rows.append(("KV cache, whole model", [gb(p.kv_bytes) for p in plans]))
    for j, k in enumerate(kinds):
        rows.append((f"prefill attn per layer, {label(k)}",
                     [human_flops(p.kinds[j].prefill_flops) for p in plans]))
    rows.append(("prefill attn, whole model", [human_flops(p.prefill_attn_flops)
                                               for p in plans]))
    rows.append(("prefill weight matmuls", [human_flops(p.prefill_linear_flops)
                                            for p in plans]))
    rows.append(("decode attn per token", [human_flops(p.decode_attn_flops) for p in plans]))
    rows.append(("decode KV read per token", [gb(p.decode_kv_read) for p in plans]))
    width = max(len(r[0]) for r in rows)
    cols = [max(len(r[1][i]) for r in rows) for i in range(len(plans))]
    head = (f"long context ({plans[0].dtype} KV cache, batch 1; {cfg.num_attention_heads} "
            f"query / {cfg.num_key_value_heads} KV heads of {cfg.head_dim}):")
    lines = [head]
    for name, vals in rows:
        lines.append("  " + name.ljust(width) + "  "
                     + "  ".join(v.rjust(c) for v, c in zip(vals, cols)))
    lines.append("  (chunked layers keep at most one chunk of keys/values, global layers all T;")
    lines.append("   attention FLOPs: 4 x heads x head_dim per causal query-key pair; weight "
                 "matmuls: 2 x active params")
    lines.append("   without the embedding, per token; a decode step reads every key and value "
                 "its layer keeps)")
    over = [p.tokens for p in plans if p.beyond_max_positions]
    if over:
        lines.append(f"  note: {', '.join(f'{t:,}' for t in over)} tokens exceed the config's "
                     f"max_position_embeddings={cfg.max_position_embeddings:,}")
    return "\n".join(lines)


def _sizes(cfg: ModelConfig, item: int) -> tuple[int, int, int, int]:
    """(bytes of one routed expert, of the largest non-expert layer part, of the head, of the
    embedding row) in a dtype of ``item`` bytes."""
    D, I, Im = cfg.hidden_size, cfg.intermediate_size, cfg.intermediate_size_mlp
    H, K, d, E = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, \
        cfg.num_local_experts
    attn = (2 * D * H * d + 2 * D * K * d + 2 * D) * item
    moe_dense = (E * D + 3 * D * I) * item  # router + shared expert
    mlp = 3 * D * Im * item
    dense = attn + max(moe_dense if cfg.moe_layers else 0,
                       mlp if len(cfg.moe_layers) < cfg.num_hidden_layers else 0)
    head = (cfg.vocab_size * D + D) * item
    return 3 * D * I * item, dense, head, D * item


def expected_experts(experts: int, assignments: int) -> float:
    """Expected distinct experts hit by ``assignments`` uniform top-k picks among ``experts``."""
    return experts * (1.0 - (1.0 - 1.0 / experts) ** assignments)


def measure_read_rate(path: str | os.PathLike | None, limit: int = 1 << 30) -> tuple[float, str]:
    """Bytes per second read sequentially from the checkpoint's largest shard (up to ``limit``
    bytes; whatever the page cache holds is read at memory speed), or, without a checkpoint,
    a memory copy rate (an upper bound for a page-cache-resident model)."""
    files = sorted(Path(path).glob("*.safetensors"), key=lambda f: -f.stat().st_size) \
        if path is not None and Path(path).is_dir() else []
    if files:
        f = files[0]
        buf = bytearray(16 << 20)
        view = memoryview(buf)
        n, t = 0, time.perf_counter()
        with open(f, "rb", buffering=0) as fh:
            while n < limit:
                got = fh.readinto(view)
                if not got:
                    break
                n += got
        dt = time.perf_counter() - t
        return n / max(dt, 1e-9), f"read {human_bytes(n)} of {f.name}"
    a = np.ones(64 << 20, np.uint8)
    b = np.ones_like(a)  # touched, so the timing has no page faults
    np.copyto(b, a)
    t = time.perf_counter()
    for _ in range(4):
        np.copyto(b, a)
    dt = time.perf_counter() - t
    return 4 * a.nbytes / max(dt, 1e-9), "memory copy (no checkpoint given)"


def make_plan(cfg: ModelConfig, memory: int | str, dtype: str = "bfloat16",
              prefill_tokens: int = 512, cache: int | str | None = None,
              read_rate: float | None = None, path: str | os.PathLike | None = None,
              backend: str = "torch",
              context: int | str | list[int | str] | tuple[int | str, ...] | None = None
              ) -> Plan:
    """Which mode fits in ``memory`` bytes and what a prefill / decode step reads streamed.

    Streamed, the torch backend holds one routed expert at a time; the jax backend holds the
    chosen experts of a layer in groups of at most ``EXPERT_GROUP_BYTES`` (at least one).
    ``context`` (a length such as ``"1M"``, or several) adds a ``context_plan`` per length
    (``contexts``).
    """
    if backend not in ("torch", "jax"):
        raise ValueError(f"backend={backend!r}: choose 'torch' or 'jax'")
    if dtype not in ITEMSIZE:
        raise ValueError(f"dtype={dtype!r}: choose one of {sorted(ITEMSIZE)}")
    mem = parse_bytes(memory, "memory")
    if mem is None or mem <= 0:
        raise ValueError(f"memory={memory!r} must be a positive byte budget such as '24GB'")
    if isinstance(prefill_tokens, bool) or not isinstance(prefill_tokens, int) \
            or prefill_tokens < 1:
        raise ValueError(f"prefill_tokens={prefill_tokens!r} must be a positive int")
    lengths = [] if context is None else list(context) \
        if isinstance(context, list | tuple) else [context]
    contexts = tuple(context_plan(cfg, t, dtype) for t in lengths)
    item = ITEMSIZE[dtype]
    expert, dense, head, row = _sizes(cfg, item)
    weights = cfg.param_counts()["total"] * item
    E, k = cfg.num_local_experts, cfg.num_experts_per_tok
    n_moe = len(cfg.moe_layers)
    cache_b = parse_bytes(cache, "cache") or 0
    # streamed peak: the layer computing and the one prefetched, the experts held at once,
    # the head, and the expert cache
    group = max(1, min(E, EXPERT_GROUP_BYTES // max(expert, 1)))
    at_once = 0 if not n_moe else expert if backend == "torch" else group * expert
    streamed_need = 2 * dense + at_once + head + cache_b
    resident_need = weights
    mode = "resident" if resident_need <= mem else "disk" if streamed_need <= mem \
        else "does not fit"
    D, I, Im = cfg.hidden_size, cfg.intermediate_size, cfg.intermediate_size_mlp
    attn = (2 * D * cfg.num_attention_heads * cfg.head_dim
            + 2 * D * cfg.num_key_value_heads * cfg.head_dim + 2 * D) * item
    non_expert = cfg.num_hidden_layers * attn + n_moe * (E * D + 3 * D * I) * item \
        + (cfg.num_hidden_layers - n_moe) * 3 * D * Im * item
    touched = expected_experts(E, prefill_tokens * k) if n_moe else 0.0
    prefill_read = int(non_expert + n_moe * touched * expert + head
                       + min(prefill_tokens, cfg.vocab_size) * row)
    decode_read = int(non_expert + n_moe * k * expert + head + row)
    if read_rate is None:
        rate, source = measure_read_rate(path)
    else:
        rate, source = float(read_rate), "given"
    return Plan(dtype, backend, mem, weights, dense, expert, head, resident_need, streamed_need,
                mode, prefill_tokens, prefill_read, decode_read, rate, source,
                prefill_read / rate, decode_read / rate, contexts)


def plan_text(p: Plan, cfg: ModelConfig, label: str) -> str:
    """The `workbench plan` report."""
    gb = human_bytes
    lines = [
        f"plan for {label}: {cfg.num_hidden_layers} layers, {cfg.num_local_experts} experts "
        f"top-{cfg.num_experts_per_tok}, {p.dtype}, memory budget {gb(p.memory)}",
        f"  weights:        {gb(p.weights)} (one expert {gb(p.expert)}, largest layer without "
        f"experts {gb(p.dense_per_layer)}, head {gb(p.head)})",
        f"  resident needs: {gb(p.resident_need)}"
        + ("  <- fits" if p.resident_need <= p.memory else ""),
        f"  streamed needs: {gb(p.streamed_need)} (2 layers' dense weights + the experts held "
        "at once + head + expert cache)" + ("  <- fits" if p.streamed_need <= p.memory
                                            else ""),
        f"  mode: {p.mode}" + ("" if p.mode != "disk" else
                               "   wb.load(path, offload='disk', max_memory=...)"),
        f"  streamed reads: prefill of {p.prefill_tokens} tokens {gb(p.prefill_read)}, decode "
        f"step {gb(p.decode_read)} (without expert cache hits)",
        f"  read rate: {gb(p.read_rate)}/s ({p.read_rate_source})",
        f"  I/O floor: prefill {p.prefill_s:.1f} s, decode {p.decode_s:.2f} s/token "
        "(plus compute)",
    ]
    if p.mode == "resident":
        lines.append("  resident: nothing is read while running; the I/O floor applies only "
                     "to offload='disk'")
    if p.contexts:
        lines.append(context_text(p.contexts, cfg))
        for c in p.contexts:
            res, stream = p.resident_need + c.kv_bytes, p.streamed_need + c.kv_bytes
            lines.append(f"  with the KV cache of {c.tokens:,} tokens: resident needs {gb(res)}"
                         + ("  <- fits" if res <= p.memory else "")
                         + f", streamed needs {gb(stream)}"
                         + ("  <- fits" if stream <= p.memory else ""))
    return "\n".join(lines)
