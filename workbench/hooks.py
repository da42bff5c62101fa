"""Hook names (the contract of DESIGN.md), glob resolution and shape rules, shared by backends."""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Iterable

import numpy as np

from .config import ModelConfig

ATTN_HOOKS = ("q", "k", "v", "pattern", "out")
MOE_HOOKS = ("router_logits", "topk_indices", "topk_scores", "routed_out", "shared_out")


class HookError(KeyError):
    """An unknown hook name or pattern; the message lists the closest valid names."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0])


def hook_names(cfg: ModelConfig) -> list[str]:
    """Every hook point of this config, in forward order."""
    names = ["embed"]
    for i in range(cfg.num_hidden_layers):
        p = f"layers.{i}."
        names.append(p + "resid_pre")
        names += [p + "attn." + h for h in ATTN_HOOKS]
        names.append(p + "resid_mid")
        if cfg.is_moe(i):
            names += [p + "moe." + h for h in MOE_HOOKS]
        else:
            names.append(p + "mlp.out")
        names.append(p + "resid_post")
    names += ["final_norm", "logits"]
    return names


def resolve(cfg: ModelConfig, patterns: str | Iterable[str] | None) -> list[str]:
    """Expand glob patterns (``*.moe.*``, ``layers.3.attn.pattern``) to hook names, in order.

    A pattern that matches nothing raises HookError with the closest valid names.
    """
    if patterns is None:
        return []
    if isinstance(patterns, str):
        patterns = [patterns]
    names = hook_names(cfg)
    chosen: set[str] = set()
    for pat in patterns:
        if not isinstance(pat, str):
            raise HookError(f"capture patterns must be strings, got {pat!r}")
        hits = [n for n in names if fnmatch.fnmatchcase(n, pat)]
        if not hits:
            raise HookError(unknown_message(pat, names))
        chosen.update(hits)
    return [n for n in names if n in chosen]


def unknown_message(name: str, names: list[str]) -> str:
    close = difflib.get_close_matches(name, names, n=4, cutoff=0.5)
    msg = f"unknown hook name or pattern {name!r}"
    if close:
        msg += f"; closest valid names: {', '.join(close)}"
    else:
        msg += "; see model.hook_names()"
    return msg


def check_name(cfg: ModelConfig, name: str) -> None:
    """Raise HookError unless ``name`` is an exact hook name of this config."""
    names = hook_names(cfg)
    if name not in names:
        raise HookError(unknown_message(name, names))


def hook_shape(cfg: ModelConfig, name: str, batch: int, seq: int,
               top_k: int | None = None, kv_len: int | None = None) -> tuple[int, ...]:
    """The shape a hook has for a (batch, seq) input (kv_len: keys seen, for decode steps)."""
    D, H, K, d = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    T = kv_len if kv_len is not None else seq
    leaf = name.rsplit(".", 1)[-1]
    if name == "logits":
        return (batch, seq, cfg.vocab_size)
    if ".attn." in name:
        return {"q": (batch, H, seq, d), "k": (batch, K, T, d), "v": (batch, K, T, d),
                "pattern": (batch, H, seq, T), "out": (batch, seq, D)}[leaf]
    if ".moe." in name:
        k = top_k or cfg.num_experts_per_tok
        return {"router_logits": (batch, seq, cfg.num_local_experts),
                "topk_indices": (batch, seq, k), "topk_scores": (batch, seq, k)}.get(
            leaf, (batch, seq, D))
    return (batch, seq, D)


def hook_dtype(name: str, model_dtype: np.dtype) -> np.dtype:
    return np.dtype(np.int32) if name.endswith("topk_indices") else np.dtype(model_dtype)


def estimate_capture_bytes(cfg: ModelConfig, capture: str | Iterable[str] | None, batch: int,
                           seq: int, capture_dtype: np.dtype | None = None) -> int:
    """Bytes a trace of these hooks takes for a (batch, seq) input; needs only the config.

    Floats are stored as float32 unless ``capture_dtype`` says otherwise; indices as int32.
    """
    item = np.dtype(capture_dtype or np.float32).itemsize
    total = 0
    for n in resolve(cfg, capture):
        size = 4 if n.endswith("topk_indices") else item
        total += int(np.prod(hook_shape(cfg, n, batch, seq), dtype=np.int64)) * size
    return total
