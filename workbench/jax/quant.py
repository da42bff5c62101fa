"""FP8 expert weights on jax: held as float8_e4m3fn, dequantised per tile at use.

Each expert of an FP8 checkpoint is an ``FP8Expert`` (a pytree): gate_up (2I, D) and down
(D, I) in nn.Linear layout as float8_e4m3fn plus float32 per-output-channel scales. The
dispatch's per-expert branch dequantises its expert to the compute dtype inside the compiled
tile loop (``expert_weights``), so weights stay FP8 in device memory and in the streamed
expert cache. ``act`` (w8a8, static: part of the compiled step's key) quantises every expert
matmul input per token to FP8 and back (``fp8_tokens``).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from ..quant import FP8_MAX, SCALE_EPS


@jax.tree_util.register_pytree_node_class
class FP8Expert:
    """One routed expert in FP8 (nn.Linear layout) with its scales; ``act``: w8a8."""

    def __init__(self, gate_up: Any, down: Any, gate_up_scale: Any, down_scale: Any,
                 act: bool = False):
        self.gate_up, self.down = gate_up, down
        self.gate_up_scale, self.down_scale = gate_up_scale, down_scale
        self.act = act

    def tree_flatten(self):
        return (self.gate_up, self.down, self.gate_up_scale, self.down_scale), self.act

    @classmethod
    def tree_unflatten(cls, act, children):
        return cls(*children, act=act)


def expert_weights(w: Any, dtype: Any) -> tuple[jax.Array, jax.Array, bool]:
    """(gate_up (2I, D), down (D, I), w8a8?) of one expert in the compute dtype."""
    if isinstance(w, FP8Expert):
        gu = (w.gate_up.astype(jnp.float32) * w.gate_up_scale[:, None]).astype(dtype)
        dn = (w.down.astype(jnp.float32) * w.down_scale[:, None]).astype(dtype)
        return gu, dn, w.act
    gate_up, down = w
    return gate_up, down, False


def fp8_tokens(x: jax.Array) -> jax.Array:
    """Dynamic per-token FP8 quantise-dequantise of activations (N, D), in float32."""
    xf = x.astype(jnp.float32)
    s = jnp.maximum(jnp.abs(xf).max(-1, keepdims=True) / FP8_MAX, SCALE_EPS)
    q = jnp.clip(xf / s, -FP8_MAX, FP8_MAX).astype(jnp.float8_e4m3fn)
    return (q.astype(jnp.float32) * s).astype(x.dtype)
