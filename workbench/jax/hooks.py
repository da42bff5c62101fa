"""Recorder: the one place where hook values are captured, patched or edited (jax backend).

Layers call ``rec(name, x)`` at every hook point while the forward pass is traced by ``jax.jit``.
Names that are neither captured nor edited return ``x`` untouched, so they leave no trace in the
compiled graph: hooks cost nothing until asked for. Captured values become extra outputs of the
jitted function (``rec.out``); the host converts them to numpy afterwards.

Differences from the torch Recorder: patch values arrive as jit arguments (``patches``, already
float32/int32 on the host) instead of being read from the plan, and the capture position slice
is applied inside the graph, so only the kept positions leave the device.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from ..interventions import Plan
from ..model import seq_axis


class Recorder:
    """Captures (``names``), patches and hook functions (``plan``) during one traced forward."""

    def __init__(self, names: frozenset[str], plan: Plan, patches: Mapping[str, jax.Array],
                 positions: slice | None = None):
        self.want = names
        self.plan = plan
        self.patches = patches
        self.edits = plan.edits()
        self.positions = positions
        self.out: dict[str, jax.Array] = {}

    def wants(self, name: str) -> bool:
        return name in self.want or name in self.edits

    def __call__(self, name: str, x: jax.Array) -> jax.Array:
        if name in self.edits:
            x = self._edit(name, x)
        if name in self.want:
            self.out[name] = _keep(x, self.positions, seq_axis(name))
        return x

    def _edit(self, name: str, x: jax.Array) -> jax.Array:
        if name in self.patches:
            x = jnp.broadcast_to(self.patches[name].astype(x.dtype), x.shape)
        fn = self.plan.fns.get(name)
        if fn is not None:
            y = fn(x)
            if not hasattr(y, "shape") or tuple(y.shape) != tuple(x.shape):
                raise ValueError(f"hook function for {name!r} must return an array of shape "
                                 f"{tuple(x.shape)}, got {getattr(y, 'shape', type(y))}")
            x = jnp.asarray(y).astype(x.dtype)
        return x


def _keep(x: jax.Array, positions: slice | None, axis: int) -> jax.Array:
    if positions is None:
        return x
    idx = [slice(None)] * x.ndim
    idx[axis] = positions
    return x[tuple(idx)]


def patch_array(value: np.ndarray) -> np.ndarray:
    """A plan's patch value as the host array passed to the jitted forward (float32 or int32)."""
    return np.ascontiguousarray(value, dtype=np.int32 if value.dtype.kind in "iu"
                                else np.float32)


def to_numpy(x: jax.Array) -> np.ndarray:
    """Array -> writable numpy; floats become float32 (bf16 is exactly representable), ints
    int32. (numpy views of jax arrays are read-only, so this always copies.)"""
    a = np.asarray(jax.device_get(x))
    return np.array(a, dtype=np.int32 if a.dtype.kind in "iu" else np.float32)
