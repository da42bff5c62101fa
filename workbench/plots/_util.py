"""Small helpers shared by the plot modules (no public API)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ..analysis import moe_layers
from ..analysis._common import Traces, as_list


def layers_or_default(traces: Traces, layers: Sequence[int] | None) -> list[int]:
    """``layers`` as a list, or every MoE layer captured in all traces (error if none)."""
    out = moe_layers(traces) if layers is None else [int(i) for i in layers]
    if not out:
        raise ValueError("no MoE routing captured; re-run with capture=['*.moe.*']")
    return out


def default_layer(traces: Traces, layer: int | None) -> int:
    """``layer``, or the middle captured MoE layer."""
    if layer is not None:
        return int(layer)
    ls = layers_or_default(traces, None)
    return ls[len(ls) // 2]


def plain(s: str) -> str:
    """Escape ``$`` so matplotlib never reads token text as mathtext."""
    return s.replace("$", r"\$")


def token_labels(ids: Sequence[int] | np.ndarray, tokenizer: Any = None,
                 tokens: Sequence[str] | None = None) -> list[str]:
    """Display strings for ``ids``: ``tokens`` if given, else ``tokenizer.token_strings(ids)``,
    else ``#id``."""
    ids = [int(i) for i in np.asarray(ids).ravel()]
    if tokens is not None:
        labels = [str(t) for t in tokens]
        if len(labels) < len(ids):
            raise ValueError(f"got {len(labels)} token strings for {len(ids)} tokens")
        return labels[:len(ids)]
    if tokenizer is not None:
        return list(tokenizer.token_strings(ids))
    return [f"#{i}" for i in ids]


def first_trace(traces: Traces) -> Any:
    return as_list(traces)[0]


def pooled_ids(traces: Traces) -> np.ndarray:
    """Input ids of all traces, flattened in analysis order (trace, batch row, position)."""
    return np.concatenate([t.input_ids.reshape(-1) for t in as_list(traces)])


def layer_label(i: int) -> str:
    return f"L{i}"


#: Above this many layers, per-layer figures switch to their large-model mode (a layer subset,
#: or a colour bar in place of a legend entry per layer).
MAX_LAYER_LINES = 8
#: Experts drawn in their own colour in large-model mode; the rest are grey "other".
TOP_EXPERTS = 12
#: Colour of the "other experts" bucket.
OTHER = "#bdbdbd"
#: Largest figure any plot function returns, in inches (width, height).
MAX_INCHES = (16.0, 13.0)


def capped(w: float, h: float) -> tuple[float, float]:
    """``(w, h)`` limited to :data:`MAX_INCHES`."""
    return min(float(w), MAX_INCHES[0]), min(float(h), MAX_INCHES[1])


def spread(items: Sequence[int], n: int) -> list[int]:
    """At most ``n`` of ``items``, evenly spaced, always keeping the first and the last."""
    items = list(items)
    if len(items) <= n:
        return items
    pick = np.unique(np.round(np.linspace(0, len(items) - 1, max(n, 2))).astype(int))
    return [items[i] for i in pick]


def pick_layers(traces: Traces, layers: Sequence[int] | None,
                max_layers: int = MAX_LAYER_LINES) -> tuple[list[int], str]:
    """The layers to draw and a note for the title: every requested layer, or (``layers`` None)
    every captured MoE layer, thinned to ``max_layers`` evenly spaced ones when there are more.
    """
    if layers is not None:
        return layers_or_default(traces, layers), ""
    all_ = layers_or_default(traces, None)
    shown = spread(all_, max_layers)
    note = f" ({len(shown)} of {len(all_)} MoE layers)" if len(shown) < len(all_) else ""
    return shown, note


def layer_ticks(ax: Any, layers: Sequence[int], axis: str = "x", max_ticks: int = 24) -> None:
    """Label positions 0..n-1 with ``L{i}``, thinned to about ``max_ticks`` labels."""
    step = max(1, int(np.ceil(len(layers) / max_ticks)))
    pos = list(range(0, len(layers), step))
    labels = [layer_label(layers[p]) for p in pos]
    if axis == "x":
        ax.set_xticks(pos, labels, rotation=90 if len(pos) > 12 else 0)
    else:
        ax.set_yticks(pos, labels)


def layer_legend(fig: Any, ax: Any, layers: Sequence[int], extra: Sequence[Any] = (),
                 max_entries: int = MAX_LAYER_LINES, **kwargs: Any) -> None:
    """A legend with one entry per layer line (plus ``extra`` handles) when there are at most
    ``max_entries`` layers; otherwise a viridis colour bar of the layer index and a legend of
    the ``extra`` handles only."""
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    handles, labels = ax.get_legend_handles_labels()
    if len(layers) <= max_entries:
        ax.legend(handles=list(handles) + list(extra), **kwargs)
        return
    keep = [h for h, lab in zip(handles, labels) if not _is_layer_label(lab)] + list(extra)
    sm = ScalarMappable(norm=Normalize(min(layers), max(layers)), cmap=_layer_cmap())
    cb = fig.colorbar(sm, ax=ax, pad=0.02, fraction=0.05)
    cb.set_label("layer")
    if keep:
        ax.legend(handles=keep, **kwargs)


def _is_layer_label(label: str) -> bool:
    head = label.split(":")[0].split(" ")[0]
    return head.startswith("L") and head[1:].isdigit()


def _layer_cmap() -> Any:
    """viridis over the range :func:`~workbench.plots.style.layer_colors` uses."""
    import matplotlib as mpl
    from matplotlib.colors import ListedColormap
    return ListedColormap(mpl.colormaps["viridis"](np.linspace(0.05, 0.85, 256)))


def top_experts(counts: np.ndarray, n: int = TOP_EXPERTS) -> list[int]:
    """The ``n`` experts with the largest counts (ties by id), highest first; experts with no
    count are left out."""
    c = np.asarray(counts, dtype=np.float64)
    order = np.lexsort((np.arange(c.size), -c))
    return [int(e) for e in order[:n] if c[e] > 0]


def head_pattern(trace: Any, layer: int, head: int | None, batch: int, caller: str,
                 capture: str = "") -> tuple[np.ndarray, int, int]:
    """One layer's captured attention pattern of batch row ``batch``: the ``head``'s (Tq, Tk)
    matrix, or the mean over heads when ``head`` is None, with Tq and Tk. ValueError names
    the missing hook (``capture``: extra arguments for the re-run hint) or the bad head."""
    name = f"layers.{layer}.attn.pattern"
    if name not in trace:
        raise ValueError(f"{caller} needs the hook {name!r}; re-run with "
                         f"capture=[{name!r}]{capture}")
    a = np.asarray(trace[name], dtype=np.float32)[batch]  # (H, Tq, Tk)
    H, Tq, Tk = a.shape
    if head is not None and not 0 <= head < H:
        raise ValueError(f"head {head} out of range: layer {layer} has {H} heads")
    return (a.mean(axis=0) if head is None else a[head]), Tq, Tk
