"""The Llama 4 text model in PyTorch: parameters from a Checkpoint, a pure forward function."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..checkpoint import Checkpoint
from ..config import ModelConfig
from ..interventions import Plan
from ..model import CaptureSpec, Model
from ..numerics import rope_cos_sin, rope_inv_freq, temperature_scales
from .attention import attention, rms_norm
from .hooks import Recorder, from_numpy, to_numpy
from .moe import mlp, moe

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class Params(nn.Module):
    """All weights by canonical name (``layers.0.self_attn.q_proj.weight``), as Parameters."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        super().__init__()
        self._names = list(tensors)
        self.store = nn.ParameterDict({n.replace(".", "/"): nn.Parameter(t, requires_grad=False)
                                       for n, t in tensors.items()})

    def as_dict(self) -> dict[str, torch.Tensor]:
        return {n: self.store[n.replace(".", "/")] for n in self._names}


def forward(p: dict[str, torch.Tensor], cfg: ModelConfig, ids: torch.Tensor, plan: Plan,
            rec: Recorder, inv_freq: np.ndarray, start: int = 0,
            cache: dict | None = None) -> torch.Tensor:
    """Logits (B, S, V) for ids (B, S) at absolute positions start..start+S-1."""
    S = ids.shape[1]
    positions = np.arange(start, start + S)
    cos, sin = (torch.from_numpy(a) for a in rope_cos_sin(positions, inv_freq))
    temp = torch.from_numpy(temperature_scales(positions, cfg)) if cfg.attn_temperature_tuning \
        else None
    h = rec("embed", p["embed_tokens.weight"][ids])
    eps = cfg.rms_norm_eps
    for i in range(cfg.num_hidden_layers):
        pre = f"layers.{i}."
        h = rec(pre + "resid_pre", h)
        a = attention(p, rms_norm(h, p[pre + "input_layernorm.weight"], eps), i, cfg,
                      (cos, sin), temp, start, cache, rec, plan.ablate.get(i))
        h = rec(pre + "resid_mid", h + a)
        x = rms_norm(h, p[pre + "post_attention_layernorm.weight"], eps)
        f = moe(p, x, i, cfg, plan, rec) if cfg.is_moe(i) else mlp(p, x, i, rec)
        h = rec(pre + "resid_post", h + f)
    h = rec("final_norm", rms_norm(h, p["norm.weight"], eps))
    head = p["embed_tokens.weight"] if cfg.tie_word_embeddings else p["lm_head.weight"]
    return rec("logits", h @ head.T)


class TorchModel(Model):
    """``wb.load(path, backend="torch")``: the PyTorch backend."""

    backend = "torch"

    def __init__(self, config: ModelConfig, tensors: dict[str, np.ndarray], dtype: str = "float32",
                 path: str | None = None):
        super().__init__(config, dtype, path)
        tdt = TORCH_DTYPES[dtype]
        self.params = Params({n: from_numpy(a, tdt) for n, a in tensors.items()})
        self.inv_freq = rope_inv_freq(config)

    @property
    def module(self) -> Params:
        """The native nn.Module holding every weight (for users going below the API)."""
        return self.params

    @property
    def torch_dtype(self) -> torch.dtype:
        return TORCH_DTYPES[self.dtype]

    def new_cache(self, batch: int) -> dict[str, Any]:
        return {"start": 0, "layers": {}}

    @torch.inference_mode()
    def _forward(self, ids, plan, spec: CaptureSpec, cache=None):
        rec = Recorder(spec, plan, self.torch_dtype)
        start = 0 if cache is None else cache["start"]
        logits = forward(self.params.as_dict(), self.config, torch.from_numpy(ids), plan, rec,
                         self.inv_freq, start, None if cache is None else cache["layers"])
        if cache is not None:
            cache["start"] = start + ids.shape[1]
        return to_numpy(logits), rec.out, cache

    def forward_train(self, ids: torch.Tensor, plan: Plan | None = None,
                      capture: Iterable[str] = ()) -> tuple[torch.Tensor, dict]:
        """Differentiable forward (no inference mode) returning torch logits and captures."""
        rec = _TensorRecorder(frozenset(capture), plan or Plan(), self.torch_dtype)
        return forward(self.params.as_dict(), self.config, ids, plan or Plan(), rec,
                       self.inv_freq), rec.out

    def state_dict_numpy(self) -> dict[str, np.ndarray]:
        """Weights as float32 numpy arrays by canonical name (for Checkpoint.save)."""
        return {n: t.detach().float().cpu().numpy() for n, t in self.params.as_dict().items()}


class _TensorRecorder(Recorder):
    """Keeps captured values as live tensors (for losses computed on router logits)."""

    def __init__(self, names: frozenset[str], plan: Plan, dtype: torch.dtype):
        super().__init__(CaptureSpec(names), plan, dtype)

    def __call__(self, name, x):
        if name in self.edits:
            x = self._edit(name, x)
        if name in self.want:
            self.out[name] = x
        return x


def load(path: str | Path, dtype: str = "float32",
         checkpoint: Checkpoint | None = None) -> TorchModel:
    """Load a checkpoint directory into the torch backend."""
    ck = checkpoint or Checkpoint.open(path)
    return TorchModel(ck.config, ck.model_tensors(), dtype, str(path))

