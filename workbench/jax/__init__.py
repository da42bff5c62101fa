"""JAX backend: ``workbench.jax.load(path, dtype, device)``. Kernels, params and compiled
steps; the forward itself is ``workbench.forward``."""

from .model import JaxModel, KVCache, Params, load
from .ops import JaxOps

__all__ = ["JaxModel", "JaxOps", "KVCache", "Params", "load"]
