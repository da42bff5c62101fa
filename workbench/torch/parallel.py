"""Expert parallelism over a ``torch.distributed`` process group.

Inside a process group the caller initialised (``torchrun --nproc-per-node N script.py`` and
``torch.distributed.init_process_group("gloo" | "nccl")``), ``wb.load(path, backend="torch",
expert_parallel=True)`` gives rank r of N the experts ``[r E/N, (r+1) E/N)`` of every MoE layer
and nothing of the others: resident weights are sliced from the memory-mapped checkpoint (only
those experts' pages are read), and with ``offload="disk"`` the streaming source reads only
those experts' bytes. Everything else (embedding, attention, norms, router, shared expert,
head) is held by every rank.

Every rank runs the same forward on the same inputs (the shared ``workbench.forward``), so the
dense part is computed redundantly and identically. Only the expert dispatch
(``ExpertParallelOps.dispatch``) differs from one device. Each rank takes its slice of the
tokens and:

1. sorts its (token, choice) assignments by expert, hence by destination rank;
2. exchanges per-expert counts with ``all_to_all_single`` (equal splits);
3. exchanges the gate-scaled rows with ``all_to_all_single``, split by those counts (gloo
   supports this call, not the list form ``all_to_all``);
4. runs its experts over what it received (the single-device kernel, ``moe.expert_rows``),
   sends the results back the same way, and combines each token's k outputs exactly as the
   single-device dispatch does;
5. gathers every rank's slice of the routed output (``all_gather_single``), so every rank
   holds the whole routed output, every hook, and returns the same ``Output``.

Every rank must therefore call ``run`` / ``generate`` with the same arguments, in the same
order (collectives pair up by order). The dispatch runs without autograd.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.distributed as dist

from ..config import ModelConfig
from ..streaming import ExpertSet, StreamedWeights
from ..vision.torch_ops import TorchVisionOps
from .moe import expert_rows


class ExpertShard(NamedTuple):
    """Rank ``rank`` of ``world`` holds experts ``lo .. hi - 1`` of every MoE layer."""

    rank: int
    world: int
    lo: int
    hi: int
    group: Any = None

    @classmethod
    def current(cls, cfg: ModelConfig, group: Any = None) -> ExpertShard:
        """This process's share of ``cfg``'s experts in the initialised process group."""
        if not dist.is_available() or not dist.is_initialized():
            raise ValueError("expert_parallel=True on torch shards the experts over a "
                             "torch.distributed process group, and none is initialised: call "
                             "torch.distributed.init_process_group('gloo' or 'nccl') first "
                             "(torchrun sets RANK, WORLD_SIZE, MASTER_ADDR for it)")
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        E = cfg.num_local_experts
        if E % world:
            raise ValueError(f"expert_parallel: the model's {E} experts cannot be split evenly "
                             f"over the process group's {world} ranks; use a number of ranks "
                             f"that divides {E}")
        per = E // world
        return cls(rank, world, rank * per, (rank + 1) * per, group)

    @property
    def per_rank(self) -> int:
        return self.hi - self.lo

    def sharded(self, name: str) -> bool:
        """Whether a canonical tensor name is a layer's stacked routed experts."""
        return ".feed_forward.experts." in name

    def local(self, stacked: Any) -> Any:
        """This rank's experts of a stacked (E, ...) array or tensor (a view)."""
        return stacked[self.lo:self.hi]


class LocalExperts(NamedTuple):
    """One MoE layer's experts held by this rank: ``weights`` numbers them from 0 (global id
    ``lo + j``) as ``moe.expert_rows`` reads them (a stacked pair, or a streamed set)."""

    lo: int
    weights: Any


class _OffsetSet:
    """A streamed layer's experts ``lo ..`` renumbered from 0: fetches only those."""

    def __init__(self, experts: ExpertSet, lo: int):
        self.experts = experts
        self.lo = lo

    def fetch(self, ids: Any) -> dict[int, Any]:
        got = self.experts.fetch([self.lo + int(e) for e in ids])
        return {e - self.lo: w for e, w in got.items()}


class ShardedStreamedWeights(StreamedWeights):
    """The streaming weight source reading only this rank's experts (``ExpertShard``)."""

    def __init__(self, shard: ExpertShard, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.shard = shard

    def layer(self, i: int) -> dict[str, Any]:
        lp = super().layer(i)
        if "experts" in lp:
            lp["experts"] = LocalExperts(self.shard.lo, _OffsetSet(lp["experts"],
                                                                   self.shard.lo))
        return lp


@dataclass
class ExchangeStats:
    """What the expert dispatch moved and where its time went, summed over MoE layer calls
    (this rank): bytes sent through ``all_to_all_single`` / ``all_gather_single``, seconds in
    those collectives, seconds computing experts."""

    calls: int = 0
    count_bytes: int = 0
    row_bytes: int = 0
    gather_bytes: int = 0
    collective_s: float = 0.0
    compute_s: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class ExpertParallelOps(TorchVisionOps):
    """The torch kernels (vision included), with the all-to-all expert dispatch."""

    def __init__(self, device: torch.device, shard: ExpertShard):
        super().__init__(device)
        self.shard = shard
        self.stats = ExchangeStats()

    def dispatch(self, xf: torch.Tensor, idx: torch.Tensor, gates: torch.Tensor,
                 experts: Any) -> torch.Tensor:
        if not isinstance(experts, LocalExperts):
            raise TypeError(f"expert-parallel dispatch needs this rank's LocalExperts, got "
                            f"{type(experts).__name__}")
        if torch.is_grad_enabled() and (xf.requires_grad or gates.requires_grad):
            raise RuntimeError("the expert-parallel dispatch runs without autograd; train or "
                               "differentiate with a model loaded without expert_parallel")
        return dispatch(xf, idx, gates, experts, self.shard, self.stats)


def _sync(x: torch.Tensor) -> None:
    if x.device.type == "cuda":
        torch.cuda.synchronize(x.device)


def dispatch(xf: torch.Tensor, idx: torch.Tensor, gates: torch.Tensor, experts: LocalExperts,
             shard: ExpertShard, stats: ExchangeStats | None = None) -> torch.Tensor:
    """Routed output (N, D) for tokens xf (N, D) with choices idx/gates (N, k), computed with
    the experts of every rank (the module doc's steps); every rank gets the whole output."""
    stats = stats if stats is not None else ExchangeStats()
    N, D = xf.shape
    k = idx.shape[1]
    world, per, group = shard.world, shard.per_rank, shard.group
    E = world * per
    m = -(-N // world)  # tokens per rank (the last ranks may have fewer)
    a, b = min(shard.rank * m, N), min((shard.rank + 1) * m, N)
    x, ix, g = xf[a:b], idx[a:b], gates[a:b]
    flat = ix.reshape(-1)
    order = torch.argsort(flat, stable=True)
    tok = order // k
    xin = x[tok] * g.reshape(-1)[order, None]  # gate-scaled, sorted by expert (and rank)

    t0 = time.perf_counter()
    send_e = torch.bincount(flat, minlength=E).view(world, per)
    recv_e = torch.empty_like(send_e)
    dist.all_to_all_single(recv_e, send_e, group=group)  # count exchange
    send_n, recv_n = send_e.sum(1).tolist(), recv_e.sum(1).tolist()
    recv = xin.new_empty((sum(recv_n), D))
    dist.all_to_all_single(recv, xin.contiguous(), recv_n, send_n, group=group)
    t1 = time.perf_counter()

    # received rows: per source rank, sorted by this rank's expert; regroup by expert
    local_e = torch.repeat_interleave(torch.arange(per, device=xf.device).repeat(world),
                                      recv_e.reshape(-1))
    order2 = torch.argsort(local_e, stable=True)
    y2 = expert_rows(recv[order2], local_e[order2], experts.weights)
    y = torch.empty_like(y2)
    y[order2] = y2
    _sync(y)
    t2 = time.perf_counter()

    back = xin.new_empty((sum(send_n), D))
    dist.all_to_all_single(back, y, send_n, recv_n, group=group)
    t3 = time.perf_counter()
    if k == 1:
        part = torch.empty_like(back)
        part[order] = back
    else:  # as the single-device dispatch: fp32 sums in expert-sorted order, one cast
        part = torch.zeros((b - a, D), dtype=torch.float32, device=xf.device)
        part = part.index_add_(0, tok, back.float()).to(xf.dtype)
    if b - a < m:
        part = torch.cat([part, part.new_zeros((m - (b - a), D))])
    full = xf.new_empty((world * m, D))
    dist.all_gather_single(full, part.contiguous(), group=group)
    t4 = time.perf_counter()

    item = xf.element_size()
    stats.calls += 1
    stats.count_bytes += 2 * send_e.numel() * send_e.element_size()
    stats.row_bytes += (sum(send_n) - send_n[shard.rank]) * D * item \
        + (sum(recv_n) - recv_n[shard.rank]) * D * item  # rows that left this rank
    stats.gather_bytes += m * D * item * (world - 1)
    stats.collective_s += (t1 - t0) + (t3 - t2) + (t4 - t3)
    stats.compute_s += t2 - t1
    return full[:N]


def gather_experts(params: dict[str, torch.Tensor], shard: ExpertShard
                   ) -> dict[str, np.ndarray]:
    """Every rank's experts, stacked in checkpoint layout as float32 numpy (a collective:
    every rank calls it)."""
    out = {}
    for name in sorted(n for n in params if shard.sharded(n)):
        t = params[name].detach().contiguous()
        parts = [torch.empty_like(t) for _ in range(shard.world)]
        dist.all_gather(parts, t, group=shard.group)
        out[name] = torch.cat(parts).float().cpu().numpy()
    return out
