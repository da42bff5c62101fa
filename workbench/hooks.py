"""Hook names: their grammar, glob resolution and shape rules, shared by both backends.

A hook name is one of::

    embed | final_norm | logits
    layers.{i}.(resid_pre | resid_mid | resid_post)
    layers.{i}.attn.(q | k | v | pattern | summary | out)
    layers.{i}.moe.(router_logits | topk_indices | topk_scores | routed_out | shared_out)
    layers.{i}.mlp.out
    token_modality
    vision.(embed | adapter_out | projected)
    vision.layers.{j}.(resid_post | attn.pattern)

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

TOP_LEVEL: tuple[str, ...] = ("embed", "final_norm", "logits", "token_modality")
"""Hook names outside any layer. ``token_modality`` (B, T) int32 is what each token is
(``MODALITY_TEXT``, ``MODALITY_IMAGE``, ``MODALITY_IMAGE_SPECIAL``), on models with a vision
tower."""
VISION_TOP: tuple[str, ...] = ("embed", "adapter_out", "projected")
"""Hooks of the vision path outside its layers: ``vision.{site}``."""
VISION_LAYER: tuple[str, ...] = ("attn.pattern", "resid_post")
"""Hooks of vision encoder layer j: ``vision.layers.{j}.{site}``."""
MODALITY_TEXT, MODALITY_IMAGE, MODALITY_IMAGE_SPECIAL = 0, 1, 2
MODALITY_NAMES: tuple[str, ...] = ("text", "image", "image special")
"""Names of the ``token_modality`` values 0, 1, 2."""
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


_GRAMMAR = " | ".join([*TOP_LEVEL[:3], _alternatives("layers.{i}.", LAYER_SITES),
                       *(_alternatives(f"layers.{{i}}.{block}.", leaves)
                         for block, leaves in BLOCKS.items()),
                       _alternatives("vision.", VISION_TOP),
                       _alternatives("vision.layers.{j}.", VISION_LAYER), "token_modality"])


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
    ``"embed"``, ``"final_norm"``, ``"logits"``, ... Hooks of the vision path have
    ``block="vision"``, ``layer=None`` and the rest of the name as ``site``
    (``"layers.3.attn.pattern"``, ``"projected"``); ``vision_layer`` is their encoder layer.
    """

    name: str
    layer: int | None
    block: str | None
    site: str

    @property
    def relative(self) -> str:
        """The name inside its layer (``"attn.q"``), or the whole name outside a layer."""
        if self.block == "vision":
            return self.name
        return self.site if self.block is None else f"{self.block}.{self.site}"

    @property
    def vision_layer(self) -> int | None:
        """The vision encoder layer j of ``vision.layers.{j}.…``, else None."""
        if self.block != "vision":
            return None
        m = _LAYER_PREFIX.match(self.site)
        return int(m.group(1)) if m else None


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
    if name.startswith("vision."):
        rest = name[len("vision."):]
        m = _LAYER_PREFIX.match(rest)
        if rest in VISION_TOP or (m and rest[m.end():] in VISION_LAYER):
            return HookName(name, None, "vision", rest)
        raise HookError(_not_a_hook(name, f"{rest!r} is not a site of the vision path "
                                          f"(expected one of {', '.join(VISION_TOP)} or "
                                          f"layers.{{j}}.({'|'.join(VISION_LAYER)}))"))
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
    block, site = _block_site(name)
    if block == "vision":
        return 2 if site.endswith("attn.pattern") else 1
    return 2 if (block, site) in SEQ_AXIS_2 else 1


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
    if site in (("moe", "topk_indices"), (None, "token_modality")):
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
            if name in VISION_TOP:  # a vision-path name without its "vision." prefix
                return "vision", name
            raise HookError(f"{e.args[0]}; nor is it a layer-relative name such as 'attn.q' "
                            "or 'resid_pre'") from None
    return h.block, h.site


def vision_hook_names(cfg: ModelConfig) -> list[str]:
    """The hooks of the vision path (and ``token_modality``), in forward order; empty for a
    config without a vision tower."""
    vc = cfg.vision
    if vc is None:
        return []
    names = ["vision.embed"]
    for j in range(vc.num_hidden_layers):
        names += [f"vision.layers.{j}.{site}" for site in VISION_LAYER]
    return names + ["vision.adapter_out", "vision.projected", "token_modality"]


def hook_names(cfg: ModelConfig, vision: bool = False) -> list[str]:
    """Every hook point of this config, in forward order; ``vision=True`` (a model holding
    a vision tower) puts the vision path's hooks first."""
    names = vision_hook_names(cfg) if vision else []
    names += ["embed"]
    for i in range(cfg.num_hidden_layers):
        block = "moe" if cfg.is_moe(i) else "mlp"
        rel = ["resid_pre", *(f"attn.{h}" for h in ATTN_HOOKS), "resid_mid",
               *(f"{block}.{h}" for h in BLOCKS[block]), "resid_post"]
        names += [absolute(i, r) for r in rel]
    names += ["final_norm", "logits"]
    return names


def resolve(cfg: ModelConfig, patterns: str | Iterable[str] | None,
            vision: bool = False) -> list[str]:
    """Expand glob patterns (``*.moe.*``, ``layers.3.attn.pattern``) to hook names, in order.

    A pattern that matches nothing raises HookError with the closest valid names.
    """
    if patterns is None:
        return []
    if isinstance(patterns, str):
        patterns = [patterns]
    names = hook_names(cfg, vision)
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
               top_k: int | None = None, kv_len: int | None = None,
               tiles: int = 0) -> tuple[int, ...]:
    """The shape a hook has for a (batch, seq) input (kv_len: keys seen, for decode steps;
    tiles: image tiles given, for the vision path's hooks)."""
    D, H, K, d = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    T = kv_len if kv_len is not None else seq
    h = parse(name)
    if h.site == "token_modality":
        return (batch, seq)
    if h.block == "vision":
        vc = cfg.vision
        if vc is None:
            raise HookError(f"{name!r}: this model has no vision tower")
        P, Pv = vc.num_patches, vc.tokens_per_tile
        if h.site.endswith("attn.pattern"):
            return (tiles, vc.num_attention_heads, P, P)
        return {"adapter_out": (tiles, Pv, vc.projector_output_dim),
                "projected": (tiles, Pv, D)}.get(h.site, (tiles, P, vc.hidden_size))
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
                           seq: int, capture_dtype: np.dtype | None = None,
                           tiles: int = 0) -> int:
    """Bytes a trace of these hooks takes for a (batch, seq) input (with ``tiles`` image tiles:
    the vision path's hooks too); needs only the config.

    Floats are stored as float32 unless ``capture_dtype`` says otherwise; indices as int32.
    """
    floats = np.dtype(capture_dtype or np.float32)
    total = 0
    for n in resolve(cfg, capture, vision=tiles > 0):
        size = hook_dtype(n, floats).itemsize
        total += int(np.prod(hook_shape(cfg, n, batch, seq, tiles=tiles),
                             dtype=np.int64)) * size
    return total
