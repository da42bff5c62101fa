"""Random weights for a config (numpy): test checkpoints, benchmarks and training from scratch."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .checkpoint import Checkpoint, expected_shapes
from .config import ModelConfig


def random_tensors(cfg: ModelConfig, seed: int = 0, std: float | None = None,
                   router_std: float | None = None) -> dict[str, np.ndarray]:
    """Normal(0, std) weights (std = initializer_range), unit norms; float32 numpy by name.

    Output projections are scaled by 1/sqrt(2 * layers) (GPT-2 style) so deep random models
    keep a sane residual stream.
    """
    rng = np.random.default_rng(seed)
    s = cfg.initializer_range if std is None else std
    depth = 1.0 / np.sqrt(2.0 * cfg.num_hidden_layers)
    out = {}
    for name, shape in expected_shapes(cfg).items():
        if name.endswith("norm.weight"):
            out[name] = np.ones(shape, np.float32)
            continue
        scale = s
        if name.endswith(("o_proj.weight", "down_proj.weight", "experts.down_proj")):
            scale = s * depth
        if name.endswith("router.weight") and router_std is not None:
            scale = router_std
        out[name] = rng.normal(0.0, scale, size=shape).astype(np.float32)
    return out


def write_random_checkpoint(path: str | os.PathLike, cfg: ModelConfig, seed: int = 0,
                            dtype: str = "float32", **kwargs) -> Path:
    """Write a random checkpoint of ``cfg`` in HF layout (what `make demo` uses with no model)."""
    return Checkpoint.save(path, random_tensors(cfg, seed, **kwargs), cfg, dtype=dtype)
