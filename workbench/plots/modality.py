"""Figures of routing by modality (image patches vs text tokens)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from matplotlib.figure import Figure

from ..analysis.modality import ModalityLayer, patch_experts
from ..trace import Trace
from .style import expert_cmap, expert_colors, styled


@styled
def modality_specialisation_plot(result: Sequence[ModalityLayer]) -> Figure:
    """Left: JS divergence (bits) between the expert distributions of image and text tokens
    per layer, with the shuffled-label chance level (mean and 95th percentile). Right: the
    share of each expert's tokens that are image tokens, per layer."""
    if not result:
        raise ValueError("modality_specialisation_plot: no layers")
    fig = Figure(figsize=(10, 3.6))
    a, b = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1, 1.4]})
    layers = [r.layer for r in result]
    x = np.arange(len(layers))
    a.bar(x, [r.js for r in result], color="#4477aa", label="image vs text")
    a.plot(x, [r.js_shuffled for r in result], "k_", ms=18, label="shuffled (mean)")
    a.plot(x, [r.js_shuffled_p95 for r in result], "k:", lw=1, label="shuffled (95%)")
    a.set_xticks(x, [f"L{i}" for i in layers])
    a.set_ylabel("JS divergence (bits)")
    a.set_title("modality specialisation")
    a.legend(fontsize=8)
    frac = np.stack([r.image_fraction for r in result])
    im = b.imshow(frac, vmin=0, vmax=1, cmap="coolwarm", aspect="auto")
    b.set_yticks(x, [f"L{i} (NMI {r.nmi:.2f})" for i, r in zip(layers, result)])
    b.set_xticks(np.arange(frac.shape[1]))
    b.set_xlabel("expert")
    b.set_title("share of each expert's tokens that are image patches")
    fig.colorbar(im, ax=b, fraction=0.04)
    return fig


@styled
def patch_expert_overlay(trace: Trace, image: np.ndarray, layers: Sequence[int],
                         tile: int = 0, row: int = 0, alpha: float = 0.55) -> Figure:
    """The image (H, W, 3) in [0, 1] with each ``<|patch|>`` cell coloured by its top-1
    expert, one panel per layer; ``tile`` picks the tile whose placeholders are shown."""
    image = np.asarray(image, dtype=np.float64)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"image must be (H, W, 3), got shape {image.shape}")
    fig = Figure(figsize=(2.6 * len(layers), 2.9))
    axes = np.atleast_1d(fig.subplots(1, len(layers)))
    E = trace.num_experts or 1 + int(max(trace.routing(i).indices.max() for i in layers))
    for ax, layer in zip(axes, layers):
        grid = patch_experts(trace, layer, row)
        if not 0 <= tile < len(grid):
            raise ValueError(f"tile {tile} out of range: the trace has {len(grid)} tile(s)")
        ax.imshow(np.clip(image, 0, 1), extent=(0, 1, 1, 0))
        ax.imshow(grid[tile], cmap=expert_cmap(E), vmin=-0.5, vmax=E - 0.5, alpha=alpha,
                  extent=(0, 1, 1, 0), interpolation="nearest")
        ax.set_title(f"layer {layer}")
        ax.set_xticks([])
        ax.set_yticks([])
    colors = expert_colors(E)
    from matplotlib.patches import Patch
    fig.legend([Patch(color=c) for c in colors], [f"E{e}" for e in range(E)],
               loc="lower center", ncol=min(E, 8), fontsize=7, frameon=False)
    fig.subplots_adjust(bottom=0.2)
    return fig
