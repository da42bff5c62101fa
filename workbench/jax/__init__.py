"""JAX backend: ``workbench.jax.load(path, dtype)``; mirrors ``workbench.torch`` file by file."""

from .model import JaxModel, KVCache, Params, forward, load

__all__ = ["JaxModel", "KVCache", "Params", "forward", "load"]
