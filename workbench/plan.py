"""`workbench plan`: will a model fit, resident or streamed, and what will a step read?

From a config alone (a checkpoint directory, a config.json or a preset) this computes the bytes
of the weights in a dtype, the memory each mode needs (resident: every weight; streamed: two
layers' dense weights, the experts of one layer, the head, and the expert cache), and the bytes
a prefill and a decode step read when streaming. A quick read of the checkpoint's own files (or
of memory, without a checkpoint) measures the read rate that turns bytes into seconds.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .config import ModelConfig, human_bytes
from .streaming import parse_bytes

ITEMSIZE = {"bfloat16": 2, "float16": 2, "float32": 4, "float8": 1}


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

    def as_dict(self) -> dict:
        return asdict(self)


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
              backend: str = "torch") -> Plan:
    """Which mode fits in ``memory`` bytes and what a prefill / decode step reads streamed.

    Streamed, the torch backend holds one routed expert at a time; the jax backend holds the
    experts a layer chose (all of them, in the worst case of a long prefill).
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
    item = ITEMSIZE[dtype]
    expert, dense, head, row = _sizes(cfg, item)
    weights = cfg.param_counts()["total"] * item
    E, k = cfg.num_local_experts, cfg.num_experts_per_tok
    n_moe = len(cfg.moe_layers)
    cache_b = parse_bytes(cache, "cache") or 0
    # streamed peak: the layer computing and the one prefetched, the experts held at once,
    # the head, and the expert cache
    at_once = 0 if not n_moe else expert if backend == "torch" else E * expert
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
                prefill_read / rate, decode_read / rate)


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
    return "\n".join(lines)
