"""Hook names: their grammar, glob resolution and shape rules, shared by both backends.

A hook name is one of::

    embed | final_norm | logits
    layers.{i}.(resid_pre | resid_mid | resid_post)
    layers.{i}.attn.(q | k | v | pattern | summary | out)
    layers.{i}.moe.(router_logits | topk_indices | topk_scores | routed_out | shared_out)
    layers.{i}.mlp.out

where ``{i}`` is a layer index written in decimal without leading zeros. :func:`parse` reads
this grammar; :func:`seq_axis` and :func:`hook_dtype` build on it, and :func:`layer_of`,
:func:`relative` and :func:`absolute` share its ``layers.{i}.`` prefix rule (which checkpoint
tensor names follow too). Which hooks a given model actually has
(``moe`` on MoE layers, ``mlp`` on dense ones) is :func:`hook_names`'s business.

Extending the grammar is a table edit: a new top-level name (e.g. ``token_modality``) goes in
``TOP_LEVEL``, a new leaf of a layer block (e.g. ``attn.summary``) in ``BLOCKS`` (and in
``SEQ_AXIS_2`` when its sequence axis is 2; ``hook_names`` lists what a model emits), a new
per-layer residual site in ``LAYER_SITES``; a new namespace with its own layers (e.g.
``vision.*``) is one more branch in ``_parse``.
"""

from __future__ import annotations

import difflib
import fnmatch
import functools
import re
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from .config import ModelConfig
from .numerics import SUMMARY_FEATURES

ATTN_HOOKS = ("q", "k", "v", "pattern", "summary", "out")
MOE_HOOKS = ("router_logits", "topk_indices", "topk_scores", "routed_out", "shared_out")
MLP_HOOKS = ("out",)

TOP_LEVEL: tuple[str, ...] = ("embed", "final_norm", "logits")
"""Hook names outside any layer."""
LAYER_SITES: tuple[str, ...] = ("resid_pre", "resid_mid", "resid_post")
"""Residual-stream sites of a layer: ``layers.{i}.{site}``."""
BLOCKS: dict[str, tuple[str, ...]] = {"attn": ATTN_HOOKS, "moe": MOE_HOOKS, "mlp": MLP_HOOKS}
"""Blocks of a layer and their leaves: ``layers.{i}.{block}.{site}``."""
SEQ_AXIS_2: frozenset[tuple[str, str]] = frozenset(
    {("attn", "q"), ("attn", "k"), ("attn", "v"), ("attn", "pattern"), ("attn", "summary")})
"""(block, site) pairs whose arrays are (batch, heads, seq, ...): the sequence is axis 2."""

# "layers.{i}." at the start of a hook or checkpoint tensor name; ASCII digits, no leading zero
_LAYER_PREFIX = re.compile(r"layers\.(0|[1-9][0-9]*)\.")


def _alternatives(prefix: str, leaves: tuple[str, ...]) -> str:
    """``prefix(a|b|c)``, or ``prefix`` + the only leaf: one clause of the grammar message."""
    return prefix + (leaves[0] if len(leaves) == 1 else f"({'|'.join(leaves)})")


_GRAMMAR = " | ".join([*TOP_LEVEL, _alternatives("layers.{i}.", LAYER_SITES),
                       *(_alternatives(f"layers.{{i}}.{block}.", leaves)
                         for block, leaves in BLOCKS.items())])


class HookError(KeyError):
    """An unknown hook name or pattern; the message lists the closest valid names."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0])


@dataclass(frozen=True)
class HookName:
    """A parsed hook name.

    ``name`` is the full name, ``layer`` its layer index (None outside a layer), ``block`` one
    of ``"attn"``, ``"moe"``, ``"mlp"`` (None for residual sites and top-level names) and
    ``site`` the leaf: ``"q"``, ``"pattern"``, ``"router_logits"``, ``"resid_pre"``,
    ``"embed"``, ``"final_norm"``, ``"logits"``, ...
    """

    name: str
    layer: int | None
    block: str | None
    site: str

    @property
    def relative(self) -> str:
        """The name inside its layer (``"attn.q"``), or the whole name outside a layer."""
        return self.site if self.block is None else f"{self.block}.{self.site}"


def parse(name: str) -> HookName:
    """Split a hook name into layer, block and site; HookError if it is not a hook name.

    Only the grammar is checked, not a particular model: ``layers.99.mlp.out`` parses even for
    a 4-layer MoE-only model (use :func:`check_name` for that).
    """
    if not isinstance(name, str):
        raise HookError(f"hook names are strings, got {type(name).__name__} {name!r}")
    return _parse(name)


@functools.lru_cache(maxsize=4096)
def _parse(name: str) -> HookName:
    if name in TOP_LEVEL:
        return HookName(name, None, None, name)
    m = _LAYER_PREFIX.match(name)
    if m is None:
        raise HookError(_not_a_hook(name, "it is neither a top-level name nor 'layers.{i}.…' "
                                          "(i a layer index without leading zeros)"))
    layer, rest = int(m.group(1)), name[m.end():]
    if rest in LAYER_SITES:
        return HookName(name, layer, None, rest)
    block, dot, site = rest.partition(".")
    if not dot or block not in BLOCKS:
        raise HookError(_not_a_hook(name, f"{rest!r} is not a site of a layer (expected one of "
                                          f"{', '.join(LAYER_SITES)} or a block "
                                          f"{'|'.join(BLOCKS)} followed by a leaf)"))
    if site not in BLOCKS[block]:
        raise HookError(_not_a_hook(name, f"{site!r} is not a leaf of the {block} block "
                                          f"(expected one of {', '.join(BLOCKS[block])})"))
    return HookName(name, layer, block, site)


def _not_a_hook(name: str, why: str) -> str:
    return f"{name!r} is not a hook name: {why}; hook names are {_GRAMMAR}"


def layer_of(name: str) -> int | None:
    """The layer index ``i`` of a name starting with ``layers.{i}.``, else None.

    Works for hook names (``layers.3.attn.q``) and canonical checkpoint tensor names
    (``layers.3.self_attn.q_proj.weight``) alike and never raises for other strings.
    """
    m = _LAYER_PREFIX.match(name) if isinstance(name, str) else None
    return int(m.group(1)) if m else None


def relative(name: str) -> str:
    """The name with its ``layers.{i}.`` prefix removed (``"attn.q"`` for
    ``"layers.3.attn.q"``); names outside a layer are returned unchanged."""
    m = _LAYER_PREFIX.match(name)
    return name[m.end():] if m else name


def absolute(layer: int, rel: str) -> str:
    """``layers.{layer}.{rel}``: the inverse of :func:`relative` (``rel`` may be a glob)."""
    if isinstance(layer, bool) or not isinstance(layer, int | np.integer) or layer < 0:
        raise ValueError(f"layer must be a non-negative integer, got {layer!r}")
    return f"layers.{int(layer)}.{rel}"


def seq_axis(name: str) -> int:
    """Axis of the sequence (query) dimension of a hook's array.

    2 for attention q, k, v and pattern, which are (batch, heads, seq, ...); 1 for every other
    hook, which is (batch, seq, ...). ``name`` is a hook name or a layer-relative one
    (``attn.q``, as a per-layer step emits it); anything else raises HookError.
    """
    return 2 if _block_site(name) in SEQ_AXIS_2 else 1


def is_pattern(name: str) -> bool:
    """True for an attention pattern hook (``layers.{i}.attn.pattern``), whose key axis grows
    while decoding."""
    return _block_site(name) == ("attn", "pattern")


def hook_dtype(name: str, model_dtype: np.dtype) -> np.dtype:
    """The dtype a hook's value has: int32 for ``moe.topk_indices``, float32 for
    ``attn.summary`` (statistics computed in fp32), else the model's dtype.

    ``name`` is a hook name or a layer-relative one (``moe.topk_indices``).
    """
    site = _block_site(name)
    if site == ("moe", "topk_indices"):
        return np.dtype(np.int32)
    return np.dtype(np.float32) if site == ("attn", "summary") else np.dtype(model_dtype)


@functools.lru_cache(maxsize=4096)
def _block_site(name: str) -> tuple[str | None, str]:
    """(block, site) of a hook name or of a layer-relative name such as ``attn.q``."""
    try:
        h = parse(name)
    except HookError as e:
        if not isinstance(name, str) or name in TOP_LEVEL or _LAYER_PREFIX.match(name):
            raise
        try:  # a name inside a layer, without its "layers.{i}." prefix
            h = parse(absolute(0, name))
        except HookError:
            raise HookError(f"{e.args[0]}; nor is it a layer-relative name such as 'attn.q' "
                            "or 'resid_pre'") from None
    return h.block, h.site


def hook_names(cfg: ModelConfig) -> list[str]:
    """Every hook point of this config, in forward order."""
    names = ["embed"]
    for i in range(cfg.num_hidden_layers):
        block = "moe" if cfg.is_moe(i) else "mlp"
        rel = ["resid_pre", *(f"attn.{h}" for h in ATTN_HOOKS), "resid_mid",
               *(f"{block}.{h}" for h in BLOCKS[block]), "resid_post"]
        names += [absolute(i, r) for r in rel]
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
    """The HookError message for ``name`` missing from ``names``, with the closest ones."""
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
    h = parse(name)
    if h.site == "logits":
        return (batch, seq, cfg.vocab_size)
    if h.block == "attn":
        return {"q": (batch, H, seq, d), "k": (batch, K, T, d), "v": (batch, K, T, d),
                "pattern": (batch, H, seq, T), "out": (batch, seq, D),
                "summary": (batch, H, seq, len(SUMMARY_FEATURES))}[h.site]
    if h.block == "moe":
        k = top_k or cfg.num_experts_per_tok
        return {"router_logits": (batch, seq, cfg.num_local_experts),
                "topk_indices": (batch, seq, k), "topk_scores": (batch, seq, k)}.get(
            h.site, (batch, seq, D))
    return (batch, seq, D)


def estimate_capture_bytes(cfg: ModelConfig, capture: str | Iterable[str] | None, batch: int,
                           seq: int, capture_dtype: np.dtype | None = None) -> int:
    """Bytes a trace of these hooks takes for a (batch, seq) input; needs only the config.

    Floats are stored as float32 unless ``capture_dtype`` says otherwise; indices as int32.
    """
    floats = np.dtype(capture_dtype or np.float32)
    total = 0
    for n in resolve(cfg, capture):
        size = hook_dtype(n, floats).itemsize
        total += int(np.prod(hook_shape(cfg, n, batch, seq), dtype=np.int64)) * size
    return total
