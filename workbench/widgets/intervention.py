"""Intervention explorer: ban, force or zero experts and ablate heads with toggles, and see the
effect live — Δ next-token loss, changed next-token predictions and re-routed tokens.

:class:`InterventionState` is the browser-free logic; :class:`InterventionExplorer` its front
end.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import ipywidgets as widgets
import numpy as np
from matplotlib.figure import Figure

from .. import interventions as iv
from .. import plots
from ..analysis import next_token_loss
from ..plots._util import layer_ticks
from ..plots.style import FONT_SIZES, REFERENCE, WARN, layer_colors, new_figure
from ._common import (
    PROMPTS,
    Progress,
    check_choice,
    default_text,
    encode,
    outline,
    resolve_model,
    resolve_tokenizer,
    table_html,
    token_strings,
)
from ._ui import Explorer
from .routing import _layer_slider

CAPTURE = ["*.moe.topk_indices", "*.moe.router_logits"]
MODES = ("ban", "zero", "force")
MODE_STYLES = {"ban": "danger", "zero": "warning", "force": "success"}
"""ipywidgets button style of an expert toggle holding each kind of intervention."""
DONE = {"ban": "banned", "zero": "zeroed", "force": "forced"}


@dataclass
class Effect:
    """What the interventions changed against the clean run of the same text."""

    base_loss: float
    loss: float
    base_preds: np.ndarray  # (T-1,) argmax next-token ids, clean
    preds: np.ndarray  # (T-1,) with interventions
    base_logp: np.ndarray  # (T-1,) log-prob of the true next token, clean
    logp: np.ndarray
    rerouted: dict[int, np.ndarray]  # MoE layer -> positions whose top-1 expert changed

    @property
    def delta_loss(self) -> float:
        return self.loss - self.base_loss

    @property
    def changed(self) -> np.ndarray:
        """Positions whose argmax next-token prediction changed."""
        return np.flatnonzero(self.preds != self.base_preds)


def _log_probs(logits: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(argmax predictions, log-prob of the true next token) for positions 0..T-2."""
    z = logits[0, :-1].astype(np.float64)
    z = z - z.max(-1, keepdims=True)
    lse = np.log(np.exp(z).sum(-1))
    tgt = ids[0, 1:]
    return z.argmax(-1), z[np.arange(len(tgt)), tgt] - lse


class InterventionState:
    """A set of interventions toggled on and off, and their effect on one text."""

    def __init__(self, model: Any = None, tokenizer: Any = None, text: str | None = None,
                 layer: int | None = None, max_tokens: int = 128,
                 progress: Progress | None = None):
        self.model = resolve_model(model)
        self.tokenizer = resolve_tokenizer(tokenizer, self.model)
        cfg = self.model.config
        self.moe_layers = [int(i) for i in cfg.moe_layers]
        self.layers = list(range(cfg.num_hidden_layers))
        self.experts = int(cfg.num_local_experts)
        self.heads = int(cfg.num_attention_heads)
        self.layer = (self.moe_layers[0] if self.moe_layers else 0) if layer is None else \
            check_choice(layer, self.layers, "layer")
        self.max_tokens = max_tokens
        self.progress = progress
        self.banned: set[tuple[int, int]] = set()
        self.zeroed: set[tuple[int, int]] = set()
        self.forced: dict[int, int] = {}
        self.ablated: set[tuple[int, int]] = set()
        self.ids = np.zeros((1, 0), np.int64)
        self._base: Any = None
        self.out: Any = None
        self.effect: Effect | None = None
        self.text = default_text(self.tokenizer, cfg.vocab_size, PROMPTS["prose"]) \
            if text is None else text
        self.set_text(self.text)

    # ----------------------------------------------------------------- toggles
    def _expert(self, layer: int, expert: int) -> tuple[int, int]:
        check_choice(int(layer), self.moe_layers, "MoE layer")
        check_choice(int(expert), range(self.experts), "expert")
        return int(layer), int(expert)

    def toggle_ban(self, layer: int, expert: int) -> bool:
        """Ban or un-ban an expert (its tokens re-route); returns whether it is now banned."""
        key = self._expert(layer, expert)
        self.banned ^= {key}
        return key in self.banned

    def toggle_zero(self, layer: int, expert: int) -> bool:
        """Zero or restore an expert's output (routing kept)."""
        key = self._expert(layer, expert)
        self.zeroed ^= {key}
        return key in self.zeroed

    def set_force(self, layer: int, expert: int | None) -> None:
        """Route every token of ``layer`` to ``expert`` first (None: stop forcing)."""
        if expert is None:
            self.forced.pop(int(check_choice(int(layer), self.moe_layers, "MoE layer")), None)
            return
        lay, e = self._expert(layer, expert)
        self.forced[lay] = e

    def toggle(self, mode: str, layer: int, expert: int) -> bool:
        """Toggle one expert (``mode``: "ban", "zero" or "force"); returns whether it now
        holds an intervention. An expert holds at most one: toggling an expert that holds
        any (whatever ``mode`` is selected now) removes it, so a toggle shown on always means
        an active intervention and off means none."""
        check_choice(mode, MODES, "mode")
        layer, expert = self._expert(layer, expert)
        if self.mode_of(layer, expert) is not None:
            self.remove(self.mode_of(layer, expert), layer, expert)
            return False
        if mode == "ban":
            return self.toggle_ban(layer, expert)
        if mode == "zero":
            return self.toggle_zero(layer, expert)
        self.set_force(layer, expert)
        return True

    def is_on(self, mode: str, layer: int, expert: int) -> bool:
        key = (int(layer), int(expert))
        return {"ban": key in self.banned, "zero": key in self.zeroed,
                "force": self.forced.get(key[0]) == key[1]}[mode]

    def mode_of(self, layer: int, expert: int) -> str | None:
        """The intervention one expert holds ("ban", "zero", "force"), or None."""
        return next((m for m in MODES if self.is_on(m, layer, expert)), None)

    def active(self) -> list[tuple[str, int, int]]:
        """Every active intervention as (kind, layer, expert or head), kinds "ban", "zero",
        "force" and "ablate", on every layer (not only the selected one)."""
        out = [("ban", lay, e) for lay, e in sorted(self.banned)]
        out += [("zero", lay, e) for lay, e in sorted(self.zeroed)]
        out += [("force", lay, e) for lay, e in sorted(self.forced.items())]
        out += [("ablate", lay, h) for lay, h in sorted(self.ablated)]
        return out

    def remove(self, kind: str, layer: int, index: int) -> None:
        """Remove one active intervention (an item of :meth:`active`)."""
        check_choice(kind, (*MODES, "ablate"), "intervention kind")
        key = (int(layer), int(index))
        if key not in {(lay, i) for k, lay, i in self.active() if k == kind}:
            raise ValueError(f"no {kind} intervention on layer {layer}, "
                             f"{'head' if kind == 'ablate' else 'expert'} {index}; active: "
                             f"{self.describe()}")
        if kind == "force":
            self.forced.pop(key[0])
        else:
            {"ban": self.banned, "zero": self.zeroed, "ablate": self.ablated}[kind].discard(key)

    def toggle_head(self, layer: int, head: int) -> bool:
        """Ablate or restore an attention head; returns whether it is now ablated."""
        key = (int(check_choice(int(layer), self.layers, "layer")),
               int(check_choice(int(head), range(self.heads), "head")))
        self.ablated ^= {key}
        return key in self.ablated

    def clear(self) -> None:
        """Remove every intervention."""
        self.banned.clear()
        self.zeroed.clear()
        self.forced.clear()
        self.ablated.clear()

    def set_layer(self, layer: int) -> None:
        self.layer = int(check_choice(int(layer), self.layers, "layer"))

    def interventions(self) -> list[Any]:
        """The active interventions as workbench intervention records."""
        out: list[Any] = [iv.ban_expert(lay, e) for lay, e in sorted(self.banned)]
        out += [iv.zero_expert(lay, e) for lay, e in sorted(self.zeroed)]
        out += [iv.force_expert(lay, e) for lay, e in sorted(self.forced.items())]
        out += [iv.ablate_head(lay, h) for lay, h in sorted(self.ablated)]
        return out

    def describe(self) -> str:
        items = [f"ban L{lay} E{e}" for lay, e in sorted(self.banned)]
        items += [f"zero L{lay} E{e}" for lay, e in sorted(self.zeroed)]
        items += [f"force L{lay} E{e}" for lay, e in sorted(self.forced.items())]
        items += [f"ablate L{lay} H{h}" for lay, h in sorted(self.ablated)]
        return ", ".join(items) or "none"

    # ----------------------------------------------------------------- running
    def set_text(self, text: str) -> None:
        """Tokenise ``text``, run the clean model once (cached) and update the effect."""
        self.text = text
        self.ids = encode(self.tokenizer, text, self.model.config.vocab_size, self.max_tokens)
        self._step(0.2, "clean run")
        self._base = self.model.run(self.ids, capture=CAPTURE)
        self.update()

    def update(self) -> Effect:
        """Run with the active interventions and compare with the clean run."""
        self._step(0.6, f"running with {len(self.interventions())} intervention(s)")
        out = self.model.run(self.ids, capture=CAPTURE, interventions=self.interventions())
        self.out = out
        bp, blp = _log_probs(self._base.logits, self.ids)
        p, lp = _log_probs(out.logits, self.ids)
        rerouted = {}
        for i in self.moe_layers:
            a = np.asarray(self._base.trace.routing(i).indices)[0, :, 0]
            b = np.asarray(out.trace.routing(i).indices)[0, :, 0]
            rerouted[i] = np.flatnonzero(a != b)
        self.effect = Effect(next_token_loss(self._base.logits, self.ids),
                             next_token_loss(out.logits, self.ids), bp, p, blp, lp, rerouted)
        self._step(1.0, "effect measured")
        return self.effect

    def _step(self, frac: float, msg: str) -> None:
        if self.progress:
            self.progress(frac, msg)

    # ----------------------------------------------------------------- views
    @property
    def tokens(self) -> list[str]:
        return token_strings(self.tokenizer, self.ids[0])

    def changed_predictions(self) -> list[dict[str, Any]]:
        """Positions whose predicted next token changed: context token, before, after and the
        change in log-probability of the true next token."""
        e = self.effect
        toks = self.tokens
        rows = []
        for t in e.changed:
            before, after = token_strings(self.tokenizer, [e.base_preds[t], e.preds[t]])
            rows.append({"position": int(t), "token": toks[t], "before": before,
                         "after": after, "true_next": toks[t + 1],
                         "delta_logp": float(e.logp[t] - e.base_logp[t])})
        return rows

    def summary_html(self) -> str:
        e = self.effect
        n = sum(len(v) for v in e.rerouted.values())
        color = WARN if e.delta_loss > 0 else "#2a7f2a"
        return (f"<b>interventions:</b> {self.describe()}<br>"
                f"<b>loss</b> {e.base_loss:.4f} → {e.loss:.4f} nats "
                f"(<b style='color:{color}'>Δ {e.delta_loss:+.4f}</b>), "
                f"<b>changed predictions</b> {len(e.changed)} of {len(e.preds)}, "
                f"<b>re-routed</b> {n} token-layer(s)")

    def predictions_html(self, limit: int = 30) -> str:
        rows = self.changed_predictions()[:limit]
        return table_html(["pos", "token", "before", "after", "true next", "Δ log p(true)"],
                          [[r["position"], r["token"], r["before"], r["after"], r["true_next"],
                            f"{r['delta_logp']:+.3f}"] for r in rows],
                          empty="no next-token prediction changed")

    def render_effect(self) -> Figure:
        """Left: share of tokens re-routed per MoE layer. Right: per position, the change in
        log-probability of the true next token (changed predictions in red)."""
        e = self.effect
        fig = new_figure((12.0, 3.0))
        ax_r, ax_p = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1, 3]})
        T = len(self.tokens)
        shares = [len(e.rerouted[i]) / T for i in self.moe_layers]
        ax_r.bar(range(len(shares)), shares, color=layer_colors(len(shares)))
        layer_ticks(ax_r, self.moe_layers, max_ticks=8)
        ax_r.set_ylim(0, 1)
        ax_r.set_ylabel("tokens re-routed")
        ax_r.set_title("re-routed (top-1 changed)", fontsize=FONT_SIZES["label"])
        d = e.logp - e.base_logp
        colors = [WARN if t in set(e.changed.tolist()) else "#4c72b0" for t in range(len(d))]
        ax_p.bar(range(len(d)), d, color=colors, width=0.85)
        ax_p.axhline(0, color=REFERENCE, lw=0.7)
        ax_p.set_xlim(-0.5, len(d) - 0.5)
        ax_p.set_xlabel("position (predicting the next token)")
        ax_p.set_ylabel("Δ log p(true next)")
        ax_p.set_title(f"Δ loss {e.delta_loss:+.4f} nats; red = prediction changed "
                       f"({len(e.changed)})", fontsize=FONT_SIZES["label"])
        fig.suptitle(f"Effect of: {self.describe()}", fontsize=FONT_SIZES["label"])
        return fig

    def render_tokens(self) -> Figure:
        """Tokens coloured by their expert at the selected MoE layer under the interventions,
        re-routed tokens outlined in black."""
        layer = self.layer if self.layer in self.moe_layers else self.moe_layers[0]
        toks = self.tokens
        fig = plots.token_routing_text(self.out.trace, layer, tokens=toks,
                                       max_tokens=self.max_tokens)
        outline(fig.axes[0], self.effect.rerouted[layer].tolist(), len(toks))
        fig.axes[0].set_title(f"Layer {layer} with interventions: tokens by top-1 expert "
                              "(black outline = re-routed)", loc="left",
                              fontsize=FONT_SIZES["title"])
        return fig


class InterventionExplorer(Explorer):
    """Toggle expert bans / forces / zeroes and head ablations for one layer at a time and see
    Δ loss, changed predictions and re-routed tokens update live."""

    def __init__(self, model: Any = None, tokenizer: Any = None, text: str | None = None,
                 layer: int | None = None, **kwargs: Any):
        super().__init__("Intervention explorer")
        self.state = InterventionState(model, tokenizer, text, layer, progress=self.report,
                                       **kwargs)
        s = self.state
        self.text_controls(s.text)
        self.clear_button = widgets.Button(description="Clear all", icon="times")
        self.layer_slider = _layer_slider(s.layers, s.layer)
        self.mode = widgets.ToggleButtons(options=list(MODES), value="ban",
                                          description="experts")
        self.expert_toggles = [widgets.ToggleButton(description=f"E{e}",
                                                    layout=widgets.Layout(width="72px"))
                               for e in range(s.experts)]
        self.head_toggles = [widgets.ToggleButton(description=f"H{h}",
                                                  layout=widgets.Layout(width="52px"))
                             for h in range(s.heads)]
        self.active_box = widgets.HBox(layout=widgets.Layout(flex_flow="row wrap"))
        self.summary = widgets.HTML()
        self.effect_image = self.image()
        self.tokens_image = self.image()
        self.predictions = widgets.HTML()
        self.run_button.on_click(self.callback("running the model", self.run_text))
        self.clear_button.on_click(self.callback("clearing interventions", self._on_clear))
        self.layer_slider.observe(self.callback("changing the layer", self._on_layer), "value")
        self.mode.observe(self.callback("changing the mode", self.sync_toggles), "value")
        for e, t in enumerate(self.expert_toggles):
            t.observe(self.callback(f"toggling expert {e}", self._expert_handler(e)), "value")
        for h, t in enumerate(self.head_toggles):
            t.observe(self.callback(f"toggling head {h}", self._head_handler(h)), "value")
        self.children = [
            self.header(),
            widgets.HBox([self.run_button, self.clear_button]),
            self.text,
            self.layer_slider,
            widgets.HBox([self.mode]),
            widgets.HBox(self.expert_toggles, layout=widgets.Layout(flex_flow="row wrap")),
            widgets.HBox([widgets.Label("ablate heads"), *self.head_toggles]),
            self.active_box,
            self.summary,
            self.effect_image,
            self.tokens_image,
            self.predictions,
            *self.footer(),
        ]
        self.guard("drawing", self.refresh)

    def sync_toggles(self) -> None:
        """Set the toggles from the state for the selected layer: an expert toggle is on when
        the expert holds any intervention (labelled and coloured by its kind, whatever mode
        is selected), a head toggle when the head is ablated; every active intervention, on
        any layer, is listed with a button that removes it."""
        s = self.state
        moe = s.layer in s.moe_layers
        with self.quiet():
            for e, t in enumerate(self.expert_toggles):
                mode = s.mode_of(s.layer, e) if moe else None
                t.disabled = not moe
                t.value = mode is not None
                t.description = f"E{e} {mode}" if mode else f"E{e}"
                t.button_style = MODE_STYLES.get(mode, "")
                t.tooltip = (f"layer {s.layer}: expert {e} is {DONE[mode]}; click to remove"
                             if mode else f"click to {self.mode.value} expert {e}")
            for h, t in enumerate(self.head_toggles):
                t.value = (s.layer, h) in s.ablated
                t.button_style = "danger" if t.value else ""
        self.active_box.children = [widgets.Label("active:"), *self._active_buttons()] \
            if s.active() else [widgets.Label("active: none")]

    def _active_buttons(self) -> list[widgets.Button]:
        buttons = []
        for kind, layer, i in self.state.active():
            what = f"H{i}" if kind == "ablate" else f"E{i}"
            b = widgets.Button(description=f"✕ {kind} L{layer} {what}",
                               tooltip="remove this intervention",
                               layout=widgets.Layout(width="auto"))
            b.on_click(self.callback(f"removing {kind} L{layer} {what}",
                                     self._remover(kind, layer, i)))
            buttons.append(b)
        return buttons

    def _remover(self, kind: str, layer: int, i: int) -> Any:
        def run() -> None:
            self.state.remove(kind, layer, i)
            self.state.update()
            self.refresh()
        return run

    def refresh(self) -> None:
        """Set the controls from the state and redraw (also after driving ``state`` from
        code)."""
        s = self.state
        with self.quiet():
            self.text.value = s.text
            self.layer_slider.value = s.layer
        self.sync_toggles()
        self.summary.value = s.summary_html()
        self.show(self.effect_image, s.render_effect())
        self.show(self.tokens_image, s.render_tokens())
        self.predictions.value = s.predictions_html()

    def _expert_handler(self, e: int) -> Any:
        def run() -> None:
            self.state.toggle(self.mode.value, self.state.layer, e)
            self.state.update()
            self.refresh()
        return run

    def _head_handler(self, h: int) -> Any:
        def run() -> None:
            self.state.toggle_head(self.state.layer, h)
            self.state.update()
            self.refresh()
        return run

    def _on_clear(self) -> None:
        self.state.clear()
        self.state.update()
        self.refresh()

    def _on_layer(self) -> None:
        self.state.set_layer(self.layer_slider.value)
        self.sync_toggles()
        self.show(self.tokens_image, self.state.render_tokens())
