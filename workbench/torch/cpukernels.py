"""The streaming CPU kernels (``workbench.cpukernels``) on torch tensors."""

from __future__ import annotations

import torch

from ..cpukernels import MAX_EXPERT_ROWS, MAX_LINEAR_ROWS, MIN_LINEAR_BYTES, library, threads

__all__ = ["MAX_EXPERT_ROWS", "MAX_LINEAR_ROWS", "MIN_LINEAR_BYTES", "experts", "linear",
           "serves", "serves_experts", "serves_linear"]

_DTYPES = (torch.float32, torch.bfloat16)


def serves(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether ``x`` times ``w`` can go through the kernels: CPU inference (no autograd, not
    inside torch.compile), fp32 or bf16 throughout, contiguous x and w."""
    return (x.device.type == "cpu" and x.dtype == w.dtype and x.dtype in _DTYPES
            and not torch.is_grad_enabled() and x.is_contiguous() and w.is_contiguous()
            and not torch.compiler.is_compiling() and library() is not None)


def serves_linear(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether ``x @ w.T`` goes through ``linear``: at most ``MAX_LINEAR_ROWS`` rows and a
    weight of at least ``MIN_LINEAR_BYTES`` (smaller ones torch multiplies as fast)."""
    return (x.numel() <= MAX_LINEAR_ROWS * x.shape[-1]
            and w.numel() * w.element_size() >= MIN_LINEAR_BYTES and serves(x, w))


def serves_experts(xin: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> bool:
    """Whether an expert phase on rows xin with stacked experts (gate_up, down) goes through
    ``experts``."""
    return serves(xin, gate_up) and down.is_contiguous()


def linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x (..., K) @ w.T for w (O, K) (x contiguous, its dtype w's); bf16: sums in fp32,
    rounded once."""
    O, K = w.shape
    y = torch.empty((*x.shape[:-1], O), dtype=x.dtype)
    if library().wb_linear(x.data_ptr(), x.numel() // K, K, w.data_ptr(), O,
                           x.dtype == torch.bfloat16, y.data_ptr(), threads()):
        raise MemoryError(f"no memory for the scratch of a ({x.numel() // K}, {K}) product")
    return y


def experts(xin: torch.Tensor, out: torch.Tensor, ids: torch.Tensor, start: torch.Tensor,
            count: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> None:
    """Rows ``start[j] .. start[j] + count[j]`` of xin (A, D) through expert ``ids[j]``'s
    SwiGLU into the same rows of ``out`` (int64 index tensors; gate_up (E, D, 2I), down
    (E, I, D) contiguous, every tensor in xin's dtype); bf16 rounds each intermediate to bf16
    as the model computes it."""
    D, I = down.shape[2], down.shape[1]
    if library().wb_experts(xin.data_ptr(), start.data_ptr(), count.data_ptr(), ids.data_ptr(),
                            len(ids), gate_up.data_ptr(), down.data_ptr(), D, I,
                            xin.dtype == torch.bfloat16, out.data_ptr(), threads()):
        raise MemoryError(f"no memory for the scratch of experts with D={D}, I={I}")
