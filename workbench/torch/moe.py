"""Llama 4 feed-forward (torch): sigmoid top-k router, sparse expert dispatch, shared expert."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..config import ModelConfig
from ..interventions import Plan
from .hooks import Recorder

_GROUPED = hasattr(torch, "_grouped_mm")


def swiglu(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor,
           down: torch.Tensor) -> torch.Tensor:
    """nn.Linear-layout SwiGLU: down(silu(gate x) * up x)."""
    return (F.silu(x @ gate.T) * (x @ up.T)) @ down.T


def select_experts(logits: torch.Tensor, k: int, layer: int, plan: Plan,
                   seq: int) -> torch.Tensor:
    """Top-k expert ids (N, k) after bans (-inf) and forcing (+inf); logits: (N, E), N = B*seq."""
    sel = logits
    ban = plan.ban.get(layer)
    force = plan.force.get(layer)
    if ban or force:
        sel = logits.clone()
        if ban:
            sel[:, ban] = float("-inf")
        for expert, pos in force or ():
            if pos is None:
                sel[:, expert] = float("inf")
            else:
                rows = (torch.arange(sel.shape[0]) % seq)
                sel[torch.isin(rows, torch.tensor(pos)), expert] = float("inf")
    return torch.topk(sel, k, dim=-1).indices


def expert_matmul(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor,
                  counts_list: list[int]) -> torch.Tensor:
    """Rows of x grouped by expert (sorted) times that expert's matrix: (N, In) -> (N, Out)."""
    if _GROUPED and not torch.is_grad_enabled() and _aligned(x, w):
        offs = counts.cumsum(0).to(torch.int32)
        return torch._grouped_mm(x, w, offs=offs)
    parts = [xe @ w[e] for e, xe in enumerate(x.split(counts_list)) if counts_list[e]]
    if not parts:
        return x.new_zeros((0, w.shape[-1]))
    return torch.cat(parts)


def _aligned(x: torch.Tensor, w: torch.Tensor) -> bool:
    item = x.element_size()
    return (x.shape[-1] * item) % 16 == 0 and (w.shape[-1] * item) % 16 == 0 and \
        x.dtype == w.dtype


def moe(p: dict[str, torch.Tensor], x: torch.Tensor, layer: int, cfg: ModelConfig,
        plan: Plan, rec: Recorder) -> torch.Tensor:
    """MoE block on normalised input x (B, S, D): shared(x) + sum_k expert_k(sigmoid(r_k) * x)."""
    B, S, D = x.shape
    E = cfg.num_local_experts
    k = plan.k(cfg, layer)
    pre = f"layers.{layer}.feed_forward."
    h = f"layers.{layer}.moe."
    xf = x.reshape(-1, D)
    logits = xf @ p[pre + "router.weight"].T  # model dtype, as HF computes it
    logits = rec(h + "router_logits", logits.view(B, S, E)).reshape(-1, E)
    idx = select_experts(logits, k, layer, plan, S)
    idx = rec(h + "topk_indices", idx.view(B, S, k)).reshape(-1, k).long()
    scores = torch.sigmoid(logits.gather(1, idx).float()).to(x.dtype)
    scores = rec(h + "topk_scores", scores.view(B, S, k)).reshape(-1, k)

    flat_e = idx.reshape(-1)
    order = torch.argsort(flat_e, stable=True)
    tok = order // k
    xin = xf[tok] * scores.reshape(-1)[order, None]
    counts = torch.bincount(flat_e, minlength=E)
    counts_list = counts.tolist()
    gu = expert_matmul(xin, p[pre + "experts.gate_up_proj"], counts, counts_list)
    inter = gu.shape[-1] // 2
    act = gu[:, inter:] * F.silu(gu[:, :inter])
    y = expert_matmul(act, p[pre + "experts.down_proj"], counts, counts_list)
    zero = plan.zero.get(layer)
    if zero:
        keep = ~torch.isin(flat_e[order], torch.tensor(zero))
        y = y * keep[:, None].to(y.dtype)
    if k == 1:
        routed = torch.empty_like(y)
        routed[order] = y
    else:
        routed = torch.zeros(xf.shape, dtype=torch.float32).index_add_(0, tok, y.float())
        routed = routed.to(x.dtype)
    routed = rec(h + "routed_out", routed.view(B, S, D))
    shared = swiglu(x, p[pre + "shared_expert.gate_proj.weight"],
                    p[pre + "shared_expert.up_proj.weight"],
                    p[pre + "shared_expert.down_proj.weight"])
    shared = rec(h + "shared_out", shared)
    return shared + routed


def mlp(p: dict[str, torch.Tensor], x: torch.Tensor, layer: int, rec: Recorder) -> torch.Tensor:
    """Dense SwiGLU layer (Maverick's non-MoE layers)."""
    pre = f"layers.{layer}.feed_forward."
    y = swiglu(x, p[pre + "gate_proj.weight"], p[pre + "up_proj.weight"],
               p[pre + "down_proj.weight"])
    return rec(f"layers.{layer}.mlp.out", y)
