"""The intervention, attention and parity explorers' figures at Scout and Maverick shape: 48
layers with 16 experts in every layer, or 128 experts on every other layer (tiny widths, random
weights). Figures stay bounded, legends short and layer axes thinned."""

from __future__ import annotations

import numpy as np
import pytest
from helpers_scale import MAX_LEGEND, legend_sizes

import workbench as wb
from workbench.random_weights import write_random_checkpoint

pytest.importorskip("ipywidgets")

#: Widget figures share the notebook width: at most 14 × 9 inches.
MAX_W, MAX_H = 14.0, 9.0
SMALL = dict(num_hidden_layers=48, hidden_size=16, intermediate_size=8, intermediate_size_mlp=16,
             num_attention_heads=4, num_key_value_heads=1, head_dim=4, vocab_size=256)


@pytest.fixture(scope="module", params=["scout", "maverick"])
def big(request, tmp_path_factory):
    cfg = wb.ModelConfig.tiny(num_local_experts=16, **SMALL) if request.param == "scout" else \
        wb.ModelConfig.tiny_maverick(num_local_experts=128, **SMALL)
    path = write_random_checkpoint(tmp_path_factory.mktemp(request.param) / "ckpt", cfg,
                                   seed=0, router_std=0.5)
    return wb.load(path)


def _bounded(fig) -> None:
    w, h = fig.get_size_inches()
    assert w <= MAX_W + 1e-6 and h <= MAX_H + 1e-6, (w, h)
    assert all(n <= MAX_LEGEND for n in legend_sizes(fig)), legend_sizes(fig)


def _ticks(ax, axis: str = "x") -> list[str]:
    labels = ax.get_xticklabels() if axis == "x" else ax.get_yticklabels()
    return [t.get_text() for t in labels if t.get_text()]


def test_intervention_figures_at_scale(big):
    from workbench.widgets.intervention import InterventionState
    moe = big.config.moe_layers
    E = big.config.num_local_experts
    s = InterventionState(big, tokenizer=None, max_tokens=32, layer=moe[-1])
    for e in range(0, E, 4):                       # a quarter of the last layer's experts
        s.toggle_ban(moe[-1], e)
    s.update()
    effect, tokens = s.render_effect(), s.render_tokens()
    for fig in (effect, tokens):
        _bounded(fig)
    ax_r = effect.axes[0]
    assert len(ax_r.patches) == len(moe)            # one bar per MoE layer, ...
    assert 2 <= len(_ticks(ax_r)) <= 8              # ... labelled sparsely
    assert _ticks(ax_r)[0] == f"L{moe[0]}"
    # tokens coloured by up to 20 experts: never a 128-entry legend
    assert legend_sizes(tokens) and max(legend_sizes(tokens)) <= MAX_LEGEND


def test_attention_figures_at_scale(big):
    from workbench.widgets.attention import AttentionState
    nope = big.config.nope_layers
    a = AttentionState(big, tokenizer=None, layer=nope[-1], max_tokens=96, max_labels=32)
    assert a.layer == 47 and a.layer_type() == "global NoPE"
    pattern, query = a.render_pattern(), a.render_query()
    for fig in (pattern, query):
        _bounded(fig)
    T = len(a.tokens)
    assert T > 32 and len(_ticks(pattern.axes[0])) <= 32      # labels thinned to max_labels
    assert len(query.axes[0].patches) == T


def test_parity_figures_at_scale(big):
    from workbench.widgets.parity import ParityState
    moe = big.config.moe_layers
    ps = ParityState(big, big, tokenizer=None, max_tokens=24)
    ps.set_layer(moe[-1])
    errors, flips = ps.render_errors(), ps.render_flips()
    for fig in (errors, flips):
        _bounded(fig)
    ticks = _ticks(errors.axes[0])
    assert "embed" in ticks and "final" in ticks and len(ticks) <= 28   # 48 layers, thinned
    x = [float(v) for c in errors.axes[0].collections for v in np.asarray(c.get_offsets())[:, 0]]
    assert max(x) >= 47                                  # every layer still drawn
    assert len(flips.axes[0].collections[0].get_offsets()) == 24
