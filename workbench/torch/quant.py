"""FP8 expert weights on torch: held as float8_e4m3fn, dequantised per expert at use.

A routed expert of an FP8 checkpoint stays FP8 on the device (resident, or in the streamed
expert cache): half the bytes of bf16. The dispatch dequantises one expert at a time to the
compute dtype just before its matmuls (``expert_weights``). With ``quant="w8a8"`` each expert
matmul's input is also quantised per token to FP8 and back (``fp8_tokens``), as a vLLM-style
server runs it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

import numpy as np
import torch

from ..quant import FP8, FP8_MAX, SCALE_EPS


class FP8Expert(NamedTuple):
    """One expert: gate_up (D, 2I) and down (I, D) FP8, float32 scales (2I,) and (D,)."""

    gate_up: torch.Tensor
    down: torch.Tensor
    gate_up_scale: torch.Tensor
    down_scale: torch.Tensor


def to_fp8(a: np.ndarray, device: torch.device | str = "cpu") -> torch.Tensor:
    """An ml_dtypes float8_e4m3fn numpy array as a torch float8_e4m3fn tensor (a copy)."""
    if a.dtype != FP8:
        raise TypeError(f"to_fp8: expected float8_e4m3fn, got {a.dtype}")
    u8 = torch.from_numpy(np.ascontiguousarray(a).view(np.uint8))
    return u8.view(torch.float8_e4m3fn).to(device, copy=True)


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``q * scale`` in float32 (scale along the last axis: output channels), then ``dtype``."""
    return (q.float() * scale).to(dtype)


def expert_weights(w: tuple | FP8Expert, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(gate_up, down) of one fetched expert in the compute dtype (dequantised if FP8)."""
    if isinstance(w, FP8Expert):
        return dequantize(w.gate_up, w.gate_up_scale, dtype), \
            dequantize(w.down, w.down_scale, dtype)
    return w


def fp8_tokens(x: torch.Tensor) -> torch.Tensor:
    """Dynamic per-token FP8 quantise-dequantise of activations (N, D), computed in float32
    (scale = max|x| / 448 per row) and returned in x's dtype."""
    xf = x.float()
    s = (xf.abs().amax(-1, keepdim=True) / FP8_MAX).clamp_min(SCALE_EPS)
    q = (xf / s).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return (q.float() * s).to(x.dtype)


class FP8Experts:
    """An MoE layer's resident FP8 experts: stacked gate_up (E, D, 2I) / down (E, I, D) in
    float8_e4m3fn with float32 scales (E, 2I) / (E, D). ``fetch`` hands out experts still in
    FP8; the dispatch dequantises each one at use. ``act_quant`` (w8a8) quantises the
    expert inputs per token."""

    def __init__(self, gate_up: torch.Tensor, down: torch.Tensor, gate_up_scale: torch.Tensor,
                 down_scale: torch.Tensor, act_quant: bool = False):
        self.gate_up, self.down = gate_up, down
        self.gate_up_scale, self.down_scale = gate_up_scale, down_scale
        self.num_experts = gate_up.shape[0]
        self.act_quant = fp8_tokens if act_quant else None

    def fetch(self, ids: Iterable[int]) -> dict[int, FP8Expert]:
        return {int(e): FP8Expert(self.gate_up[e], self.down[e], self.gate_up_scale[e],
                                  self.down_scale[e]) for e in ids}
