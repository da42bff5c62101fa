"""Parity explorer: PyTorch vs JAX (or fp32 vs bf16) on one text — per-hook errors per layer,
tokens whose expert choice flips, with their router margins.

:class:`ParityState` is the browser-free logic; :class:`ParityExplorer` its front end. The
second model's other precision is loaded lazily from its checkpoint ``path`` when first asked
for.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import ipywidgets as widgets
import numpy as np
from matplotlib.figure import Figure

from .. import plots
from ..parity import margins
from ..plots.style import FONT_SIZES, REFERENCE, WARN, new_figure
from ._common import (
    PROMPTS,
    Progress,
    check_choice,
    default_text,
    encode,
    resolve_model,
    resolve_tokenizer,
    table_html,
    token_strings,
)
from ._ui import Explorer
from .routing import _layer_slider

DTYPES = ("float32", "bfloat16")


class ParityState:
    """Compare ``model_a`` with ``model_b`` (in the chosen dtype) on one text.

    ``variants``: the second model already loaded in other dtypes (else loaded on demand).
    """

    def __init__(self, model_a: Any = None, model_b: Any = None, tokenizer: Any = None,
                 text: str | None = None, dtype: str | None = None, max_tokens: int = 128,
                 variants: Sequence[Any] = (), progress: Progress | None = None):
        self.model_a = resolve_model(model_a, backend="torch")
        b = resolve_model(model_b, backend="jax")
        self.tokenizer = resolve_tokenizer(tokenizer, self.model_a)
        self._models: dict[str, Any] = {b.dtype: b}
        for v in variants:
            if v.backend != b.backend or v.config.summary() != b.config.summary():
                raise ValueError("variants must be the second model in other dtypes")
            self._models.setdefault(v.dtype, v)
        self.backend_b = b.backend
        self.path_b = getattr(b, "path", None)
        self.layers = [int(i) for i in self.model_a.config.moe_layers]
        self.layer = self.layers[0] if self.layers else 0
        self.max_tokens = max_tokens
        self.progress = progress
        self.dtype = b.dtype if dtype is None else check_choice(dtype, DTYPES, "dtype")
        vocab = self.model_a.config.vocab_size
        self.text = default_text(self.tokenizer, vocab, PROMPTS["code"]) if text is None \
            else text
        self.ids = encode(self.tokenizer, self.text, vocab, max_tokens)
        self.report: Any = None
        self.trace_a: Any = None
        self.update()

    # ----------------------------------------------------------------- state changes
    @property
    def model_b(self) -> Any:
        """The second model in the selected dtype (loaded from its path on first use)."""
        if self.dtype not in self._models:
            if self.path_b is None:
                raise ValueError(f"the second model has no checkpoint path, so its {self.dtype} "
                                 "variant cannot be loaded; pass a model loaded in that dtype")
            import workbench as wb
            self._step(0.1, f"loading the {self.dtype} {self.backend_b} model")
            self._models[self.dtype] = wb.load(self.path_b, backend=self.backend_b,
                                               dtype=self.dtype)
        return self._models[self.dtype]

    def set_text(self, text: str) -> None:
        self.text = text
        self.ids = encode(self.tokenizer, text, self.model_a.config.vocab_size,
                          self.max_tokens)
        self.update()

    def set_dtype(self, dtype: str) -> None:
        """Compare against the second model in ``dtype`` ("float32" or "bfloat16")."""
        self.dtype = check_choice(dtype, DTYPES, "dtype")
        self.update()

    def set_layer(self, layer: int) -> None:
        self.layer = int(check_choice(int(layer), self.layers, "MoE layer"))

    def update(self) -> None:
        """Run both models and rebuild the report."""
        import workbench as wb
        b = self.model_b
        self._step(0.4, f"running {self.model_a.backend} and {b.backend}/{b.dtype}")
        self.report = wb.compare(self.model_a, b, self.ids)
        self._step(0.8, "routing margins")
        self.trace_a = self.model_a.run(self.ids, capture=["*.moe.router_logits"]).trace
        self._step(1.0, "report ready")

    def _step(self, frac: float, msg: str) -> None:
        if self.progress:
            self.progress(frac, msg)

    # ----------------------------------------------------------------- derived data
    @property
    def tokens(self) -> list[str]:
        return token_strings(self.tokenizer, self.ids[0])

    def flips(self, layer: int | None = None) -> list[Any]:
        """Routing flips of the report (of one layer when given)."""
        return [f for f in self.report.flips if layer is None or f.layer == layer]

    def summary(self) -> str:
        return self.report.summary(max_rows=12)

    def flips_html(self) -> str:
        """Every flip as an HTML table; flips at a wide margin (bugs) in red."""
        toks = self.tokens
        rows = [[f.layer, f.position, toks[f.position] if f.batch == 0 else f.token,
                 f"{f.experts_a} → {f.experts_b}", f"{f.margin_a:.2e}", f"{f.margin_b:.2e}",
                 "near-tie" if f.near_tie else "WIDE MARGIN"] for f in self.flips()]
        r = self.report
        head = (f"<b>{r.label_a} vs {r.label_b}</b>: worst hook "
                f"{r.worst.name if r.worst else '-'} rel {r.worst.rel if r.worst else 0:.2e} "
                f"(tolerance {r.tol:g}); next-token agreement {r.next_token_agreement:.1%}; "
                f"<b>{'OK' if r.ok else 'OUT OF TOLERANCE'}</b><br>")
        return head + table_html(["layer", "pos", "token", "experts a → b", "margin a",
                                  "margin b", "kind"], rows, empty="no routing flips",
                                 highlight=[not f.near_tie for f in self.flips()])

    # ----------------------------------------------------------------- figures
    def render_errors(self) -> Figure:
        """Relative error per hook and layer against the tolerance (plots.parity_errors)."""
        return plots.parity_errors(self.report)

    def render_flips(self) -> Figure:
        """Router margin of every token at the selected layer (model a, log scale), flipped
        tokens highlighted in red with their tokens and experts a → b; the near-tie threshold
        dashed."""
        toks = self.tokens
        m = margins(np.asarray(self.trace_a[f"layers.{self.layer}.moe.router_logits"])[0])
        floor = max(float(m[m > 0].min()) / 2 if (m > 0).any() else 1e-6, 1e-8)
        fig = new_figure((min(12.0, max(6.0, 0.07 * len(m) + 3.0)), 3.2))
        ax = fig.add_subplot()
        ax.scatter(range(len(m)), np.maximum(m, floor), s=12, color=REFERENCE, zorder=2,
                   label="tokens")
        flips = self.flips(self.layer)
        for i, f in enumerate(flips):
            if f.batch != 0:
                continue
            y = max(f.margin_a, floor)
            ax.scatter([f.position], [y], s=70, color=WARN, edgecolors="black", zorder=3,
                       label="flipped" if i == 0 else None, gid="flip")
            ax.annotate(f"{toks[f.position]}\nE{f.experts_a[0]}→E{f.experts_b[0]}",
                        (f.position, y), xytext=(0, 6), textcoords="offset points",
                        ha="center", fontsize=FONT_SIZES["annotation"], color=WARN,
                        parse_math=False)
        ax.axhline(self.report.near_tie, color=WARN, ls="--", lw=1.0,
                   label=f"near-tie threshold {self.report.near_tie:g}")
        ax.set_yscale("log")
        ax.set_xlabel("token position")
        ax.set_ylabel("router margin z(1) − z(2)")
        ax.set_title(f"Layer {self.layer}: {len(flips)} routing flip(s), "
                     f"{self.report.label_a} vs {self.report.label_b}",
                     fontsize=FONT_SIZES["title"] - 1)
        ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
        return fig


class ParityExplorer(Explorer):
    """Per-hook errors, flipped tokens with margins, and a dtype switch for the second
    model."""

    def __init__(self, torch_model: Any = None, jax_model: Any = None, tokenizer: Any = None,
                 text: str | None = None, **kwargs: Any):
        super().__init__("Parity explorer")
        self.state = ParityState(torch_model, jax_model, tokenizer, text,
                                 progress=self.report, **kwargs)
        s = self.state
        self.text_controls(s.text, label="Compare")
        self.dtype_toggle = widgets.ToggleButtons(options=list(DTYPES), value=s.dtype,
                                                  description="model b")
        self.layer_slider = _layer_slider(s.layers, s.layer) if s.layers else \
            widgets.IntSlider(disabled=True)
        self.errors_image = self.image()
        self.flips_image = self.image()
        self.flips_table = widgets.HTML()
        self.run_button.on_click(self.callback("comparing", self.run_text))
        self.bind(self.dtype_toggle, "switching the dtype", "set_dtype")
        self.layer_slider.observe(self.callback("changing the layer", self._on_layer), "value")
        self.children = [
            self.header(),
            widgets.HBox([self.run_button, self.dtype_toggle]),
            self.text,
            self.errors_image,
            self.layer_slider,
            self.flips_image,
            self.flips_table,
            *self.footer(),
        ]
        self.guard("drawing", self.refresh)

    def refresh(self) -> None:
        """Set the controls from the state and redraw (also after driving ``state`` from
        code)."""
        s = self.state
        with self.quiet():
            self.text.value = s.text
            self.dtype_toggle.value = s.dtype
            if s.layers:
                self.layer_slider.value = s.layer
        self.show(self.errors_image, s.render_errors())
        self.show(self.flips_image, s.render_flips())
        self.flips_table.value = s.flips_html()

    def _on_layer(self) -> None:
        self.state.set_layer(self.layer_slider.value)
        self.show(self.flips_image, self.state.render_flips())
