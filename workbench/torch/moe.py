"""Mixture-of-experts kernels (torch): top-k selection, sparse expert dispatch, SwiGLU.

Dispatch sorts the (token, choice) assignments by expert and runs each expert's rows through
its weights, so cost follows the tokens routed, not the number of experts: bf16 on CUDA with
the grouped GEMM ``torch._grouped_mm``; on the CPU (inference) the streaming kernel of
``cpukernels`` (or, where it cannot run, one fused SwiGLU per expert used, the experts split
between two threads: ``cpu_expert_rows``); otherwise a product per expert used.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
import torch.nn.functional as F

from . import cpukernels
from .quant import expert_weights

_GROUPED = hasattr(torch, "_grouped_mm")
MIN_SPLIT_EXPERTS = 4  # fewer experts used than this run on the calling thread
_POOL: ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()
_ZERO, _ONE = torch.zeros(1, dtype=torch.long), torch.ones(1, dtype=torch.long)


UPCAST_BLOCK_BYTES = 16 << 20  # fp32 copy of a weight block made at a time by ``linear``


def linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x @ w.T for an nn.Linear-layout w (out, in); a few rows (a decode step) on the CPU go
    through the streaming kernel (``cpukernels``), which reads w at the memory's rate.

    More rows of bf16 on the CPU (more than ``MAX_LINEAR_ROWS``) are computed in fp32, a
    block of w's rows at a time (an exact upcast and one rounding at the end, as torch's bf16
    product accumulating in fp32 rounds): torch's CPU bf16 GEMM runs several times below the
    fp32 one on CPUs without native bf16 instructions (a 512-row prefill product: 3 to 5
    times)."""
    if cpukernels.serves_linear(x, w):
        return cpukernels.linear(x, w)
    if x.dtype == w.dtype == torch.bfloat16 and x.device.type == "cpu" and w.dim() == 2 and \
            x.numel() > cpukernels.MAX_LINEAR_ROWS * x.shape[-1]:
        xf = x.float()
        rows = max(1, UPCAST_BLOCK_BYTES // (4 * max(w.shape[1], 1)))
        if w.shape[0] <= rows:
            return (xf @ w.float().T).to(x.dtype)
        out = x.new_empty((*x.shape[:-1], w.shape[0]))
        for o in range(0, w.shape[0], rows):
            out[..., o:o + rows] = xf @ w[o:o + rows].float().T
        return out
    return x @ w.T


def swiglu(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor,
           down: torch.Tensor) -> torch.Tensor:
    """nn.Linear-layout SwiGLU: down(silu(gate x) * up x)."""
    return linear(F.silu(linear(x, gate)) * linear(x, up), down)


def select_experts(logits: torch.Tensor, k: int, ban: tuple[int, ...],
                   force: tuple[tuple[int, tuple[int, ...] | None], ...],
                   seq: int) -> torch.Tensor:
    """Top-k expert ids (N, k) after bans (-inf) and forcing (+inf); logits: (N, E), N = B*seq."""
    sel = logits
    if ban or force:
        sel = logits.clone()
        if ban:
            sel[:, list(ban)] = float("-inf")
        for expert, pos in force:
            if pos is None:
                sel[:, expert] = float("inf")
            else:
                rows = torch.arange(sel.shape[0], device=sel.device) % seq
                sel[torch.isin(rows, torch.tensor(pos, device=sel.device)), expert] = \
                    float("inf")
    # exact ties (two forced experts, equal logits) go to the lower expert id, as in jax;
    # top-1 is argmax, which takes the first maximum (and a NaN, as the sort puts it first)
    if k == 1:
        return sel.argmax(dim=-1, keepdim=True)
    return torch.sort(sel, dim=-1, descending=True, stable=True).indices[:, :k]


def expert_matmul(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor,
                  counts_list: list[int]) -> torch.Tensor:
    """Rows of x grouped by expert (sorted) times that expert's matrix: (N, In) -> (N, Out):
    one grouped GEMM where ``grouped`` allows it, else a product per expert used."""
    if grouped(x, w):
        offs = counts.cumsum(0).to(torch.int32)
        return torch._grouped_mm(x, w, offs=offs)
    # unbind, not w[e]: under autograd each w[e] would backpropagate a zero-filled (E, In, Out)
    # gradient of its own; unbind's backward stacks the per-expert gradients once
    ws = w.unbind(0)
    parts = [xe @ ws[e] for e, xe in enumerate(x.split(counts_list)) if counts_list[e]]
    if not parts:
        return x.new_zeros((0, w.shape[-1]))
    return torch.cat(parts)


GROUPED_MM = True  # False: a product per expert on CUDA too (for measuring the two)


def grouped(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether x (N, In) @ w (E, In, Out) runs as ``torch._grouped_mm``: bf16 on CUDA
    (the grouped GEMM kernels' dtype), inference, both row strides 16-byte aligned."""
    item = x.element_size()
    return _GROUPED and GROUPED_MM and x.device.type == "cuda" and \
        x.dtype == w.dtype == torch.bfloat16 and not torch.is_grad_enabled() and \
        (x.shape[-1] * item) % 16 == 0 and (w.shape[-1] * item) % 16 == 0


def dispatch(xf: torch.Tensor, idx: torch.Tensor, gates: torch.Tensor,
             experts: Any) -> torch.Tensor:
    """Routed output (N, D) for tokens xf (N, D) and choices idx/gates (N, k).

    ``experts`` is the stacked pair (gate_up (E, D, 2I), down (E, I, D)), or an expert set
    (streamed, or resident FP8) whose ``fetch(ids)`` returns {e: (gate_up_e (D, 2I), down_e
    (I, D))} or FP8 experts (dequantised one at a time) for the experts used. Each
    assignment's input is ``x * gate`` in the model dtype (as HF); with k > 1 the
    outputs are summed in fp32 and cast once.
    """
    if idx.numel() == 1 and idx.dtype == torch.long and isinstance(experts, tuple) and \
            cpukernels.serves_experts(xf, *experts):
        # one token, one choice (a decode step): its expert directly, without the sort, the
        # expert grouping and the scatter back (the same kernel call on the same row)
        xin = xf * gates.reshape(1, 1)
        out = torch.empty_like(xin)
        cpukernels.experts(xin, out, idx.reshape(1), _ZERO, _ONE, *experts)
        return out
    k = idx.shape[1]
    flat_e = idx.reshape(-1)
    order = torch.argsort(flat_e, stable=True)
    tok = order // k
    # index_select / index_copy_: row gathers and scatters (advanced indexing runs several
    # times slower on the CPU for the same rows)
    xin = xf.index_select(0, tok) * gates.reshape(-1)[order, None]
    y = expert_rows(xin, flat_e[order], experts)
    if k == 1:
        return torch.empty_like(y).index_copy_(0, order, y)
    routed = torch.zeros(xf.shape, dtype=torch.float32, device=xf.device)
    return routed.index_add_(0, tok, y.float()).to(xf.dtype)


def expert_rows(xin: torch.Tensor, sorted_e: torch.Tensor, experts: Any) -> torch.Tensor:
    """Expert-sorted rows xin (A, D) through their experts: row j through expert sorted_e[j]
    of ``experts`` (the stacked pair, or a streamed set, as ``dispatch`` takes them)."""
    if not isinstance(experts, tuple):
        return _streamed(xin, sorted_e, experts)
    gate_up, down = experts
    if cpukernels.serves_experts(xin, gate_up, down):
        return kernel_expert_rows(xin, sorted_e, gate_up, down)
    if xin.device.type == "cpu" and not torch.is_grad_enabled():
        return cpu_expert_rows(xin, sorted_e, gate_up, down)
    counts = torch.bincount(sorted_e, minlength=gate_up.shape[0])
    # grouped products need no per-expert counts on the host (no device sync)
    counts_list = [] if grouped(xin, gate_up) and grouped(xin, down) else counts.tolist()
    gu = expert_matmul(xin, gate_up, counts, counts_list)
    inter = gu.shape[-1] // 2
    return expert_matmul(gu[:, inter:] * F.silu(gu[:, :inter]), down, counts, counts_list)


def _mm(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x (n, In) @ w (In, Out); bf16 on the CPU is computed in fp32 (an exact upcast, one
    rounding at the end, as a bf16 product accumulating in fp32 rounds) because torch's CPU
    bf16 kernel for a weight in this (in, out) layout reads it 20 to 1000 times slower than
    the fp32 product on CPUs without native bf16 (the experts' checkpoint layout). One row
    (a decode step) goes through ``torch.mv`` on the transposed weight instead, which gives
    the same values without converting the weight."""
    if x.dtype == torch.bfloat16 and x.device.type == "cpu":
        if x.shape[0] == 1:
            return torch.mv(w.T, x[0])[None]
        return (x.float() @ w.float()).to(x.dtype)
    return x @ w


def expert_swiglu(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor,
                  act: Any = None) -> torch.Tensor:
    """One expert on its rows x (n, D): down(silu(gate x) * up x) with gate_up (D, 2I) and
    down (I, D); ``act`` quantises the inputs of both products (w8a8)."""
    gu = _mm(x if act is None else act(x), gate_up)
    inter = gu.shape[-1] // 2
    h = gu[:, inter:] * F.silu(gu[:, :inter])
    return _mm(h if act is None else act(h), down)


def cpu_expert_rows(xin: torch.Tensor, sorted_e: torch.Tensor, gate_up: torch.Tensor,
                    down: torch.Tensor) -> torch.Tensor:
    """Expert-sorted rows through resident experts on the CPU: one fused SwiGLU per expert
    used (its intermediate stays in cache), the experts used split in two halves, one run by
    the calling thread and one by a worker thread.

    The phase reads each used expert's weights once with a few rows each (about 4 for 512
    tokens over 128 experts), where one product is too small to split well between threads:
    two experts at a time read memory faster than one expert split in two. Each expert's
    result does not depend on the split, so the output is the same with any thread count.
    """
    used, parts = _by_expert(xin, sorted_e)

    def run(lo: int, hi: int) -> list[torch.Tensor]:
        with torch.inference_mode():
            return [expert_swiglu(parts[j], gate_up[used[j]], down[used[j]])
                    for j in range(lo, hi)]

    n = len(used)
    if n < MIN_SPLIT_EXPERTS or torch.get_num_threads() < 2:
        return _cat(run(0, n), xin)
    half = n // 2
    second = _pool().submit(run, half, n)
    first = run(0, half)
    return _cat(first + second.result(), xin)


def kernel_expert_rows(xin: torch.Tensor, sorted_e: torch.Tensor, gate_up: torch.Tensor,
                       down: torch.Tensor) -> torch.Tensor:
    """Expert-sorted rows through resident experts on the CPU with the streaming kernel
    (``cpukernels.experts``: each used expert's weights read once, at the memory's rate);
    an expert with more than ``cpukernels.MAX_EXPERT_ROWS`` rows reuses its weights enough
    for torch's GEMM, which then computes it."""
    used, count = torch.unique_consecutive(sorted_e, return_counts=True)
    start = count.cumsum(0) - count
    out = torch.empty_like(xin)
    big = count > cpukernels.MAX_EXPERT_ROWS
    if bool(big.any()):
        for e, s, c in zip(used[big].tolist(), start[big].tolist(), count[big].tolist()):
            out[s:s + c] = expert_swiglu(xin[s:s + c], gate_up[e], down[e])
        keep = ~big
        used, start, count = used[keep], start[keep], count[keep]
    if len(used):
        cpukernels.experts(xin, out, used, start, count, gate_up, down)
    return out


def _by_expert(xin: torch.Tensor, sorted_e: torch.Tensor
               ) -> tuple[list[int], tuple[torch.Tensor, ...]]:
    """The experts used (in order) and each one's rows of the expert-sorted xin."""
    used, counts = torch.unique_consecutive(sorted_e, return_counts=True)
    return used.tolist(), xin.split(counts.tolist())


def _cat(parts: list[torch.Tensor], xin: torch.Tensor) -> torch.Tensor:
    """Per-expert outputs joined in order ((0, D) when no expert was used)."""
    return torch.cat(parts) if parts else xin.new_zeros((0, xin.shape[-1]))


def _pool() -> ThreadPoolExecutor:
    """The worker thread that runs the second half of a CPU expert phase (made once)."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = ThreadPoolExecutor(1, thread_name_prefix="workbench-experts")
        return _POOL


def _streamed(xin: torch.Tensor, sorted_e: torch.Tensor, experts: Any) -> torch.Tensor:
    """Expert-sorted rows through experts read on demand: each expert used is read once,
    used, and dropped before the next is read (unless the source's cache keeps it)."""
    act = getattr(experts, "act_quant", None)  # w8a8: FP8 expert inputs, per token
    out = []
    for e, xe in zip(*_by_expert(xin, sorted_e)):
        gate_up, down = expert_weights(experts.fetch([e])[e], xin.dtype)  # FP8: dequantised
        if act is None and cpukernels.serves_experts(xe, gate_up, down):
            one = torch.zeros(xe.shape[0], dtype=torch.long)  # the stack of one expert
            out.append(kernel_expert_rows(xe, one, gate_up[None], down[None]))
        else:
            out.append(expert_swiglu(xe, gate_up, down, act))
        del gate_up, down
    return _cat(out, xin)


def zero_gates(gates: torch.Tensor, idx: torch.Tensor, experts: tuple[int, ...]) -> torch.Tensor:
    """gates with 0 where idx is one of ``experts``."""
    return gates.masked_fill(torch.isin(idx, torch.tensor(experts, device=idx.device)), 0)
