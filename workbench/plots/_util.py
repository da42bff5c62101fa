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
