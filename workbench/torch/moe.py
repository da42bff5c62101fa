"""Mixture-of-experts kernels (torch): top-k selection, sparse expert dispatch, SwiGLU.

Dispatch sorts the (token, choice) assignments by expert and runs each expert's rows through
its weights with ``torch._grouped_mm`` (a loop of per-expert matmuls where that kernel does not
apply), so cost follows the tokens routed, not the number of experts.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from .quant import expert_weights

_GROUPED = hasattr(torch, "_grouped_mm")


def swiglu(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor,
           down: torch.Tensor) -> torch.Tensor:
    """nn.Linear-layout SwiGLU: down(silu(gate x) * up x)."""
    return (F.silu(x @ gate.T) * (x @ up.T)) @ down.T


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
    # exact ties (two forced experts, equal logits) go to the lower expert id, as in jax
    return torch.sort(sel, dim=-1, descending=True, stable=True).indices[:, :k]


def expert_matmul(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor,
                  counts_list: list[int]) -> torch.Tensor:
    """Rows of x grouped by expert (sorted) times that expert's matrix: (N, In) -> (N, Out)."""
    if _GROUPED and not torch.is_grad_enabled() and _aligned(x, w):
        offs = counts.cumsum(0).to(torch.int32)
        return torch._grouped_mm(x, w, offs=offs)
    # unbind, not w[e]: under autograd each w[e] would backpropagate a zero-filled (E, In, Out)
    # gradient of its own; unbind's backward stacks the per-expert gradients once
    ws = w.unbind(0)
    parts = [xe @ ws[e] for e, xe in enumerate(x.split(counts_list)) if counts_list[e]]
    if not parts:
        return x.new_zeros((0, w.shape[-1]))
    return torch.cat(parts)


def _aligned(x: torch.Tensor, w: torch.Tensor) -> bool:
    item = x.element_size()
    return (x.shape[-1] * item) % 16 == 0 and (w.shape[-1] * item) % 16 == 0 and \
        x.dtype == w.dtype


def dispatch(xf: torch.Tensor, idx: torch.Tensor, gates: torch.Tensor,
             experts: Any) -> torch.Tensor:
    """Routed output (N, D) for tokens xf (N, D) and choices idx/gates (N, k).

    ``experts`` is the stacked pair (gate_up (E, D, 2I), down (E, I, D)), or an expert set
    (streamed, or resident FP8) whose ``fetch(ids)`` returns {e: (gate_up_e (D, 2I), down_e
    (I, D))} or FP8 experts (dequantised one at a time) for the experts used. Each
    assignment's input is ``x * gate`` in the model dtype (as HF); with k > 1 the
    outputs are summed in fp32 and cast once.
    """
    k = idx.shape[1]
    flat_e = idx.reshape(-1)
    order = torch.argsort(flat_e, stable=True)
    tok = order // k
    xin = xf[tok] * gates.reshape(-1)[order, None]
    y = expert_rows(xin, flat_e[order], experts)
    if k == 1:
        routed = torch.empty_like(y)
        routed[order] = y
        return routed
    routed = torch.zeros(xf.shape, dtype=torch.float32, device=xf.device)
    return routed.index_add_(0, tok, y.float()).to(xf.dtype)


def expert_rows(xin: torch.Tensor, sorted_e: torch.Tensor, experts: Any) -> torch.Tensor:
    """Expert-sorted rows xin (A, D) through their experts: row j through expert sorted_e[j]
    of ``experts`` (the stacked pair, or a streamed set, as ``dispatch`` takes them)."""
    if isinstance(experts, tuple):
        gate_up, down = experts
        counts = torch.bincount(sorted_e, minlength=gate_up.shape[0])
        counts_list = counts.tolist()
        gu = expert_matmul(xin, gate_up, counts, counts_list)
        inter = gu.shape[-1] // 2
        return expert_matmul(gu[:, inter:] * F.silu(gu[:, :inter]), down, counts, counts_list)
    return _streamed(xin, sorted_e, experts)


def _streamed(xin: torch.Tensor, sorted_e: torch.Tensor, experts: Any) -> torch.Tensor:
    """Expert-sorted rows through experts read on demand: each expert used is read once,
    used, and dropped before the next is read (unless the source's cache keeps it)."""
    used, counts = torch.unique_consecutive(sorted_e, return_counts=True)
    act = getattr(experts, "act_quant", None)  # w8a8: FP8 expert inputs, per token
    parts = []
    for e, xe in zip(used.tolist(), xin.split(counts.tolist())):
        gate_up, down = expert_weights(experts.fetch([e])[e], xin.dtype)  # FP8: dequantised
        gu = (xe if act is None else act(xe)) @ gate_up
        inter = gu.shape[-1] // 2
        h = gu[:, inter:] * F.silu(gu[:, :inter])
        parts.append((h if act is None else act(h)) @ down)
        del gate_up, down, gu, h
    return torch.cat(parts) if parts else xin.new_zeros((0, xin.shape[-1]))


def zero_gates(gates: torch.Tensor, idx: torch.Tensor, experts: tuple[int, ...]) -> torch.Tensor:
    """gates with 0 where idx is one of ``experts``."""
    return gates.masked_fill(torch.isin(idx, torch.tensor(experts, device=idx.device)), 0)
