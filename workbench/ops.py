"""The two small interfaces the shared forward (``workbench.forward``) is written against.

``Ops`` is what a backend supplies: kernels on its own array type, on its own device. Shapes
use B batch, S query positions, T key positions, D hidden, H query heads, K key/value heads,
d head dim, E experts, k experts per token, N = B*S tokens. Ops know no hook names and no
parameter names; every rounding choice (fp32 accumulation, where to cast) is the backend's, and
each backend documents how it matches transformers' Llama 4.

``WeightSource`` is what a way of holding weights supplies: the parameters of the embedding,
of each layer and of the head, on the model's device.
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np

Array = Any


class Ops(Protocol):
    """Backend kernels used by ``workbench.forward``."""

    device: Any

    # host <-> device
    def asarray(self, a: np.ndarray) -> Array:
        """A host array on the model's device (float32 tables, int ids)."""

    def to_numpy(self, x: Array) -> np.ndarray:
        """Device array -> writable numpy: floats as float32 (bf16 is exact), ints as int32."""

    def broadcast_like(self, value: Array, x: Array) -> Array:
        """``value`` (a patch) broadcast to x's shape and cast to x's dtype."""

    def all_finite(self, x: Array) -> Array:
        """A scalar: True when x holds no NaN or infinity."""

    def cast(self, x: Array, dtype: Any) -> Array:
        """x in ``dtype`` (a dtype of this backend)."""

    # dense kernels
    def embed(self, table: Array, ids: Array) -> Array:
        """Rows of table (V, D) for ids (B, S): (B, S, D)."""

    def linear(self, x: Array, w: Array) -> Array:
        """``x @ w.T`` for an nn.Linear-layout weight (out, in)."""

    def rms_norm(self, x: Array, w: Array | None, eps: float) -> Array:
        """RMSNorm over the last axis in fp32, cast back, then times ``w`` (if any)."""

    def swiglu(self, x: Array, gate: Array, up: Array, down: Array) -> Array:
        """``down(silu(gate x) * up x)`` with nn.Linear-layout weights."""

    # attention
    def split_heads(self, x: Array, n: int, d: int) -> Array:
        """(B, S, n*d) -> (B, n, S, d)."""

    def merge_heads(self, o: Array) -> Array:
        """(B, H, S, d) -> (B, S, H*d)."""

    def rope(self, x: Array, cos: Array, sin: Array) -> Array:
        """Interleaved-pair RoPE on x (B, N, S, d) with tables (S, d/2), or (B, S, d/2) per
        row of a padded batch, computed in fp32."""

    def scale_queries(self, q: Array, temp: Array) -> Array:
        """q (B, H, S, d) times a per-position temperature (S,), rounded to q's dtype."""

    def attention(self, q: Array, k: Array, v: Array, start: Any, k_start: Any,
                  chunk: int | None, scale: float, pad: Any = None) -> Array:
        """Causal (and, with ``chunk``, chunk-local) GQA softmax attention without a
        materialised pattern where possible: q (B, H, S, d) at positions start.., k/v
        (B, K, T, d) at positions k_start..; returns (B, H, S, d). ``pad`` (a
        ``forward.PadMask``) adds a padded batch's key mask and shifted chunks."""

    def attention_probs(self, q: Array, k: Array, start: Any, k_start: Any, chunk: int | None,
                        scale: float, pad: Any = None) -> Array:
        """The masked softmax pattern (B, H, S, T), as an eager implementation computes it
        (``pad``: as ``attention``; padded keys get probability 0)."""

    def attention_summary(self, q: Array, k: Array, start: Any, k_start: Any,
                          chunk: int | None, own_chunk: int | None, scale: float) -> Array:
        """Per query and head, statistics of the attention distribution (B, H, S, F) float32,
        F = ``numerics.SUMMARY_FEATURES``, computed blockwise (never an S x T buffer); mask as
        ``attention``; ``own_chunk`` is the chunk size whose mass the ``own_chunk`` feature
        measures (None: the whole context)."""

    def seq_slice(self, x: Array, lo: int, hi: int) -> Array:
        """x[:, :, lo:hi] (the sequence axis of (B, H, S, ...) arrays)."""

    def attend(self, probs: Array, v: Array) -> Array:
        """probs (B, H, S, T) times v (B, K, T, d): (B, H, S, d)."""

    def zero_heads(self, o: Array, heads: tuple[int, ...]) -> Array:
        """o (B, H, S, d) with the given heads set to zero."""

    def cache_update(self, entry: Any, k: Array, v: Array, start: Any,
                     chunk: int | None, shift: Any = None) -> tuple[Array, Array, Any, Any]:
        """Append this call's keys/values to a layer's cache entry: (keys and values to attend
        to, the position of their first slot, the updated entry). Chunked layers keep only
        what a later query can still see (of any row, with ``shift``: a padded batch's left
        padding per row, which moves its chunks)."""

    # mixture of experts
    def select_experts(self, logits: Array, k: int, ban: tuple[int, ...],
                       force: tuple[tuple[int, tuple[int, ...] | None], ...],
                       seq: int) -> Array:
        """Top-k expert ids (N, k) of router logits (N, E) after setting banned experts to
        -inf and forced ones (at sequence positions, or everywhere for None) to +inf."""

    def as_index(self, idx: Array) -> Array:
        """Expert ids in the integer dtype the backend indexes with."""

    def gate_scores(self, logits: Array, idx: Array) -> Array:
        """sigmoid of the chosen experts' logits (N, k), in fp32, rounded to the model dtype."""

    def zero_gates(self, gates: Array, idx: Array, experts: tuple[int, ...]) -> Array:
        """gates (N, k) with 0 wherever idx (N, k) is one of ``experts``."""

    def dispatch(self, x: Array, idx: Array, gates: Array, experts: Any) -> Array:
        """Routed output (N, D): sum over each token's k choices of expert(gate * x), computed
        sparsely (cost follows the tokens routed, not E). ``experts`` is the backend's resident
        layout, or a streamed ``ExpertSet`` that reads an expert when first asked for it."""


class WeightSource(Protocol):
    """Parameters for the forward, on the model's device (names relative to the layer)."""

    def begin(self, layers: int) -> None:
        """A forward over layers 0..layers-1 starts (a streaming source starts reading)."""

    def embedding(self, ids: Any) -> tuple[Array, Any]:
        """(table, ids into it) for the token ids of this call: the whole embedding (V, D)
        with ids unchanged, or only the rows asked for with ids renumbered (host ids)."""

    def layer(self, i: int) -> dict[str, Array]:
        """Layer i's parameters by relative name (``self_attn.q_proj.weight``); MoE layers add
        ``experts`` in the layout the backend's ``dispatch`` reads."""

    def release(self, i: int) -> None:
        """Called once the forward is done with layer i."""

    def head(self) -> tuple[Array, Array]:
        """(final norm weight (D,), lm_head (V, D))."""
