"""Routing explorer: tokens coloured by expert, one token's path through the layers, load bars.

:class:`RoutingState` holds the logic (run the model, pick layer and token, render figures) and
is usable without a browser; :class:`RoutingExplorer` is its ipywidgets front end.
"""

from __future__ import annotations

from typing import Any

import ipywidgets as widgets
import numpy as np
from matplotlib.figure import Figure

from .. import plots
from ..analysis import NEAR_TIE_EPS, expert_load
from ..plots.style import FONT_SIZES, REFERENCE, WARN, expert_color, new_figure
from ._common import (
    PROMPTS,
    Progress,
    check_choice,
    check_position,
    default_text,
    encode,
    outline,
    resolve_model,
    resolve_tokenizer,
    table_html,
    token_strings,
)
from ._ui import Explorer

CAPTURE = ["*.moe.router_logits", "*.moe.topk_indices", "*.moe.topk_scores"]


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


class RoutingState:
    """Routing of one text: which expert each token goes to, per MoE layer.

    ``set_text`` runs the model (capturing router logits, chosen experts and gates);
    ``set_layer`` and ``select_token`` pick what the figures show.
    """

    def __init__(self, model: Any = None, tokenizer: Any = None, text: str | None = None,
                 layer: int | None = None, max_tokens: int = 256, eps: float = NEAR_TIE_EPS,
                 progress: Progress | None = None):
        self.model = resolve_model(model)
        self.tokenizer = resolve_tokenizer(tokenizer, self.model)
        self.layers: list[int] = [int(i) for i in self.model.config.moe_layers]
        if not self.layers:
            raise ValueError("the model has no MoE layer: nothing to explore")
        self.max_tokens = max_tokens
        self.eps = eps
        self.progress = progress
        self.layer = self.layers[0] if layer is None else check_choice(layer, self.layers,
                                                                       "MoE layer")
        self.position = 0
        self.text = ""
        self.trace: Any = None
        self.tokens: list[str] = []
        self.set_text(default_text(self.tokenizer, self.model.config.vocab_size,
                                   PROMPTS["code"]) if text is None else text)

    # ----------------------------------------------------------------- state changes
    def set_text(self, text: str) -> None:
        """Tokenise ``text``, run the model and keep its routing; selects the last token."""
        ids = encode(self.tokenizer, text, self.model.config.vocab_size, self.max_tokens)
        self.set_ids(ids, text)

    def set_ids(self, ids: Any, text: str | None = None) -> None:
        """Run the model on token ids (1, T) directly."""
        if self.progress:
            self.progress(0.2, f"running the model on {np.asarray(ids).shape[-1]} tokens")
        out = self.model.run(ids, capture=CAPTURE)
        self.trace = out.trace
        self.image = None
        self.text = text if text is not None else " ".join(str(int(i)) for i in self.ids)
        self.tokens = token_strings(self.tokenizer, self.ids)
        self.position = len(self.tokens) - 1
        if self.progress:
            self.progress(1.0, "routing captured")

    def set_image(self, image: Any, text: str = "<|image|> ") -> None:
        """Run the model on an image (H, W, 3) and ``text`` (``<|image|>`` marks where the
        image goes): its patches and tokens both show, the patch grid coloured by expert."""
        from ..vision.processor import Processor
        if not getattr(self.model, "has_vision", False):
            raise ValueError("this model has no vision tower: load a multimodal checkpoint "
                             "(e.g. data/scout-mini-vision) to explore images")
        if "<|image|>" not in text:
            text = "<|image|>" + text
        ids, pv = Processor.from_pretrained(self.model.path)(text, [image])
        out = self.model.run(ids, pixel_values=pv, capture=[*CAPTURE, "token_modality"])
        self.trace = out.trace
        arr = np.asarray(image, dtype=np.float64)
        self.image = arr / 255.0 if arr.max() > 1 else arr
        self.text = text
        self.tokens = token_strings(self.tokenizer, self.ids)
        self.position = len(self.tokens) - 1

    def render_image(self) -> Any:
        """The image with its patches coloured by top-1 expert at the selected layer (None
        without an image)."""
        if self.image is None:
            return None
        from ..plots.modality import patch_expert_overlay
        return patch_expert_overlay(self.trace, self.image, [self.layer])

    def set_layer(self, layer: int) -> None:
        self.layer = int(check_choice(int(layer), self.layers, "MoE layer"))

    def select_token(self, position: int) -> None:
        """Select the token at ``position`` (negative counts from the end)."""
        self.position = check_position(position, len(self.tokens), "token position")

    # ----------------------------------------------------------------- derived data
    @property
    def ids(self) -> np.ndarray:
        return np.asarray(self.trace.input_ids)[0]

    def experts(self, layer: int | None = None) -> np.ndarray:
        """Top-1 expert of every token at ``layer`` (default: the selected layer), (T,)."""
        layer = self.layer if layer is None else layer
        return np.asarray(self.trace.routing(layer).indices)[0, :, 0].astype(np.int64)

    def path(self, position: int | None = None) -> list[dict[str, Any]]:
        """The token's route: per MoE layer its experts, gates, top-1/top-2 margin, near-tie."""
        pos = self.position if position is None else check_position(position, len(self.tokens))
        rows = []
        for i in self.layers:
            r = self.trace.routing(i)
            logits = np.asarray(r.logits, dtype=np.float64)[0, pos]
            z = np.sort(logits)
            margin = float(z[-1] - z[-2]) if z.size > 1 else float("inf")
            experts = [int(e) for e in np.asarray(r.indices)[0, pos]]
            gates = [float(g) for g in np.asarray(r.scores, dtype=np.float64)[0, pos]]
            rows.append({"layer": i, "experts": experts, "gates": gates, "margin": margin,
                         "near_tie": margin < self.eps})
        return rows

    def path_html(self) -> str:
        """The selected token's route as an HTML table (near-ties in red)."""
        rows = self.path()
        return table_html(
            ["layer", "experts", "gates", "margin z(1)−z(2)"],
            [[r["layer"], ", ".join(f"E{e}" for e in r["experts"]),
              ", ".join(f"{g:.3f}" for g in r["gates"]), f"{r['margin']:.3g}"] for r in rows],
            highlight=[r["near_tie"] for r in rows])

    def token_options(self) -> list[tuple[str, int]]:
        """(label, position) pairs for a token picker."""
        return [(f"{p}: {s}", p) for p, s in enumerate(self.tokens)]

    # ----------------------------------------------------------------- figures
    def render_tokens(self) -> Figure:
        """The text with each token coloured by its top-1 expert at the selected layer; the
        selected token outlined in black."""
        fig = plots.token_routing_text(self.trace, self.layer, tokens=self.tokens,
                                       eps=self.eps, max_tokens=self.max_tokens)
        outline(fig.axes[0], [self.position], len(self.tokens))
        return fig

    def render_path(self, max_annotated: int = 12) -> Figure:
        """The selected token through the layers: gate σ(z) of every expert per layer (shading),
        chosen experts marked and joined; with at most ``max_annotated`` layers each choice is
        annotated with its gate and router margin (near-ties: red text, dashed outline). The
        figure stays within 14 × 8 inches at any depth and width (Maverick: 24 × 128)."""
        E = int(self.model.config.num_local_experts)
        rows = self.path()
        L = len(self.layers)
        probs = np.stack([_sigmoid(np.asarray(self.trace.routing(i).logits,
                                              dtype=np.float64)[0, self.position])
                          for i in self.layers], axis=1)  # (E, L)
        big = L > max_annotated
        fig = new_figure((min(14.0, max(4.8, (0.28 if big else 1.3) * L + 2.4)),
                          min(8.0, max(3.2, (0.06 if E > 32 else 0.3) * E + 1.6))))
        ax = fig.add_subplot()
        im = ax.imshow(probs, cmap="Greys", vmin=0.0, vmax=1.0, aspect="auto",
                       extent=(-0.5, L - 0.5, E - 0.5, -0.5))
        top1 = [r["experts"][0] for r in rows]
        ax.plot(range(L), top1, "-", color=REFERENCE, lw=1.2, zorder=2, gid="token-path")
        for x, r in enumerate(rows):
            for slot, (e, g) in enumerate(zip(r["experts"], r["gates"])):
                ax.scatter([x], [e], s=(170 if slot == 0 else 90) / (3 if big else 1),
                           color=expert_color(e), edgecolors="black", linewidths=1.5,
                           linestyle="--" if r["near_tie"] else "-", zorder=3)
                if slot == 0 and not big:
                    ax.annotate(f"g {g:.2f}\nΔ {r['margin']:.2g}", (x, e), xytext=(10, 0),
                                textcoords="offset points", va="center",
                                fontsize=FONT_SIZES["annotation"],
                                color=WARN if r["near_tie"] else "black")
        step = max(1, int(np.ceil(L / 24)))
        ax.set_xticks(range(0, L, step), [f"L{i}" for i in self.layers[::step]],
                      rotation=90 if L > 16 else 0)
        if E <= 32:
            ax.set_yticks(range(E), [f"E{e}" for e in range(E)])
        ax.set_xlabel("MoE layer")
        ax.set_ylabel("expert")
        tok = self.tokens[self.position]
        ties = sum(r["near_tie"] for r in rows)
        ax.set_title(f"Path of token {self.position} {tok!r}\n"
                     + ("(g = gate, Δ = top-1 − top-2 router logit; red = near-tie)" if not big
                        else f"({ties} near-tie layer(s): dashed outline; see the table)"),
                     fontsize=FONT_SIZES["title"] - 1)
        cb = fig.colorbar(im, ax=ax, pad=0.02)
        cb.set_label("σ(router logit)")
        return fig

    def render_load(self, max_layers: int = 8, max_bars: int = 16) -> Figure:
        """Per-layer expert load of this text as bars (selected layer framed, the selected
        token's expert hatched); at most ``max_layers`` panels around the selected layer.
        Above ``max_bars`` experts, one layer × expert heatmap of all layers instead, the
        selected token's expert ringed in each row and the selected layer marked."""
        E = int(self.model.config.num_local_experts)
        if E > max_bars:
            return self._load_heatmap()
        k = self.layers.index(self.layer)
        lo = max(0, min(k - max_layers // 2, len(self.layers) - max_layers))
        shown = self.layers[lo:lo + max_layers]
        fig = new_figure((min(14.0, 2.4 * len(shown) + 1.0), 2.6))
        axes = np.atleast_1d(fig.subplots(1, len(shown), sharey=True))
        colors = [expert_color(e) for e in range(E)]
        for ax, i in zip(axes, shown):
            load = expert_load(self.trace, i)
            bars = ax.bar(range(E), load, color=colors, width=0.8)
            chosen = self.path()[self.layers.index(i)]["experts"][0]
            bars[chosen].set_hatch("///")
            bars[chosen].set_edgecolor("black")
            ax.axhline(1.0 / E, color=REFERENCE, ls=":", lw=0.9)
            ax.set_title(f"L{i}", fontsize=FONT_SIZES["label"],
                         fontweight="bold" if i == self.layer else "normal")
            ax.set_xticks(range(E), [str(e) for e in range(E)] if E <= 16 else [""] * E,
                          fontsize=FONT_SIZES["annotation"])
            if i == self.layer:
                for s in ax.spines.values():
                    s.set_visible(True)
                    s.set_linewidth(2.0)
        axes[0].set_ylabel("share of tokens")
        fig.suptitle(f"Expert load on this text ({len(self.tokens)} tokens; dotted = 1/E; "
                     "hatched = selected token's expert)", fontsize=FONT_SIZES["label"])
        return fig


    def _load_heatmap(self) -> Figure:
        from ..plots.routing import _ratio_norm, ratio_colorbar
        E = int(self.model.config.num_local_experts)
        L = len(self.layers)
        ratio = np.stack([expert_load(self.trace, i) for i in self.layers]) * E
        fig = new_figure((min(14.0, 0.06 * E + 4.0), min(7.0, 0.14 * L + 1.8)))
        ax = fig.add_subplot()
        im = ax.imshow(ratio, cmap="RdBu_r", norm=_ratio_norm(ratio), aspect="auto",
                       interpolation="nearest")
        chosen = [r["experts"][0] for r in self.path()]
        ax.scatter(chosen, range(L), s=22, facecolors="none", edgecolors="black", lw=1.2,
                   gid="selected-token")
        k = self.layers.index(self.layer)
        ax.axhspan(k - 0.5, k + 0.5, fill=False, ec="black", lw=1.5, gid="selected-layer")
        step = max(1, int(np.ceil(L / 24)))
        ax.set_yticks(range(0, L, step), [f"L{i}" for i in self.layers[::step]])
        ax.set_xlabel("expert")
        ratio_colorbar(fig, im, ax, "load ÷ uniform (log)")
        ax.set_title(f"Expert load on this text ({len(self.tokens)} tokens); circles = selected "
                     "token's expert, box = selected layer", fontsize=FONT_SIZES["label"])
        return fig


def _hex(rgba: tuple[float, ...]) -> str:
    return "#" + "".join(f"{int(round(255 * c)):02x}" for c in rgba[:3])


def _ink(rgba: tuple[float, ...]) -> str:
    """Black or white text, whichever reads better on ``rgba``."""
    r, g, b = rgba[:3]
    return "black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.55 else "white"


def _shown(token: str) -> str:
    """A token as a button label: spaces and line breaks made visible, never empty."""
    return token.replace(" ", "·").replace("\n", "⏎").replace("\t", "⇥") or "∅"


class RoutingExplorer(Explorer):
    """Explore routing interactively: text box and prompt picker, layer slider; the tokens as
    buttons coloured by their top-1 expert (click one to follow it), the selected token's path
    and per-layer load bars."""

    def __init__(self, model: Any = None, tokenizer: Any = None, text: str | None = None,
                 layer: int | None = None, image: Any = None, **kwargs: Any):
        super().__init__("Routing explorer")
        self.state = RoutingState(model, tokenizer, text, layer, progress=self.report, **kwargs)
        s = self.state
        if image is not None:  # an image plus text: the patch grid and the tokens
            s.set_image(image, text or "<|image|> ")
        self.prompt = widgets.Dropdown(options=["(custom)", *PROMPTS], value="(custom)",
                                       description="prompt")
        self.text_controls(s.text, "70px")
        self.layer_slider = _layer_slider(s.layers, s.layer)
        self.legend = widgets.HTML()
        self.token_buttons: list[widgets.Button] = []
        self.token_box = widgets.Box(layout=widgets.Layout(flex_flow="row wrap", width="100%"))
        self.patch_image = self.image()
        self.path_image = self.image()
        self.load_image = self.image()
        self.path_table = widgets.HTML()
        self.prompt.observe(self.callback("loading the prompt", self._on_prompt), "value")
        self.run_button.on_click(self.callback("running the model", self.run_text))
        self.layer_slider.observe(self.callback("changing the layer", self._on_layer), "value")
        self.children = [
            self.header(),
            widgets.HBox([self.prompt, self.run_button]),
            self.text,
            self.layer_slider,
            self.patch_image,
            self.legend,
            self.token_box,
            widgets.HBox([self.path_image, self.path_table]),
            self.load_image,
            *self.footer(),
        ]
        self.guard("drawing", self.refresh)

    def refresh(self) -> None:
        """Set the controls from the state and redraw everything (call it after driving
        ``explorer.state`` from code)."""
        s = self.state
        with self.quiet():
            self.text.value = s.text
            self.layer_slider.value = s.layer
            self.prompt.value = next((n for n, t in PROMPTS.items() if t == s.text),
                                     "(custom)")
        if len(self.token_buttons) != len(s.tokens) or \
                [b.description for b in self.token_buttons] != [_shown(t) for t in s.tokens]:
            self._build_tokens()
        self.style_tokens()
        self._show_patches()
        self.refresh_token()

    def _build_tokens(self) -> None:
        """One button per token (clicking selects it)."""
        buttons = []
        for p, tok in enumerate(self.state.tokens):
            b = widgets.Button(description=_shown(tok),
                               layout=widgets.Layout(width="auto", height="30px",
                                                     margin="1px", padding="0 5px"))
            b.style.font_size = "15px"
            b.on_click(self.callback(f"selecting token {p}", self._selector(p)))
            buttons.append(b)
        self.token_buttons = buttons
        self.token_box.children = buttons

    def _selector(self, p: int) -> Any:
        def run() -> None:
            self.select(p)
        return run

    def select(self, position: int) -> None:
        """Select the token at ``position`` (what clicking its button does) and redraw."""
        self.state.select_token(position)
        self.style_tokens()
        self.refresh_token()

    def style_tokens(self) -> None:
        """Colour each token button by its top-1 expert at the selected layer; frame the
        selected token, dash-frame near-ties."""
        s = self.state
        experts = s.experts()
        r = s.trace.routing(s.layer)
        z = np.sort(np.asarray(r.logits, dtype=np.float64)[0], axis=-1)
        margins = z[:, -1] - z[:, -2] if z.shape[-1] > 1 else np.full(len(z), np.inf)
        for p, b in enumerate(self.token_buttons):
            c = expert_color(int(experts[p]))
            b.style.button_color = _hex(c)
            b.style.text_color = _ink(c)
            b.style.font_weight = "bold" if p == s.position else "normal"
            b.layout.border = ("3px solid black" if p == s.position else
                               f"2px dashed {WARN}" if margins[p] < s.eps else "1px solid #ccc")
            b.tooltip = (f"position {p}: {s.tokens[p]!r} → E{int(experts[p])} at layer "
                         f"{s.layer} (margin {margins[p]:.3g})")
        self.legend.value = (
            f"<span style='font-size:14px'>tokens coloured by their top-1 expert at layer "
            f"<b>{s.layer}</b>; <b>click a token</b> to follow it through the layers "
            f"(selected: <b>{s.position}</b> {s.tokens[s.position]!r}; black frame = selected, "
            f"dashed red = near-tie)</span>")

    def _show_patches(self) -> None:
        fig = self.state.render_image()
        self.patch_image.layout.display = "none" if fig is None else None
        if fig is not None:
            self.show(self.patch_image, fig)

    def refresh_token(self) -> None:
        s = self.state
        self.show(self.path_image, s.render_path())
        self.show(self.load_image, s.render_load())
        self.path_table.value = s.path_html()

    def _on_prompt(self) -> None:
        if self.prompt.value in PROMPTS:
            self.text.value = PROMPTS[self.prompt.value]
            self.run_text()

    def _on_layer(self) -> None:
        self.state.set_layer(self.layer_slider.value)
        self._show_patches()
        self.style_tokens()
        self.show(self.load_image, self.state.render_load())


def _layer_slider(layers: list[int], value: int, description: str = "layer") -> widgets.Widget:
    """An IntSlider when the layers are evenly spaced (editable readout), else a
    SelectionSlider."""
    steps = {b - a for a, b in zip(layers[:-1], layers[1:])}
    if len(layers) == 1 or len(steps) == 1:
        step = steps.pop() if steps else 1
        return widgets.IntSlider(value=value, min=layers[0], max=max(layers[-1], layers[0]),
                                 step=step, description=description, continuous_update=False)
    return widgets.SelectionSlider(options=layers, value=value, description=description,
                                   continuous_update=False)
