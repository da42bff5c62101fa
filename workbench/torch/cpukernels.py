"""The streaming CPU kernels (``workbench.cpukernels``) on torch tensors.

Eagerly each function calls the kernel directly. Inside ``torch.compile`` the products, the
norm, RoPE and decode attention are the custom ops ``torch.ops.workbench.linear``,
``.rms_norm``, ``.rope`` and ``.attention`` (the same kernels, opaque to the compiler), so a
compiled layer computes what the eager one does, bit for bit."""

from __future__ import annotations

import torch

from ..cpukernels import (
    MAX_EXPERT_ROWS,
    MAX_LINEAR_ROWS,
    MIN_LINEAR_BYTES,
    attention_shapes,
    library,
    threads,
)

__all__ = ["MAX_EXPERT_ROWS", "MAX_LINEAR_ROWS", "MIN_LINEAR_BYTES", "attention", "experts",
           "linear", "rms_norm", "rope", "serves", "serves_attention", "serves_experts",
           "serves_linear", "serves_norm", "serves_rope"]

_DTYPES = (torch.float32, torch.bfloat16)


def _inference_cpu(x: torch.Tensor) -> bool:
    """x is an fp32 or bf16 CPU tensor outside autograd, and the kernels run here."""
    return (x.device.type == "cpu" and x.dtype in _DTYPES and not torch.is_grad_enabled()
            and library() is not None)


def serves(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether ``x`` times ``w`` can go through the kernels: CPU inference (no autograd),
    fp32 or bf16 throughout, contiguous x and w."""
    return (x.dtype == w.dtype and x.is_contiguous() and w.is_contiguous()
            and _inference_cpu(x))


def serves_linear(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether ``x @ w.T`` goes through ``linear``: at most ``MAX_LINEAR_ROWS`` rows and, in
    fp32, a weight of at least ``MIN_LINEAR_BYTES`` (smaller ones torch multiplies as fast;
    its bf16 product on a row takes several times the kernel's time at any size, e.g. the
    router's)."""
    return (x.numel() <= MAX_LINEAR_ROWS * x.shape[-1]
            and (x.dtype == torch.bfloat16 or w.numel() * w.element_size() >= MIN_LINEAR_BYTES)
            and serves(x, w))


def serves_experts(xin: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> bool:
    """Whether an expert phase on rows xin with stacked experts (gate_up, down) goes through
    ``experts`` (eager only: a compiled layer runs its dispatch eagerly)."""
    return serves(xin, gate_up) and down.is_contiguous() and not torch.compiler.is_compiling()


def linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x (..., K) @ w.T for w (O, K) (x contiguous, its dtype w's); bf16: sums in fp32,
    rounded once."""
    if torch.compiler.is_compiling():
        return torch.ops.workbench.linear(x, w)
    return _linear(x, w)


def _linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
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


def serves_norm(x: torch.Tensor, weight: torch.Tensor | None) -> bool:
    """Whether ``rms_norm`` runs x's norm: as ``serves``, with a weight (if any) of x's last
    dimension, contiguous, in x's dtype."""
    return x.dim() > 0 and x.shape[-1] > 0 and (
        weight is None or (weight.dtype == x.dtype and weight.is_contiguous()
                           and weight.shape == x.shape[-1:])) and serves(x, x)


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """transformers' Llama 4 RMSNorm in one call: normalised in fp32, rounded to x's dtype,
    then times ``weight`` (rounded again). The squares are summed in the kernel's fixed order
    (torch's reduction may differ in the last bit of the fp32 mean)."""
    if torch.compiler.is_compiling():
        return torch.ops.workbench.rms_norm(x, weight, eps)
    return _rms_norm(x, weight, eps)


def _rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    D = x.shape[-1]
    library().wb_rms_norm(x.data_ptr(), x.numel() // D, D,
                          None if weight is None else weight.data_ptr(), eps,
                          x.dtype == torch.bfloat16, out.data_ptr())
    return out


def serves_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> bool:
    """Whether ``rope`` rotates x (B, N, S, d): as ``serves`` but any layout whose last
    dimension is contiguous, d a multiple of 8 (every pair in the kernel's vector loop),
    contiguous fp32 tables (S, d/2) or (B, S, d/2)."""
    return (x.dim() == 4 and x.stride(-1) == 1 and x.shape[-1] % 8 == 0
            and cos.dtype == sin.dtype == torch.float32 and cos.shape == sin.shape
            and cos.shape[-2:] == (x.shape[2], x.shape[3] // 2)
            and (cos.dim() == 2 or (cos.dim() == 3 and cos.shape[0] == x.shape[0]))
            and cos.is_contiguous() and sin.is_contiguous() and _inference_cpu(x))


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """transformers' interleaved (complex) RoPE of x (B, N, S, d) in one call, each product
    and sum rounded on its own as torch's vectorised complex multiply rounds (the same bits at
    the model's head sizes); the result is contiguous."""
    if torch.compiler.is_compiling():
        return torch.ops.workbench.rope(x, cos, sin)
    return _rope(x, cos, sin)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    B, N, S, d = x.shape
    out = torch.empty((B, N, S, d), dtype=x.dtype)
    library().wb_rope(x.data_ptr(), B, N, S, d, x.stride(0), x.stride(1), x.stride(2),
                      cos.data_ptr(), sin.data_ptr(), S * d // 2 if cos.dim() == 3 else 0,
                      x.dtype == torch.bfloat16, out.data_ptr())
    return out


def serves_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether ``attention`` runs one query per head q (B, H, 1, d) over keys and values
    (B, H / G, T, d): CPU inference, one dtype (fp32 or bf16), each last
    dimension contiguous, d at most 1024."""
    return (attention_shapes(q.shape, k.shape, v.shape) and q.dtype == k.dtype == v.dtype
            and q.stride(-1) == k.stride(-1) == v.stride(-1) == 1 and _inference_cpu(q))


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(q k^T * scale) v for one query per head over every key (a decode step), GQA
    (query head h reads kv head h // (H / kv heads)), in one call: what SDPA computes, in its
    order of roundings (fp32 sums; in bf16 the softmax weights rounded to bf16 before they
    weigh v), not bit for bit."""
    if torch.compiler.is_compiling():
        return torch.ops.workbench.attention(q, k, v, scale)
    return _attention(q, k, v, scale)


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    B, H, _, d = q.shape
    T = k.shape[2]
    out = torch.empty((B, H, 1, d), dtype=q.dtype)
    if library().wb_attn1(q.data_ptr(), B, H, H // k.shape[1], T, d, q.stride(0), q.stride(1),
                          k.data_ptr(), k.stride(0), k.stride(1), k.stride(2), v.data_ptr(),
                          v.stride(0), v.stride(1), v.stride(2), scale,
                          q.dtype == torch.bfloat16, out.data_ptr(), threads()):
        raise MemoryError(f"no memory for the scores of {B * H} heads over {T} keys")
    return out


# ---------------------------------------------------------------- the same, as custom ops

@torch.library.custom_op("workbench::linear", mutates_args=())
def _linear_op(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return _linear(x.contiguous(), w.contiguous())


@_linear_op.register_fake
def _(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], w.shape[0]))


@torch.library.custom_op("workbench::rms_norm", mutates_args=())
def _rms_norm_op(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    return _rms_norm(x.contiguous(), weight, eps)


@_rms_norm_op.register_fake
def _(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    return x.new_empty(x.shape)


@torch.library.custom_op("workbench::rope", mutates_args=())
def _rope_op(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return _rope(x, cos.contiguous(), sin.contiguous())


@_rope_op.register_fake
def _(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape)


@torch.library.custom_op("workbench::attention", mutates_args=())
def _attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  scale: float) -> torch.Tensor:
    # the kernel reads any strides whose last is 1 (the KV cache's views)
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    return _attention(q, k, v, scale)


@_attention_op.register_fake
def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    return q.new_empty(q.shape)
