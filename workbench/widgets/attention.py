"""Attention explorer: one layer's pattern (per head or head mean) with token labels and chunk
boundaries, the layer's type (chunked RoPE / global NoPE), and one query token in focus.

:class:`AttentionState` is the browser-free logic; :class:`AttentionExplorer` its front end.
"""

from __future__ import annotations

from typing import Any

import ipywidgets as widgets
import numpy as np
from matplotlib.figure import Figure

from .. import plots
from ..numerics import chunk_boundaries
from ..plots.attention import BOUNDARY
from ..plots.style import FONT_SIZES, WARN, new_figure
from ._common import (
    PROMPTS,
    Progress,
    check_choice,
    check_position,
    default_text,
    encode,
    resolve_model,
    resolve_tokenizer,
    table_html,
    token_strings,
)
from ._ui import Explorer
from .routing import _layer_slider

#: A text long enough to cross the bundled model's 64-token attention chunk.
DEFAULT_TEXT = PROMPTS["code"] + PROMPTS["numeric"] + PROMPTS["prose"]


class AttentionState:
    """Attention patterns of one text. Patterns are captured one layer at a time, when a layer
    is first shown (O(T²) per head), and cached until the text changes."""

    def __init__(self, model: Any = None, tokenizer: Any = None, text: str | None = None,
                 layer: int | None = None, head: int | None = None, max_tokens: int = 96,
                 max_labels: int = 96, progress: Progress | None = None):
        self.model = resolve_model(model)
        self.tokenizer = resolve_tokenizer(tokenizer, self.model)
        cfg = self.model.config
        self.layers = list(range(cfg.num_hidden_layers))
        self.heads = int(cfg.num_attention_heads)
        self.max_tokens = max_tokens
        self.max_labels = max_labels
        self.progress = progress
        self.layer = 0 if layer is None else check_choice(layer, self.layers, "layer")
        self.head: int | None = None
        self.set_head(head)
        self.query: int | None = None
        self.ids = np.zeros((1, 0), np.int64)
        self.tokens: list[str] = []
        self._traces: dict[int, Any] = {}
        self.text = default_text(self.tokenizer, cfg.vocab_size, DEFAULT_TEXT, 80) \
            if text is None else text
        self.set_text(self.text)

    # ----------------------------------------------------------------- state changes
    def set_text(self, text: str) -> None:
        """Tokenise and run ``text``; the query focus moves to the last token."""
        self.text = text
        self.set_ids(encode(self.tokenizer, text, self.model.config.vocab_size,
                            self.max_tokens))

    def set_ids(self, ids: Any) -> None:
        self.ids = np.asarray(ids, dtype=np.int64).reshape(1, -1)
        self.tokens = token_strings(self.tokenizer, self.ids[0])
        self._traces = {}
        self.query = len(self.tokens) - 1
        self.trace  # noqa: B018 - capture the current layer now

    def set_layer(self, layer: int) -> None:
        self.layer = int(check_choice(int(layer), self.layers, "layer"))

    def set_head(self, head: int | None) -> None:
        """Show one head, or the mean over heads (None or -1)."""
        if head is None or int(head) < 0:
            self.head = None
        else:
            self.head = int(check_choice(int(head), range(self.heads), "head"))

    def set_query(self, position: int | None) -> None:
        """Focus one query token (None: no focus row, the last token in the query view)."""
        self.query = None if position is None else check_position(position, len(self.tokens),
                                                                   "query position")

    # ----------------------------------------------------------------- derived data
    @property
    def trace(self) -> Any:
        """The trace holding the selected layer's pattern (run on first use)."""
        if self.layer not in self._traces:
            if self.progress:
                self.progress(0.3, f"capturing layer {self.layer} attention")
            name = f"layers.{self.layer}.attn.pattern"
            self._traces[self.layer] = self.model.run(self.ids, capture=[name]).trace
            if self.progress:
                self.progress(1.0, "pattern captured")
        return self._traces[self.layer]

    @property
    def chunk(self) -> int | None:
        """The selected layer's attention chunk (None for a global layer)."""
        return self.model.config.chunk_size(self.layer)

    def layer_type(self) -> str:
        """"chunked RoPE (chunk 64)", "global NoPE" or "global RoPE"."""
        return plots.layer_type_text(self.trace, self.layer)

    def pattern(self) -> np.ndarray:
        """(T, T) pattern of the selected head (or the head mean)."""
        a = np.asarray(self.trace[f"layers.{self.layer}.attn.pattern"], dtype=np.float64)[0]
        return a.mean(axis=0) if self.head is None else a[self.head]

    def query_weights(self) -> np.ndarray:
        """Attention of the focus query (default: last token) over all keys, (T,)."""
        q = len(self.tokens) - 1 if self.query is None else self.query
        return self.pattern()[q]

    def top_keys(self, n: int = 5) -> list[tuple[int, str, float]]:
        """The focus query's ``n`` most attended keys: (position, token, weight)."""
        w = self.query_weights()
        order = np.argsort(-w, kind="stable")[:n]
        return [(int(k), self.tokens[k], float(w[k])) for k in order if w[k] > 0]

    def top_keys_html(self, n: int = 5) -> str:
        q = len(self.tokens) - 1 if self.query is None else self.query
        rows = [[k, s, f"{w:.3f}"] for k, s, w in self.top_keys(n)]
        return (f"<b>query {q} {self.tokens[q]!r}</b> ({self.layer_type()})"
                + table_html(["key", "token", "weight"], rows))

    # ----------------------------------------------------------------- figures
    def render_pattern(self) -> Figure:
        """The pattern heatmap with token labels, chunk boundaries (dashed) and the focus query
        row outlined (gid ``"query-focus"``)."""
        fig = plots.attention_pattern(self.trace, self.layer, self.head, tokens=self.tokens,
                                      max_labels=self.max_labels, chunk=self.chunk or 0)
        if self.query is not None:
            ax = fig.axes[0]
            T = len(self.tokens)
            ax.axhspan(self.query - 0.5, self.query + 0.5, xmin=0, xmax=(self.query + 1) / T,
                       facecolor="none", edgecolor=WARN, lw=1.6, gid="query-focus")
        return fig

    def render_query(self) -> Figure:
        """Bars: the focus query's attention over the keys up to itself; chunk boundaries
        dashed, the most attended keys labelled."""
        w = self.query_weights()
        T = len(w)
        q = T - 1 if self.query is None else self.query
        w = w[:q + 1]
        fig = new_figure((min(12.0, max(6.0, 0.08 * (q + 1) + 3.0)), 2.8))
        ax = fig.add_subplot()
        ax.bar(range(q + 1), w, color="#6a51a3", width=0.85)
        for b in chunk_boundaries(q + 1, self.chunk):
            ax.axvline(b - 0.5, color=BOUNDARY, ls="--", lw=1.0, gid="chunk-boundary")
        for k, s, wk in self.top_keys(5):
            ax.annotate(s, (k, wk), xytext=(0, 2), textcoords="offset points", ha="center",
                        va="bottom", fontsize=FONT_SIZES["annotation"], family="monospace",
                        rotation=60, parse_math=False)
        ax.axvline(q, color=WARN, lw=1.0, ls=":")
        ax.set_xlim(-0.5, q + 0.5)
        ax.set_ylim(0, max(float(w.max()) * 1.35, 1e-6))
        ax.set_xlabel("key position")
        ax.set_ylabel("attention")
        who = "mean of heads" if self.head is None else f"head {self.head}"
        ax.set_title(f"Layer {self.layer}, {self.layer_type()}, {who}: query {q} "
                     f"{self.tokens[q]!r} over keys 0..{q}", fontsize=FONT_SIZES["title"] - 1)
        return fig


class AttentionExplorer(Explorer):
    """Layer and head selectors, the pattern heatmap with chunk boundaries, the layer's
    RoPE/NoPE type and a query token in focus."""

    def __init__(self, model: Any = None, tokenizer: Any = None, text: str | None = None,
                 layer: int | None = None, **kwargs: Any):
        super().__init__("Attention explorer")
        self.state = AttentionState(model, tokenizer, text, layer, progress=self.report,
                                    **kwargs)
        s = self.state
        self.text_controls(s.text, "70px")
        self.layer_slider = _layer_slider(s.layers, s.layer)
        self.head_picker = widgets.Dropdown(
            options=[("mean of heads", -1)] + [(f"head {h}", h) for h in range(s.heads)],
            value=-1, description="head")
        self.query_picker = widgets.Dropdown(options=self._query_options(), value=s.query,
                                             description="query")
        self.layer_type = widgets.HTML()
        self.pattern_image = self.image()
        self.query_image = self.image()
        self.keys_table = widgets.HTML()
        self.run_button.on_click(self.callback("running the model", self.run_text))
        self.bind(self.layer_slider, "changing the layer", "set_layer")
        self.bind(self.head_picker, "changing the head", "set_head")
        self.bind(self.query_picker, "focusing the query", "set_query")
        self.children = [
            self.header(),
            widgets.HBox([self.run_button]),
            self.text,
            widgets.HBox([self.layer_slider, self.head_picker, self.query_picker]),
            self.layer_type,
            widgets.HBox([self.pattern_image, self.keys_table]),
            self.query_image,
            *self.footer(),
        ]
        self.guard("drawing", self.refresh)

    def _query_options(self) -> list[tuple[str, int | None]]:
        return [("(none)", None)] + [(f"{p}: {t}", p) for p, t in enumerate(self.state.tokens)]

    def refresh(self) -> None:
        """Set the controls from the state and redraw (also after driving ``state`` from
        code)."""
        s = self.state
        with self.quiet():
            self.text.value = s.text
            self.layer_slider.value = s.layer
            self.head_picker.value = -1 if s.head is None else s.head
            self.query_picker.options = self._query_options()
            self.query_picker.value = s.query
        kind = s.layer_type()
        color = "#1f77b4" if "chunked" in kind else "#d62728"
        self.layer_type.value = (f"layer {s.layer}: <b style='color:{color}'>{kind}</b>"
                                 + (f" — keys in chunks of {s.chunk}" if s.chunk else
                                    " — every earlier token is visible"))
        self.show(self.pattern_image, s.render_pattern())
        self.show(self.query_image, s.render_query())
        self.keys_table.value = s.top_keys_html()

