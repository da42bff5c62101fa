"""Llama 4's vision path, written once for both backends: image tiles -> projected features.

Each tile (C, H, W) goes through, as transformers' ``Llama4VisionModel`` and
``Llama4MultiModalProjector`` compute it:

1. patch embedding: unfold into ``patch_size`` squares (channel-major, as ``nn.Unfold``),
   a linear without bias;
2. the class embedding appended after the patches, ``positional_embedding_vlm`` added,
   ``layernorm_pre`` (hook ``vision.embed``);
3. pre-LN ViT blocks: LayerNorm, q/k/v with bias, 2-D RoPE, non-causal softmax attention
   (``vision.layers.{j}.attn.pattern``), o_proj, residual; LayerNorm, fc1, GELU, fc2,
   residual (``vision.layers.{j}.resid_post``);
4. ``layernorm_post``, the class token dropped, pixel shuffle;
5. the vision adapter: fc1, GELU, fc2, GELU (``vision.adapter_out``);
6. ``multi_modal_projector.linear_1`` into the text width (``vision.projected``).

Backends supply the kernels (``VisionOps``); this module knows the structure and the hook
names, which a recorder scoped to ``vision.`` prefixes. The three steps (``pre_step``,
``layer_step``, ``post_step``) take parameters as arguments so a compiling backend compiles
each once, the layer step once for every layer.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

import numpy as np

from ..config import ModelConfig, VisionConfig
from ..hooks import MODALITY_IMAGE, MODALITY_IMAGE_SPECIAL, MODALITY_TEXT
from ..ops import Ops

Array = Any
Params = Mapping[str, Any]
PREFIX = "vision_model."
LAYER = PREFIX + "model.layers.{}."
PROJECTOR = "multi_modal_projector.linear_1.weight"
LN_EPS = 1e-5  # transformers builds the tower's nn.LayerNorm with its default eps


class VisionError(ValueError):
    """Images the model cannot take: no vision tower, pixel values of the wrong shape, or a
    number of ``<|patch|>`` placeholders that differs from the image features."""


class VisionOps(Ops, Protocol):
    """The kernels the vision path needs beyond the text model's ``Ops``."""

    def unfold(self, pixels: Array, patch: int) -> Array:
        """(N, C, H, W) -> (N, P, C*patch*patch) non-overlapping patches, row-major over the
        grid, each flattened channel-major as ``nn.Unfold`` does."""

    def linear_bias(self, x: Array, w: Array, b: Array | None) -> Array:
        """``x @ w.T + b`` (nn.Linear)."""

    def layer_norm(self, x: Array, w: Array, b: Array, eps: float) -> Array:
        """LayerNorm over the last axis (nn.LayerNorm)."""

    def gelu(self, x: Array) -> Array:
        """Exact (erf) GELU."""

    def append_class(self, x: Array, cls: Array) -> Array:
        """x (N, P, D) with the class embedding (D,) appended as position P: (N, P+1, D)."""

    def full_attention(self, q: Array, k: Array, v: Array, scale: float) -> Array:
        """Non-causal softmax attention, q/k/v (N, H, S, d) -> (N, H, S, d)."""

    def full_attention_probs(self, q: Array, k: Array, scale: float) -> Array:
        """The non-causal softmax pattern (N, H, S, S)."""

    def pixel_shuffle(self, x: Array, ratio: float) -> Array:
        """transformers' ``pixel_shuffle`` of (N, P, D) patches on a square grid:
        (N, P*ratio**2, D/ratio**2)."""

    def scatter_rows(self, e: Array, index: Array, rows: Array) -> Array:
        """e (B, S, D) with rows (n, D) written at flat positions ``index`` (n,) of B*S."""


def rope_tables(vc: VisionConfig) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin (P+1, head_dim/2) float32 of the tower's 2-D RoPE, as transformers'
    ``Llama4VisionRotaryEmbedding``: the first half of each head's pairs rotates with the
    patch column + 1, the second half with the row + 1, frequencies ``theta**(-2i/(d/2))``;
    the class token (last position) is not rotated."""
    g, d = vc.grid, vc.head_dim
    freq_dim = d // 2
    freq = (1.0 / (np.float32(vc.rope_theta) ** (np.arange(0, freq_dim, 2)[: freq_dim // 2]
                                                 .astype(np.float32) / np.float32(freq_dim))))
    freq = freq.astype(np.float32)
    idx = np.arange(g * g)
    x = (idx % g + 1).astype(np.float32)[:, None] * freq[None]
    y = (idx // g + 1).astype(np.float32)[:, None] * freq[None]
    ang = np.concatenate([x, y], axis=-1).astype(np.float32)  # (P, d/2)
    ang = np.concatenate([ang, np.zeros((1, ang.shape[1]), np.float32)])  # the class token
    return np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)


def pre_step(ops: VisionOps, vc: VisionConfig, p: Params, pixels: Array, rec: Any) -> Array:
    """Tiles (N, C, H, W) -> the first block's input (N, P+1, D): ``vision.embed``."""
    x = ops.linear(ops.unfold(pixels, vc.patch_size), p["patch_embedding.linear.weight"])
    x = ops.append_class(x, p["class_embedding"]) + p["positional_embedding_vlm"]
    x = ops.layer_norm(x, p["layernorm_pre.weight"], p["layernorm_pre.bias"], LN_EPS)
    return rec("embed", x)


def layer_step(ops: VisionOps, vc: VisionConfig, lp: Params, h: Array, cos: Array, sin: Array,
               rec: Any) -> Array:
    """One pre-LN ViT block on h (N, S, D); ``rec`` emits ``attn.pattern`` and
    ``resid_post`` under the layer's prefix."""
    H, d = vc.num_attention_heads, vc.head_dim
    x = ops.layer_norm(h, lp["input_layernorm.weight"], lp["input_layernorm.bias"], LN_EPS)

    def proj(name: str) -> Array:
        return ops.split_heads(ops.linear_bias(x, lp[f"self_attn.{name}.weight"],
                                               lp[f"self_attn.{name}.bias"]), H, d)

    q, k, v = ops.rope(proj("q_proj"), cos, sin), ops.rope(proj("k_proj"), cos, sin), \
        proj("v_proj")
    scale = d ** -0.5
    if rec.wants("attn.pattern"):
        o = ops.attend(rec("attn.pattern", ops.full_attention_probs(q, k, scale)), v)
    else:
        o = ops.full_attention(q, k, v, scale)
    h = h + ops.linear_bias(ops.merge_heads(o), lp["self_attn.o_proj.weight"],
                            lp["self_attn.o_proj.bias"])
    x = ops.layer_norm(h, lp["post_attention_layernorm.weight"],
                       lp["post_attention_layernorm.bias"], LN_EPS)
    x = ops.gelu(ops.linear_bias(x, lp["mlp.fc1.weight"], lp["mlp.fc1.bias"]))
    return rec("resid_post", h + ops.linear_bias(x, lp["mlp.fc2.weight"], lp["mlp.fc2.bias"]))


def post_step(ops: VisionOps, vc: VisionConfig, p: Params, proj: Array, h: Array,
              rec: Any) -> Array:
    """Encoder output (N, P+1, D) -> projected features (N, P', text hidden):
    ``vision.adapter_out`` and ``vision.projected``."""
    h = ops.layer_norm(h, p["layernorm_post.weight"], p["layernorm_post.bias"], LN_EPS)
    h = ops.pixel_shuffle(h[:, :-1], vc.pixel_shuffle_ratio)
    h = ops.gelu(ops.linear(h, p["vision_adapter.mlp.fc1.weight"]))
    h = rec("adapter_out", ops.gelu(ops.linear(h, p["vision_adapter.mlp.fc2.weight"])))
    return rec("projected", ops.linear(h, proj))


class VisionExecutor:
    """Calls the vision steps eagerly with one recorder scoped to ``vision.``; a compiling
    backend overrides ``pre``/``layer``/``post`` with compiled versions of the same steps."""

    def __init__(self, ops: VisionOps, vc: VisionConfig, rec: Any):
        self.ops = ops
        self.vc = vc
        self.rec = rec

    def pre(self, p: Params, pixels: Array) -> Array:
        return pre_step(self.ops, self.vc, p, pixels, self.rec.scope("vision."))

    def layer(self, j: int, lp: Params, h: Array, cos: Array, sin: Array) -> Array:
        return layer_step(self.ops, self.vc, lp, h, cos, sin,
                          self.rec.scope(f"vision.layers.{j}."))

    def post(self, p: Params, proj: Array, h: Array) -> Array:
        return post_step(self.ops, self.vc, p, proj, h, self.rec.scope("vision."))


def split_params(vc: VisionConfig, params: Mapping[str, Array]) -> tuple[dict, list[dict], Array]:
    """The tower's parameters by role: (top-level by name without ``vision_model.``, one dict
    per encoder layer by name inside it, the projector weight)."""
    top = {n[len(PREFIX):]: a for n, a in params.items()
           if n.startswith(PREFIX) and not n.startswith(PREFIX + "model.")}
    layers = []
    for j in range(vc.num_hidden_layers):
        pre = LAYER.format(j)
        layers.append({n[len(pre):]: a for n, a in params.items() if n.startswith(pre)})
    return top, layers, params[PROJECTOR]


def vision_forward(ex: VisionExecutor, params: tuple[dict, list[dict], Array], pixels: Array,
                   cos: Array, sin: Array) -> Array:
    """Tiles (N, C, H, W) through the tower, adapter and projector: (N, P', text hidden)."""
    top, layers, proj = params
    h = ex.pre(top, pixels)
    for j, lp in enumerate(layers):
        h = ex.layer(j, lp, h, cos, sin)
    return ex.post(top, proj, h)


# ----------------------------------------------------------------------------- inputs
def check_pixels(cfg: ModelConfig, vc: VisionConfig, pixel_values: Any) -> np.ndarray:
    """``pixel_values`` as float32 (N, C, H, W) tiles of the tower's size; VisionError naming
    the problem otherwise. (A torch tensor is read on the host.)"""
    if hasattr(pixel_values, "detach"):
        pixel_values = pixel_values.detach().float().cpu().numpy()
    try:
        px = np.asarray(pixel_values)
    except Exception as e:  # noqa: BLE001 - anything numpy cannot read is an input error
        raise VisionError(f"pixel_values could not be read as an array: {e}") from None
    want = (vc.num_channels, vc.image_size, vc.image_size)
    if px.ndim == 3:
        px = px[None]
    if px.ndim != 4 or tuple(px.shape[1:]) != want or px.shape[0] == 0:
        raise VisionError(f"pixel_values must have shape (tiles, {', '.join(map(str, want))}) "
                          f"for this vision tower (image_size={vc.image_size}), got "
                          f"{tuple(px.shape)}")
    if px.dtype.kind not in "fiu":
        raise VisionError(f"pixel_values must be numbers, got dtype {px.dtype}")
    px = px.astype(np.float32)
    if not np.isfinite(px).all():
        raise VisionError("pixel_values hold NaN or Inf")
    return px


def image_positions(ids: np.ndarray, vc: VisionConfig, tiles: int) -> np.ndarray:
    """Flat positions (over batch x seq) of the ``<|patch|>`` placeholders, in the order the
    image features fill them; VisionError when their count differs from the features'."""
    pos = np.flatnonzero(ids.reshape(-1) == vc.image_token_index)
    want = tiles * vc.tokens_per_tile
    if len(pos) != want:
        raise VisionError(
            f"image features and image tokens do not match: {tiles} tile(s) give {want} "
            f"features ({vc.tokens_per_tile} per tile) but input_ids hold {len(pos)} "
            f"<|patch|> placeholder(s) (image_token_index={vc.image_token_index}); build the "
            "prompt with wb.Processor so each tile gets its placeholders")
    return pos.astype(np.int64)


def token_modality(ids: np.ndarray, vc: VisionConfig | None) -> np.ndarray:
    """(B, T) int32: ``MODALITY_IMAGE`` for ``<|patch|>`` placeholders, ``MODALITY_IMAGE_SPECIAL``
    for the other tokens from ``<|image_start|>`` to ``<|image_end|>`` (tile separators,
    ``<|image|>``, the markers themselves), ``MODALITY_TEXT`` for the rest."""
    ids = np.asarray(ids)
    out = np.full(ids.shape, MODALITY_TEXT, np.int32)
    if vc is None:
        return out
    for b in range(ids.shape[0]):
        row = ids[b]
        inside = np.cumsum(row == vc.boi_token_index) - np.cumsum(row == vc.eoi_token_index)
        span = (inside > 0) | (row == vc.eoi_token_index)
        out[b, span] = MODALITY_IMAGE_SPECIAL
    out[ids == vc.image_token_index] = MODALITY_IMAGE
    return out


def vision_status(cfg: ModelConfig, tensors: Mapping[str, Any]) -> str | None:
    """Why a model of ``cfg`` holding ``tensors`` (canonical names) cannot run images, or
    None when it can: a text-only config, or tensors of the tower missing or mis-shaped."""
    from ..checkpoint import VISION_PREFIXES, vision_expected_shapes
    try:
        vc = cfg.vision
    except ValueError as e:
        return f"its vision_config is unusable: {e}"
    if vc is None:
        return "its config has no vision_config (a text-only Llama 4)"
    given = [n for n in tensors if n.startswith(VISION_PREFIXES)]
    if not given:
        return ("the checkpoint holds no vision tower (vision_model.*, "
                "multi_modal_projector.*)")
    exp = vision_expected_shapes(vc, cfg.hidden_size)
    missing = sorted(set(exp) - set(given))
    if missing:
        return f"vision tensor(s) missing: {missing[:3]} ({len(missing)} of {len(exp)})"
    for n, shape in exp.items():
        if tuple(tensors[n].shape) != shape:
            return f"vision tensor {n!r} has shape {tuple(tensors[n].shape)}, expected {shape}"
    return None
