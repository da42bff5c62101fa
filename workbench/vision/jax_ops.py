"""The jax backend's kernels for the vision path (``workbench.vision.forward.VisionOps``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from ..config import VisionConfig
from ..forward import Recorder
from ..hooks import VISION_LAYER, VISION_TOP
from ..interventions import Plan
from ..jax.attention import PRECISION
from ..jax.ops import JaxOps
from .forward import Params, VisionExecutor, layer_step, post_step, pre_step


class JaxVisionOps(JaxOps):
    """``JaxOps`` plus the vision kernels, as transformers' Llama 4 vision tower computes."""

    def unfold(self, pixels: jax.Array, patch: int) -> jax.Array:
        N, C, H, W = pixels.shape
        gh, gw = H // patch, W // patch
        x = pixels[:, :, : gh * patch, : gw * patch].reshape(N, C, gh, patch, gw, patch)
        return x.transpose(0, 2, 4, 1, 3, 5).reshape(N, gh * gw, C * patch * patch)

    def linear_bias(self, x: jax.Array, w: jax.Array, b: jax.Array | None) -> jax.Array:
        y = self.linear(x, w)
        return y if b is None else y + b

    def layer_norm(self, x: jax.Array, w: jax.Array, b: jax.Array, eps: float) -> jax.Array:
        xf = x.astype(jnp.float32)
        mu = jnp.mean(xf, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(xf - mu), axis=-1, keepdims=True)
        return ((xf - mu) * jax.lax.rsqrt(var + eps)).astype(x.dtype) * w + b

    def gelu(self, x: jax.Array) -> jax.Array:
        return jax.nn.gelu(x, approximate=False)

    def append_class(self, x: jax.Array, cls: jax.Array) -> jax.Array:
        c = jnp.broadcast_to(cls.astype(x.dtype), (x.shape[0], 1, x.shape[-1]))
        return jnp.concatenate([x, c], axis=1)

    def full_attention(self, q: jax.Array, k: jax.Array, v: jax.Array,
                       scale: float) -> jax.Array:
        return self.attend(self.full_attention_probs(q, k, scale), v)

    def full_attention_probs(self, q: jax.Array, k: jax.Array, scale: float) -> jax.Array:
        s = jnp.einsum("bhsd,bhtd->bhst", q, k, precision=PRECISION,
                       preferred_element_type=jnp.float32).astype(q.dtype) * scale
        return jax.nn.softmax(s, axis=-1)

    def pixel_shuffle(self, x: jax.Array, ratio: float) -> jax.Array:
        N, P, C = x.shape
        g = round(P ** 0.5)
        r = round(g * ratio)
        x = x.reshape(N, g, r, round(C / ratio)).transpose(0, 2, 1, 3)
        x = x.reshape(N, r, r, round(C / ratio ** 2)).transpose(0, 2, 1, 3)
        return x.reshape(N, r * r, round(C / ratio ** 2))

    def scatter_rows(self, e: jax.Array, index: jax.Array, rows: jax.Array) -> jax.Array:
        B, S, D = e.shape
        flat = e.reshape(B * S, D).at[index].set(rows.reshape(-1, D).astype(e.dtype))
        return flat.reshape(B, S, D)


class CompiledVision(VisionExecutor):
    """Runs the vision steps as compiled functions of ``model`` (a ``JaxModel``): the
    embedding step, one encoder layer (compiled once, reused for every layer) and the adapter
    with the projector. Captured values are merged into ``rec.out`` under ``vision.`` names."""

    def __init__(self, model: Any, vc: VisionConfig, rec: Any, names: frozenset[str],
                 nan_check: bool):
        super().__init__(model.ops, vc, rec)
        self.model = model
        self.names = names
        self.nan_check = nan_check

    def _call(self, kind: str, prefix: str, sites: tuple[str, ...], step: Callable[..., Any],
              *args: Any) -> Any:
        want = frozenset(n[len(prefix):] for n in self.names
                         if n.startswith(prefix) and n[len(prefix):] in sites)
        ops, vc, nan_check = self.ops, self.vc, self.nan_check

        def build() -> Callable:
            def run(*a):
                rec = Recorder(ops, want, Plan(), nan_check=nan_check)
                return step(ops, vc, *a, rec), rec.out, rec.finite
            return run

        result, out, finite = self.model._step(("vision", kind, want, nan_check), build)(*args)
        for n, v in out.items():
            self.rec.out[prefix + n] = v
        for n, v in finite.items():
            self.rec.finite[prefix + n] = v
        return result

    def pre(self, p: Params, pixels: jax.Array) -> jax.Array:
        return self._call("pre", "vision.", VISION_TOP, pre_step, p, pixels)

    def layer(self, j: int, lp: Params, h: jax.Array, cos: jax.Array,
              sin: jax.Array) -> jax.Array:
        return self._call("layer", f"vision.layers.{j}.", VISION_LAYER, layer_step, lp, h, cos,
                          sin)

    def post(self, p: Params, proj: jax.Array, h: jax.Array) -> jax.Array:
        return self._call("post", "vision.", VISION_TOP, post_step, p, proj, h)
