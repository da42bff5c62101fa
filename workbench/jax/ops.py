"""The jax backend's kernels behind the ``workbench.ops.Ops`` interface (traced under jit)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ..model import DeviceError
from . import attention as att
from . import moe

JAX_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
_PLATFORMS = {"gpu": "gpu", "cuda": "gpu", "rocm": "gpu", "cpu": "cpu", "tpu": "tpu"}


def resolve_device(device: Any) -> jax.Device:
    """``None`` (jax's default device), a ``jax.Device``, or a platform name ("cpu", "gpu",
    "cuda", "tpu", optionally ":N"), checked to exist."""
    if device is None:
        return jax.devices()[0]
    if isinstance(device, jax.Device):
        return device
    if not isinstance(device, str):
        raise DeviceError(f"device={device!r}: give a jax.Device or a platform name such as "
                          "'cpu' or 'gpu'")
    name, _, index = device.partition(":")
    platform = _PLATFORMS.get(name.lower())
    if platform is None:
        raise DeviceError(f"device={device!r}: unknown jax platform; use 'cpu', 'gpu' (or "
                          "'cuda'), 'tpu', or a jax.Device")
    try:
        devices = jax.devices(platform)
    except RuntimeError as e:
        raise DeviceError(f"device={device!r}: jax has no {platform} backend here "
                          f"(available: {sorted({d.platform for d in jax.devices()})}; "
                          f"{str(e).splitlines()[0]})") from None
    if not index:
        return devices[0]
    if not index.isdigit() or int(index) >= len(devices):
        raise DeviceError(f"device={device!r}: jax has {len(devices)} {platform} device(s) "
                          f"(0..{len(devices) - 1})")
    return devices[int(index)]


def to_numpy(x: jax.Array) -> np.ndarray:
    """Array -> writable numpy; floats become float32 (bf16 is exactly representable), ints
    int32. (numpy views of jax arrays are read-only, so this always copies.)"""
    a = np.asarray(jax.device_get(x))
    return np.array(a, dtype=np.int32 if a.dtype.kind in "iu" else np.float32)


def host_array(value: np.ndarray) -> np.ndarray:
    """A host array as jitted steps take it: int32 for integers, float32 for floats."""
    return np.ascontiguousarray(value, dtype=np.int32 if value.dtype.kind in "iu"
                                else np.float32)


class JaxOps:
    """Kernels of the jax backend (``workbench.ops.Ops``); arrays live on ``device``."""

    def __init__(self, device: jax.Device):
        self.device = device

    def asarray(self, a: np.ndarray) -> jax.Array:
        return jax.device_put(host_array(np.asarray(a)), self.device)

    to_numpy = staticmethod(to_numpy)

    def broadcast_like(self, value: jax.Array, x: jax.Array) -> jax.Array:
        return jnp.broadcast_to(value.astype(x.dtype), x.shape)

    def all_finite(self, x: jax.Array) -> jax.Array:
        return jnp.all(jnp.isfinite(x))

    def cast(self, x: jax.Array, dtype: Any) -> jax.Array:
        return jnp.asarray(x).astype(dtype)

    def embed(self, table: jax.Array, ids: jax.Array) -> jax.Array:
        return jnp.take(table, ids, axis=0)

    linear = staticmethod(att.linear)
    rms_norm = staticmethod(att.rms_norm)
    swiglu = staticmethod(moe.swiglu)

    def split_heads(self, x: jax.Array, n: int, d: int) -> jax.Array:
        B, S, _ = x.shape
        return x.reshape(B, S, n, d).transpose(0, 2, 1, 3)

    def merge_heads(self, o: jax.Array) -> jax.Array:
        B, H, S, d = o.shape
        return o.transpose(0, 2, 1, 3).reshape(B, S, H * d)

    rope = staticmethod(att.apply_rope)

    def scale_queries(self, q: jax.Array, temp: jax.Array) -> jax.Array:
        return (q * temp[None, None, :, None]).astype(q.dtype)

    def attention(self, q, k, v, start, k_start, chunk, scale, pad=None):
        return att.fused(q, k, v, start, k_start, chunk, scale, self.device.platform, pad)
    attention_probs = staticmethod(att.attention_probs)
    attention_summary = staticmethod(att.attention_summary)
    attend = staticmethod(att.attend)

    def seq_slice(self, x: jax.Array, lo: int, hi: int) -> jax.Array:
        return x[:, :, lo:hi]

    def zero_heads(self, o: jax.Array, heads: tuple[int, ...]) -> jax.Array:
        return o.at[:, np.asarray(heads)].set(0)

    cache_update = staticmethod(att.cache_update)

    def select_experts(self, logits, k, ban, force, seq):
        # looked up at trace time, so tests can swap the kernel module's functions
        return moe.select_experts(logits, k, ban, force, seq)

    def as_index(self, idx: jax.Array) -> jax.Array:
        return idx.astype(jnp.int32)

    def gate_scores(self, logits: jax.Array, idx: jax.Array) -> jax.Array:
        s = jax.nn.sigmoid(jnp.take_along_axis(logits, idx, axis=1).astype(jnp.float32))
        return s.astype(logits.dtype)

    def dispatch(self, xf, idx, gates, experts):
        return moe.dispatch(xf, idx, gates, experts)

    zero_gates = staticmethod(moe.zero_gates)
