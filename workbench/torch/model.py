"""The torch backend: parameters on a device, the shared forward run eagerly."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..checkpoint import Checkpoint
from ..config import ModelConfig
from ..forward import Context, Executor, Recorder, ResidentWeights, first_nonfinite, forward
from ..interventions import Plan
from ..model import CaptureSpec, Model, raise_nonfinite, store
from ..numerics import rope_cos_sin, rope_inv_freq, temperature_scales
from ..streaming import StreamedWeights, check_offload, parse_bytes, streamed_state_dict
from .attention import EMPTY
from .ops import TORCH_DTYPES, TorchOps, from_numpy, resolve_device
from .parallel import (
    ExpertParallelOps,
    ExpertShard,
    LocalExperts,
    ShardedStreamedWeights,
    gather_experts,
)

SMALL_CALL_TOKENS = 64  # forwards over fewer positions run single-threaded on the CPU


class Params(nn.Module):
    """All weights by canonical name (``layers.0.self_attn.q_proj.weight``), as Parameters."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        super().__init__()
        self._names = list(tensors)
        self.store = nn.ParameterDict({n.replace(".", "/"): nn.Parameter(t, requires_grad=False)
                                       for n, t in tensors.items()})

    def as_dict(self) -> dict[str, torch.Tensor]:
        return {n: self.store[n.replace(".", "/")] for n in self._names}


class TorchModel(Model):
    """``wb.load(path, backend="torch")``: the PyTorch backend.

    ``tensors`` maps canonical names to numpy arrays or torch tensors; a tensor already in the
    model's dtype and on its device is used as it is (no copy), so weights memory-mapped from a
    checkpoint stay one copy.
    """

    backend = "torch"

    def __init__(self, config: ModelConfig, tensors: dict[str, Any], dtype: str = "float32",
                 path: str | None = None, device: Any = None, *,
                 weights: StreamedWeights | None = None, shard: ExpertShard | None = None):
        super().__init__(config, dtype, path)
        self.shard = shard  # expert parallel: this rank's experts and process group
        self._device = resolve_device(device)
        self.threads: int | None = None  # intra-op threads per forward (None: threads_for)
        tdt = TORCH_DTYPES[dtype]
        self.params = Params({n: _to(t, tdt, self._device) for n, t in tensors.items()})
        self.ops = TorchOps(self._device) if shard is None else \
            ExpertParallelOps(self._device, shard)
        self.inv_freq = rope_inv_freq(config)
        self.weights = weights if weights is not None else self._weights()

    def _weights(self) -> ResidentWeights:
        p = self.params.as_dict()
        pre = "layers.{}.feed_forward.experts."

        def experts(i: int) -> Any:
            pair = (p[pre.format(i) + "gate_up_proj"], p[pre.format(i) + "down_proj"])
            return pair if self.shard is None else LocalExperts(self.shard.lo, pair)
        return ResidentWeights(self.config, p, experts)

    @property
    def device(self) -> torch.device:
        """The torch device holding the weights and running the forward."""
        return self._device

    @property
    def module(self) -> Params:
        """The native nn.Module holding every weight (for users going below the API)."""
        return self.params

    @property
    def torch_dtype(self) -> torch.dtype:
        return TORCH_DTYPES[self.dtype]

    def new_cache(self, batch: int) -> dict[str, Any]:
        """``{"start": next position, "layers": {i: attention.KVBuffer}}``: each layer's keys
        and values in a preallocated buffer appended to in place, made by the layer's first
        call (``attention.EMPTY`` until then). Continue a cache along one sequence only: it is
        not copied per call, so two continuations of one cache would overwrite each other."""
        return {"start": 0, "layers": dict.fromkeys(range(self.config.num_hidden_layers),
                                                    EMPTY)}

    def _context(self, start: int, n: int) -> Context:
        positions = np.arange(start, start + n)
        cos, sin = (self.ops.asarray(a) for a in rope_cos_sin(positions, self.inv_freq))
        temp = (self.ops.asarray(temperature_scales(positions, self.config))
                if self.config.attn_temperature_tuning else None)
        return Context(cos, sin, temp, start)

    def _run(self, ids: torch.Tensor, plan: Plan, rec: Recorder, start: int = 0,
             cache: dict | None = None, stop_at_layer: int | None = None):
        ex = Executor(self.ops, self.config, plan, rec)
        return forward(ex, self.weights, ids, self._context(start, ids.shape[1]), cache,
                       stop_at_layer)

    def threads_for(self, tokens: int) -> int | None:
        """Intra-op threads a forward over ``tokens`` (batch x seq) positions runs with: the
        model's ``threads`` when set; else, on the CPU, 1 for small calls (decode steps, where
        each product is too small to split and OpenMP's hand-offs, worse on a busy machine,
        cost more than they save), torch's setting for the rest; None leaves torch's as is."""
        if self.threads is not None:
            return self.threads
        if self._device.type == "cpu" and tokens < SMALL_CALL_TOKENS:
            return 1
        return None

    def _forward(self, ids, plan, spec: CaptureSpec, cache=None, stop_at_layer=None):
        n = self.threads_for(int(ids.shape[0] * ids.shape[1]))
        before = torch.get_num_threads()
        if n is None or n == before:
            return self._forward_inner(ids, plan, spec, cache, stop_at_layer)
        torch.set_num_threads(n)
        try:
            return self._forward_inner(ids, plan, spec, cache, stop_at_layer)
        finally:
            torch.set_num_threads(before)

    @torch.inference_mode()
    def _forward_inner(self, ids, plan, spec: CaptureSpec, cache=None, stop_at_layer=None):
        patches = {n: self.ops.asarray(v) for n, v in plan.patches.items()}
        rec = Recorder(self.ops, spec.names, plan, patches, spec.positions,
                       nan_check=spec.nan_check)
        start = 0 if cache is None else cache["start"]
        logits, _ = self._run(ids, plan, rec, start,
                              None if cache is None else cache["layers"], stop_at_layer)
        if cache is not None:
            cache["start"] = start + ids.shape[1]
        raise_nonfinite(first_nonfinite(rec.finite, self.hook_names()), "torch")
        arrays = {n: store(self.ops.to_numpy(a), spec) for n, a in rec.out.items()}
        return (None if logits is None else self.ops.to_numpy(logits)), arrays, cache

    def forward_train(self, ids: torch.Tensor, plan: Plan | None = None,
                      capture: Iterable[str] = ()) -> tuple[torch.Tensor, dict]:
        """Differentiable forward (no inference mode) returning torch logits and the captured
        hooks as live tensors (e.g. router logits for a balancing loss)."""
        plan = plan or Plan()
        rec = Recorder(self.ops, frozenset(capture), plan)
        logits, _ = self._run(ids.to(self._device), plan, rec)
        return logits, rec.out

    def state_dict_numpy(self) -> dict[str, np.ndarray]:
        """Weights as float32 numpy arrays by canonical name (for Checkpoint.save)."""
        if isinstance(self.weights, StreamedWeights):
            return streamed_state_dict(self.weights)
        params = self.params.as_dict()
        out = {n: t.detach().float().cpu().numpy() for n, t in params.items()
               if self.shard is None or not self.shard.sharded(n)}
        if self.shard is not None:  # a collective: every rank's experts
            out.update(gather_experts(params, self.shard))
        return out


def _to(t: Any, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A tensor in dtype on device; the input itself (no copy) when it already is."""
    if not isinstance(t, torch.Tensor):
        t = from_numpy(np.ascontiguousarray(t))
    return t.to(device=device, dtype=dtype)


def load(path: str | Path, dtype: str = "float32", checkpoint: Checkpoint | None = None,
         device: Any = None, offload: str | None = None,
         max_memory: int | str | None = None, expert_parallel: bool = False) -> TorchModel:
    """Load a checkpoint directory into the torch backend, one copy of the weights.

    On the CPU, tensors stored in the requested dtype are zero-copy views of the memory-mapped
    (copy-on-write) shards: loading allocates no memory for them. Otherwise each tensor is
    converted or copied to the device one at a time and its file pages are released.
    ``offload="disk"`` streams instead: nothing is read until a forward needs it
    (``workbench.streaming``), with an expert cache of ``max_memory`` bytes.
    ``expert_parallel=True`` keeps only this rank's experts (``workbench.torch.parallel``).
    """
    ck = checkpoint or Checkpoint.open(path)
    dev = resolve_device(device)
    tdt = TORCH_DTYPES[dtype]
    shard = ExpertShard.current(ck.config) if expert_parallel else None
    if check_offload(offload, max_memory) == "disk":
        ck.weight_names()  # a streamed forward needs every layer too

        def put(view: np.ndarray) -> torch.Tensor:
            return from_numpy(np.asarray(view)).to(device=dev, dtype=tdt, copy=True)

        args = (ck, put, lambda gu, dn: (put(gu), put(dn)), parse_bytes(max_memory))
        source = StreamedWeights(*args) if shard is None else ShardedStreamedWeights(shard, *args)
        return TorchModel(ck.config, {}, dtype, str(path), dev, weights=source, shard=shard)
    tensors: dict[str, torch.Tensor] = {}
    kept_views = False
    for name in ck.weight_names():
        view = ck.view(name)
        if shard is not None and shard.sharded(name):
            view = shard.local(view)  # this rank's experts only: only their pages are read
        t = from_numpy(view) if _aligned(view) else from_numpy(view.copy())
        if t.dtype == tdt and dev.type == "cpu" and t.data_ptr() == view.ctypes.data:
            kept_views = True
            tensors[name] = t
            continue
        tensors[name] = t.to(device=dev, dtype=tdt, copy=True)
        del t, view
        ck.evict(name)
    model = TorchModel(ck.config, tensors, dtype, str(path), dev, shard=shard)
    if not kept_views:
        ck.close()
    return model


def _aligned(a: np.ndarray) -> bool:
    return a.ctypes.data % a.dtype.itemsize == 0
