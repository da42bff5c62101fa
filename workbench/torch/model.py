"""The torch backend: parameters on a device, the shared forward run eagerly."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..checkpoint import Checkpoint, ExpertWeights
from ..config import ModelConfig
from ..cpukernels import library as kernel_library
from ..cpukernels import using as kernel_threads
from ..forward import (
    Context,
    Executor,
    LayerKind,
    LayerPlan,
    Padding,
    PadMask,
    Recorder,
    ResidentWeights,
    forward,
    layer_step,
)
from ..interventions import Plan
from ..model import CaptureSpec, Model, store
from ..numerics import rope_cos_sin, rope_inv_freq, temperature_scales
from ..quant import FP8, check_quant
from ..streaming import StreamedWeights, check_offload, parse_bytes, streamed_state_dict
from ..vision.forward import (
    VisionExecutor,
    rope_tables,
    split_params,
    vision_forward,
    vision_status,
)
from ..vision.torch_ops import TorchVisionOps
from .attention import EMPTY
from .ops import TORCH_DTYPES, from_numpy, resolve_device
from .parallel import (
    ExpertParallelOps,
    ExpertShard,
    LocalExperts,
    ShardedStreamedWeights,
    gather_experts,
)
from .quant import FP8Expert, FP8Experts, dequantize, fp8_tokens, to_fp8

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
                 weights: StreamedWeights | None = None, shard: ExpertShard | None = None,
                 quant: str | None = None):
        super().__init__(config, dtype, path)
        self.shard = shard  # expert parallel: this rank's experts and process group
        self._device = resolve_device(device)
        self.threads: int | None = None  # intra-op threads per forward (None: threads_for)
        # (layer step, ops, CUDA graphs?): see set_compile
        self._compiled: tuple[Any, Any, bool] | None = None
        self.quant = quant  # None, or how FP8 weights run: "weights" | "w8a8"
        tdt = TORCH_DTYPES[dtype]
        # FP8 experts stay FP8 and their scales float32; the rest in the model dtype
        self.params = Params({n: _to(t, None if _stored(n, t) else tdt, self._device)
                              for n, t in tensors.items()})
        self.ops = TorchVisionOps(self._device) if shard is None else \
            ExpertParallelOps(self._device, shard)
        self.inv_freq = rope_inv_freq(config)
        self.weights = weights if weights is not None else self._weights()
        self.vision_problem = vision_status(config, tensors)

    def _weights(self) -> ResidentWeights:
        p = self.params.as_dict()
        pre = "layers.{}.feed_forward.experts."

        def experts(i: int) -> Any:
            gu, dn = p[pre.format(i) + "gate_up_proj"], p[pre.format(i) + "down_proj"]
            if pre.format(i) + "gate_up_proj_scale" not in p:
                return (gu, dn) if self.shard is None else LocalExperts(self.shard.lo, (gu, dn))
            return FP8Experts(gu, dn, p[pre.format(i) + "gate_up_proj_scale"],
                              p[pre.format(i) + "down_proj_scale"], self.quant == "w8a8")

        weights = {n: t for n, t in p.items() if not n.endswith("_scale")}
        return ResidentWeights(self.config, weights, experts)

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

    def _context(self, start: int, n: int, pad: Padding | None = None) -> Context:
        positions = np.arange(start, start + n)
        rope_pos = positions if pad is None else pad.positions
        cos, sin = (self.ops.asarray(a) for a in rope_cos_sin(rope_pos, self.inv_freq))
        # the query temperature follows the slot, as transformers' Llama 4 computes it
        temp = (self.ops.asarray(temperature_scales(positions, self.config))
                if self.config.attn_temperature_tuning else None)
        mask = None if pad is None else PadMask(
            torch.from_numpy(np.ascontiguousarray(pad.valid, bool)).to(self._device),
            self.ops.asarray(pad.shift.astype(np.int64)))
        return Context(cos, sin, temp, start, mask)

    def _run(self, ids: torch.Tensor, plan: Plan, rec: Recorder, start: int = 0,
             cache: dict | None = None, stop_at_layer: int | None = None,
             pad: Padding | None = None,
             images: tuple[np.ndarray, np.ndarray] | None = None):
        if self._compiled is None or torch.is_grad_enabled():
            ex = Executor(self.ops, self.config, plan, rec)
        else:  # the compiled layer step, with its ops (dispatch and cache append eager)
            step, ops, graphs = self._compiled
            ex = _CompiledLayers(ops, self.config, plan, rec, step)
            ex.graphs = graphs
        image = None if images is None else self._image(images, rec)
        return forward(ex, self.weights, ids, self._context(start, ids.shape[1], pad),
                       cache,
                       stop_at_layer, image)

    def _image(self, images: tuple[np.ndarray, np.ndarray],
               rec: Recorder) -> tuple[torch.Tensor, torch.Tensor]:
        """The vision path on checked tiles: (placeholder positions, features (n, D))."""
        vc = self.config.vision
        vrec = rec.scope("")
        vrec.positions = None  # the vision hooks are per tile, not per text position
        pixels, positions = images
        cos, sin = (self.ops.asarray(a) for a in rope_tables(vc))
        feats = vision_forward(VisionExecutor(self.ops, vc, vrec),
                               split_params(vc, self.params.as_dict()),
                               self.ops.asarray(pixels).to(self.torch_dtype), cos, sin)
        return self.ops.asarray(positions), feats.reshape(-1, feats.shape[-1])

    def set_compile(self, options: bool | dict[str, Any] = True) -> None:
        """Run each decoder layer as a ``torch.compile``d layer step (False: eagerly again).

        ``options`` are ``torch.compile``'s keyword arguments (``True``: ``dynamic=True``, and
        on CUDA, CUDA graphs: inductor's ``triton.cudagraphs``). Expert dispatch (data-dependent
        shapes) and the KV-cache append (in-place buffers) stay eager; attention, norms, RoPE,
        the router and the shared expert are traced. Hooks and interventions are traced with
        them: a new capture set or intervention plan costs one recompile of the layer. Layers
        see their hooks by relative name, so layers of one kind with the same hooks and
        interventions share one compiled graph (a 48-layer model compiles a few graphs, not 48).
        Training (``forward_train``) stays eager.

        With inductor (the default backend, no ``mode`` given) each fused bf16 op rounds where
        the eager op rounds (inductor's ``emulate_precision_casts``; without it, fused bf16
        pointwise ops keep fp32 intermediates and results drift from eager's by an ulp per op,
        enough to change greedy tokens): compiled and eager layers give the same values.
        """
        if options is False or options is None:
            self._compiled = None
            return
        if options is True:
            options = {"dynamic": True}
            if self._device.type == "cuda":
                options["options"] = {"triton.cudagraphs": True}
        if not isinstance(options, dict):
            raise ValueError(f"compile={options!r}: True, False or a dict of torch.compile "
                             "keyword arguments")
        if options.get("backend", "inductor") == "inductor" and "mode" not in options:
            options = {**options, "options": {"emulate_precision_casts": True,
                                              **options.get("options", {})}}
        import copy
        # the kernels built and loaded now: traced, their first load (under a lock) would
        # break the graphs compiled then, and those graphs are kept
        kernel_library()
        ops = copy.copy(self.ops)
        ops.dispatch = torch.compiler.disable(self.ops.dispatch)
        ops.cache_update = torch.compiler.disable(self.ops.cache_update)
        inductor = options.get("options", {})
        graphs = self._device.type == "cuda" and (
            bool(inductor.get("triton.cudagraphs")) or
            options.get("mode") in ("reduce-overhead", "max-autotune"))
        self._compiled = (torch.compile(layer_step, **options), ops, graphs)

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

    def _forward(self, ids, plan, spec: CaptureSpec, cache=None, stop_at_layer=None, pad=None,
                 images=None):
        tokens = int(ids.shape[0] * ids.shape[1])
        if images is not None:  # the tower's positions count too: (P + 1) per tile
            tokens += int(images[0].shape[0]) * (self.config.vision.grid ** 2 + 1)
        n = self.threads_for(tokens)
        before = torch.get_num_threads()
        with kernel_threads(self.threads):  # the streaming CPU kernels' own two threads
            if n is None or n == before:
                return self._forward_inner(ids, plan, spec, cache, stop_at_layer, pad, images)
            torch.set_num_threads(n)
            try:
                return self._forward_inner(ids, plan, spec, cache, stop_at_layer, pad, images)
            finally:
                torch.set_num_threads(before)

    @torch.inference_mode()
    def _forward_inner(self, ids, plan, spec: CaptureSpec, cache=None, stop_at_layer=None,
                       pad=None, images=None):
        patches = {n: self.ops.asarray(v) for n, v in plan.patches.items()}
        rec = Recorder(self.ops, spec.names, plan, patches, spec.positions,
                       nan_check=spec.nan_check)
        start = 0 if cache is None else cache["start"]
        logits, _ = self._run(ids, plan, rec, start,
                              None if cache is None else cache["layers"], stop_at_layer, pad,
                              images)
        if cache is not None:
            cache["start"] = start + ids.shape[1]
        self._check_finite(rec.finite, "torch")
        arrays = {n: store(self.ops.to_numpy(a), spec) for n, a in rec.out.items()}
        return (None if logits is None else self.ops.to_numpy(logits)), arrays, cache

    def forward_train(self, ids: torch.Tensor, plan: Plan | None = None,
                      capture: Iterable[str] = (),
                      images: tuple[np.ndarray, np.ndarray] | None = None
                      ) -> tuple[torch.Tensor, dict]:
        """Differentiable forward (no inference mode) returning torch logits and the captured
        hooks as live tensors (e.g. router logits for a balancing loss); ``images`` as
        ``check_images`` returns them."""
        plan = plan or Plan()
        rec = Recorder(self.ops, frozenset(capture), plan)
        logits, _ = self._run(ids.to(self._device), plan, rec, images=images)
        return logits, rec.out

    def state_dict_numpy(self) -> dict[str, np.ndarray]:
        """Weights as float32 numpy arrays by canonical name (for Checkpoint.save)."""
        if isinstance(self.weights, StreamedWeights):
            return streamed_state_dict(self.weights)
        p = self.params.as_dict()
        out = {}
        for n, t in p.items():
            if n.endswith("_scale") or (self.shard is not None and self.shard.sharded(n)):
                continue
            if n + "_scale" in p:  # FP8 experts (E, in, out), scales (E, out)
                t = dequantize(t, p[n + "_scale"][:, None, :], torch.float32)
            out[n] = t.detach().float().cpu().numpy()
        if self.shard is not None:  # a collective: every rank's experts
            out.update(gather_experts(p, self.shard))
        return out


class _CompiledLayers(Executor):
    """The shared forward with each decoder layer run by a ``torch.compile``d layer step that
    records under layer-relative names (``Recorder.layer_view``): what a layer's graph depends
    on is then its kind, hooks and interventions, not its index, and layers alike share one
    compiled graph (torch's recompile limit, 8 graphs per function, would otherwise leave every
    layer past the eighth eager).

    With CUDA graphs (``graphs``), a graph's outputs live in memory its next replay
    overwrites, and the next layer replays the same graphs: each layer step starts a new
    CUDA-graph step, and what outlives it (the residual stream, captured hooks) is copied out."""

    graphs = False

    def layer(self, i: int, lp: Any, h: torch.Tensor, ctx: Context,
              cache: Any) -> tuple[torch.Tensor, Any]:
        view = self.rec.layer_view(i)
        if self.graphs:
            torch.compiler.cudagraph_mark_step_begin()
        h, cache = self.step(self.ops, self.cfg, LayerKind.of(self.cfg, i), lp, h, ctx, view,
                             LayerPlan.of(self.cfg, self.plan, i), cache)
        if self.graphs:
            h = h.clone()
            view.out = {n: v.clone() if isinstance(v, torch.Tensor) else v
                        for n, v in view.out.items()}
        self.rec.merge(i, view)
        return h, cache


def _to(t: Any, dtype: torch.dtype | None, device: torch.device) -> torch.Tensor:
    """A tensor in dtype (None: as it is) on device; the input itself (no copy) when it
    already is."""
    if not isinstance(t, torch.Tensor):
        t = to_fp8(t) if t.dtype == FP8 else from_numpy(np.ascontiguousarray(t))
    return t.to(device=device, dtype=dtype)


def _stored(name: str, t: Any) -> bool:
    """FP8 weights and their scales keep their dtype."""
    return name.endswith("_scale") or t.dtype in (FP8, torch.float8_e4m3fn)


def load(path: str | Path, dtype: str = "float32", checkpoint: Checkpoint | None = None,
         device: Any = None, offload: str | None = None,
         max_memory: int | str | None = None, expert_parallel: bool = False,
         quant: str | None = None) -> TorchModel:
    """Load a checkpoint directory into the torch backend, one copy of the weights.

    On the CPU, tensors stored in the requested dtype are zero-copy views of the memory-mapped
    (copy-on-write) shards: loading allocates no memory for them. Otherwise each tensor is
    converted or copied to the device one at a time and its file pages are released.
    ``offload="disk"`` streams instead: nothing is read until a forward needs it
    (``workbench.streaming``), with an expert cache of ``max_memory`` bytes.
    ``expert_parallel=True`` keeps only this rank's experts (``workbench.torch.parallel``).


    FP8 checkpoints keep their routed experts in FP8 (resident or in the streamed cache),
    dequantised one expert at a time at use; ``quant="w8a8"`` also quantises the expert
    inputs per token (``workbench.quant.check_quant``). FP8 dense weights are dequantised
    when loaded.
    """
    ck = checkpoint or Checkpoint.open(path)
    mode = check_quant(quant, ck)
    dev = resolve_device(device)
    tdt = TORCH_DTYPES[dtype]
    shard = ExpertShard.current(ck.config) if expert_parallel else None
    if shard is not None and mode is not None:
        raise ValueError(f"{path} is an FP8 checkpoint: expert_parallel shards bf16/fp32 "
                         "experts only; load it without expert_parallel, or dequantise it first")
    if check_offload(offload, max_memory) == "disk":
        ck.weight_names()  # a streamed forward needs every layer too

        def put(view: np.ndarray) -> torch.Tensor:
            return from_numpy(np.asarray(view)).to(device=dev, dtype=tdt, copy=True)

        def put_expert(w: ExpertWeights) -> Any:
            if not w.quantized:
                return put(w.gate_up), put(w.down)
            return FP8Expert(to_fp8(w.gate_up, dev), to_fp8(w.down, dev),
                             torch.from_numpy(w.gate_up_scale).to(dev),
                             torch.from_numpy(w.down_scale).to(dev))

        vision = {n: put(ck.view(n)) for n in ck.vision_names()}
        if shard is not None:  # this rank's experts only (FP8 refused above)
            source = ShardedStreamedWeights(shard, ck, put, put_expert, parse_bytes(max_memory))
            model = TorchModel(ck.config, vision, dtype, str(path), dev, weights=source,
                               shard=shard)
            model.vision_problem = ck.vision_problem
            return model
        source = StreamedWeights(ck, put, put_expert, parse_bytes(max_memory),
                                 act_quant=fp8_tokens if mode == "w8a8" else None)
        model = TorchModel(ck.config, vision, dtype, str(path), dev, weights=source, quant=mode)
        model.vision_problem = ck.vision_problem
        return model
    tensors: dict[str, torch.Tensor] = {}
    kept_views = False
    for name in ck.weight_names() + ck.vision_names():
        if ck.is_quantized(name):
            if ".experts." in name:  # FP8 experts stay FP8, one expert read at a time
                tensors.update(_fp8_experts(ck, name, dev))
            else:
                tensors[name] = from_numpy(ck.dequantized(name)).to(dev, tdt)
            continue
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
    model = TorchModel(ck.config, tensors, dtype, str(path), dev, shard=shard, quant=mode)
    model.vision_problem = ck.vision_problem
    if not kept_views:
        ck.close()
    return model


def _fp8_experts(ck: Checkpoint, name: str, dev: torch.device) -> dict[str, torch.Tensor]:
    """A fused FP8 expert tensor (E, in, out) and its scales (E, out), built expert by expert
    from the checkpoint (per-expert layouts included)."""
    from ..hooks import layer_of
    layer, gate_up = layer_of(name), name.endswith("gate_up_proj")
    shape = ck.info(name).shape
    q = torch.empty(shape, dtype=torch.float8_e4m3fn, device=dev)
    s = torch.empty((shape[0], shape[2]), dtype=torch.float32, device=dev)
    for e in range(shape[0]):
        w = ck.expert(layer, e)
        q[e] = to_fp8(w.gate_up if gate_up else w.down, dev)
        s[e] = torch.from_numpy(w.gate_up_scale if gate_up else w.down_scale)
        ck.evict_expert(layer, e)
    return {name: q, name + "_scale": s}


def _aligned(a: np.ndarray) -> bool:
    return a.ctypes.data % a.dtype.itemsize == 0
