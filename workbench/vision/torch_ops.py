"""The torch backend's kernels for the vision path (``workbench.vision.forward.VisionOps``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..torch.ops import TorchOps


class TorchVisionOps(TorchOps):
    """``TorchOps`` plus the vision kernels, as transformers' Llama 4 vision tower computes."""

    def unfold(self, pixels: torch.Tensor, patch: int) -> torch.Tensor:
        return F.unfold(pixels, kernel_size=patch, stride=patch).transpose(1, 2)

    def linear_bias(self, x: torch.Tensor, w: torch.Tensor,
                    b: torch.Tensor | None) -> torch.Tensor:
        return F.linear(x, w, b)

    def layer_norm(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor,
                   eps: float) -> torch.Tensor:
        return F.layer_norm(x, (x.shape[-1],), w, b, eps)

    def gelu(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(x)

    def append_class(self, x: torch.Tensor, cls: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, cls.to(x.dtype).expand(x.shape[0], 1, x.shape[-1])], dim=1)

    def full_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       scale: float) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v, scale=scale)

    def full_attention_probs(self, q: torch.Tensor, k: torch.Tensor,
                             scale: float) -> torch.Tensor:
        # as transformers' vision_eager_attention_forward: softmax in the model dtype
        return torch.softmax((q @ k.transpose(-1, -2)) * scale, dim=-1)

    def pixel_shuffle(self, x: torch.Tensor, ratio: float) -> torch.Tensor:
        N, P, C = x.shape
        g = round(P ** 0.5)
        x = x.reshape(N, g, g, C).reshape(N, g, round(g * ratio), round(C / ratio))
        x = x.permute(0, 2, 1, 3).reshape(N, round(g * ratio), round(g * ratio),
                                          round(C / ratio ** 2))
        return x.permute(0, 2, 1, 3).reshape(N, -1, round(C / ratio ** 2))

    def scatter_rows(self, e: torch.Tensor, index: torch.Tensor,
                     rows: torch.Tensor) -> torch.Tensor:
        B, S, D = e.shape
        flat = e.reshape(B * S, D).clone()
        flat[index] = rows.reshape(-1, D).to(e.dtype)
        return flat.reshape(B, S, D)
