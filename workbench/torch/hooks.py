"""Recorder: the one place where hook values are captured, patched or edited (torch backend).

Layers call ``rec(name, x)`` at every hook point. When nothing is captured or edited this is a
set lookup and a return: hooks cost nothing until asked for.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import torch

from ..interventions import Plan
from ..model import CaptureSpec, _store, seq_axis


class Recorder:
    def __init__(self, spec: CaptureSpec, plan: Plan, dtype: torch.dtype):
        self.spec = spec
        self.plan = plan
        self.want = spec.names
        self.edits = plan.edits()
        self.dtype = dtype
        self.out: dict[str, np.ndarray] = {}

    def wants(self, name: str) -> bool:
        return name in self.want or name in self.edits

    def __call__(self, name: str, x: torch.Tensor) -> torch.Tensor:
        if name in self.edits:
            x = self._edit(name, x)
        if name in self.want:
            self.out[name] = _store(to_numpy(x), self.spec, seq_axis(name))
        return x

    def _edit(self, name: str, x: torch.Tensor) -> torch.Tensor:
        if name in self.plan.patches:
            v = self.plan.patches[name]
            t = torch.from_numpy(np.array(v, dtype=np.int64 if v.dtype.kind in "iu"
                                                       else np.float32))
            x = t.to(x.dtype).expand(x.shape).clone()
        fn = self.plan.fns.get(name)
        if fn is not None:
            y = fn(x)
            if not isinstance(y, torch.Tensor) or tuple(y.shape) != tuple(x.shape):
                raise ValueError(f"hook function for {name!r} must return a tensor of shape "
                                 f"{tuple(x.shape)}, got {getattr(y, 'shape', type(y))}")
            x = y.to(x.dtype)
        return x


def to_numpy(x: torch.Tensor) -> np.ndarray:
    """Tensor -> numpy; floats become float32 (bf16 is exactly representable), ints int32."""
    x = x.detach()
    if x.dtype in (torch.int64, torch.int32):
        return x.to(torch.int32).cpu().numpy()
    return x.float().cpu().numpy()


def from_numpy(a: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """numpy (incl. ml_dtypes.bfloat16) -> torch tensor of ``dtype``, without a float64 detour."""
    if a.dtype == ml_dtypes.bfloat16:
        t = torch.from_numpy(np.ascontiguousarray(a).view(np.int16)).view(torch.bfloat16)
    else:
        t = torch.from_numpy(np.ascontiguousarray(a))
    return t.to(dtype)
