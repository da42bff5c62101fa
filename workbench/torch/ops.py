"""The torch backend's kernels behind the ``workbench.ops.Ops`` interface, on one device."""

from __future__ import annotations

from typing import Any

import ml_dtypes
import numpy as np
import torch

from ..model import DeviceError
from . import attention as att
from . import moe

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def resolve_device(device: Any) -> torch.device:
    """``None`` (the CPU), "cpu", "cuda", "cuda:N", "mps" or a torch.device, checked to exist."""
    if device is None:
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise DeviceError(f"device={device!r} is not a torch device; use 'cpu', 'cuda', "
                          "'cuda:N' or 'mps'") from None
    if dev.type == "cpu":
        return dev
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"device={device!r}: CUDA is not available to this torch "
                              f"({torch.__version__}, built with CUDA "
                              f"{torch.version.cuda or 'none'}); use device='cpu'")
        n = torch.cuda.device_count()
        if dev.index is not None and dev.index >= n:
            raise DeviceError(f"device={device!r}: only {n} CUDA device(s) (cuda:0..cuda:{n - 1})")
        return torch.device("cuda", torch.cuda.current_device() if dev.index is None
                            else dev.index)
    if dev.type == "mps":
        if not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            raise DeviceError(f"device={device!r}: Apple MPS is not available on this machine")
        return dev
    raise DeviceError(f"device={device!r}: the torch backend runs on 'cpu', 'cuda[:N]' or "
                      f"'mps', not {dev.type!r}")


def from_numpy(a: np.ndarray) -> torch.Tensor:
    """A zero-copy torch view of a numpy array (ml_dtypes.bfloat16 included)."""
    if a.dtype == ml_dtypes.bfloat16:
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a)


class TorchOps:
    """Kernels of the torch backend (``workbench.ops.Ops``) on ``device``."""

    def __init__(self, device: torch.device):
        self.device = device

    def asarray(self, a: np.ndarray) -> torch.Tensor:
        return from_numpy(np.require(a, requirements=["C", "W"])).to(self.device)

    def to_numpy(self, x: torch.Tensor) -> np.ndarray:
        x = x.detach()
        if x.dtype in (torch.int64, torch.int32):
            return x.to(torch.int32).cpu().numpy()
        return x.float().cpu().numpy()

    def broadcast_like(self, value: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return value.to(x.device, x.dtype).expand(x.shape).clone()

    def all_finite(self, x: torch.Tensor) -> torch.Tensor:
        return torch.isfinite(x).all()

    def cast(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return x.to(dtype)

    def embed(self, table: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return table[ids]

    linear = staticmethod(moe.linear)
    rms_norm = staticmethod(att.rms_norm)
    swiglu = staticmethod(moe.swiglu)

    def split_heads(self, x: torch.Tensor, n: int, d: int) -> torch.Tensor:
        B, S, _ = x.shape
        return x.view(B, S, n, d).transpose(1, 2)

    def merge_heads(self, o: torch.Tensor) -> torch.Tensor:
        B, H, S, d = o.shape
        return o.transpose(1, 2).reshape(B, S, H * d)

    rope = staticmethod(att.apply_rope)

    def scale_queries(self, q: torch.Tensor, temp: torch.Tensor) -> torch.Tensor:
        return (q * temp[None, None, :, None]).to(q.dtype)

    attention = staticmethod(att.fused)
    attention_probs = staticmethod(att.attention_probs)
    attention_summary = staticmethod(att.attention_summary)
    attend = staticmethod(att.attend)

    def seq_slice(self, x: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        return x[:, :, lo:hi]

    def zero_heads(self, o: torch.Tensor, heads: tuple[int, ...]) -> torch.Tensor:
        o = o.clone()
        o[:, list(heads)] = 0
        return o

    cache_update = staticmethod(att.cache_update)
    select_experts = staticmethod(moe.select_experts)

    def as_index(self, idx: torch.Tensor) -> torch.Tensor:
        return idx.long()

    def gate_scores(self, logits: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(logits.gather(1, idx).float()).to(logits.dtype)

    dispatch = staticmethod(moe.dispatch)
    zero_gates = staticmethod(moe.zero_gates)
