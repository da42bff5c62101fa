"""Routing by modality: do image tokens go to different experts than text, and where?

Takes traces of runs with images that captured ``token_modality`` and the MoE routing
(``*.moe.topk_indices``). Modalities are ``workbench.hooks.MODALITY_*``: 0 text, 1 image
patch, 2 image special token (image markers and tile separators, counted as neither here).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..hooks import MODALITY_IMAGE, MODALITY_TEXT
from ..trace import Trace
from ._common import (
    Traces,
    as_list,
    indices,
    moe_layers,
    need,
    nmi_from_joint,
    num_experts,
    real_tokens,
)
from .specialisation import js_divergence


@dataclass(frozen=True)
class ModalityLayer:
    """One MoE layer's routing split by modality (top-1 choices)."""

    layer: int
    image_share: np.ndarray  # (E,) fraction of image tokens sent to each expert
    text_share: np.ndarray  # (E,) fraction of text tokens sent to each expert
    image_fraction: np.ndarray  # (E,) share of each expert's tokens that are image tokens
    js: float  # JS(image_share ‖ text_share), bits
    js_shuffled: float  # mean JS with the modality labels shuffled (the chance level)
    js_shuffled_p95: float
    nmi: float  # NMI between top-1 expert and modality (image vs text)


def modality_labels(traces: Traces) -> np.ndarray:
    """``token_modality`` of every real token (pads left out), pooled in the analysis order."""
    return np.concatenate([real_tokens(t, need(t, "token_modality", "modality analysis"))
                           .reshape(-1) for t in as_list(traces)])


def modality_specialisation(traces: Traces, layers: list[int] | None = None,
                            shuffles: int = 200, seed: int = 0) -> list[ModalityLayer]:
    """Per MoE layer: expert shares of image and text tokens, their JS divergence against a
    shuffled-label baseline, and the NMI between top-1 expert and modality."""
    ts = as_list(traces)
    mod = modality_labels(ts)
    keep = (mod == MODALITY_IMAGE) | (mod == MODALITY_TEXT)
    is_img = mod[keep] == MODALITY_IMAGE
    if is_img.all() or not is_img.any():
        raise ValueError("modality_specialisation needs both image and text tokens in the "
                         "traces (run with pixel_values and capture 'token_modality')")
    rng = np.random.default_rng(seed)
    out = []
    for i in layers if layers is not None else moe_layers(ts):
        E = num_experts(ts, i)
        top1 = indices(ts, i, "modality analysis")[..., 0].reshape(-1)[keep]
        img = np.bincount(top1[is_img], minlength=E).astype(np.float64)
        txt = np.bincount(top1[~is_img], minlength=E).astype(np.float64)
        null = []
        for _ in range(shuffles):
            perm = rng.permutation(is_img)
            null.append(js_divergence(np.bincount(top1[perm], minlength=E) + 1e-12,
                                      np.bincount(top1[~perm], minlength=E) + 1e-12))
        total = img + txt
        out.append(ModalityLayer(
            i, img / img.sum(), txt / txt.sum(),
            np.divide(img, total, out=np.full(E, np.nan), where=total > 0),
            js_divergence(img + 1e-12, txt + 1e-12), float(np.mean(null)) if null else 0.0,
            float(np.percentile(null, 95)) if null else 0.0,
            nmi_from_joint(np.stack([img, txt]))))
    return out


def patch_experts(trace: Trace, layer: int, row: int = 0) -> np.ndarray:
    """Top-1 expert of each ``<|patch|>`` token of batch row ``row``, one grid per tile:
    (tiles, g, g) with g the side of a tile's placeholder grid (placeholders fill tiles in
    order, row-major, as the pixel-shuffled patches)."""
    mod = need(trace, "token_modality", "patch_experts")[row]
    top1 = trace.routing(layer).indices[row, :, 0]
    e = top1[mod == MODALITY_IMAGE]
    n = trace.meta.get("image_tokens_per_tile")
    n = int(n) if n else len(e)
    g = int(round(np.sqrt(n)))
    if g * g != n or len(e) % n:
        raise ValueError(f"patch_experts: {len(e)} image tokens do not form tiles of {n} "
                         "(set trace.meta['image_tokens_per_tile'])")
    return e.reshape(-1, g, g)
